"""gather_dedupe: one process without a process group, and two gloo processes with uneven counts,
whole, in slices, and spilled into a file both ranks map."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import ForkedRun, finished, free_port
from retrieval_lightning.retrieval.gather import gather_dedupe
from retrieval_lightning.retrieval.spill import SpillConfig, remove_left_by_killed_runs
from retrieval_lightning.retrieval.workdirs import pid_space


def test_single_process_dedupes_and_sorts() -> None:
    index = torch.tensor([5, 1, 3, 1, 5, 0])
    values = torch.tensor([[50.0, 5], [10, 1], [30, 3], [11, 1], [51, 5], [0, 0]])
    flags = torch.tensor([True, False, True, False, True, False])
    got_index, arrays = gather_dedupe(None, index, values=values, flags=flags)
    assert got_index.tolist() == [0, 1, 3, 5]
    # the first occurrence of a repeated index wins
    assert arrays["values"].tolist() == [[0, 0], [10, 1], [30, 3], [50, 5]]
    assert arrays["flags"].tolist() == [False, False, True, True]


def test_single_process_keeps_sorted_rows_without_a_copy() -> None:
    """One process gathers rows already in dataset order: +1M descriptors are not copied again."""
    feats = torch.randn(6, 3)
    got_index, arrays = gather_dedupe(None, torch.arange(6), feats=feats)
    assert got_index.tolist() == list(range(6))
    assert arrays["feats"].data_ptr() == feats.data_ptr()


def test_single_process_rejects_mismatched_rows() -> None:
    try:
        gather_dedupe(None, torch.arange(3), feats=torch.zeros(4, 2))
    except ValueError as err:
        assert "'feats'" in str(err) and "3 rows" in str(err)
    else:
        raise AssertionError("mismatched rows were accepted")


def test_spill_config_defaults_to_the_temporary_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The default follows ``TMPDIR`` (node-local scratch on clusters), not the run's directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert SpillConfig().directory == tmp_path / "retrieval-lightning-spill"
    assert SpillConfig(dir="elsewhere").directory == Path("elsewhere")
    assert SpillConfig(0).spills(1) and not SpillConfig(0).spills(0) and not SpillConfig(None).spills(1 << 40)
    assert not SpillConfig().spills((1 << 30) - 1) and SpillConfig().spills(1 << 30)
    with pytest.raises(ValueError, match="min_bytes"):
        SpillConfig(-1)


SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from retrieval_lightning.retrieval import gather
    from retrieval_lightning.retrieval.gather import gather_dedupe
    from retrieval_lightning.retrieval.spill import SpillConfig, gather_into_file
    from retrieval_lightning.retrieval.workdirs import pid_space

    def main(rank, port, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        # rank 0 holds 0, 2, 4, 6, 8; rank 1 holds 1, 3, 5 and pads with 0 (a sampler repeat)
        index = torch.tensor([0, 2, 4, 6, 8]) if rank == 0 else torch.tensor([1, 3, 5, 0])
        feats = (index[:, None, None] * torch.ones(1, 2, 3)).half()
        flags = index % 3 == 0
        got, arrays = gather_dedupe(None, index, feats=feats, flags=flags, count=index * 10)
        torch.save({"index": got, **arrays}, f"{out}/rank{rank}.pt")
        # again in slices of 24 bytes over both ranks: one row of an 8- or 12-byte array per call,
        # all 5 of the 1-byte flags in one
        calls = []
        real_all_gather = dist.all_gather
        def counting_all_gather(parts, tensor):
            calls.append(tuple(tensor.shape))
            return real_all_gather(parts, tensor)
        dist.all_gather = counting_all_gather
        gather.GATHER_SLICE_BYTES = 24
        got, arrays = gather_dedupe(None, index, feats=feats, flags=flags, count=index * 10)
        torch.save({"index": got, **arrays, "calls": calls}, f"{out}/sliced{rank}.pt")
        # spilled: feats (96 bytes) and count (64) go to a file of the machine, flags (8) stay in memory;
        # the file a killed run left (its writer's pid, sys.argv[3], no longer runs) goes on the first gather
        spill = SpillConfig(min_bytes=40, dir=f"{out}/spill")
        if rank == 0:
            os.makedirs(spill.dir)
            open(f"{spill.dir}/feats-{pid_space()}-{sys.argv[3]}-0.bin", "wb").close()
        dist.barrier()
        got, arrays = gather_dedupe(None, index, spill=spill, feats=feats, flags=flags, count=index * 10)
        dist.barrier()  # the writer unlinks the file after the gather's last collective
        backing = {name: mapped_file(value) for name, value in arrays.items()}
        left = sorted(os.listdir(spill.dir))
        kept = {k: v.clone() for k, v in arrays.items()}
        if rank == 0:  # an in-place change on one rank stays there (copy-on-write mappings)
            arrays["feats"].fill_(7)
        dist.barrier()
        after = arrays["feats"].clone()
        unmade = failed = None
        try:  # a spill dir that cannot be made: every rank raises, none waits for the others
            gather_dedupe(None, index, spill=SpillConfig(0, f"{out}/sliced0.pt/spill"), feats=feats)
        except Exception as err:
            unmade = (type(err).__name__, str(err))
        def fill(into):  # the writer fails while filling: every rank raises, and the file goes with it
            if into is not None:
                raise OSError("disk gone")
        try:
            gather_into_file(4, 8, spill.dir, "feats", fill)
        except Exception as err:
            failed = (type(err).__name__, str(err))
        dist.barrier()  # the writer unlinks as it raises
        torch.save({"index": got, **kept, "backing": backing, "left": left, "after": after, "unmade": unmade,
                    "failed": failed, "left_after_failure": os.listdir(spill.dir)}, f"{out}/spilled{rank}.pt")
        dist.destroy_process_group()

    def mapped_file(tensor):
        address = tensor.data_ptr()
        for line in open("/proc/self/maps").read().splitlines():
            fields = line.split(maxsplit=5)
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < stop:
                return fields[5] if len(fields) == 6 else None
        return None

    if __name__ == "__main__":
        mp.start_processes(main, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2, start_method="fork")
    """
)


def test_two_processes_uneven_counts_identical_everywhere(tmp_path) -> None:
    script = tmp_path / "gather_ddp.py"
    script.write_text(SCRIPT)
    finished(ForkedRun([str(free_port()), str(tmp_path), str(_dead_pid())], tmp_path, script=script), timeout=120)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    sliced = [torch.load(tmp_path / f"sliced{r}.pt") for r in (0, 1)]
    # per array (index, feats, flags, count): one call for the counts, then the slices (rank 0 has 5 rows)
    assert sliced[0]["calls"] == ([(1,)] + [(1, 8)] * 5 + [(1,)] + [(1, 12)] * 5 + [(1,)] + [(5, 1)]
                                  + [(1,)] + [(1, 8)] * 5)
    for got in sliced:
        assert all(torch.equal(got[k], results[0][k]) for k in results[0])
    want_index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])
    for res in results:
        assert torch.equal(res["index"], want_index)
        assert res["feats"].dtype == torch.float16 and res["feats"].shape == (8, 2, 3)
        assert torch.equal(res["feats"], (want_index[:, None, None] * torch.ones(1, 2, 3)).half())
        assert torch.equal(res["flags"], want_index % 3 == 0)
        assert torch.equal(res["count"], want_index * 10)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    # spilled: the same values, the large arrays in one file both ranks map (unlinked once both had it)
    spilled = [torch.load(tmp_path / f"spilled{r}.pt", weights_only=False) for r in (0, 1)]
    for got in spilled:
        assert all(torch.equal(got[k], results[0][k]) for k in results[0])
        assert got["backing"]["flags"] is None or ".bin" not in got["backing"]["flags"]
        assert got["left"] == []
    for name in ("feats", "count"):
        files = {got["backing"][name] for got in spilled}
        assert len(files) == 1, files
        path = files.pop()
        assert path.endswith(".bin (deleted)") and f"/spill/{name}-" in path, path
    assert torch.equal(spilled[1]["after"], results[0]["feats"]) and bool((spilled[0]["after"] == 7).all())
    unmade = [got["unmade"] for got in spilled]
    assert unmade[0][0] in ("FileExistsError", "NotADirectoryError", "OSError"), unmade[0]
    assert "spill.dir" in unmade[0][1]
    assert unmade[1][0] == "OtherRankFailed" and "rank(s) [0]" in unmade[1][1]
    assert spilled[0]["failed"] == ("OSError", "disk gone") and spilled[1]["failed"][0] == "OtherRankFailed"
    assert spilled[0]["left_after_failure"] == spilled[1]["left_after_failure"] == []


def _dead_pid() -> int:
    """The pid of a process that has ended (a killed run's writer)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_spill_removes_only_the_files_of_killed_runs_on_this_machine(tmp_path: Path) -> None:
    space, dead, alive = pid_space(), _dead_pid(), os.getpid()
    host, namespace = space.rsplit("-", 1)
    assert host == socket.gethostname() and int(namespace) >= 0
    names = [f"feats-{space}-{dead}-0.bin", f"count-{space}-{dead}-3.bin", f"feats-{space}-{alive}-1.bin",
             f"feats-other-host-{namespace}-{dead}-0.bin", f"feats-{host}-{int(namespace) + 1}-{dead}-0.bin",
             f"feats-a-{space}-{dead}-0.bin", f"feats-{space}-{dead}-0.bin.part", "notes.bin"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_left_by_killed_runs(tmp_path)
    assert sorted(path.name for path in removed) == sorted(names[:2])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[2:])
