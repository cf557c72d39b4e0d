"""`retrieval-lightning import-checkpoint cvnet`: an official-layout CVNet file becomes a self-contained
checkpoint that re-ranks through `rerank_scores` with no other configuration; unknown formats are the
registry's one-line error."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, read_metrics, run_main
from retrieval_lightning.cli import main
from retrieval_lightning.module import RetrievalModule
from test_cli import _overrides_for
from test_cvnet_verifier import random_official_state


def test_import_checkpoint_command_gives_a_model_that_reranks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "CVPR2022_CVNet_R50.pyth"
    official = random_official_state(50)
    torch.save({"model_state": official, "epoch": 1}, source)
    out = tmp_path / "cvnet.ckpt"
    assert main(["import-checkpoint", "cvnet", str(source), str(out)]) == 0
    module = RetrievalModule.load_from_checkpoint(out)
    assert module.rerank.fusion == "weighted" and module.rerank.weight == 0.5  # the official fusion
    assert module.eval_resize == "opencv"  # the official tester's multi-scale resizing
    assert module.heads["verifier"].score_dtype == "float32"  # the official tester scores in fp32, on a GPU too
    gen = torch.Generator().manual_seed(0)
    query = torch.rand(3, 96, 128, generator=gen)
    candidates = [query, torch.rand(3, 112, 96, generator=gen)]
    scores = module.rerank_scores(query, candidates)
    assert scores.shape == (2,) and bool(((scores >= 0) & (scores <= 1)).all())
    entries = module.rerank_entries(candidates)
    assert torch.allclose(module.rerank_scores(query, entries), scores)

    capsys.readouterr()  # what the import printed (on a loaded machine, a progress bar shown after its delay)
    assert main(["import-checkpoint", "cvnt", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown checkpoint importer 'cvnt'; did you mean 'cvnet'?")
    assert main(["import-checkpoint", "delg", str(source), str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown checkpoint importer 'delg'. Registered checkpoint importers")

    # a file that pickles an object besides tensors: refused, unless the user trusts it
    pickled = tmp_path / "with_a_config_object.pyth"
    torch.save({"model_state": official, "cfg": argparse.Namespace(arch="R50")}, pickled)
    trusted = tmp_path / "trusted.ckpt"
    assert main(["import-checkpoint", "cvnet", str(pickled), str(trusted)]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle arbitrary objects" in err and "argparse.Namespace" in err
    assert ". If the file comes from a source you trust, add --trust-pickle" in err and ".. If" not in err
    assert not trusted.exists()
    assert main(["import-checkpoint", "cvnet", str(pickled), str(trusted), "--trust-pickle"]) == 0
    imported = torch.load(trusted, weights_only=True)["state_dict"]
    assert imported.keys() == module.state_dict().keys()
    assert all(torch.equal(imported[k], v) for k, v in module.state_dict().items())

    # a file that is not a whole CVNet: one line naming what is missing, and no output written
    state = dict(official)
    del state["cv_learner.mlp.2.weight"]
    torch.save({"model_state": state}, source)
    broken = tmp_path / "broken.ckpt"
    assert main(["import-checkpoint", "cvnet", str(source), str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: official CVNet R50 checkpoint does not fit: missing ['heads.verifier.learner.")
    assert len(err.strip().splitlines()) == 1 and not broken.exists()


@pytest.fixture(scope="module")
def imported_r50(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-layout R50 file of random weights, imported: the checkpoint the commands below run."""
    folder = tmp_path_factory.mktemp("imported")
    source = folder / "CVPR2022_CVNet_R50.pyth"
    torch.save({"model_state": random_official_state(50)}, source)
    ckpt = folder / "cvnet_r50.ckpt"
    assert main(["import-checkpoint", "cvnet", str(source), str(ckpt)]) == 0
    return ckpt


@pytest.mark.slow
def test_imported_checkpoint_tests_through_the_official_tester_config(cache_root: Path, tmp_path: Path,
                                                                      imported_r50: Path) -> None:
    """`test --config experiments/eval_cvnet_revisitop.yaml --ckpt_path <imported>`: the config's model
    is the importer's (every tensor fits), and the run logs global and re-ranked revisitop metrics."""
    ckpt = imported_r50
    config = REPO / "experiments" / "eval_cvnet_revisitop.yaml"
    overrides = [o for o in _overrides_for(config, cache_root, tmp_path) if not o.startswith("--model.backbone")]
    run_main(["test", "--config", str(config), *overrides, f"--ckpt_path={ckpt}"], cwd=tmp_path)
    metrics = read_metrics(tmp_path / "metrics", "test")
    assert {"test/minilandmarks/mAP_H", "test/minilandmarks/reranked/mAP_H"} <= set(metrics)


def test_an_imported_checkpoint_evaluates_with_a_datamodule_and_no_model_config(
        cache_root: Path, tmp_path: Path, imported_r50: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """#9: the imported model re-ranks through ``test`` "with no other configuration": the parser wanted
    ``model.backbone`` and ``model.heads``, which the checkpoint records. Without a model in the command line or a
    config, the model is the checkpoint's own; ``--model.*`` still overrides it, a config's model replaces it."""
    import logging

    from retrieval_lightning.cli import run_lightning_cli
    from retrieval_lightning.trainer import RetrievalTrainer

    ckpt = imported_r50
    ran: list = []
    argvs: list = []
    monkeypatch.setattr(sys, "argv", ["retrieval-lightning"])

    def instead_of(command: str):
        @functools.wraps(getattr(RetrievalTrainer, command))  # the parser reads the command's options from it
        def record(self, model, *args, **kwargs) -> None:
            ran.append(model)
            argvs.append(sys.argv[1:])
        return record

    for command in ("test", "extract"):
        monkeypatch.setattr(RetrievalTrainer, command, instead_of(command))
    data = ["--data=minilandmarks", f"--data.init_args.root={cache_root}", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}"]
    command = ["test", *data, f"--ckpt_path={ckpt}", "--model.rerank.k=7",
               "--model.heads.verifier.init_args.batch_size=8"]  # a head's setting overrides, too
    with caplog.at_level(logging.INFO):
        run_lightning_cli(command)
        run_lightning_cli(["extract", *data, f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'features'}"])
    assert f"--ckpt_path {ckpt}: no model configured, so the model is the checkpoint's own (backbone resnet50, " \
           "heads ['global', 'verifier'])" in caplog.text
    imported = RetrievalModule.load_from_checkpoint(ckpt)
    assert [model.heads["verifier"].batch_size for model in ran] == [8, imported.heads["verifier"].batch_size]
    # what W&B records and DDP re-launches is the command as given, not one naming a temporary model config
    assert argvs[0] == command and not any("retrieval-lightning-models" in arg for arg in argvs[1])
    for model, k in zip(ran, (7, 100)):
        assert type(model.heads["verifier"]).__name__ == "cvnet_verifier" and model.rerank.k == k  # its alias
        assert model.backbone.feature_arguments() == imported.backbone.feature_arguments()  # BGR, its statistics
        assert (model.eval_scales, model.eval_resize) == (imported.eval_scales, imported.eval_resize)
        # every tensor of the checkpoint, and a classifier for the datamodule's classes (training only)
        assert set(model.state_dict()) - set(imported.state_dict()) == {"heads.global.classifier.weight"}
    ran.clear()
    run_lightning_cli(["test", "--config", str(REPO / "experiments" / "demo.yaml"), *data, f"--ckpt_path={ckpt}"])
    assert list(ran[0].heads) == ["global"]  # the config's model, not the checkpoint's
    # a checkpoint without an architecture record cannot stand in for a model config: the parser's error
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, bare)
    with pytest.raises(SystemExit):
        run_lightning_cli(["test", *data, f"--ckpt_path={bare}"])


def test_a_checkpoints_model_config_is_one_file_per_model_not_per_run() -> None:
    """The model config an evaluation with ``--ckpt_path`` alone reads was a new temporary file per run, removed
    only at a normal exit: a cancelled evaluation job (SIGTERM) or each call in a notebook left one more."""
    from retrieval_lightning.checkpoint_model import write_model_config

    config = {"model": {"backbone": {"class_path": "x", "init_args": {"name": "resnet50"}}, "heads": {}}}
    first = write_model_config(config)
    assert write_model_config(dict(config)) == first  # the same model: the same file, written once
    other = write_model_config({"model": {**config["model"], "eval_scales": [1.0]}})
    assert other != first and Path(first).parent == Path(other).parent
    assert yaml.safe_load(Path(first).read_text()) == config
    assert not [p for p in Path(first).parent.iterdir() if p.name.startswith(".")]  # no temporary part left
