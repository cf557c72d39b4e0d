"""Archive extraction against hostile and malformed archives (issue 12, items 13-14).

Each archive is built here with ``tarfile``/``zipfile``; every test checks both the error and
what is (not) on disk afterwards, inside and next to the target.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
import zipfile
from pathlib import Path

import pytest

from retrieval_lightning.archives import CorruptArchiveError, UnsafeArchiveError, extract_archive


def _tar(entries: list[tuple[str, str, bytes | str]], gz: bool = False) -> bytes:
    """Entries in order: ("file", name, data), ("dir", name, ""), ("sym"|"hard", name, link target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for kind, name, payload in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}[kind]
            info.linkname = str(payload)
            tar.addfile(info)
    return buffer.getvalue()


def _outside_links(target: Path) -> list[str]:
    root = os.path.realpath(target)
    return [str(p) for p in target.rglob("*")
            if p.is_symlink() and not os.path.realpath(p).startswith(root + os.sep)]


def test_retargeted_directory_link_cannot_redirect_a_planted_temporary_file(tmp_path):
    """The three-step attack: link at the temp name, retarget the directory it goes through, then the file."""
    archive = tmp_path / "attack.tar"
    archive.write_bytes(_tar([
        ("dir", "s", ""),
        ("sym", "e", "s"),                 # e -> s (inside)
        ("sym", "d", "e/.."),              # d -> s/.. = target (inside when made)
        ("sym", ".f.extracting", "d/x"),   # planted at the temporary name of f: target/x (inside when made)
        ("sym", "e", "."),                 # retarget e: d now resolves to target/.., the temp link to ../x
        ("file", "f", b"escaped"),
    ]))
    sandbox = tmp_path / "sandbox"
    target = sandbox / "target"
    with pytest.raises(UnsafeArchiveError, match=r"attack\.tar: member 'e' makes the earlier link 'd' point outside"):
        extract_archive(archive, target)
    assert sorted(p.name for p in sandbox.iterdir()) == ["target"]  # no sandbox/x
    assert _outside_links(target) == []
    assert list(target.iterdir()) == []  # the failed extraction is undone


def test_temporary_file_is_never_opened_through_a_link(tmp_path):
    """A link already sitting at the temporary name is replaced, not followed (O_EXCL | O_NOFOLLOW)."""
    outside, target = tmp_path / "outside", tmp_path / "target"
    outside.mkdir()
    target.mkdir()
    (target / ".f.extracting").symlink_to(outside / "x")
    archive = tmp_path / "plain.tar"
    archive.write_bytes(_tar([("file", "f", b"data")]))
    assert extract_archive(archive, target) == 1
    assert not (outside / "x").exists() and list(outside.iterdir()) == []
    assert (target / "f").read_bytes() == b"data" and not (target / "f").is_symlink()
    assert not os.path.lexists(target / ".f.extracting")


def test_link_made_inside_the_archive_at_the_temporary_name_is_not_followed(tmp_path):
    archive = tmp_path / "plant.tar"
    archive.write_bytes(_tar([("file", "victim", b"keep"), ("sym", ".f.extracting", "victim"), ("file", "f", b"new")]))
    extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out/victim").read_bytes() == b"keep"
    assert (tmp_path / "out/f").read_bytes() == b"new" and not (tmp_path / "out/f").is_symlink()


@pytest.mark.parametrize("entries, pattern", [
    ([("file", "a.txt", b"1"), ("hard", "b.txt", "missing.txt")], "hardlink 'b.txt' points to no earlier file"),
    ([("dir", "d", ""), ("hard", "b.txt", "d")], "hardlink 'b.txt' points to a directory"),
    ([("hard", "b.txt", "a.txt"), ("file", "a.txt", b"1")], "hardlink 'b.txt' points to no earlier file"),
])
def test_malformed_hardlinks_are_corrupt_and_leave_nothing(tmp_path, entries, pattern):
    archive = tmp_path / "bad.tar"
    archive.write_bytes(_tar(entries))
    with pytest.raises(CorruptArchiveError, match=pattern):
        extract_archive(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("cut", [2048 + 100, 2048, 2048 + 7])
def test_plain_tar_cut_inside_or_at_a_header_is_corrupt(tmp_path, cut):
    """Three 1-block files: cut within the third header, right after the second member, or just past it."""
    whole = _tar([("file", f"{n}.txt", bytes([65 + n]) * 300) for n in range(3)])
    assert len(whole) > cut
    archive = tmp_path / "cut.tar"
    archive.write_bytes(whole[:cut])
    with pytest.raises(CorruptArchiveError, match=r"cut\.tar"):
        extract_archive(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_truncated_member_data_undoes_the_files_already_written(tmp_path):
    whole = _tar([("file", "a.txt", b"a" * 600), ("file", "b.txt", b"b" * 5000)], gz=True)
    archive = tmp_path / "half.tgz"
    archive.write_bytes(whole[: len(whole) - 20])
    with pytest.raises(CorruptArchiveError, match=r"half\.tgz"):
        extract_archive(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("damage", ["flipped", "no_trailer"])
def test_a_gzip_archive_whose_data_fails_its_crc_is_corrupt_and_leaves_nothing(tmp_path, damage):
    """A flipped bit inside a stored (not compressed) deflate block decompresses without error, to other
    bytes: only gzip's CRC-32 at the end of the stream tells, and listing the members stops before it."""
    payload = random.Random(0).randbytes(4000)  # random: deflate stores it, so a flipped bit changes the data only
    whole = bytearray(_tar([("file", "a.jpg", payload)], gz=True))
    if damage == "flipped":
        whole[len(whole) // 2] ^= 0x10
    else:
        del whole[-8:]  # CRC-32 and length
    archive = tmp_path / f"{damage}.tgz"
    archive.write_bytes(bytes(whole))
    with pytest.raises(CorruptArchiveError, match=rf"{damage}\.tgz"):
        extract_archive(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_tar_whose_last_member_is_a_zip_extracts_as_a_tar(tmp_path):
    """``zipfile.is_zipfile`` finds a zip's end record anywhere in the last 64 KiB of a file."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as handle:
        handle.writestr("inner.txt", "inside the zip")
    archive = tmp_path / "bundle.tar"
    archive.write_bytes(_tar([("file", "0/1/2/012a.jpg", b"jpeg bytes"),
                              ("file", "docs/bundle.zip", inner.getvalue())]))
    assert zipfile.is_zipfile(archive)
    assert extract_archive(archive, tmp_path / "out") == 2
    assert (tmp_path / "out/0/1/2/012a.jpg").read_bytes() == b"jpeg bytes"
    assert (tmp_path / "out/docs/bundle.zip").read_bytes() == inner.getvalue()


def test_total_size_bound_refuses_before_writing(tmp_path):
    archive = tmp_path / "big.tar"
    archive.write_bytes(_tar([("file", "a.bin", b"x" * 3000)]))
    with pytest.raises(UnsafeArchiveError, match=r"big\.tar: declares 3000 bytes"):
        extract_archive(archive, tmp_path / "out", max_bytes=2048)
    assert list((tmp_path / "out").iterdir()) == []
    assert extract_archive(archive, tmp_path / "ok", max_bytes=4096) == 1


def test_compression_ratio_bound_refuses_a_zip_bomb(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as handle:
        with handle.open("zeros.bin", "w") as out:
            for _ in range(72):
                out.write(bytes(1 << 20))
    assert bomb.stat().st_size * 100 < 72 << 20
    with pytest.raises(UnsafeArchiveError, match=r"bomb\.zip: declares 75497472 bytes"):
        extract_archive(bomb, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_files_links_and_hardlinks_of_a_good_archive_still_extract(tmp_path):
    archive = tmp_path / "good.tgz"
    archive.write_bytes(_tar([("dir", "a", ""), ("file", "a/b.txt", b"hello"), ("sym", "a/alias", "b.txt"),
                              ("sym", "up", "a"), ("hard", "copy.txt", "a/b.txt"), ("file", "up/c.txt", b"c")],
                             gz=True))
    assert extract_archive(archive, tmp_path / "out") == 3
    out = tmp_path / "out"
    assert (out / "a/alias").read_bytes() == b"hello" and (out / "copy.txt").read_bytes() == b"hello"
    assert (out / "a/c.txt").read_bytes() == b"c"
    assert extract_archive(archive, tmp_path / "flat", flatten=True) == 3
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["b.txt", "c.txt", "copy.txt"]
