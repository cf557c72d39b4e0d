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
    for imprint in (False, True):  # the imprinting pass at fit start (the demo recipes imprint) reads them first
        module = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace(imprint=imprint)},
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
    from retrieval_lightning.divergence import TrainingDivergedError
    from retrieval_lightning.evaluation import NonFiniteDescriptorError

    torch.manual_seed(0)
    module = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace()}, num_classes=3).eval()
    module.on_save_checkpoint({"state_dict": module.state_dict()})  # finite: fine
    images = torch.rand(2, 3, 64, 64)
    assert module.predict_step({"image": images, "index": torch.tensor([5, 6])}, 0)["global"].shape == (2, 512)
    with torch.no_grad():
        module.heads["global"].whiten.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"weights hold NaN/Inf \(heads\.global\.whiten\.weight\)"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})
    with pytest.raises(NonFiniteDescriptorError, match=r"extract: the descriptors of 2 images \(dataset indices "
                                                       r"\[5, 6\]\)"):
        module.predict_step({"image": images, "index": torch.tensor([5, 6])}, 0)


def test_under_ddp_the_merged_store_is_refused_once_for_every_rank(tmp_path: Path) -> None:
    """Under DDP a rank refusing NaN descriptors in its step would raise alone and leave the others waiting at the
    barrier, so rank 0 checks the merged store instead (its errors reach every rank) and keeps no store of NaN."""
    from types import SimpleNamespace

    import numpy as np

    import retrieval_lightning.trainer as trainer_module
    from retrieval_lightning.evaluation import NonFiniteDescriptorError
    from retrieval_lightning.retrieval.writer import ShardWriter

    rows = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    rows[4, 1] = np.nan
    for rank in range(2):  # each rank's shard, as the two processes write them
        writer = ShardWriter(tmp_path / "set", rank, 8, {"model": 1}, {"global": "float16"})
        writer.add({"index": np.arange(rank, 6, 2), "global": rows[rank::2]})
        writer.close()
    spec = SimpleNamespace(name="set", dataset=list(range(6)), n_queries=2, image_ids=[f"img{i}" for i in range(6)])
    with pytest.raises(NonFiniteDescriptorError, match=r"1 descriptor\(s\) contain NaN/Inf, e.g. \['img4'\].*the store "
                                                       r"was not kept"):
        trainer_module._merge_set(spec, tmp_path / "set", {"model": 1})
    assert not (tmp_path / "set" / "store").exists()


def test_the_divergence_line_is_the_same_on_every_rank_and_16_mixed_tolerates_skipped_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP each rank printed its own losses (rank 0 a finite one, saying the loss was not finite): the line
    now names the ranks whose loss is not finite, the same on every rank, so it is printed once. Under 16-mixed the
    loss scaler skips an overflowing step, so a few non-finite losses in a row do not end the run."""
    import retrieval_lightning.divergence as divergence
    from retrieval_lightning.divergence import FP16_TOLERATED_STEPS, TrainingDivergedError, check_loss

    monkeypatch.setattr(divergence.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(divergence.dist, "all_reduce", lambda tensor, op: tensor.zero_())  # another rank's NaN
    monkeypatch.setattr(divergence, "gather_objects",
                        lambda mine: [mine, (False, {"train/global/arcface": float("nan")})])
    finite = torch.tensor(1.79)
    with pytest.raises(TrainingDivergedError, match=r"at step 3: the loss is not finite \(rank 1: "
                                                    r"train/global/arcface = nan\)"):
        check_loss(finite, {"train/global/arcface": finite}, 3, synced=True)
    monkeypatch.undo()
    nan = torch.tensor(float("nan"))
    assert [check_loss(nan, {"l": nan}, 3, False, "16-mixed", n) for n in (0, 1)] == [1, 2]
    assert check_loss(torch.tensor(0.5), {"l": torch.tensor(0.5)}, 4, False, "16-mixed", 7) == 0
    with pytest.raises(TrainingDivergedError, match=f"{FP16_TOLERATED_STEPS + 1} steps in a row under 16-mixed"):
        check_loss(nan, {"l": nan}, 9, False, "16-mixed", FP16_TOLERATED_STEPS)
    with pytest.raises(TrainingDivergedError, match=r"\(l = nan\)"):
        check_loss(nan, {"l": nan}, 3, False, "bf16-mixed", 0)
    # an overflowing forward that left NaN in the BatchNorm statistics is no skipped step: they stay NaN
    with pytest.raises(TrainingDivergedError, match=r"\(l = nan\)"):
        check_loss(nan, {"l": nan}, 3, False, "16-mixed", 0, state_finite=lambda: False)


def test_a_bad_label_on_one_ranks_batch_stops_every_rank_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A label only one rank's batch holds (labels counted from 1) raised on that rank alone, and the others, in
    the forward's collective, died with a gloo traceback: the flag is all-reduced and the line names the rank."""
    import retrieval_lightning.divergence as divergence
    from retrieval_lightning.divergence import check_labels

    monkeypatch.setattr(divergence.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(divergence.dist, "all_reduce", lambda tensor, op: tensor.fill_(1.0))  # another rank's
    monkeypatch.setattr(divergence, "gather_objects", lambda mine: [mine, (1, 10)])
    with pytest.raises(UsageError, match=r"training labels run from 1 to 10 on rank 1, but the classifier has "
                                         r"num_classes 10"):
        check_labels(torch.tensor([1, 2, 9]), 10, synced=True)  # this rank's labels are fine
    monkeypatch.undo()
    check_labels(torch.tensor([0, 9]), 10)
    check_labels(torch.tensor([5, 70]), 0)  # no classifier: labels are ids


def test_a_one_class_training_set_is_said_to_train_no_classifier() -> None:
    """A softmax over one class has a loss of 0 on every batch: a run on a one-landmark training set trained
    nothing (train/loss=0.000 at every step) and exited 0 without a word."""
    import warnings

    torch.manual_seed(0)
    one = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace()}, num_classes=1)
    with pytest.warns(UserWarning, match=r"one class: the classifier of \['global'\] has a loss of 0"):
        one.warn_if_one_class_trains_a_classifier()
    two = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace()}, num_classes=2)
    frozen = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace()}, num_classes=1,
                             freeze=["global"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two.warn_if_one_class_trains_a_classifier()
        frozen.warn_if_one_class_trains_a_classifier()


def test_an_error_moving_a_batch_to_the_device_rewinds_it_too() -> None:
    """An out-of-memory moving a batch to the device comes before Lightning counts the batch as ready: rewinding
    by the ready-but-unprocessed count missed it, and the resumed run skipped that batch."""
    from types import SimpleNamespace

    from datamodules.sampling import ResumableDataLoader
    from retrieval_lightning.callbacks.preemption import _rewind_unapplied_batch

    loader = ResumableDataLoader(list(range(10)), batch_size=2)
    batches = iter(loader)
    for _ in range(4):  # three trained, the fourth fetched when the transfer failed
        next(batches)
    progress = SimpleNamespace(ready=3, started=3, processed=3, completed=3)
    fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=progress)),
                               _combined_loader=SimpleNamespace(flattened=[loader, [1, 2]]))
    assert loader.state_dict()["batches"] == 4
    _rewind_unapplied_batch(SimpleNamespace(fit_loop=fit_loop))
    assert loader.state_dict()["batches"] == 3


def test_fit_with_no_training_batches_says_so(tmp_path: Path) -> None:
    """``limit_train_batches=0``: Lightning ends fit without training and without a word (exit status 0)."""
    items = [{"image": torch.rand(3, 64, 64), "label": i % 2, "index": i} for i in range(4)]
    module = RetrievalModule(Backbone("resnet18", stages=("conv5",)), {"global": GemArcFace(imprint=False)},
                             num_classes=2)
    trainer = pl.Trainer(max_steps=1, limit_train_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="trainer.limit_train_batches is 0: fit trains nothing"):
        trainer.fit(module, torch.utils.data.DataLoader(items, batch_size=4))
