"""Write database features during ``trainer.predict`` as atomic, resumable per-rank shards.

:class:`FeatureStoreWriter` is a Lightning prediction writer. Each rank buffers its
``predict_step`` outputs and flushes every ``shard_size`` samples to
``shard-r<rank>-s<seq>.npz`` (written under a temporary name, then ``os.replace``d, so a shard
that exists is complete). A shard lists the dataset indices it holds, so after an interruption
:func:`completed_indices` says what is done and :func:`remaining_subset` gives the dataset
positions still to extract, whatever the world size of either run. :func:`merge_shards` then
builds the final :class:`~.store.FeatureStore`, sorted by dataset index.

What ``predict_step`` must return: a dict with ``"index"`` (B,) integer dataset indices and one
entry per stored *kind*: a tensor (B, ...) for a fixed per-image shape, or a list of B tensors
(n_i, ...) for a ragged kind (local features). ``"global"`` is stored as fp16 by default.
Call ``trainer.predict(..., return_predictions=False)`` so outputs are not also kept in memory.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from retrieval_lightning.errors import DataFormatError, UsageError

from .store import (
    FeatureStore,
    KindSpec,
    StoreIdentityError,
    check_kind_name,
    identity_differences,
    normalize_identity,
)
from .workdirs import process_alive

_SHARD_RE = re.compile(r"^shard-r(\d+)-s(\d+)\.npz$")
_META_KEY = "__meta__"
DEFAULT_DTYPES = {"global": "float16"}


def shard_name(rank: int, seq: int) -> str:
    return f"shard-r{rank:04d}-s{seq:06d}.npz"


def list_shards(output_dir: str | os.PathLike) -> list[Path]:
    """Finished shards in ``output_dir``, in (rank, sequence) order; temporary files are ignored."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SHARD_RE.match(p.name))


#: the stored kind marking placeholders of images that were unreadable when extracted (``on_error: skip``)
UNREADABLE = "unreadable"


def stored_unreadable(store: FeatureStore) -> np.ndarray | None:
    """The store's flags of placeholders of unreadable images, row by row (``None`` in a store without them)."""
    if UNREADABLE not in store.kinds:
        return None
    return np.asarray(store.array(UNREADABLE)).astype(bool).reshape(len(store))


def placeholder_note(store: FeatureStore, what: str, names: Sequence[str] = ()) -> str | None:
    """A warning naming the store's placeholders of images unreadable when extracted, or ``None``."""
    if UNREADABLE not in store.kinds:
        return None
    rows = np.flatnonzero(np.asarray(store.array(UNREADABLE)))
    if not rows.size:
        return None
    shown = [names[i] if i < len(names) else f"item {int(store.index[i])}" for i in rows[:5].tolist()]
    return (f"{what}: {rows.size} of {len(store)} images were unreadable when extracted (on_error: skip) and hold "
            f"blank placeholders, e.g. {shown}; a database one is ranked last for every query (it matches nothing), "
            "a query retrieves nothing (AP 0). Fix them and run extract again: it retries them")


#: what numpy/zipfile raise for a truncated or corrupted shard (BadZipFile is none of the others)
_DAMAGED = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)


class StoreWriteError(RuntimeError):
    """A shard could not be written (a full disk, a read-only directory); names the shard."""


def _damaged(shard: Path, err: BaseException) -> DataFormatError:
    return DataFormatError(
        f"feature shard {shard} is damaged or not a shard ({type(err).__name__}: {err}); delete it and "
        "rerun the extraction: only its images are extracted again"
    )


def _member(z: Any, shard: Path, key: str) -> np.ndarray:
    """One array of an open shard; a damaged member (bad CRC, cut short) is an error naming the shard."""
    try:
        return z[key]
    except _DAMAGED as err:
        raise _damaged(shard, err) from None


def _read_meta(shard: Path) -> dict[str, Any]:
    try:
        with np.load(shard, allow_pickle=False) as z:
            meta = json.loads(str(z[_META_KEY]))
            meta["index"] = np.asarray(z["index"], dtype=np.int64)
            # placeholders of images unreadable when extracted (on_error: skip): a re-run extracts them again
            meta["unreadable"] = (np.asarray(z[UNREADABLE], dtype=bool) if UNREADABLE in meta["kinds"]
                                  else np.zeros(len(meta["index"]), dtype=bool))
            meta["lengths"] = {
                kind: np.diff(z[f"{kind}.offsets"]) for kind, spec in meta["kinds"].items() if spec["ragged"]
            }
    except _DAMAGED as err:
        raise _damaged(shard, err) from None
    return meta


def _check_identity(shard: Path, stored: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    diffs = identity_differences(stored, expected)
    if diffs:
        raise StoreIdentityError(
            f"feature shard {shard} was written by a different model or config "
            f"({'; '.join(diffs)}); use a fresh output directory or the same model"
        )


def completed_indices(
    output_dir: str | os.PathLike, expect_identity: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Sorted unique dataset indices held by the finished shards of ``output_dir`` (a row that is the
    placeholder of an unreadable image does not count: a re-run extracts that image again)."""
    expected = None if expect_identity is None else normalize_identity(expect_identity)
    found = [np.empty(0, dtype=np.int64)]
    for shard in list_shards(output_dir):
        meta = _read_meta(shard)
        if expected is not None:
            _check_identity(shard, meta["identity"], expected)
        found.append(meta["index"][~meta["unreadable"]])
    return np.unique(np.concatenate(found))


def remaining_subset(
    dataset: Dataset,
    output_dir: str | os.PathLike,
    indices: Sequence[int] | np.ndarray | None = None,
    expect_identity: Mapping[str, Any] | None = None,
) -> Subset:
    """The part of ``dataset`` whose features are not yet in ``output_dir``'s shards.

    Position ``p`` of the dataset carries dataset index ``indices[p]`` (default ``p``, as for
    :class:`~retrieval_lightning.data.types.EvalSet` datasets). May be empty: skip ``predict`` then.
    """
    n = len(dataset)  # type: ignore[arg-type]
    carried = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(carried) != n:
        raise ValueError(f"remaining_subset: {len(carried)} indices given for a dataset of {n} items")
    done = completed_indices(output_dir, expect_identity)
    todo = np.nonzero(~np.isin(carried, done))[0]
    return Subset(dataset, todo.tolist())


def _to_numpy(value: Tensor | np.ndarray, dtype: str | None) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    arr = np.asarray(value)
    return arr.astype(dtype, copy=False) if dtype else arr


class ShardWriter:
    """Buffers per-item outputs of one rank and writes them as atomic shards of ``shard_size`` items.

    The one code path for database features at every scale: the ``extract`` command (through
    :class:`FeatureStoreWriter`) and re-ranked evaluation both write through it. Items are dicts of
    kinds: ``index`` (B,) plus, per kind, an array (B, ...) or a list of B arrays (ragged kinds).
    ``identity`` is written into every shard; shards of another identity already in
    ``output_dir`` are refused. ``dtypes`` maps kinds to the numpy dtype they are stored in.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        rank: int = 0,
        shard_size: int = 4096,
        identity: Mapping[str, Any] | None = None,
        dtypes: Mapping[str, str] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.output_dir = Path(output_dir)
        self.rank = int(rank)
        self.shard_size = int(shard_size)
        self.identity = normalize_identity(identity)
        self.dtypes = dict(DEFAULT_DTYPES if dtypes is None else dtypes)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        seqs = [-1]
        for shard in list_shards(self.output_dir):
            match = _SHARD_RE.match(shard.name)
            if match and int(match.group(1)) == self.rank:
                seqs.append(int(match.group(2)))
        self._seq = max(seqs) + 1
        for stale in self.output_dir.glob(f".{shard_name(self.rank, 0).split('-s')[0]}-s*.npz.tmp-*"):
            if not _written_by_another_live_process(stale):  # left by a killed writer of this rank
                stale.unlink(missing_ok=True)
        first = next(iter(list_shards(self.output_dir)), None)
        if first is not None:
            _check_identity(first, _read_meta(first)["identity"], self.identity)
        self._buffer: list[dict[str, Any]] = []
        self._buffered = 0

    def add(self, prediction: Mapping[str, Any], batch_idx: int = 0) -> None:
        """Buffer one batch of outputs; full shards are written as soon as they are complete."""
        item = self._convert(prediction, batch_idx)
        if not len(item["index"]):
            return
        self._buffer.append(item)
        self._buffered += len(item["index"])
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> None:
        """Write what is buffered as a last, smaller shard."""
        if self._buffered:
            self._flush(self._buffered)

    def _convert(self, prediction: Any, batch_idx: int) -> dict[str, Any]:
        if not isinstance(prediction, Mapping) or "index" not in prediction:
            raise TypeError(
                f"predict_step must return a dict with an 'index' entry (batch {batch_idx}), "
                f"got {type(prediction).__name__}"
                + (f" with keys {sorted(prediction)}" if isinstance(prediction, Mapping) else "")
            )
        index = _to_numpy(prediction["index"], "int64").reshape(-1)
        out: dict[str, Any] = {"index": index}
        for kind, value in prediction.items():
            if kind == "index":
                continue
            check_kind_name(kind)
            dtype = self.dtypes.get(kind)
            if isinstance(value, (list, tuple)):
                parts = [_to_numpy(v, dtype) for v in value]
            else:
                parts = _to_numpy(value, dtype)
            if len(parts) != len(index):
                raise ValueError(
                    f"predict_step output {kind!r} has {len(parts)} entries for {len(index)} indices "
                    f"(batch {batch_idx})"
                )
            out[kind] = parts
        return out

    def _take(self, n: int) -> dict[str, Any]:
        """Remove and return the first ``n`` buffered samples as one batch."""
        merged: dict[str, Any] = {}
        for kind in self._buffer[0]:
            values = [b[kind] for b in self._buffer]
            if isinstance(values[0], list):
                merged[kind] = [part for v in values for part in v]
            else:
                try:
                    merged[kind] = np.concatenate(values)
                except ValueError as err:
                    raise ValueError(f"predict_step output {kind!r} changes shape between batches: {err}") from None
        head = {k: v[:n] for k, v in merged.items()}
        rest = {k: v[n:] for k, v in merged.items()}
        self._buffered -= n
        self._buffer = [rest] if self._buffered else []
        return head

    def _flush(self, n: int) -> None:
        batch = self._take(n)
        arrays: dict[str, np.ndarray] = {"index": batch["index"]}
        kinds: dict[str, Any] = {}
        for kind, value in batch.items():
            if kind == "index":
                continue
            if isinstance(value, list):
                row_shape = value[0].shape[1:]
                bad = next((i for i, v in enumerate(value) if v.shape[1:] != row_shape), None)
                if bad is not None:
                    raise ValueError(
                        f"ragged kind {kind!r}: rows of dataset index {batch['index'][bad]} have shape "
                        f"{value[bad].shape[1:]}, others {row_shape}"
                    )
                arrays[kind] = np.concatenate(value)
                arrays[f"{kind}.offsets"] = np.concatenate([[0], np.cumsum([len(v) for v in value])]).astype(np.int64)
                spec = KindSpec(value[0].dtype.name, row_shape, ragged=True)
            else:
                arrays[kind] = value
                spec = KindSpec(value.dtype.name, value.shape[1:])
            kinds[kind] = spec.to_json()
        meta = {"identity": self.identity, "kinds": kinds, "count": int(n)}
        arrays[_META_KEY] = np.array(json.dumps(meta, sort_keys=True))
        final = self.output_dir / shard_name(self.rank, self._seq)
        tmp = self.output_dir / f".{final.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException as err:
            tmp.unlink(missing_ok=True)  # a shard-sized file would keep a full disk full
            if isinstance(err, OSError):
                raise StoreWriteError(f"writing feature shard {final} failed: {err}; the finished shards are kept, "
                                      "so running the same command again continues after them") from err
            raise
        self._seq += 1


class FeatureStoreWriter(BasePredictionWriter):
    """Lightning callback writing ``predict_step`` outputs through a per-rank :class:`ShardWriter`.

    ``model_identity`` (e.g. :func:`module_identity`) is written into every shard and the merged
    store; shards of another identity already in ``output_dir`` make :meth:`setup` fail.
    ``dtypes`` maps kinds to the numpy dtype they are stored in (default: ``global`` in fp16).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        shard_size: int = 4096,
        model_identity: Mapping[str, Any] | None = None,
        dtypes: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.output_dir = Path(output_dir)
        self.shard_size = int(shard_size)
        self.identity = normalize_identity(model_identity)
        self.dtypes = dict(DEFAULT_DTYPES if dtypes is None else dtypes)
        self._writer: ShardWriter | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._writer = ShardWriter(
            self.output_dir, int(trainer.global_rank), self.shard_size, self.identity, self.dtypes
        )

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if dataloader_idx:
            raise ValueError("FeatureStoreWriter writes one dataset: predict with a single dataloader")
        assert self._writer is not None, "setup() runs before the first batch"
        self._writer.add(prediction, batch_idx)

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        if self._writer is not None:
            self._writer.close()


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (s, l), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _without_flag(kinds: Mapping[str, Any]) -> dict[str, Any]:
    """Stored kinds apart from the placeholder flags, which shards of earlier versions lack."""
    return {k: v for k, v in kinds.items() if k != UNREADABLE}


def merge_shards(
    output_dir: str | os.PathLike,
    store_path: str | os.PathLike | None = None,
    expect_identity: Mapping[str, Any] | None = None,
    expected_indices: Sequence[int] | np.ndarray | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> FeatureStore:
    """Merge every shard of ``output_dir`` into a store (default ``output_dir/store``) sorted by index.

    A dataset index present in several shards (a sampler's repeats, a rerun) is taken from the
    first shard in (rank, sequence) order that holds a readable image's row (a later run may have read
    an image that was unreadable before). ``expected_indices`` makes a missing index an error.
    """
    shards = list_shards(output_dir)
    if not shards:
        raise FileNotFoundError(f"no feature shards (shard-r*-s*.npz) in {output_dir}")
    stamps = [_file_stamp(s.stat()) for s in shards]  # before the headers: a shard replaced later is seen
    metas = [_read_meta(s) for s in tqdm(shards, desc="reading shard headers", disable=not progress)]
    first = metas[0]
    identity = first["identity"] if expect_identity is None else normalize_identity(expect_identity)
    stored_kinds = dict(first["kinds"])
    for shard, meta in zip(shards, metas):
        _check_identity(shard, meta["identity"], identity)  # a shard of an earlier version may lack a newer key
        stored_kinds.update({k: v for k, v in meta["kinds"].items() if k == UNREADABLE})
        if _without_flag(meta["kinds"]) != _without_flag(first["kinds"]):
            raise UsageError(f"feature shard {shard} stores kinds {sorted(meta['kinds'])}, {shards[0]} stores "
                             f"{sorted(first['kinds'])} (written by another version?): extract into a fresh directory")
    kinds = {k: KindSpec(v["dtype"], tuple(v["shape"]), v["ragged"]) for k, v in stored_kinds.items()}

    all_index = np.concatenate([m["index"] for m in metas])
    src_shard = np.concatenate([np.full(len(m["index"]), i) for i, m in enumerate(metas)])
    src_row = np.concatenate([np.arange(len(m["index"])) for m in metas])
    placeholder = np.concatenate([m["unreadable"] for m in metas])
    order = np.lexsort((np.arange(len(all_index)), placeholder, all_index))  # by index, readable first, then order
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = all_index[order][1:] != all_index[order][:-1]
    chosen = order[keep]
    final_index = all_index[chosen]
    if expected_indices is not None:
        expected = np.unique(np.asarray(expected_indices, dtype=np.int64))
        missing = np.setdiff1d(expected, final_index)
        extra = np.setdiff1d(final_index, expected)
        if missing.size or extra.size:
            hint = ("; the image list has changed since they were written: extract into a fresh output directory"
                    if extra.size else "")
            raise UsageError(
                f"shards in {output_dir}: {missing.size} expected dataset indices missing "
                f"(first {missing[:5].tolist()}), {extra.size} unexpected (first {extra[:5].tolist()}){hint}"
            )
    lengths = {
        k: np.concatenate([np.asarray(m["lengths"][k], dtype=np.int64) for m in metas])[chosen]
        for k, spec in kinds.items()
        if spec.ragged
    }
    store_path = Path(output_dir) / "store" if store_path is None else Path(store_path)
    builder = FeatureStore.create(store_path, kinds, len(final_index), identity, lengths, overwrite)
    try:
        builder.index[:] = final_index
        # the chosen rows grouped by shard once (a stable sort keeps each shard's in destination order): a mask per
        # shard made merging O(rows x shards), minutes for a 1M-image store in 256-image shards
        chosen_shard, chosen_row = src_shard[chosen], src_row[chosen]
        by_shard = np.argsort(chosen_shard, kind="stable")
        bounds = np.searchsorted(chosen_shard[by_shard], np.arange(len(shards) + 1))
        for s, shard in enumerate(tqdm(shards, desc="merging feature shards", disable=not progress)):
            dest = by_shard[bounds[s]:bounds[s + 1]]
            if not dest.size:
                continue
            local = chosen_row[dest]
            try:
                handle = open(shard, "rb")
            except _DAMAGED as err:
                raise _damaged(shard, err) from None
            with handle:
                if _file_stamp(os.fstat(handle.fileno())) != stamps[s]:  # its rows would be another run's
                    raise UsageError(f"feature shard {shard} was replaced while its folder was merged: another run "
                                     f"is writing into {output_dir} (one run per output folder); run this one again "
                                     "once it has finished")
                try:
                    archive = np.load(handle, allow_pickle=False)
                except _DAMAGED as err:
                    raise _damaged(shard, err) from None
                with archive as z:
                    for kind, spec in kinds.items():
                        if kind not in metas[s]["kinds"]:  # no placeholder flags (an earlier version): zeros stay
                            continue
                        data = _member(z, shard, kind)
                        if not spec.ragged:
                            builder.array(kind)[dest] = data[local]
                            continue
                        offsets = _member(z, shard, f"{kind}.offsets")
                        src_rows = _ranges(offsets[local], offsets[local + 1] - offsets[local])
                        dst_off = builder.offsets[kind]
                        dst_rows = _ranges(dst_off[dest], dst_off[dest + 1] - dst_off[dest])
                        builder.array(kind)[dst_rows] = data[src_rows]
        store = builder.commit()
    except BaseException:
        builder.abort()
        raise
    # every writer has finished: a killed one's partial file is rubbish now, also of a rank this run did not have
    # (a 2-process run resumed on 1 process; each writer only clears its own rank's)
    for stale in Path(output_dir).glob(".shard-r*-s*.npz.tmp-*"):
        if not _written_by_another_live_process(stale):
            stale.unlink(missing_ok=True)
    return store


def _written_by_another_live_process(tmp: Path) -> bool:
    """Whether a partial shard ``.shard-...npz.tmp-<pid>`` is being written by another process that still runs
    (a second run writing into the same folder; its file is not rubbish yet)."""
    pid = tmp.name.rsplit("-", 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid))


def _file_stamp(stat: os.stat_result) -> tuple[int, int, int]:
    """What changes when a shard file is replaced (``os.replace`` gives a new inode) or rewritten."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
