"""Re-ranking through the CLI with a head from a separate test distribution the core does not know:
`test` logs global and re-ranked metrics, a head scoring by the global similarity reproduces the
global metrics under weighted fusion, 2 processes (gloo) equal 1 process on both ranks, and
`extract` → `search` runs end to end. Also the CLI's one-line errors."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, TINY_DATA, ForkedRun, ddp_env, finished, read_metrics, run_ddp, run_main
from rerank_plugin import make_rerank_distribution

DEMO = str(REPO / "experiments/demo.yaml")
SET = "minilandmarks"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("rerank_site")
    make_rerank_distribution(root)
    return str(root)


def rerank_args(cache_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", DEMO, f"--data.init_args.root={cache_root}", *TINY_DATA, "--trainer.logger=false",
            f"--trainer.default_root_dir={out}", "--trainer.callbacks+=retrieval_lightning.callbacks.MetricsToJson",
            f"--trainer.callbacks.output_dir={out}/metrics", "--model.eval_scales=[1.0]",
            "--model.heads.verifier.class_path=acme_cosine_rerank", "--model.rerank.k=8", *extra]


@pytest.mark.slow
def test_rerank_head_from_another_distribution_in_test_and_ddp(cache_root: Path, tmp_path: Path, plugin_path: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(plugin_path)  # the 1-process runs in this process, the DDP ranks forked
    one = tmp_path / "one"
    run_main(["test", *rerank_args(cache_root, one, "--model.rerank.fusion=weighted")], cwd=tmp_path)
    single = read_metrics(one / "metrics", "test")
    for name in ("mAP_E", "mAP_M", "mAP_H", "mP@5_H"):
        # the head's score is the global similarity: weighted fusion changes no order
        assert single[f"test/{SET}/reranked/{name}"] == single[f"test/{SET}/{name}"]
    stores = sorted((one / "rerank_store" / "test" / SET).glob("*/database/store"))
    assert len(stores) == 1 and (stores[0] / "manifest.json").is_file()
    # the same weights on other images (a smaller max_side): the entries are extracted again, not reused
    run_main(["test", *rerank_args(cache_root, one, "--model.rerank.fusion=weighted"),
              "--data.init_args.eval_max_side=64"], cwd=tmp_path)
    again = sorted((one / "rerank_store" / "test" / SET).glob("*/database/store"))
    assert len(again) == 1 and again[0] != stores[0]  # the other images' store replaced the first
    # ... unless another live run (other settings, the same directory) is using it: its folder is marked
    from retrieval_lightning.retrieval.workdirs import pid_space

    in_use = again[0].parent.parent / f".in-use-{pid_space()}-{os.getppid()}"
    in_use.touch()
    run_main(["test", *rerank_args(cache_root, one, "--model.rerank.fusion=weighted"),
              "--data.init_args.eval_max_side=80"], cwd=tmp_path)
    third = sorted((one / "rerank_store" / "test" / SET).glob("*/database/store"))
    assert len(third) == 2 and again[0] in third
    assert not list((one / "rerank_store").rglob(f".in-use-*-{os.getpid()}"))  # this run's markers are gone

    reversed_dir = tmp_path / "reversed"
    run_main(["test", *rerank_args(cache_root, reversed_dir, "--model.heads.verifier.init_args.sign=-1",
                                   "--model.rerank.fusion=lexicographic", "--model.rerank.shortlist=plain")],
             cwd=tmp_path)
    flipped = read_metrics(reversed_dir / "metrics", "test")
    assert flipped[f"test/{SET}/mAP_M"] == single[f"test/{SET}/mAP_M"]
    assert flipped[f"test/{SET}/reranked/mAP_M"] < single[f"test/{SET}/mAP_M"]  # the shortlist order was reversed

    two = tmp_path / "two"
    run_ddp(["test", *rerank_args(cache_root, two, "--model.heads.verifier.init_args.sign=-1",
                                  "--model.rerank.fusion=lexicographic", "--model.rerank.shortlist=plain")],
            cwd=tmp_path, env=ddp_env(plugin_path))
    assert read_metrics(two / "metrics", "test", 0) == flipped
    assert read_metrics(two / "metrics", "test", 1) == flipped


@pytest.mark.slow
def test_extract_then_search_end_to_end(cache_root: Path, tmp_path: Path, plugin_path: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(plugin_path)  # every command in this process: the plugin is found as installed
    fit_dir = tmp_path / "fit"
    run_main(["fit", *rerank_args(cache_root, fit_dir), "--trainer.max_steps=1"], cwd=tmp_path)
    ckpt = sorted(fit_dir.rglob("*.ckpt"))[-1]
    features = tmp_path / "features"
    run_main(["extract", *rerank_args(cache_root, tmp_path / "ex"), f"--ckpt_path={ckpt}",
              f"--output_dir={features}"], cwd=tmp_path)
    store = features / SET / "store"
    items = (features / SET / "items.tsv").read_text().splitlines()
    query_file = items[1].split("\t")[2]
    assert Path(query_file).is_file()
    out = run_main(["search", str(ckpt), str(store), query_file, "--k", "3", "--out", str(tmp_path / "s.png")],
                   cwd=tmp_path).stdout
    assert "rerank" in out and (tmp_path / "s.png").stat().st_size > 1000
    table = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert len(table) == 3
    # the query's own stored crop (item 0) is no result: the set's queries are left out of the search
    import json

    n_queries = json.loads((features / SET / "set.json").read_text())["queries"]
    assert Path(query_file).is_absolute() and n_queries > 0 and all(int(r[1]) >= n_queries for r in table)
    global_scores = [float(r[2]) for r in table]
    rerank_scores = [float(r[3]) for r in table]
    assert rerank_scores == sorted(rerank_scores, reverse=True)  # lexicographic: re-ranking score first
    assert all(abs(g - s) < 2e-3 for g, s in zip(global_scores, rerank_scores))  # the head re-computes the cosine

    # a database image searched for is sized as the store's images were (recorded by extract): itself, at cosine 1
    assert json.loads((features / SET / "image_resize.json").read_text()) == {"max_side": 96, "upscale": False}
    db_index, db_id, db_file = items[-1].split("\t")
    found = run_main(["search", str(ckpt), str(store), db_file, "--k", "1", "--out", str(tmp_path / "d.png")],
                     cwd=tmp_path)
    rank1 = [line.split() for line in found.stdout.splitlines() if line[:4].strip() == "1"][0]
    assert rank1[1] == db_index and rank1[-1] == db_id and float(rank1[2]) > 0.9995, found.stdout
    assert "note:" not in found.stderr
    # at its stored size (128 px) instead of the database's 96 the same image is another descriptor, with a note
    other = run_main(["search", str(ckpt), str(store), db_file, "--k", "1", "--max-side", "128",
                      "--out", str(tmp_path / "d.png")], cwd=tmp_path)
    assert "database images were sized to 96" in other.stderr
    assert float([line.split() for line in other.stdout.splitlines() if line[:4].strip() == "1"][0][2]) < 0.9995

    # --k past the shortlist: the re-ranked shortlist, then the global order (no re-ranking score)
    longer = run_main(["search", str(ckpt), str(store), query_file, "--k", "6", "--shortlist", "2",
                       "--out", str(tmp_path / "s.png")], cwd=tmp_path).stdout
    rows = [line.split() for line in longer.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 6 and all(r[3] != "-" for r in rows[:2]) and all(r[3] == "-" for r in rows[2:])
    assert [float(r[2]) for r in rows[2:]] == sorted((float(r[2]) for r in rows[2:]), reverse=True)
    assert "--shortlist must be at least 1, got 0" in _fails(["search", str(ckpt), str(store), query_file,
                                                              "--shortlist", "0"], tmp_path)
    assert "did you mean" in _fails(["search", str(ckpt), str(features / SET), query_file], tmp_path)
    if not torch.cuda.is_available():  # a GPU that is not there is one line, not a CUDA trace
        assert "--device cuda: no such CUDA device here" in _fails(["search", str(ckpt), str(store), query_file,
                                                                    "--device", "cuda"], tmp_path)
    on_cpu = run_main(["search", str(ckpt), str(store), query_file, "--k", "6", "--shortlist", "2", "--device", "cpu",
                       "--out", str(tmp_path / "c.png")], cwd=tmp_path).stdout
    assert on_cpu.replace("c.png", "s.png") == longer  # auto is the CPU here

    # a directory of queries, searched in batches: the same results whatever the batch size
    import shutil

    import retrieval_lightning.search_cli as search_cli

    folder = tmp_path / "queries"
    folder.mkdir()
    for line in items[1:4]:
        shutil.copy(line.split("\t")[2], folder)
    (folder / "notes.txt").write_text("not an image")
    seeded: list[int] = []  # RANSAC's seeds of a query's pairs follow its pixels, not its place in the list
    real_seeds = search_cli.pair_seeds
    monkeypatch.setattr(search_cli, "pair_seeds", lambda q, db: seeded.append(q) or real_seeds(q, db))
    whole = run_main(["search", str(ckpt), str(store), str(folder), "--out", str(tmp_path / "f.png")], cwd=tmp_path)
    assert whole.stdout.count("query ") == 3 and "notes.txt" not in whole.stdout
    from retrieval_lightning.retrieval.store import FeatureStore

    resize = search_cli.query_resize(FeatureStore.open(store), None)
    pixels = [search_cli.load_query_sized(str(f), resize)[0] for f in sorted(folder.glob("*.jpg"))]
    assert seeded == [search_cli.query_seed(image) for image in pixels] and len(set(seeded)) == 3
    monkeypatch.setattr(search_cli, "QUERY_BATCH", 2)
    monkeypatch.setattr(search_cli, "PICTURE_QUERIES", 1)
    batched = run_main(["search", str(ckpt), str(store), str(folder), "--out", str(tmp_path / "f.png")], cwd=tmp_path)
    assert batched.stdout.replace(" (the first 1 of 3 queries)", "") == whole.stdout
    # an unreadable query stops the search, or with --on-error skip is left out of it
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    assert "broken.jpg" in _fails(["search", str(ckpt), str(store), str(folder)], tmp_path)
    skipping = run_main(["search", str(ckpt), str(store), str(folder), "--on-error", "skip",
                         "--out", str(tmp_path / "f.png")], cwd=tmp_path)
    assert skipping.stdout.count("query ") == 3 and "skipped 1 unreadable of 4 queries" in skipping.stderr

    # the checkpoint alone rebuilds the model: same descriptors as the config + init_from
    from retrieval_lightning.cli import run_lightning_cli
    from retrieval_lightning.module import RetrievalModule

    rebuilt = RetrievalModule.load_from_checkpoint(ckpt)
    configured = run_lightning_cli(rerank_args(cache_root, tmp_path / "cfg", f"--model.init_from={ckpt}"),
                                   run=False).model.eval()
    image = torch.rand(3, 80, 96)
    assert torch.equal(rebuilt.embed_image(image), configured.embed_image(image))

    # a store is refused when the preprocessing changed (issue 12 item 5), naming what differs
    refused = _fails(["extract", *rerank_args(cache_root, tmp_path / "ex2", "--data.init_args.eval_max_side=80"),
                      f"--ckpt_path={ckpt}", f"--output_dir={features}"], tmp_path)
    assert refused.startswith("error: feature shard") and "eval_max_side" in refused

    # `evaluate` scores the extracted store: the global and re-ranked metrics `test` computes by embedding everything
    # again (the plugin's re-ranking reverses the shortlist here, so the re-ranked metrics differ from the global ones)
    reverse = ["--model.heads.verifier.init_args.sign=-1", "--model.rerank.shortlist=plain"]
    evaluated = run_main(["evaluate", *rerank_args(cache_root, tmp_path / "ev", *reverse), f"--ckpt_path={ckpt}",
                          f"--features_dir={features}"], cwd=tmp_path).stdout
    printed = {line.split()[0]: float(line.split()[1]) for line in evaluated.splitlines() if line.startswith("test/")}
    # the config's gallery, named by the checkpoint evaluated (as test's)
    assert (tmp_path / "ev" / "gallery" / f"evaluate_{SET}_ckpt{ckpt.stem}.png").stat().st_size > 1000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_main(["test", *rerank_args(cache_root, tmp_path / "te", *reverse), f"--ckpt_path={ckpt}"], cwd=tmp_path)
    # Lightning's note that the checkpoint's run kept its best checkpoints elsewhere: nothing to a test run
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    tested = read_metrics(tmp_path / "te" / "metrics", "test")
    assert printed and printed.keys() == tested.keys() and f"test/{SET}/reranked/mAP_M" in printed
    assert printed[f"test/{SET}/reranked/mAP_M"] < printed[f"test/{SET}/mAP_M"]
    assert all(abs(printed[k] - tested[k]) < 0.006 for k in tested), (printed, tested)  # printed to 2 decimals
    # alpha-QE and DBA (post-processing, not part of the store's identity) apply in both, alike
    post = [*reverse, "--model.postprocess.query_expansion=true", "--model.postprocess.dba=true",
            "--model.postprocess.qe_alpha=0", "--model.postprocess.dba_alpha=0"]
    logged = [a for a in rerank_args(cache_root, tmp_path / "evp", *post) if a != "--trainer.logger=false"]
    evaluated = run_main(["evaluate", *logged, f"--trainer.logger.init_args.save_dir={tmp_path / 'evp'}",
                          f"--ckpt_path={ckpt}", f"--features_dir={features}"], cwd=tmp_path).stdout
    # its W&B run (offline) holds the resolved config and the code version, as every other command's
    run_dir = next((tmp_path / "evp").rglob("offline-run-*"))
    assert yaml.safe_load((run_dir / "files" / "lightning_config.yaml").read_text())["features_dir"] == str(features)
    assert b'"git_commit"' in next(run_dir.glob("run-*.wandb")).read_bytes()
    expanded = {line.split()[0]: float(line.split()[1]) for line in evaluated.splitlines() if line.startswith("test/")}
    run_main(["test", *rerank_args(cache_root, tmp_path / "tep", *post), f"--ckpt_path={ckpt}"], cwd=tmp_path)
    tested_post = read_metrics(tmp_path / "tep" / "metrics", "test")
    assert expanded.keys() == tested.keys()
    assert all(abs(expanded[k] - tested_post[k]) < 0.006 for k in tested), (expanded, tested_post)
    assert any(abs(expanded[k] - printed[k]) > 0.01 for k in tested), "post-processing changed no metric"
    other = _fails(["evaluate", *rerank_args(cache_root, tmp_path / "ev2", "--data.init_args.eval_max_side=80"),
                    f"--ckpt_path={ckpt}", f"--features_dir={features}"], tmp_path)
    assert "'preprocessing.eval_max_side': store has 96, expected 80" in other
    missing = _fails(["evaluate", *rerank_args(cache_root, tmp_path / "ev3"), f"--ckpt_path={ckpt}",
                      f"--features_dir={tmp_path / 'none'}"], tmp_path)
    # said before the weights are loaded and the data set up (under DDP: before the launch)
    assert missing.startswith(f"error: --features_dir {tmp_path / 'none'}: no such directory; run `retrieval-"
                              "lightning extract` with the same arguments"), missing

    # an evaluation-only datamodule (num_classes 0) tests a trained checkpoint (issue 12 item 1)
    from test_cli import _overrides_for

    revisitop = _overrides_for(REPO / "experiments/eval_revisitop.yaml", cache_root, tmp_path / "rev")
    run_main(["test", "--config", str(REPO / "experiments/eval_revisitop.yaml"), *revisitop,
              "--model.heads.verifier.class_path=acme_cosine_rerank", f"--ckpt_path={ckpt}"], cwd=tmp_path)
    assert read_metrics(tmp_path / "rev" / "metrics", "test")[f"test/{SET}/reranked/mAP_M"] >= 0


def _fails(args: list[str], cwd: Path, in_subprocess: bool = False) -> str:
    """The command fails with status 2 and one ``error: ...`` line (no traceback); returns from that line on.

    In this process by default (seconds saved per command); ``in_subprocess``: in a process of its own, whose
    exit status is checked.
    """
    if in_subprocess:
        proc = finished(ForkedRun(args, cwd), expect=2)
    else:
        proc = run_main(args, cwd, status=2)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    first = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(first) == 1, proc.stderr[-2000:]
    return "\n".join(lines[first[0]:])


@pytest.mark.slow
def test_cli_errors_are_one_line_with_status_2(cache_root: Path, tmp_path: Path) -> None:
    unknown_head = _fails(["test", "--config", DEMO, "--model.heads.global.class_path=gem_arcfac"], tmp_path,
                          in_subprocess=True)
    assert "error: --model.heads.global.class_path: unknown head 'gem_arcfac'; did you mean 'gem_arcface'?" in unknown_head
    unknown_data = _fails(["fit", "--config", DEMO, "--data.class_path=minilandmark"], tmp_path)
    assert "unknown datamodule 'minilandmark'" in unknown_data and "'minilandmarks'" in unknown_data
    # values the classes refuse while being built (one dataclass refusal arrives wrapped in a union error)
    # (found by a review of every option: these failed with a traceback, most only after extraction, set-up or
    # imprinting, or were taken silently: `eval_scales=[0]` described every image from one pixel; the rest of
    # them in test_the_options_a_review_found_unchecked_are_refused_when_built)
    for override, message in [("--model.rerank.k=0", "rerank.k must be >= 1, got 0"),
                              ("--model.heads.global.init_args.margin=cos", "unknown margin 'cos'"),
                              ("--model.freeze=[verifier]", "not configured heads ['global']"),
                              ("--model.eval_scales=[1.0,0]", "eval_scales must be one or more finite factors > 0"),
                              ("--model.optim.name=adamx", "optim.name must be one of ('sgd', 'adamw')"),
                              ("--data.init_args.num_workers=-1", "--data.init_args.num_workers must be an integer >= 0")]:
        refused = _fails(["test", "--config", DEMO, override, f"--data.init_args.root={cache_root}"], tmp_path)
        assert refused.startswith("error: the configuration cannot be built: ") and message in refused, refused
    no_set = _fails(["extract", "--config", DEMO, f"--data.init_args.root={cache_root}", *TINY_DATA,
                     "--trainer.logger=false", f"--output_dir={tmp_path / 'features'}", "--eval_set=roxford5k"],
                    tmp_path)
    assert no_set.startswith("error: --eval_set 'roxford5k': the datamodule has no such eval set; it has ['minilandmarks']")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    for bad, said in ((["--shard_size=0", f"--output_dir={tmp_path / 'features'}"], "--shard_size must be >= 1"),
                      ([f"--output_dir={a_file}"], f"--output_dir {a_file}: is a file, not a folder")):
        refused = _fails(["extract", "--config", DEMO, f"--data.init_args.root={cache_root}", *TINY_DATA,
                          "--trainer.logger=false", *bad], tmp_path)
        assert refused.startswith(f"error: {said}"), refused

    bad_image = tmp_path / "broken.jpg"
    bad_image.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ckpt = tmp_path / "model.ckpt"
    _tiny_checkpoint(ckpt)
    store = tmp_path / "store"
    _tiny_store(store)
    out = _fails(["search", str(ckpt), str(store), str(bad_image)], tmp_path)
    assert out.startswith("error:") and "broken.jpg" in out

    foreign = tmp_path / "foreign.ckpt"
    import torch

    torch.save({"state_dict": {"something.else": torch.zeros(2)}}, foreign)
    out = _fails(["search", str(foreign), str(store), str(bad_image)], tmp_path)
    assert out.startswith("error:") and "foreign.ckpt" in out and "architecture record" in out

    wrong = _fails(["test", "--config", DEMO, f"--data.init_args.root={cache_root}", *TINY_DATA,
                    "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={ckpt}"], tmp_path)
    # what Lightning would fail on with a bare KeyError or IsADirectoryError
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "bare.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    for given, said in ((tmp_path, "is a directory"), (tmp_path / "bare.pt", "holds weights only.*--model.init_from"),
                        (tmp_path / "list.pt", "holds a list, not a checkpoint")):
        refused = _fails(["test", "--config", DEMO, f"--data.init_args.root={cache_root}", *TINY_DATA,
                          "--trainer.logger=false", f"--ckpt_path={given}"], tmp_path)
        assert re.match(rf"error: {re.escape(str(given))}: {said}", refused), refused
    nothing = _fails(["validate", "--config", DEMO, f"--data.init_args.root={cache_root}", *TINY_DATA,
                      "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"], tmp_path)
    assert nothing.startswith("error: validate evaluates nothing: trainer.limit_val_batches is 0"), nothing
    for command in ("test", "finetune"):  # finetune ran its whole first test before Lightning refused it
        best = _fails([command, "--config", DEMO, f"--data.init_args.root={cache_root}", *TINY_DATA,
                       "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=best"],
                      tmp_path)
        assert best.startswith("error: --ckpt_path best names the best checkpoint of a fit earlier in the same "
                               "Python process"), best
    assert wrong.startswith(f"error: checkpoint {ckpt} does not fit this model") and "missing" in wrong

    gnd_root = tmp_path / "revisitop"
    (gnd_root / "broken" / "jpg").mkdir(parents=True)
    (gnd_root / "broken" / "gnd_broken.pkl").write_bytes(b"\x80\x04not a pickle at all")
    malformed = _fails(["test", "--config", str(REPO / "experiments/eval_revisitop.yaml"),
                        f"--data.init_args.root={gnd_root}", "--data.init_args.datasets=[broken]",
                        "--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.devices=1",
                        f"--trainer.default_root_dir={tmp_path}"], tmp_path)
    assert malformed.startswith("error:") and "gnd_broken.pkl" in malformed

    other = tmp_path / "other.ckpt"
    _tiny_checkpoint(other, seed=1)
    out = _fails(["search", str(other), str(store), str(bad_image)], tmp_path)
    assert out.startswith("error:") and "another model" in out


def test_recipe_stage_errors_are_one_line(cache_root: Path, tmp_path: Path) -> None:
    """Two mistakes of a multi-stage recipe: data not downloaded yet (raised while the CLI links
    ``num_classes``, so it arrives wrapped by jsonargparse) and a stage run without ``init_from``."""
    no_data = _fails(["fit", "--config", str(REPO / "experiments/cvnet_r50_gldv2_global.yaml"),
                      f"--data.init_args.root={tmp_path / 'gldv2'}", "--model.backbone.init_args.weights=null",
                      "--trainer.logger=false"], tmp_path)
    assert no_data.startswith("error: GLDv2 training list not found: ") and "download gldv2" in no_data
    no_init = _fails(["fit", "--config", str(REPO / "experiments/cvnet_ds_demo.yaml"),
                      f"--data.init_args.root={cache_root}", *TINY_DATA, "--trainer.logger=false",
                      "--model.freeze=[backbone,global,verifier]", f"--trainer.default_root_dir={tmp_path}"], tmp_path)
    assert no_init.startswith("error: model.freeze keeps heads fixed whose weights were never trained or loaded: "
                              "'verifier': ") and "model.init_from is not set" in no_init


def _tiny_model(seed: int = 0):
    import torch

    from retrieval_lightning.backbone import Backbone
    from retrieval_lightning.head_plugins import gem_arcface
    from retrieval_lightning.module import RetrievalModule

    torch.manual_seed(seed)
    return RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface(dim=16)})


def _tiny_checkpoint(path: Path, seed: int = 0) -> None:
    _tiny_model(seed).save_checkpoint(path)


def _tiny_store(path: Path) -> None:
    import numpy as np

    from retrieval_lightning.retrieval.store import FeatureStore
    from retrieval_lightning.retrieval.identity import model_identity

    FeatureStore.from_arrays(path, {"global": np.eye(4, 16, dtype=np.float16)}, identity=model_identity(_tiny_model(0)))


def test_the_options_a_review_found_unchecked_are_refused_when_built(tmp_path: Path) -> None:
    """The classes refuse them when the config is built (the CLI prints such a refusal as one line, above)."""
    from datamodules.minilandmarks import MiniLandmarksDataModule
    from datamodules.revisitop import RevisitopDataModule
    from retrieval_lightning.backbone import Backbone
    from retrieval_lightning.head_plugins import gem_arcface
    from retrieval_lightning.module import RetrievalModule
    from retrieval_lightning.optim import OptimConfig
    from retrieval_lightning.retrieval.rerank import RerankConfig

    def module(**settings) -> RetrievalModule:
        return RetrievalModule(Backbone("resnet18", stages=["conv5"]), {"global": gem_arcface(dim=8)}, **settings)

    for build, message in [(lambda: module(eval_scales=[]), "eval_scales must be one or more finite factors > 0"),
                           (lambda: module(eval_scales=[-1.0]), "eval_scales must be one or more finite factors"),
                           (lambda: module(eval_scales=[float("nan")]), "eval_scales must be one or more finite"),
                           (lambda: module(search_chunk=0), "search_chunk must be >= 1"),
                           (lambda: RerankConfig(shard_size=0), "rerank.shard_size must be >= 1"),
                           (lambda: OptimConfig(schedule="foo"), "optim.schedule must be one of"),
                           (lambda: gem_arcface(dim=-4), "dim must be >= 1, or null"),
                           (lambda: MiniLandmarksDataModule(root=str(tmp_path), batch_size=0),
                            "--data.init_args.batch_size must be an integer >= 1"),
                           (lambda: MiniLandmarksDataModule(root=str(tmp_path), eval_batch_size=0),
                            "eval_batch_size must be an integer >= 1"),
                           (lambda: RevisitopDataModule(root=str(tmp_path), num_workers=-1),
                            "num_workers must be an integer >= 0"),
                           (lambda: RevisitopDataModule(root=str(tmp_path), eval_batch_size=0),
                            "eval_batch_size must be an integer >= 1")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            build()
    assert module(eval_scales=[1, 2]).eval_scales == (1.0, 2.0)  # ints, as a config may give them
