"""How a training run fails: divergence, crashes mid-step, bad labels, a checkpoint of another class count.

Found by a review of how training fails; each failed on the code before its fix (the docstrings say how).
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from helpers import REPO, TINY_DATA, run_main
from retrieval_lightning.backbone import Backbone
from retrieval_lightning.errors import UsageError
from retrieval_lightning.module import RetrievalModule
from retrieval_lightning.registry import HEADS

GemArcFace = HEADS.get("gem_arcface")


class PoisonAt(pl.Callback):
    """A run that diverges at optimiser step ``step``: a backbone weight turns NaN, as an overflow would."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.backbone.parameters()).fill_(float("nan"))


class CrashAt(pl.Callback):
    """An error inside a training step (a CUDA OOM, a bug in a head) once step ``step``'s batch was fetched."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")


def _demo(tmp_path: Path, cache_root: Path, callback: str, **init_args: int) -> tuple[list[str], Path]:
    """experiments/demo.yaml, tiny, a checkpoint every 2 steps (the latest kept, as in every shipped config)."""
    import yaml

    config = yaml.safe_load((REPO / "experiments/demo.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    config["trainer"]["callbacks"].insert(0, {"class_path": callback, "init_args": init_args})
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    return (["fit", "--config", str(path), "--trainer.max_steps=6", "--trainer.logger=false",
             "--model.heads.global.init_args.imprint=false", f"--data.init_args.root={cache_root}", *TINY_DATA,
             f"--trainer.default_root_dir={out}"], out / "checkpoints")


def _finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_diverging_fit_stops_naming_the_step_and_keeps_its_last_finite_checkpoint(cache_root: Path,
                                                                                       tmp_path: Path) -> None:
    """At HEAD the run trains on NaN to its end, exits 0, and its step checkpoints rotate the last finite one
    (step 2) away: only NaN weights remain (last.ckpt, step=0000006.ckpt)."""
    args, checkpoints = _demo(tmp_path, cache_root, f"{__name__}.PoisonAt", step=3)
    done = run_main(args, cwd=tmp_path, status=2)
    first = done.stderr.strip().splitlines()[-1]
    assert first.startswith("error: ") and re.search(r"step [34]\b", first), done.stderr[-2000:]
    assert re.search(r"nan|non-finite", first, re.IGNORECASE), first
    kept = sorted(checkpoints.glob("*.ckpt"))
    assert kept and all(_finite(path) for path in kept), [(p.name, _finite(p)) for p in kept]


def test_init_from_refuses_non_finite_weights(tmp_path: Path) -> None:
    """At HEAD ``--model.init_from`` of a diverged run's checkpoint (what the refusal to resume with other
    settings suggests) loads NaN weights silently, and the new run trains on NaN."""
    torch.manual_seed(0)
    source = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace()}, num_classes=3)
    with torch.no_grad():
        source.backbone.model.conv1.weight.fill_(float("nan"))
    path = tmp_path / "diverged.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.raises(UsageError, match=r"holds NaN/Inf in 1 tensors \(backbone\.model\.conv1\.weight\)"):
        RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace()}, num_classes=3,
                        init_from=str(path))
    fresh = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace()}, num_classes=3)
    with pytest.raises(UsageError, match=r"holds NaN/Inf"):
        fresh.load_weights(path)


def test_a_crash_mid_step_leaves_a_checkpoint_that_does_not_skip_the_unfinished_batch(cache_root: Path,
                                                                                       tmp_path: Path) -> None:
    """An error in step 4 (after its batch was fetched) writes on_exception.ckpt, which the next run resumes
    automatically. At HEAD its loader state counts the fetched batch (4 batches, 3 trained), so the resumed run
    never trains on that batch and is not the uninterrupted run (as Ctrl-C and SIGTERM, which wait for the batch's
    end, are)."""
    args, checkpoints = _demo(tmp_path, cache_root, f"{__name__}.CrashAt", step=3)
    with pytest.raises(RuntimeError, match="simulated crash at step 3"):
        run_main(args, cwd=tmp_path)
    saved = torch.load(checkpoints / "on_exception.ckpt", map_location="cpu", weights_only=False)
    loops = saved["loops"]["fit_loop"]
    trained = loops["epoch_loop.batch_progress"]["current"]["completed"]
    assert saved["global_step"] == trained == 3
    assert loops["state_dict"]["combined_loader"][0]["batches"] == trained, loops["state_dict"]


def test_labels_outside_the_classifier_are_named_in_one_line(tmp_path: Path) -> None:
    """A third-party datamodule whose labels are not 0 .. num_classes-1 (its own ids, -1 for "unknown"): before,
    an index RuntimeError from margins.py naming neither (a device-side assert on a GPU)."""
    torch.manual_seed(0)
    items = [{"image": torch.rand(3, 64, 64), "label": label, "index": i} for i, label in enumerate([0, 1, 2, 7])]
    module = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace(imprint=False)},
                             num_classes=5)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(UsageError, match=r"training labels run from 0 to 7, but the classifier has num_classes 5"):
        trainer.fit(module, torch.utils.data.DataLoader(items, batch_size=4))


def test_init_from_another_class_count_with_an_imprinted_classifier(tmp_path: Path) -> None:
    """Fine-tuning a model on other landmarks: with ``imprint: true`` the classifier is replaced from the new
    training set anyway, yet at HEAD init_from refuses its shape and nothing else lets the run start."""
    torch.manual_seed(0)
    source = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace()}, num_classes=10)
    path = tmp_path / "ten_classes.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace(imprint=True)},
                             num_classes=5, init_from=str(path))
    torch.testing.assert_close(target.backbone.model.conv1.weight, source.backbone.model.conv1.weight)


def test_pair_sampling_without_negatives_or_positives_is_a_one_line_error() -> None:
    """A training list of one landmark (or of single images) under ``sampling: pairs``: at HEAD a bare ValueError,
    which the CLI prints as a traceback from the mining callback, not the one ``error:`` line of a bad input."""
    from datamodules.pairs import PairMiner, PairSampling

    with pytest.raises(UsageError, match="at least two labels"):
        PairMiner([0, 0, 0], PairSampling())
    with pytest.raises(UsageError, match="two images"):
        PairMiner([0, 1, 2], PairSampling())


def test_no_checkpoint_or_store_takes_non_finite_weights_or_descriptors() -> None:
    """Weights that turned NaN in the step a checkpoint is due (an optimiser step on Inf gradients) are not
    written, so ModelCheckpoint neither writes them nor rotates the last finite file away; ``extract`` refuses
    NaN descriptors before a store takes them (it wrote a whole store of NaN, and ``search`` ranked it)."""
    from retrieval_lightning.divergence import NonFiniteWeightsError, TrainingDivergedError

    torch.manual_seed(0)
    module = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace()}, num_classes=3).eval()
    module.on_save_checkpoint({"state_dict": module.state_dict()})  # finite: fine
    images = torch.rand(2, 3, 64, 64)
    assert module.predict_step({"image": images, "index": torch.tensor([5, 6])}, 0)["global"].shape == (2, 512)
    with torch.no_grad():
        module.heads["global"].whiten.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"weights hold NaN/Inf \(heads\.global\.whiten\.weight\)"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})
    with pytest.raises(NonFiniteWeightsError, match=r"extract: the descriptors of 2 images \(dataset indices \[5, 6\]\)"):
        module.predict_step({"image": images, "index": torch.tensor([5, 6])}, 0)
