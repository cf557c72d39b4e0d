"""FeatureStore: round trip, ragged kinds, read-only memory maps, identity refusal, atomic creation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval_lightning.retrieval.store import FeatureStore, KindSpec, StoreIdentityError

IDENTITY = {"model": "tiny", "weights_sha256": "abc123", "scales": [0.707, 1.0, 1.414]}


@pytest.fixture()
def arrays() -> dict:
    rng = np.random.default_rng(0)
    return {
        "global": rng.standard_normal((7, 5)).astype(np.float16),
        "verifier": rng.standard_normal((7, 2, 3)).astype(np.float32),
        "local_desc": [rng.standard_normal((n, 4)).astype(np.float32) for n in (3, 0, 1, 5, 2, 2, 4)],
    }


def test_round_trip_fixed_and_ragged(tmp_path, arrays) -> None:
    index = np.array([2, 3, 5, 8, 13, 21, 34])
    FeatureStore.from_arrays(tmp_path / "s", arrays, IDENTITY, index=index)
    store = FeatureStore.open(tmp_path / "s", expect_identity=IDENTITY)
    assert len(store) == 7
    np.testing.assert_array_equal(store.index, index)
    np.testing.assert_array_equal(store.array("global"), arrays["global"])
    assert store.array("global").dtype == np.float16
    np.testing.assert_array_equal(store.get("verifier", [6, 0, 3]), arrays["verifier"][[6, 0, 3]])
    got = store.get("local_desc", [3, 1, 0])
    for part, want in zip(got, [arrays["local_desc"][i] for i in (3, 1, 0)]):
        np.testing.assert_array_equal(part, want)
    assert got[1].shape == (0, 4)
    np.testing.assert_array_equal(store.rows_of([21, 2]), [5, 0])
    with pytest.raises(KeyError, match="dataset index 4"):
        store.rows_of([4])


def test_manifest_and_bytes_per_image(tmp_path, arrays) -> None:
    store = FeatureStore.from_arrays(tmp_path / "s", arrays, IDENTITY)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format"] == "retrieval-lightning-feature-store" and manifest["version"] == 1
    assert manifest["count"] == 7
    assert manifest["kinds"]["global"] == {
        "dtype": "float16", "shape": [5], "ragged": False, "rows": 7, "bytes_per_image": 10.0
    }
    assert manifest["kinds"]["local_desc"]["rows"] == 17
    assert store.bytes_per_image["verifier"] == 24.0
    # ragged: 17 rows of 4 float32 plus 8 offsets of int64, spread over 7 images
    assert store.bytes_per_image["local_desc"] == pytest.approx((17 * 16 + 8 * 8) / 7)
    assert store.kinds["local_desc"] == KindSpec("float32", (4,), ragged=True)


def test_opened_store_is_read_only(tmp_path, arrays) -> None:
    FeatureStore.from_arrays(tmp_path / "s", arrays, IDENTITY)
    store = FeatureStore.open(tmp_path / "s")
    data = store.array("global")
    assert isinstance(data, np.memmap)
    with pytest.raises(ValueError, match="read-only"):
        data[0, 0] = 1
    with pytest.raises(ValueError, match="read-only"):
        store.index[0] = 99


def test_identity_mismatch_names_the_differences(tmp_path, arrays) -> None:
    FeatureStore.from_arrays(tmp_path / "s", arrays, IDENTITY)
    other = {**IDENTITY, "weights_sha256": "fff", "image_size": 512}
    with pytest.raises(StoreIdentityError) as err:
        FeatureStore.open(tmp_path / "s", expect_identity=other)
    message = str(err.value)
    assert str(tmp_path / "s") in message
    assert "'weights_sha256': store has 'abc123', expected 'fff'" in message
    assert "'image_size' missing in store" in message
    assert "scales" not in message
    # tuples and lists are the same identity once written as JSON
    FeatureStore.open(tmp_path / "s", expect_identity={**IDENTITY, "scales": (0.707, 1.0, 1.414)})


def test_builder_is_atomic_and_refuses_overwrite(tmp_path) -> None:
    builder = FeatureStore.create(tmp_path / "s", {"global": KindSpec("float16", (3,))}, count=4, identity=IDENTITY)
    builder.index[:] = np.arange(4)
    builder.array("global")[:] = 1
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        FeatureStore.open(tmp_path / "s")  # not published before commit
    store = builder.commit()
    assert store.get("global", [3]).tolist() == [[1, 1, 1]]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary directory left behind
    with pytest.raises(FileExistsError, match="already exists"):
        FeatureStore.create(tmp_path / "s", {"global": KindSpec("float16", (3,))}, count=4)


def test_bad_inputs_are_named(tmp_path, arrays) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        FeatureStore.from_arrays(tmp_path / "a", {"global": arrays["global"]}, index=[0, 1, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="'bad.name' is invalid"):
        FeatureStore.from_arrays(tmp_path / "b", {"bad.name": arrays["global"]})
    store = FeatureStore.from_arrays(tmp_path / "c", arrays)
    with pytest.raises(KeyError, match="no kind 'missing'"):
        store.get("missing", [0])
    with pytest.raises(IndexError, match="row 7 out of range"):
        store.get("global", [7])
    with pytest.raises(ValueError, match="format version 2"):
        manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
        (tmp_path / "c" / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
        FeatureStore.open(tmp_path / "c")


@pytest.mark.parametrize(("manifest", "message"), [
    ('{"name": "my web app", "version": 1}', r"not a feature-store manifest \(format None"),
    ("[]", r"not a feature-store manifest \(format 'list'"),
    ("{not json", r"not a feature-store manifest \(invalid JSON"),
    (None, "format version 2 is not supported .* extract the store again"),
    ("drop count", r"malformed feature-store manifest \('count' missing\)"),
    ("drop rows", r"malformed feature-store manifest \(kind 'global' lacks rows\)"),
])
def test_a_manifest_of_another_program_or_version_is_one_format_error(tmp_path, arrays, manifest, message) -> None:
    """The CLI prints a DataFormatError in one line; a KeyError or AttributeError was a traceback."""
    from retrieval_lightning.errors import DataFormatError

    FeatureStore.from_arrays(tmp_path / "c", {"global": arrays["global"]})
    path = tmp_path / "c" / "manifest.json"
    written = json.loads(path.read_text())
    if manifest is None:
        manifest = json.dumps({**written, "version": 2})
    elif manifest == "drop count":
        manifest = json.dumps({k: v for k, v in written.items() if k != "count"})
    elif manifest == "drop rows":
        written["kinds"]["global"].pop("rows")
        manifest = json.dumps(written)
    path.write_text(manifest)
    with pytest.raises(DataFormatError, match=message):
        FeatureStore.open(tmp_path / "c")


def test_a_ragged_image_of_another_row_width_a_truncated_file_and_an_empty_store_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"kind 'loc' image 1: expected 2 rows of shape \[4\], got \[2, 1\]"):
        FeatureStore.from_arrays(tmp_path / "r", {"loc": [np.zeros((3, 4), np.float32), np.ones((2, 1), np.float32)]})
    store = FeatureStore.from_arrays(tmp_path / "t", {"global": np.ones((6, 4), np.float16),
                                                      "loc": [np.ones((2, 3), np.float32)] * 6})
    for name in ("global.npy", "index.npy"):
        (tmp_path / "t" / name).write_bytes((tmp_path / "t" / name).read_bytes()[:60])
        with pytest.raises(ValueError, match=rf"feature store {tmp_path / 't'}: {name} is unreadable"):
            FeatureStore.open(tmp_path / "t").array("global")
    empty = FeatureStore.from_arrays(tmp_path / "e", {"global": np.zeros((0, 4), np.float16)})
    with pytest.raises(KeyError, match="is empty: no entry for dataset index 3"):
        empty.rows_of([3])
    assert empty.rows_of([]).tolist() == [] and store.count == 6


def _crash_while_building(path) -> int:
    """A process that dies (no Python clean-up) in the middle of writing a store; returns its pid."""
    import subprocess
    import sys

    code = (
        "import os, sys, numpy as np\n"
        "from retrieval_lightning.retrieval.store import FeatureStore, KindSpec\n"
        "b = FeatureStore.create(sys.argv[1], {'global': KindSpec('float16', (64,))}, count=1000)\n"
        "b.array('global')[:] = 1\n"
        "print(os.getpid(), flush=True)\n"
        "os._exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    return int(proc.stdout.split()[0])


def test_build_folder_of_a_crashed_process_is_removed_by_the_next_create(tmp_path) -> None:
    import os
    import socket

    from retrieval_lightning.retrieval.workdirs import pid_space

    pid = _crash_while_building(tmp_path / "s")
    hidden = [p.name for p in tmp_path.iterdir()]
    assert len(hidden) == 1 and hidden[0].startswith(".s.building-") and hidden[0].endswith(f"-{pid}")
    live = tmp_path / f".s.building-{pid_space()}-{os.getppid()}"  # a concurrent live builder
    other_host = tmp_path / f".s.building-{socket.gethostname()}x-0-{pid}"  # cannot be checked from here
    other_space = tmp_path / f".s.building-{pid_space()}1-{pid}"  # another container's pids
    other_store = tmp_path / f".t.building-{pid}"  # another store's folder
    kept = (live, other_host, other_space, other_store)
    for folder in kept:
        folder.mkdir()
    FeatureStore.from_arrays(tmp_path / "s", {"global": np.ones((2, 3), np.float16)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s", *(folder.name for folder in kept)])


def test_replacing_a_store_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch) -> None:
    import os

    path = tmp_path / "s"
    FeatureStore.from_arrays(path, {"global": np.zeros((2, 3), np.float16)}, IDENTITY)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).startswith(str(tmp_path / ".s.building")) and str(dst) == str(path):
            raise OSError("disk vanished while publishing the new store")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk vanished"):
        FeatureStore.from_arrays(path, {"global": np.ones((2, 3), np.float16)}, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    old = FeatureStore.open(path, expect_identity=IDENTITY)  # the old store survived, whole
    assert old.get("global", [0, 1]).tolist() == [[0, 0, 0]] * 2
    new = FeatureStore.from_arrays(path, {"global": np.ones((2, 3), np.float16)}, overwrite=True)
    assert new.get("global", [1]).tolist() == [[1, 1, 1]]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_old_store_moved_aside_by_a_crashed_replace_is_put_back(tmp_path) -> None:
    from retrieval_lightning.retrieval.store import clean_stale_builds

    pid = _crash_while_building(tmp_path / "probe")  # a pid that is certainly dead
    aside = tmp_path / f".s.replaced-{pid}"
    FeatureStore.from_arrays(aside, {"global": np.zeros((2, 3), np.float16)}, IDENTITY)
    clean_stale_builds(tmp_path / "s")
    assert FeatureStore.open(tmp_path / "s", expect_identity=IDENTITY).count == 2 and not aside.exists()


def test_evaluate_rescores_from_a_store_holding_the_heads_entries(tmp_path) -> None:
    """Re-ranked metrics need a re-ranking head, re-ranking on, and that head's entries in the store."""
    from types import SimpleNamespace

    from retrieval_lightning.retrieval.store_eval import reranks_from_store

    store = FeatureStore.from_arrays(tmp_path / "s", {"global": np.eye(2, dtype=np.float16),
                                                      "verifier-rows": np.ones((2, 3), np.float16)})
    model = SimpleNamespace(rerank_head=object(), rerank=SimpleNamespace(enabled=True), rerank_prefix="verifier-",
                            sparsifier=None)
    assert reranks_from_store(model, store)
    assert not reranks_from_store(SimpleNamespace(**{**vars(model), "rerank_prefix": "local-"}), store)  # no entries
    assert not reranks_from_store(SimpleNamespace(**{**vars(model), "rerank": SimpleNamespace(enabled=False)}), store)
    assert not reranks_from_store(SimpleNamespace(**{**vars(model), "rerank_head": None}), store)


def test_a_folder_above_the_stores_lists_them(tmp_path: Path) -> None:
    """``search features/`` (extract's output directory) instead of ``features/<set>/store``: the stores are named."""
    for name in ("roxford5k", "rparis6k"):
        (tmp_path / name / "store").mkdir(parents=True)
        (tmp_path / name / "store" / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"stores inside it: .*roxford5k/store, .*rparis6k/store"):
        FeatureStore.open(tmp_path)
