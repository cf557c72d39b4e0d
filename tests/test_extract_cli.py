"""`retrieval-lightning extract`: a 2-process extraction killed part-way and restarted gives a store
byte-identical to an uninterrupted 1-process run (real model, real CLI, gloo)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, TINY_DATA, finished, run_ddp, run_main, start_ddp

SHARD = 8


def args(cache_root: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--config", str(REPO / "experiments/demo.yaml"), f"--data.init_args.root={cache_root}",
            *TINY_DATA, "--trainer.logger=false", f"--trainer.default_root_dir={out}",
            f"--output_dir={out}/features", f"--shard_size={SHARD}", *extra]


def kill_after_first_shards(args: list[str], shard_dir: Path, cwd: Path) -> None:
    """Start the 2-process run and SIGKILL both ranks (and what they started) once two shards exist."""
    ranks = start_ddp(args, cwd)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and all(rank.poll() is None for rank in ranks):
            if len(list(shard_dir.glob("shard-*.npz"))) >= 2:
                break
            time.sleep(0.05)
    finally:
        for rank in ranks:
            rank.kill_group()
        finished(ranks, expect=None)


def shard_indices(shard_dir: Path) -> dict[str, np.ndarray]:
    """Dataset indices held by each finished shard, read straight from the ``.npz`` files."""
    out = {}
    for shard in sorted(shard_dir.glob("shard-*.npz")):
        with np.load(shard, allow_pickle=False) as z:
            out[shard.name] = np.asarray(z["index"], dtype=np.int64)
    return out


def store_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_killed_ddp_extraction_resumes_to_the_single_process_store(cache_root: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    run_main(args(cache_root, single, "--trainer.devices=1"), cwd=tmp_path, threads=1)  # one thread, as DDP's
    reference = store_files(single / "features" / "minilandmarks" / "store")
    assert {"manifest.json", "index.npy", "global.npy"} <= set(reference)

    ddp = tmp_path / "ddp"
    shard_dir = ddp / "features" / "minilandmarks"
    kill_after_first_shards(args(cache_root, ddp, "--trainer.devices=2", "--trainer.strategy=ddp"), shard_dir, tmp_path)
    before = shard_indices(shard_dir)
    assert len(before) >= 2 and not (shard_dir / "store").exists(), "the run was not interrupted part-way"
    done = set(np.concatenate(list(before.values())).tolist())
    everything = set(np.load(single / "features" / "minilandmarks" / "store" / "index.npy").tolist())
    assert done < everything

    run_ddp(args(cache_root, ddp), cwd=tmp_path)
    after = shard_indices(shard_dir)
    assert all(np.array_equal(after[name], idx) for name, idx in before.items())  # finished shards untouched
    redone = np.concatenate([idx for name, idx in after.items() if name not in before])
    # the restart extracted exactly the missing images (a DistributedSampler may repeat one of them
    # to give both ranks equal batches, never one that was already done)
    assert set(redone.tolist()) == everything - done
    assert len(redone) <= len(everything - done) + 1
    assert store_files(shard_dir / "store") == reference


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_an_item_when_fewer_are_left_than_ranks(world: int) -> None:
    """A retry of one unreadable image under DDP: Lightning's predict sampler refused the rank left empty."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    from retrieval_lightning.trainer import items_for_every_rank

    for left in range(0, 6):
        todo = list(range(10, 10 + left))
        items = items_for_every_rank(todo, world)
        assert set(items) == set(todo)
        if left >= world or left == 0:
            assert items == todo  # nothing repeated when every rank has work anyway
        per_rank = [[items[i] for i in UnrepeatedDistributedSampler(items, num_replicas=world, rank=r)]
                    for r in range(world)]
        assert all(per_rank) or not todo
        assert sorted(set(sum(per_rank, []))) == todo


def test_extract_reports_bytes_per_image_per_head() -> None:
    from retrieval_lightning.trainer import store_sizes

    sizes = {"global": 640.0, "verifier-level0_val": 108.4, "verifier-level0_pos": 21.2, "verifier-level1_val": 225.0}
    assert store_sizes(sizes) == "total 995 B/image: global 640, verifier 355"
    # the placeholders' flag is not a descriptor ("unreadable 1" read as one unreadable image)
    assert store_sizes({**sizes, "unreadable": 1.0}) == "total 995 B/image: global 640, verifier 355"


def test_download_without_a_datamodule_names_them_and_where_their_options_are(capsys) -> None:
    from retrieval_lightning.cli import run_download

    assert run_download(["--help"]) == 0
    said = capsys.readouterr().out
    assert "gldv2" in said and "revisitop" in said and "retrieval-lightning download <datamodule> --help" in said
    assert run_download([]) == 2 and "datamodules with a download" in capsys.readouterr().err


def test_a_store_rank_zero_refuses_stops_every_rank(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`extract` into a folder holding another model's store: rank 0 raises the refusal and the other
    ranks raise too, instead of waiting in the broadcast of the work left until the process-group timeout."""
    from types import SimpleNamespace

    import retrieval_lightning.trainer as trainer_module
    from retrieval_lightning.rank_zero import RankZeroFailed
    from retrieval_lightning.retrieval.store import StoreIdentityError

    def refuse(*args, **kwargs):
        raise StoreIdentityError("the store holds another model's features")

    monkeypatch.setattr(trainer_module, "remaining_subset", refuse)
    spec = SimpleNamespace(name="test", dataset=list(range(5)), n_queries=2, image_ids=[])
    inner = SimpleNamespace(setup=lambda stage: None, eval_sets=lambda stage: [spec],
                            predict_dataloader=lambda: [None], prepare_data_per_node=True)
    rank_zero_said: list = []  # what rank 0 broadcast, in order: rank 1 receives the same values

    def rank(is_zero: bool):
        def broadcast(value, src=0):
            if is_zero:
                rank_zero_said.append(value)
                return value
            return rank_zero_said.pop(0)
        one = trainer_module._OneEvalSet(inner, 0, None, tmp_path, {}, SimpleNamespace(output_dir=None))
        one.trainer = SimpleNamespace(is_global_zero=is_zero, strategy=SimpleNamespace(broadcast=broadcast))
        return one

    with pytest.raises(StoreIdentityError, match="another model"):
        rank(True).setup("predict")
    with pytest.raises(RankZeroFailed, match="extract test"):
        rank(False).setup("predict")


def test_a_store_of_another_image_list_is_refused_not_continued(tmp_path: Path) -> None:
    """Shards resume by dataset position: continuing them over an updated image list (one image inserted
    first) would keep, at each position, the descriptor of the image that was there before."""
    from types import SimpleNamespace

    import retrieval_lightning.trainer as trainer_module
    from retrieval_lightning.retrieval.store import StoreIdentityError
    from retrieval_lightning.retrieval.identity import items_identity
    from retrieval_lightning.retrieval.writer import ShardWriter

    before = SimpleNamespace(name="set", dataset=list(range(4)), n_queries=1, image_ids=["q", "b", "c", "d"])
    after = SimpleNamespace(name="set", dataset=list(range(5)), n_queries=1, image_ids=["q", "a", "b", "c", "d"])
    writer = ShardWriter(tmp_path / "set", rank=0, shard_size=8, identity={"model": 1, **items_identity(before)})
    writer.add({"index": np.arange(4), "global": np.zeros((4, 3), np.float16)})
    writer.close()

    def setup(spec: SimpleNamespace) -> trainer_module._OneEvalSet:
        inner = SimpleNamespace(setup=lambda stage: None, eval_sets=lambda stage: [spec],
                                predict_dataloader=lambda: [None], prepare_data_per_node=True)
        one = trainer_module._OneEvalSet(inner, 0, None, tmp_path, {"model": 1}, SimpleNamespace(output_dir=None))
        one.setup("predict")
        return one

    assert list(setup(before).subset.indices) == []  # the same list: everything is done
    with pytest.raises(StoreIdentityError, match=r"'items': store has '4 items \(1 queries\).*expected '5 items"):
        setup(after)
    assert items_identity(before) != items_identity(SimpleNamespace(**{**vars(before), "image_ids": list("qbdc")}))
