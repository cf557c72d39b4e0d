"""A config's ``~/...`` paths: no shell expands ``~`` inside a YAML file or an ``--option=~/x`` argument, so the
readers expand it themselves (a literal ``~`` folder was made in the working directory, or the path was "missing")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrieval_lightning.errors import UsageError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    return tmp_path


def test_datamodule_roots_and_lists_under_home(home: Path) -> None:
    from datamodules.downloads import gldv2_files
    from datamodules.gldv2 import GLDv2DataModule
    from datamodules.minilandmarks import MiniLandmarksDataModule
    from datamodules.revisitop import RevisitopDataModule

    (home / "photos").mkdir()
    (home / "d" / "revisitop1m").mkdir(parents=True)
    (home / "d" / "revisitop1m" / "revisitop1m.txt").write_text("a\nb\n")
    revisitop = RevisitopDataModule(root="~/d", distractors="~/d/revisitop1m/revisitop1m.txt")
    assert revisitop.root == str(home / "d")
    names, base = revisitop._distractors()
    assert len(names) == 2 and base == str(home / "d" / "revisitop1m" / "jpg")
    assert GLDv2DataModule(root="~/g").root == str(home / "g")
    mini = MiniLandmarksDataModule(root="~/m", photo_dirs=["~/photos"])  # was refused: photo_dirs not found
    assert mini.root == str(home / "m") and mini.photo_dirs == [home / "photos"]
    assert all(str(item.dest).startswith(str(home / "g")) for item in gldv2_files("~/g", splits=["train"]))


def test_checkpoints_and_feature_folders_under_home(home: Path) -> None:
    from retrieval_lightning.checkpoints import load_tensor_file, open_checkpoint
    from retrieval_lightning.trainer import RetrievalTrainer

    torch.save({"state_dict": {"w": torch.ones(2)}}, home / "x.ckpt")
    assert open_checkpoint("~/x.ckpt")["state_dict"]["w"].sum() == 2
    assert "state_dict" in load_tensor_file("~/x.ckpt")
    (home / "features").mkdir()
    trainer = RetrievalTrainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(UsageError, match=f"--features_dir {home / 'nope'}: no such directory"):
        trainer.evaluate(None, None, features_dir="~/nope")  # type: ignore[arg-type]


def test_argparse_commands_expand_home(home: Path) -> None:
    """``--out=~/x`` and a quoted ``'~/x'`` reach the program unexpanded; search, match and import-checkpoint
    expand them as the LightningCLI subcommands do (they looked for, or wrote into, a folder named ``~``)."""
    from retrieval_lightning.importers import run_import
    from retrieval_lightning.match import _parser
    from retrieval_lightning.search_cli import run_search

    args = _parser().parse_args(["~/a.jpg", "~/b.jpg", "--out=~/m.png", "--checkpoint=~/c.ckpt"])
    assert (args.image_a, args.image_b) == (str(home / "a.jpg"), str(home / "b.jpg"))
    assert (args.out, args.checkpoint) == (str(home / "m.png"), str(home / "c.ckpt"))
    with pytest.raises(Exception, match=str(home / "missing.pyth")):
        run_import(["cvnet", "~/missing.pyth", "~/out.ckpt"])
    with pytest.raises(Exception, match=str(home / "missing.ckpt")):
        run_search(["~/missing.ckpt", "~/store", "~/q.jpg", "--out=~/s.png"])
