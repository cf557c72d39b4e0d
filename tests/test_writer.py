"""FeatureStoreWriter: shards, identity, resume, merge; a 2-process DDP run killed and restarted."""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ForkedRun, finished, free_port
from retrieval_lightning.errors import DataFormatError, UsageError
from retrieval_lightning.retrieval.store import FeatureStore, StoreIdentityError, identity_differences
from retrieval_lightning.retrieval.identity import datamodule_identity, model_identity, module_identity
from retrieval_lightning.retrieval.writer import completed_indices, list_shards, merge_shards, remaining_subset

N_ITEMS = 30
IDENTITY = {"model": "tiny-sine", "version": 1}

# A tiny deterministic extractor. Every output depends on the sample alone (elementwise maths,
# no batch-size-dependent kernels), so any split into ranks and batches gives the same bytes.
SCRIPT = textwrap.dedent(
    """
    import argparse, os
    import torch
    import lightning as L
    from torch.utils.data import DataLoader, Dataset
    from retrieval_lightning.retrieval.writer import FeatureStoreWriter, remaining_subset

    class Items(Dataset):
        def __len__(self):
            return N_ITEMS

        def __getitem__(self, i):
            return {"index": i, "x": torch.full((4,), float(i))}

    class Tiny(L.LightningModule):
        def __init__(self, crash_after):
            super().__init__()
            self.freq = torch.nn.Parameter(torch.linspace(0.1, 0.8, 8), requires_grad=False)
            self.crash_after = crash_after

        def predict_step(self, batch, batch_idx):
            if self.crash_after is not None and self.global_rank == 0 and batch_idx == self.crash_after:
                os._exit(17)  # a crash: no clean-up, no flush of the buffered samples
            x = batch["x"][:, :1]
            glob = torch.nn.functional.normalize(torch.sin(x * self.freq), dim=1)
            local = [torch.arange(int(i) % 4 * 3, dtype=torch.float32).reshape(-1, 3) + float(i)
                     for i in batch["index"]]
            return {"index": batch["index"], "global": glob, "local_desc": local}

    def run(out, devices, crash_after):
        data = remaining_subset(Items(), out)
        if len(data):
            writer = FeatureStoreWriter(out, shard_size=4, model_identity=IDENTITY)
            trainer = L.Trainer(
                accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[writer],
            )
            trainer.predict(Tiny(crash_after), DataLoader(data, batch_size=2), return_predictions=False)

    if __name__ == "__main__":
        p = argparse.ArgumentParser()
        p.add_argument("--out")
        p.add_argument("--devices", type=int)
        p.add_argument("--crash-after", type=int, default=None)
        args = p.parse_args()
        run(args.out, args.devices, args.crash_after)
    """
).replace("N_ITEMS", str(N_ITEMS)).replace("IDENTITY)", f"{IDENTITY!r})")


def _extract(script: Path, out: Path, devices: int, crash_after: int | None = None) -> int:
    """Run the script on ``devices`` ranks and return rank 0's exit code.

    The ranks are started together, as torchrun would (``LOCAL_RANK`` set, so Lightning does not
    re-launch them one after the other), each forked from the import server (``helpers.ForkedRun``).
    A crashed rank 0 leaves the others waiting for it: they are killed once rank 0 is gone.
    """
    args = ["--out", str(out), "--devices", str(devices)]
    if crash_after is not None:
        args += ["--crash-after", str(crash_after)]
    port = str(free_port())
    ranks = [ForkedRun(args, out.parent, {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                          "LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(devices),
                                          "GLOO_SOCKET_IFNAME": "lo"}, script=script)
             for rank in range(devices)]
    first = ranks[0].wait(120)
    if crash_after is not None:  # the others wait for the crashed rank 0
        for rank in ranks[1:]:
            rank.kill_group()
    else:
        assert first.returncode == 0, first.stderr[-3000:]
    if ranks[1:]:
        finished(ranks[1:], expect=None if crash_after is not None else 0, timeout=60)
    return first.returncode


def _load_script(script: Path):
    spec = importlib.util.spec_from_file_location("extract_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _store_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.slow
def test_killed_two_process_extraction_resumes_to_identical_store(tmp_path) -> None:
    script = tmp_path / "extract.py"
    script.write_text(SCRIPT)

    # the uninterrupted single-process run, in this process (one device: no DDP, no relaunch)
    single = tmp_path / "single"
    extractor = _load_script(script)
    extractor.run(single, devices=1, crash_after=None)
    reference = merge_shards(single, progress=False, expect_identity=IDENTITY, expected_indices=range(N_ITEMS))

    parts = tmp_path / "ddp"
    assert _extract(script, parts, devices=2, crash_after=5) == 17
    done = completed_indices(parts, IDENTITY)
    assert 0 < len(done) < N_ITEMS, done  # killed part-way, after some shards were written
    (parts / ".shard-r0000-s000099.npz.tmp-1").write_bytes(b"half a shard")  # never counted
    assert len(remaining_subset(list(range(N_ITEMS)), parts)) == N_ITEMS - len(done)

    _extract(script, parts, devices=2)
    assert len(completed_indices(parts)) == N_ITEMS
    merged = merge_shards(parts, progress=False, expect_identity=IDENTITY, expected_indices=range(N_ITEMS))

    assert _store_bytes(merged.path) == _store_bytes(reference.path)
    assert merged.array("global").dtype == np.float16
    np.testing.assert_array_equal(merged.index, np.arange(N_ITEMS))
    for i in (0, 7, 29):
        want = np.arange(i % 4 * 3, dtype=np.float32).reshape(-1, 3) + i
        np.testing.assert_array_equal(merged.get("local_desc", [i])[0], want)


# ---- in-process checks (one device, no relaunch) ---------------------------------------------


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": i}


def _predict(out: Path, data, identity=IDENTITY, shard_size: int = 4, dim: int = 3) -> None:
    import lightning as L

    from retrieval_lightning.retrieval.writer import FeatureStoreWriter

    class Module(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            idx = batch["index"]
            return {"index": idx, "global": idx[:, None].float().repeat(1, dim) / 64}

    writer = FeatureStoreWriter(out, shard_size=shard_size, model_identity=identity)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[writer],
    )
    trainer.predict(Module(), torch.utils.data.DataLoader(data, batch_size=3), return_predictions=False)


def test_shards_are_sized_named_and_resumable(tmp_path) -> None:
    _predict(tmp_path, torch.utils.data.Subset(_Items(20), range(10)))
    names = [p.name for p in list_shards(tmp_path)]
    assert names == ["shard-r0000-s000000.npz", "shard-r0000-s000001.npz", "shard-r0000-s000002.npz"]
    with np.load(tmp_path / names[0]) as z:
        assert z["index"].tolist() == [0, 1, 2, 3] and z["global"].dtype == np.float16
        assert json.loads(str(z["__meta__"]))["identity"] == IDENTITY
    rest = remaining_subset(_Items(20), tmp_path, expect_identity=IDENTITY)
    assert list(rest.indices) == list(range(10, 20))
    _predict(tmp_path, rest)  # the rerun continues the sequence instead of overwriting shards
    assert [p.name for p in list_shards(tmp_path)][3] == "shard-r0000-s000003.npz"
    store = merge_shards(tmp_path, expected_indices=range(20), progress=False)
    np.testing.assert_array_equal(store.array("global")[:, 0], (np.arange(20) / 64).astype(np.float16))
    assert store.bytes_per_image == {"global": 6.0}
    assert FeatureStore.open(tmp_path / "store", expect_identity=IDENTITY).count == 20


def test_other_model_identity_is_refused(tmp_path) -> None:
    _predict(tmp_path, _Items(5))
    with pytest.raises(ValueError, match="different model or config.*'version': store has 1, expected 2"):
        _predict(tmp_path, _Items(5), identity={**IDENTITY, "version": 2})
    with pytest.raises(ValueError, match="different model or config"):
        completed_indices(tmp_path, {"model": "other", "version": 1})


def test_merge_reports_missing_indices(tmp_path) -> None:
    _predict(tmp_path, torch.utils.data.Subset(_Items(9), [0, 1, 2, 5]))
    with pytest.raises(UsageError, match=r"5 expected dataset indices missing \(first \[3, 4, 6, 7, 8\]\)"):
        merge_shards(tmp_path, expected_indices=range(9), progress=False)
    with pytest.raises(FileNotFoundError, match="no feature shards"):
        merge_shards(tmp_path / "empty", progress=False)


def test_module_identity_tracks_weights() -> None:
    a = torch.nn.Linear(3, 2)
    same = torch.nn.Linear(3, 2)
    same.load_state_dict(a.state_dict())
    assert module_identity(a, size=512) == module_identity(same, size=512)
    with torch.no_grad():
        same.bias[0] += 1
    assert module_identity(a)["weights_sha256"] != module_identity(same)["weights_sha256"]


def test_a_store_identity_skips_the_arguments_that_shape_only_training(tmp_path: Path) -> None:
    """A store extracted under one training recipe is evaluated under another (other crops, pair batches,
    batch sizes); an argument that changes the evaluation images is still part of the identity."""
    from datamodules.gldv2 import GLDv2DataModule
    from datamodules.minilandmarks import MiniLandmarksDataModule
    from datamodules.pairs import PairSampling
    from retrieval_lightning.retrieval.identity import datamodule_identity

    base = datamodule_identity(GLDv2DataModule(root=str(tmp_path)))
    training = GLDv2DataModule(root=str(tmp_path), image_size=256, crop_area_min=0.1, sampling="pairs",
                               pairs=PairSampling(groups_per_batch=2, seed=0), sampler_seed=3, eval_batch_size=2)
    assert datamodule_identity(training) == base
    # on_error: extract stopped by a bad image, then resumed with on_error skip as its error says (and back)
    assert datamodule_identity(GLDv2DataModule(root=str(tmp_path), on_error="skip")) == base
    assert datamodule_identity(GLDv2DataModule(root=str(tmp_path), eval_max_side=512)) != base
    mini = datamodule_identity(MiniLandmarksDataModule(root=str(tmp_path)))
    assert datamodule_identity(MiniLandmarksDataModule(root=str(tmp_path), image_size=96, crop_area_min=0.5)) == mini
    assert datamodule_identity(MiniLandmarksDataModule(root=str(tmp_path), eval_max_side=96)) != mini
    # a store written when training arguments still counted is read as before
    from retrieval_lightning.retrieval.store import identity_differences
    written_before = {**base, "preprocessing": {**base["preprocessing"], "image_size": 512, "sampling": "pairs",
                                                "on_error": "raise"}}
    written_before.pop("preprocessing_uncounted")
    assert identity_differences(written_before, base) == []
    assert identity_differences(base, {**base, "preprocessing": {**base["preprocessing"], "eval_max_side": 512}})
    # an argument that changes evaluation images is not excused by its absence from this datamodule
    other = {**base, "preprocessing": {**base["preprocessing"], "query_box_rounding": "floor"}}
    assert identity_differences(other, base) == ["'preprocessing.query_box_rounding'='floor' in store but not expected"]


def _shards(out: Path, n: int, shard_size: int = 4) -> list[Path]:
    from retrieval_lightning.retrieval.writer import ShardWriter

    writer = ShardWriter(out, rank=0, shard_size=shard_size, identity=IDENTITY)
    idx = np.arange(n)
    writer.add({"index": idx, "global": np.repeat(idx[:, None] / 64, 3, axis=1)})
    writer.close()
    return list_shards(out)


def test_truncated_shard_is_reported_by_name(tmp_path) -> None:
    shards = _shards(tmp_path, 10)
    raw = shards[1].read_bytes()
    shards[1].write_bytes(raw[: len(raw) // 2])  # a copy cut short: zipfile.BadZipFile inside numpy
    for call in (lambda: completed_indices(tmp_path, IDENTITY), lambda: merge_shards(tmp_path, progress=False)):
        with pytest.raises(DataFormatError, match=rf"feature shard \S*{shards[1].name} is damaged.*BadZipFile"):
            call()


def test_corrupted_shard_member_is_reported_by_name_and_leaves_no_build_folder(tmp_path) -> None:
    shards = _shards(tmp_path, 10)
    raw = bytearray(shards[2].read_bytes())
    data = (np.repeat(np.arange(8, 10)[:, None] / 64, 3, axis=1)).astype(np.float16).tobytes()
    pos = raw.find(data)
    assert pos > 0
    raw[pos + 1] ^= 0xFF  # headers and index intact; the descriptors fail their CRC
    shards[2].write_bytes(bytes(raw))
    assert completed_indices(tmp_path, IDENTITY).tolist() == list(range(10))
    with pytest.raises(ValueError, match=rf"feature shard \S*{shards[2].name} is damaged.*CRC"):
        merge_shards(tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []


def test_item_names_are_read_by_line_offset_and_a_reordered_file_is_still_read(tmp_path: Path) -> None:
    """`search` prints a few names from sets of millions: the table holds line offsets, not every row;
    a file whose rows are not in index order (edited by hand) is read whole instead of misnamed."""
    from retrieval_lightning.retrieval.set_files import ItemTable, read_items

    rows = [f"{i}\tid{i}\t/data/é{i}.jpg" for i in range(50)]
    (tmp_path / "items.tsv").write_text("index\tid\tpath\n" + "\n".join(rows) + "\n", encoding="utf-8")
    table = read_items(tmp_path)
    assert isinstance(table, ItemTable) and len(table) == 50
    assert table.get(0) == ("id0", "/data/é0.jpg") and table.get(49) == ("id49", "/data/é49.jpg")
    assert table.get(50, ("50", "")) == ("50", "") and table._whole is None  # never read whole
    (tmp_path / "items.tsv").write_text("index\tid\tpath\n" + "\n".join(reversed(rows)) + "\n", encoding="utf-8")
    assert ItemTable(tmp_path / "items.tsv").get(3) == ("id3", "/data/é3.jpg")
    assert read_items(tmp_path / "nowhere") == {}


def test_placeholders_of_unreadable_images_are_retried_and_replaced(tmp_path) -> None:
    """``on_error: skip`` stores a blank placeholder: a re-run extracts that image again, the merge takes the
    readable row, and until then the store names the placeholders."""
    from types import SimpleNamespace

    from retrieval_lightning.retrieval.writer import UNREADABLE, ShardWriter, placeholder_note

    first = ShardWriter(tmp_path, rank=0, shard_size=8, identity=IDENTITY)
    first.add({"index": np.arange(4), "global": np.zeros((4, 2), np.float16),
               UNREADABLE: np.array([0, 1, 0, 0], np.uint8)})
    first.close()
    assert completed_indices(tmp_path, IDENTITY).tolist() == [0, 2, 3]  # image 1 is to be extracted again
    store = merge_shards(tmp_path, expected_indices=range(4), progress=False)
    assert "1 of 4 images were unreadable" in placeholder_note(store, "set", ["a", "b", "c", "d"])
    assert "['b']" in placeholder_note(store, "set", ["a", "b", "c", "d"])
    second = ShardWriter(tmp_path, rank=0, shard_size=8, identity=IDENTITY)  # the re-run, once the file is fixed
    second.add({"index": np.array([1]), "global": np.ones((1, 2), np.float16), UNREADABLE: np.array([0], np.uint8)})
    second.close()
    store = merge_shards(tmp_path, expected_indices=range(4), progress=False, overwrite=True)
    assert store.array("global")[1].tolist() == [1.0, 1.0] and placeholder_note(store, "set") is None
    assert placeholder_note(SimpleNamespace(kinds={}), "set") is None  # a store written before the flag existed


def test_a_failed_shard_write_leaves_no_partial_file_and_names_the_shard(tmp_path, monkeypatch) -> None:
    from retrieval_lightning.retrieval import writer as writer_module
    from retrieval_lightning.retrieval.writer import ShardWriter, StoreWriteError

    stale = tmp_path / ".shard-r0000-s000004.npz.tmp-999"  # left by a writer killed mid-write
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"x" * 100)
    writer = ShardWriter(tmp_path, rank=0, shard_size=2, identity=IDENTITY)
    assert not stale.exists()
    writer.add({"index": np.arange(2), "global": np.zeros((2, 3), np.float16)})  # one finished shard

    def full_disk(f, **arrays):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module.np, "savez", full_disk)
    with pytest.raises(StoreWriteError, match=r"writing feature shard \S*shard-r0000-s000001.npz failed.*No space"):
        writer.add({"index": np.arange(2, 4), "global": np.zeros((2, 3), np.float16)})
    assert [p.name for p in tmp_path.iterdir()] == ["shard-r0000-s000000.npz"]


def test_an_extraction_begun_by_an_earlier_version_is_finished_and_merged(tmp_path) -> None:
    """Shards written before stores carried their image list and placeholder flags, completed by this version."""
    from retrieval_lightning.retrieval.writer import UNREADABLE, ShardWriter

    old = ShardWriter(tmp_path, rank=0, shard_size=8, identity=IDENTITY)
    old.add({"index": np.arange(4), "global": np.zeros((4, 2), np.float16)})
    old.close()
    current = {**IDENTITY, "items": "6 items (1 queries), ids sha256 0123456789abcdef"}
    assert completed_indices(tmp_path, current).tolist() == [0, 1, 2, 3]
    new = ShardWriter(tmp_path, rank=0, shard_size=8, identity=current)
    new.add({"index": np.arange(4, 6), "global": np.ones((2, 2), np.float16), UNREADABLE: np.array([0, 1], np.uint8)})
    new.close()
    store = merge_shards(tmp_path, expect_identity=current, expected_indices=range(6), progress=False)
    assert store.array(UNREADABLE).tolist() == [0, 0, 0, 0, 0, 1] and store.identity["items"] == current["items"]


def test_features_under_autocast_are_not_an_fp32_runs_store(tmp_path: Path) -> None:
    """A store extracted, or re-ranking entries written, under ``bf16-mixed`` hold other numbers than fp32 ones:
    their identities differ, so neither is resumed nor reused by the other (both were the same identity); fp32
    identities are those of stores written before the precision was recorded."""
    from types import SimpleNamespace

    from retrieval_lightning.trainer import extraction_identity
    from test_rerank import tiny_module

    module, data = tiny_module(), SimpleNamespace(hparams={"eval_max_side": 96})
    fp32 = extraction_identity(module, data)
    assert fp32 == {**model_identity(module), **datamodule_identity(data)}
    assert extraction_identity(module, data, "32-true") == fp32
    bf16 = extraction_identity(module, data, "bf16-mixed")
    assert identity_differences(bf16, fp32) == ["'precision'='bf16-mixed' in store but not expected"]
    FeatureStore.create(tmp_path / "store", {}, 0, bf16).commit()
    with pytest.raises(StoreIdentityError, match=r"'precision'='bf16-mixed' in store but not expected\. The store "
                                                  r"was extracted under trainer.precision bf16-mixed, this run is "
                                                  r"32-true: run with --trainer.precision=bf16-mixed"):
        FeatureStore.open(tmp_path / "store", expect_identity=fp32)
    # a store written before the precision was recorded may be of either: the refusal does not guess
    FeatureStore.create(tmp_path / "older", {}, 0, fp32).commit()
    with pytest.raises(StoreIdentityError, match=r"records no trainer.precision \(32-true, or extracted before the "
                                                  r"precision was recorded\), this run is bf16-mixed"):
        FeatureStore.open(tmp_path / "older", expect_identity=bf16)
    rerank_identities = {}
    for precision in ("32-true", "bf16-mixed"):
        module._trainer = SimpleNamespace(precision=precision, datamodule=data)
        rerank_identities[precision] = module.rerank_store_identity()
    assert rerank_identities["bf16-mixed"] == {**rerank_identities["32-true"], "precision": "bf16-mixed"}


def test_a_merge_removes_the_partial_shards_of_ranks_the_resumed_run_did_not_have(tmp_path: Path) -> None:
    """A writer clears only its own rank's partial file when it starts: a 2-process run killed mid-write and
    resumed on 1 process left rank 1's (up to a shard of bytes) in the folder for good."""
    from retrieval_lightning.retrieval.writer import ShardWriter

    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()  # a pid no process has any more: its writer was killed
    stale = tmp_path / f".shard-r0001-s000003.npz.tmp-{ended.pid}"
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"x" * 100)
    writer = ShardWriter(tmp_path, rank=0, shard_size=2, identity=IDENTITY)
    writer.add({"index": np.arange(2), "global": np.zeros((2, 3), np.float16)})
    writer.close()
    assert stale.exists()  # rank 0's writer leaves rank 1's file: rank 1 may still be writing it
    merge_shards(tmp_path, progress=False, expect_identity=IDENTITY, expected_indices=range(2))
    assert not stale.exists()


def test_a_merge_refuses_a_shard_another_run_replaced_and_leaves_a_live_writers_partial_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs writing one folder (a review): the second's ``os.replace`` of a shard the first was merging gave
    the first's store the second's rows (other settings) without a word, and each run deleted the other's partial
    file, so the other failed as if the disk had."""
    import shutil

    from retrieval_lightning.retrieval.writer import ShardWriter

    writer = ShardWriter(tmp_path, rank=0, shard_size=2, identity=IDENTITY)
    writer.add({"index": np.arange(4), "global": np.zeros((4, 3), np.float16)})
    writer.close()
    live = tmp_path / f".shard-r0000-s000009.npz.tmp-{os.getppid()}"  # another run's shard being written
    live.write_bytes(b"x" * 10)
    ShardWriter(tmp_path, rank=0, shard_size=2, identity=IDENTITY)  # a new writer of rank 0 leaves it
    assert live.exists()
    create = FeatureStore.create

    def create_while_another_run_replaces_a_shard(*args, **kwargs):
        builder = create(*args, **kwargs)
        shard = list_shards(tmp_path)[1]
        shutil.copyfile(shard, tmp_path / ".other")
        os.replace(tmp_path / ".other", shard)  # the other run's write of the same shard name
        return builder

    monkeypatch.setattr(FeatureStore, "create", create_while_another_run_replaces_a_shard)
    with pytest.raises(UsageError, match=r"shard-r0000-s000001.npz was replaced while its folder was merged: "
                                         r"another run is writing into"):
        merge_shards(tmp_path, progress=False, expect_identity=IDENTITY, expected_indices=range(4))
    assert not (tmp_path / "store").exists()
    monkeypatch.undo()
    store = merge_shards(tmp_path, progress=False, expect_identity=IDENTITY, expected_indices=range(4))
    assert store.count == 4 and live.exists()  # the merge keeps a live writer's partial file too


def test_set_files_are_written_through_a_temporary_file_of_this_process(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs finishing at once shared ``.items.tsv.tmp``: the first's rename took it, the second failed."""
    import retrieval_lightning.retrieval.set_files as set_files

    renamed: list[tuple[str, str]] = []
    replace = os.replace
    monkeypatch.setattr(set_files.os, "replace", lambda src, dst: renamed.append((str(src), str(dst))) or
                        replace(src, dst))
    set_files._replace_atomically(tmp_path / "items.tsv", ["a", "b"])
    assert renamed == [(str(tmp_path / f".items.tsv.tmp-{os.getpid()}"), str(tmp_path / "items.tsv"))]
    assert (tmp_path / "items.tsv").read_text() == "a\nb\n"


def test_an_interrupted_set_or_marker_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A Ctrl-C (or a full disk) half-way through ``items.tsv`` left its pid-named part beside the store for good:
    about 100 bytes per item, 100 MB for the +1M distractors, once per interrupted try."""
    import retrieval_lightning.retrieval.set_files as set_files
    from retrieval_lightning.retrieval.workdirs import atomic_write_text

    def lines():
        yield "index\tid\tpath"
        yield "0\ta\t/x.jpg"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        set_files._replace_atomically(tmp_path / "items.tsv", lines())
    (tmp_path / "marker").mkdir()
    with pytest.raises(OSError):  # the target is a folder: the rename fails after the write
        atomic_write_text(tmp_path / "marker", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker"]



def test_a_plugin_datamodules_own_loader_arguments_leave_the_store_identity() -> None:
    """The core's list of loader arguments is the usual names; a plugin datamodule's own (``workers``) would
    make every store of another worker count another model's, unless it declares them."""
    from retrieval_lightning.retrieval.identity import datamodule_identity

    class FolderData:
        def __init__(self, workers: int, max_side: int, declare: bool) -> None:
            self.hparams = {"workers": workers, "max_side": max_side}
            self.loader_only_arguments = ("workers",) if declare else ()

    assert datamodule_identity(FolderData(2, 512, True)) == datamodule_identity(FolderData(8, 512, True))
    assert datamodule_identity(FolderData(2, 512, False)) != datamodule_identity(FolderData(8, 512, False))
    assert datamodule_identity(FolderData(2, 512, True)) != datamodule_identity(FolderData(2, 640, True))
