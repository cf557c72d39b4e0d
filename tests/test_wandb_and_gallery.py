"""W&B (offline, no API key): the resolved config reaches the run, twice in one directory without the
`config.yaml` clash; the query/top-k gallery picture is saved and logged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers import REPO, TINY_DATA, cli_env, run_forked, run_main


@pytest.mark.slow
def test_config_and_gallery_reach_wandb_offline(cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_dir = tmp_path / "wandb_runs"
    args = ["test", "--config", str(REPO / "experiments/demo.yaml"), f"--data.init_args.root={cache_root}", *TINY_DATA,
            f"--trainer.default_root_dir={tmp_path}/out", f"--trainer.logger.init_args.save_dir={save_dir}",
            "--model.heads.global.init_args.margin_m=0.123"]
    monkeypatch.setenv("WANDB_DIR", str(save_dir))
    run_main(args, cwd=tmp_path)
    run_main(args, cwd=tmp_path)  # a second run in the same save_dir must not clash

    runs = sorted(save_dir.rglob("offline-run-*"))
    assert len(runs) == 2, runs
    for run in runs:
        saved = yaml.safe_load((run / "files" / "lightning_config.yaml").read_text())
        assert saved["model"]["heads"]["global"]["init_args"]["margin_m"] == 0.123
        # the run.config update is a JSON record inside the offline run file (synced later)
        record = next(run.glob("run-*.wandb")).read_bytes()
        assert b'"margin_m":0.123' in record
        assert b'"class_path":"retrieval_lightning.backbone.Backbone"' in record
        media = list((run / "files" / "media" / "images").rglob("*.png"))
        assert media, f"no gallery image logged to {run}"

    pictures = sorted((tmp_path / "out").rglob("gallery/test_minilandmarks_step0*.png"))
    assert [p.name for p in pictures] == ["test_minilandmarks_step0.png", "test_minilandmarks_step0_2.png"]
    with Image.open(pictures[0]) as picture:
        assert picture.width > 400 and picture.height > 200


def test_a_reranked_gallery_shows_both_rankings_and_where_each_image_stood() -> None:
    import torch

    from retrieval_lightning.callbacks.gallery import NEGATIVE_COLOUR, gallery_rows

    dataset = [{"image": torch.full((3, 4, 4), i / 20)} for i in range(20)]  # 2 queries, then 18 database images
    before = torch.tensor([[5, 3, 8, 0], [1, 2, 4, 6]])  # global order, kept shortlist of 4
    before_marks = torch.tensor([[0, 1, 0, -1], [1, 0, 0, 0]], dtype=torch.int8)
    after = torch.tensor([[3, 9, 5], [1, 2, 4]])
    marks = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.int8)
    rows = gallery_rows(dataset, 2, after, marks, max_queries=2, k=3, before=before, before_relevance=before_marks)
    assert [row[0].caption for row in rows] == ["query 0, global", "query 0, re-ranked", "query 1, global",
                                                "query 1, re-ranked"]
    assert [t.caption for t in rows[0][1:]] == ["#1 db 5", "#2 db 3", "#3 db 8"]
    assert [t.caption for t in rows[1][1:]] == ["#1 db 3, from #2", "#2 db 9, from >#4", "#3 db 5, from #1"]
    assert rows[0][1].colour == NEGATIVE_COLOUR and rows[1][1].colour != NEGATIVE_COLOUR
    assert torch.equal(rows[1][2].image, dataset[2 + 9]["image"])  # database images follow the queries
    plain = gallery_rows(dataset, 2, after, marks, max_queries=2, k=3)
    assert [row[0].caption for row in plain] == ["query 0", "query 1"] and plain[0][1].caption == "#1 db 3"
    dataset[1]["unreadable"] = True  # on_error: skip's placeholder: its ranking is drawn, its AP counted 0
    assert [row[0].caption for row in gallery_rows(dataset, 2, after, marks, max_queries=2, k=3)] == [
        "query 0", "query 1\nunreadable: scored 0"]
    from retrieval_lightning.callbacks.gallery import _headline

    reranked, global_only = {"mAP_E": 90.0, "mAP_M": 70.25, "mP@5_M": 1.0}, {"mAP_E": 80.0, "mAP_M": 75.0}
    assert _headline(reranked, global_only) == "mAP_E 80.0 → 90.0, mAP_M 75.0 → 70.2"
    assert _headline(global_only) == "mAP_E 80.0, mAP_M 75.0"


def test_a_thumbnail_grid_puts_each_image_in_its_cell_inside_its_border(tmp_path: Path) -> None:
    """Pictures are drawn pixel by pixel onto one canvas: each image fitted into its cell (aspect kept),
    framed in its tile's colour (1 px black without one), an empty cell left white, long captions cut,
    long titles kept whole."""
    import torch

    from retrieval_lightning.thumbnail_grid import BORDER, CAPTION_PX, CELL, PAD, TITLE_PX, Tile, draw_rows

    red, blue = torch.zeros(3, 20, 40), torch.zeros(3, 40, 20)  # landscape and portrait
    red[0], blue[2] = 1.0, 1.0
    rows = [[Tile(red, "query"), Tile(blue, "#1 db 3", "#1a9850")], [Tile(None, "gone " * 40)]]
    path = draw_rows(rows, "title", tmp_path / "sub" / "grid.png")
    with Image.open(path) as opened:
        picture = opened.convert("RGB")
    top, caption, side = PAD + TITLE_PX + 5, CAPTION_PX + 3 + 3, CELL - 2 * BORDER
    row_height = caption + CELL + PAD
    assert picture.size == (PAD + 2 * (CELL + PAD), top + 2 * row_height)
    centre_y = top + caption + CELL // 2
    assert picture.getpixel((PAD + CELL // 2, centre_y)) == (255, 0, 0)
    blue_left = PAD + CELL + PAD + (CELL - side // 2) // 2  # a portrait image, centred: side/2 px wide
    assert picture.getpixel((blue_left + 2, centre_y)) == (0, 0, 255)
    assert picture.getpixel((blue_left - 2, centre_y)) == (0x1A, 0x98, 0x50)  # inside the 4 px border
    assert picture.getpixel((blue_left - BORDER - 2, centre_y)) == (255, 255, 255)
    red_top = top + caption + (CELL - side // 2) // 2  # landscape: side/2 px high
    assert picture.getpixel((PAD + CELL // 2, red_top - 1)) == (0, 0, 0)  # the 1 px black frame
    assert picture.getpixel((PAD + CELL // 2, red_top - 3)) == (255, 255, 255)
    assert picture.getpixel((PAD + CELL // 2, top + row_height + caption + CELL // 2)) == (255, 255, 255)
    # the long caption stays inside its cell: nothing drawn in the next column's caption band
    band = picture.crop((PAD + CELL + 2, top + row_height, 2 * (CELL + PAD), top + row_height + caption))
    assert band.getextrema() == ((255, 255),) * 3
    # a title wider than the grid (one query, a long metrics headline) widens the picture instead of being cut
    with Image.open(draw_rows([[Tile(red, "query")]], "mAP_M 75.0 → 70.2, " * 8, tmp_path / "titled.png")) as wide:
        assert wide.width > 8 * 100 and wide.height == top + row_height


def test_long_names_keep_their_ends_and_the_gallery_says_what_borders_mean() -> None:
    """Names sharing a long prefix were all cut to the same "oxford_trip_2019_summer_ph…"; a gallery's marks
    (revisitop's Medium setup) were explained nowhere in the picture (a review of the pictures)."""
    from PIL import ImageDraw

    from retrieval_lightning.callbacks.gallery import border_legend
    from retrieval_lightning.thumbnail_grid import CAPTION_PX, CELL, _fitted, _font

    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = _font(CAPTION_PX)
    names = [_fitted(draw, f"oxford_trip_2019_summer_photo_{i:04d}.jpg", font, CELL) for i in (1, 2)]
    assert names[0] != names[1] and all("…" in n and draw.textlength(n, font=font) <= CELL for n in names)
    assert names[0].startswith("oxford") and names[0].endswith("0001.jpg") and names[1].endswith("0002.jpg")
    assert _fitted(draw, "#1 db 3", font, CELL) == "#1 db 3"
    assert "Medium" in border_legend("revisitop") and "Medium" not in border_legend("gldv2_retrieval")
    assert border_legend("gldv2_retrieval").startswith("borders: green correct, red wrong, grey junk")


@pytest.mark.parametrize(("mode", "offline"), [("disabled", False), ("offline", True), ("", True)])
def test_without_an_api_key_the_logger_goes_offline_unless_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    mode: str, offline: bool) -> None:
    from retrieval_lightning.loggers import RetrievalWandbLogger

    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key either
    assert RetrievalWandbLogger(save_dir=str(tmp_path / "runs"), project="p")._offline is offline


def test_training_subcommands_keep_the_log_directorys_config_yaml() -> None:
    """``finetune`` (test, fit, test: its first stage a test) saves its config as ``fit`` does; the evaluating
    subcommands beside it, so a ``test`` in a training run's directory leaves that run's config alone."""
    from retrieval_lightning.callbacks.config import config_file_name

    assert config_file_name("fit") == config_file_name("finetune") == "config.yaml"
    assert [config_file_name(c) for c in ("test", "evaluate", "extract")] == [
        "config_test.yaml", "config_evaluate.yaml", "config_extract.yaml"]


@pytest.mark.slow
def test_wandb_mode_disabled_runs_without_wandb_files(cache_root: Path, tmp_path: Path) -> None:
    """``WANDB_MODE=disabled``: the command runs (the resolved config goes to the log directory, as
    without W&B) and no W&B run folder is written. A process of its own: W&B latches its settings per process."""
    env = cli_env()
    env.update(WANDB_MODE="disabled", HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))
    out = tmp_path / "out"
    run_forked(["test", "--config", str(REPO / "experiments/demo.yaml"), f"--data.init_args.root={cache_root}",
                *TINY_DATA, f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}/wb",
                "--trainer.callbacks=[]"], cwd=tmp_path, env=env)
    assert not list(out.rglob("offline-run-*")) and not list(out.rglob("run-*.wandb"))
    saved = list(out.rglob("config_test.yaml"))  # a test run's: a training run's config.yaml beside it stays
    assert saved and "gem_arcface" in saved[0].read_text() and not list(out.rglob("config.yaml"))


def test_a_run_records_the_commit_of_the_code_that_runs(tmp_path: Path) -> None:
    """W&B records the git state of the run's directory (scratch space on a cluster); the config gets the
    package's own commit, and none for a copy that no checkout tracks (an installed wheel)."""
    import shutil
    import subprocess

    from retrieval_lightning.loggers import code_version

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    here = code_version()
    assert here["git_commit"] == head and isinstance(here["git_dirty"], bool) and here["package_version"]
    copy = shutil.copytree(REPO / "retrieval_lightning", tmp_path / "site-packages" / "retrieval_lightning",
                           ignore=shutil.ignore_patterns("__pycache__"))
    assert code_version(Path(copy))["git_commit"] is None


def test_lightnings_flat_hyperparameters_go_under_hparams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's config holds the resolved config, nested; Lightning's flat copy of the module's and datamodule's
    arguments (a datamodule's ``seed`` reading as the run's) goes under ``hparams``, without ``_instantiator``."""
    from lightning.pytorch.loggers import WandbLogger

    from retrieval_lightning.loggers import RetrievalWandbLogger

    logged: list[dict] = []
    monkeypatch.setattr(WandbLogger, "log_hyperparams", lambda self, params: logged.append(params))
    logger = RetrievalWandbLogger(offline=True, save_dir=str(tmp_path), project="p")
    logger.log_hyperparams({"seed": 3, "optim": {"lr": 0.1}, "_instantiator": "lightning.pytorch.cli.instantiate"})
    assert logged == [{"hparams": {"seed": 3, "optim": {"lr": 0.1}}}]


def test_a_gallery_names_the_evaluated_weights_and_never_overwrites(tmp_path: Path) -> None:
    """``test --ckpt_path`` restores no step count: the picture is named after the checkpoint, not
    "step 0" (which reads as untrained); an existing picture gets a numbered neighbour."""
    from types import SimpleNamespace

    from retrieval_lightning.callbacks.gallery import free_path, weights_label

    fitting = SimpleNamespace(global_step=0, ckpt_path=None, state=SimpleNamespace(fn="fit"))
    assert weights_label(fitting) == "step 0"
    tested = SimpleNamespace(global_step=0, ckpt_path="/runs/a/checkpoints/0000300.ckpt",
                             state=SimpleNamespace(fn="test"))
    assert weights_label(tested) == "ckpt 0000300"
    module = SimpleNamespace(hparams={"init_from": "/runs/a/checkpoints/last.ckpt"})  # test --model.init_from
    from_init = SimpleNamespace(global_step=0, ckpt_path=None, state=SimpleNamespace(fn="test"),
                                lightning_module=module)
    assert weights_label(from_init) == "init_from last"
    module.hparams["init_from"] = None
    assert weights_label(from_init) == "step 0"  # what it is: weights nobody trained here or loaded
    resumed = SimpleNamespace(global_step=40, ckpt_path="/runs/a/last.ckpt", state=SimpleNamespace(fn="fit"))
    assert weights_label(resumed) == "step 40"
    # logged where Lightning logs the metrics it shows: its count of batches that stepped
    from retrieval_lightning.callbacks.gallery import metrics_step

    validating = SimpleNamespace(global_step=4, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
        _batches_that_stepped=3)))
    assert metrics_step(validating) == 3 and metrics_step(SimpleNamespace(global_step=5)) == 5
    # and in the section of the metrics it draws: evaluate's are logged as test/... (it was evaluate/...)
    from retrieval_lightning.callbacks.gallery import gallery_key

    assert [gallery_key(stage, "rox") for stage in ("validate", "test", "evaluate")] == [
        "val/rox/gallery", "test/rox/gallery", "test/rox/gallery"]
    first = tmp_path / "test_x_step0.png"
    assert free_path(first) == first
    first.write_bytes(b"png")
    assert free_path(first) == tmp_path / "test_x_step0_2.png"
    (tmp_path / "test_x_step0_2.png").write_bytes(b"png")
    assert free_path(first) == tmp_path / "test_x_step0_3.png"


@pytest.mark.parametrize("bad", [{"k": 11}, {"k": 0}, {"max_queries": 0}])
def test_a_gallery_larger_than_the_kept_shortlist_is_refused(bad: dict) -> None:
    from retrieval_lightning.callbacks.gallery import RetrievalGallery

    with pytest.raises(ValueError, match="RetrievalGallery"):
        RetrievalGallery(**bad)


def test_wandb_runs_carry_the_subcommand_and_the_run_their_weights_come_from(tmp_path: Path) -> None:
    """A test run is grouped as ``job_type`` test and names the checkpoint it evaluates and the W&B run that
    trained it; a verifier stage names the stage it starts from (``init_from``); a resumed fit continues its
    own run, so its ``--ckpt_path`` is no source; a ``job_type`` set in the config is kept."""
    from types import SimpleNamespace

    import torch

    from retrieval_lightning.loggers import RetrievalWandbLogger, label_wandb_runs

    trained = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"ResumeState": {"wandb": {"run_id": "abc123", "step": 7}}}}, trained)
    plain = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, plain)

    def labelled(subcommand: str, cli_config: dict, **init: object) -> dict:
        logger = RetrievalWandbLogger(offline=True, save_dir=str(tmp_path / "runs"), project="p", **init)
        label_wandb_runs(SimpleNamespace(loggers=[logger], is_global_zero=True), subcommand, cli_config)
        return logger._wandb_init

    tested = labelled("test", {"ckpt_path": str(trained), "model": {"init_from": None}},
                      job_type=None, config=None)  # as the CLI passes unset arguments
    assert tested["job_type"] == "test" and "anonymous" not in tested  # W&B warns whenever it is passed
    assert tested["config"]["weights_source"] == {"checkpoint": str(trained.resolve()), "wandb_run_id": "abc123"}
    stage = labelled("fit", {"ckpt_path": "last", "model": {"init_from": str(plain)}})
    assert stage["job_type"] == "fit" and stage["config"]["weights_source"]["wandb_run_id"] is None
    resumed = labelled("fit", {"ckpt_path": str(trained), "model": {"init_from": None}}, job_type="sweep")
    assert resumed["job_type"] == "sweep" and "weights_source" not in (resumed.get("config") or {})
