"""Downloads against a loopback HTTP server: resume, md5 re-fetch, unsafe archives, no-op re-runs.

The server (127.0.0.1, ephemeral port) serves fixture archives built here in the official
GLDv2 and revisitop layouts; it honours ``Range`` unless told not to, can cut its first
answer for a path in the middle of the body, and can serve a bad body before a good one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import socket
import tarfile
import threading
import zipfile
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from helpers import free_port
from datamodules.downloads import (GLDV2_ARCHIVES, REVISITOP1M_ARCHIVES, download_gldv2, download_revisitop,
                                   gldv2_files, revisitop_files)
from retrieval_lightning.download import (ChecksumError, DownloadError, RemoteFile, UnsafeArchiveError,
                                          download_files, extract_archive, read_md5_list)

FAST = {"progress": False, "retry_wait": 0.01}


# --------------------------------------------------------------------------- server


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: dict[str, list[bytes]] = {}
        self.served: dict[str, int] = defaultdict(int)
        self.drop_first: set[str] = set()
        self.ignore_range = False
        self.content_types: dict[str, str] = {}
        self.status: dict[str, int] = {}  # an error status to answer for a path
        self.log: list[tuple[str, str | None]] = []

    def requests(self, path: str) -> list[str | None]:
        return [rng for logged, rng in self.log if logged == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state: _State = self.server.state  # type: ignore[attr-defined]
        path, wanted = urlsplit(self.path).path, self.headers.get("Range")
        with state.lock:
            state.log.append((path, wanted))
            bodies = state.bodies.get(path)
            state.served[path] += 1
            count = state.served[path]
        if path in state.status:
            self.send_error(state.status[path])
            return
        if bodies is None:
            self.send_error(404, "Not Found")
            return
        body = bodies[min(count, len(bodies)) - 1]
        start = 0
        if wanted and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        payload = body[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(payload)))
        if path in state.content_types:
            self.send_header("Content-Type", state.content_types[path])
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if path in state.drop_first and count == 1:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = _State()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.state.base = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield httpd.state  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


# --------------------------------------------------------------------------- fixture data


def _tar(members: dict[str, bytes], gz: bool = False, links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return buffer.getvalue()


def _image_id(split: str, archive: int, k: int) -> str:
    return hashlib.md5(f"{split}{archive}{k}".encode()).hexdigest()[:16]


def _gldv2(state: _State) -> dict[str, bytes]:
    """Two train archives with md5 lists and the train csv files; returns expected files by rel path."""
    expected: dict[str, bytes] = {}
    prefix = "/google-landmark"
    for number in range(2):
        members = {}
        for k in range(3):
            image = _image_id("train", number, k)
            members[f"{image[0]}/{image[1]}/{image[2]}/{image}.jpg"] = os.urandom(3000)
        archive = _tar(members)
        state.bodies[f"{prefix}/train/images_{number:03d}.tar"] = [archive]
        digest = hashlib.md5(archive).hexdigest()
        state.bodies[f"{prefix}/md5sum/train/md5.images_{number:03d}.txt"] = [
            f"{digest}  images_{number:03d}.tar\n".encode()]
        expected.update({f"train/{name}": data for name, data in members.items()})
    for name in ("train.csv", "train_clean.csv", "train_label_to_category.csv"):
        body = f"id,landmark_id\n{_image_id('train', 0, 0)},7\n".encode()
        state.bodies[f"{prefix}/metadata/{name}"] = [body]
        expected[name] = body
    return expected


def _revisitop(state: _State, paris_extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """roxford5k and rparis6k (gnd pkl + image archives) and the 1M distractors, as the official hosts lay them."""
    expected: dict[str, bytes] = {}
    for name, prefix in (("roxford5k", "oxford"), ("rparis6k", "paris")):
        imlist = [f"{prefix}_{k:06d}" for k in range(4)]
        gnd = {"imlist": imlist[1:], "qimlist": imlist[:1],
               "gnd": [{"bbx": [1.0, 2.0, 30.0, 40.0], "easy": [0], "hard": [1], "junk": [2]}]}
        state.bodies[f"/gnd/{name}/gnd_{name}.pkl"] = [pickle.dumps(gnd)]
        expected[f"datasets/{name}/gnd_{name}.pkl"] = pickle.dumps(gnd)
        images = {image: os.urandom(500) for image in imlist}
        expected.update({f"datasets/{name}/jpg/{image}.jpg": data for image, data in images.items()})
        if name == "roxford5k":
            state.bodies["/oxford/oxbuild_images-v1.tgz"] = [
                _tar({f"oxbuild_images/{image}.jpg": data for image, data in images.items()}, gz=True)]
        else:
            for part, chunk in ((1, imlist[:2]), (2, imlist[2:])):
                members = {f"paris/landmark{part}/{image}.jpg": images[image] for image in chunk}
                if part == 1:
                    members.update(paris_extra or {})
                state.bodies[f"/paris/paris_{part}-v1.tgz"] = [_tar(members, gz=True)]
    paths = []
    for number in range(1, REVISITOP1M_ARCHIVES + 1):
        rel = f"{number % 7}/{number:05d}.jpg"
        data = os.urandom(64)
        paths.append(rel)
        state.bodies[f"/r1m/jpg/revisitop1m.{number}.tar.gz"] = [_tar({rel: data}, gz=True)]
        expected[f"datasets/revisitop1m/jpg/{rel}"] = data
    listing = ("\n".join(paths) + "\n").encode()
    state.bodies["/r1m/revisitop1m.txt"] = [listing]
    expected["datasets/revisitop1m/revisitop1m.txt"] = listing
    return expected


def _hosts(state: _State) -> dict[str, str]:
    return {"oxford": f"{state.base}/oxford", "paris": f"{state.base}/paris", "gnd": f"{state.base}/gnd",
            "revisitop1m": f"{state.base}/r1m"}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------- official lists


def test_official_file_lists_have_the_published_counts_and_urls(tmp_path):
    items = gldv2_files(tmp_path)
    tars = [item for item in items if item.dest.suffix == ".tar"]
    assert {split: sum(item.dest.parent.name == split for item in tars) for split in GLDV2_ARCHIVES} == \
        {"train": 500, "index": 100, "test": 20}
    last = next(item for item in tars if item.url.endswith("/test/images_019.tar"))
    assert last.url == "https://s3.amazonaws.com/google-landmark/test/images_019.tar"
    assert last.md5_url == "https://s3.amazonaws.com/google-landmark/md5sum/test/md5.images_019.txt"
    assert last.extract_to == tmp_path / "test"
    assert {item.dest.name for item in items if item.dest.suffix == ".csv"} >= {
        "train.csv", "index.csv", "test.csv", "retrieval_solution_v2.1.csv", "recognition_solution_v2.1.csv"}
    rop = revisitop_files(tmp_path, ("roxford5k", "rparis6k", "revisitop1m"))
    urls = {item.url for item in rop}
    assert "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl" in urls
    assert "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz" in urls
    assert "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.100.tar.gz" in urls
    assert sum(".tar.gz" in url for url in urls) == 100
    with pytest.raises(ValueError, match="unknown GLDv2 split.*valid"):
        gldv2_files(tmp_path, ("valid",))
    with pytest.raises(ValueError, match="unknown revisitop host keys"):
        revisitop_files(tmp_path, base_url={"oxfrod": "http://x"})
    # max_archives cuts revisitop1m's archives only: without it among the datasets it would be silently unused
    assert sum(".tar.gz" in item.url for item in revisitop_files(tmp_path, "rparis6k,revisitop1m", max_archives=2)) == 2
    assert len(revisitop_files(tmp_path, "rparis6k,revisitop1m", max_archives=0)) == 4  # gnd, 2 archives, the list
    with pytest.raises(ValueError, match=r"max_archives limits the revisitop1m .* \(rparis6k\) do not include"):
        revisitop_files(tmp_path, "rparis6k", max_archives=0)


def test_read_md5_list_picks_the_named_entry_and_rejects_junk(tmp_path):
    listing = tmp_path / "md5.txt"
    listing.write_text("0" * 32 + "  images_000.tar\n" + "a" * 32 + " *images_001.tar\n")
    assert read_md5_list(listing, "images_001.tar") == "a" * 32
    listing.write_text("not-a-digest  images_000.tar\n")
    with pytest.raises(ValueError, match=r"md5.txt:1: 'not-a-digest'"):
        read_md5_list(listing, "images_000.tar")


# --------------------------------------------------------------------------- GLDv2 end to end


def test_interrupted_download_resumes_with_range_and_second_run_is_a_no_op(server, tmp_path):
    expected = _gldv2(server)
    tar_path = "/google-landmark/train/images_000.tar"
    server.drop_first.add(tar_path)
    summary = download_gldv2(tmp_path, splits="train", base_url=f"{server.base}/google-landmark", workers=2,
                             max_archives=2, keep_archives=True, retry_wait=0.01, progress=True)
    size = len(server.bodies[tar_path][0])
    assert server.requests(tar_path) == [None, f"bytes={size // 2}-"]
    assert (tmp_path / "train/images_000.tar").read_bytes() == server.bodies[tar_path][0]
    assert str(tmp_path / "train/images_000.tar") in summary.resumed
    assert len(summary.fetched) == 5 and len(summary.extracted) == 2 and not summary.refetched
    tree = _tree(tmp_path)
    assert {rel: tree[rel] for rel in expected} == expected
    assert not list(tmp_path.rglob("*.part"))

    before = len(server.log)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    again = download_gldv2(tmp_path, splits=["train"], base_url=f"{server.base}/google-landmark",
                           max_archives=2, keep_archives=True, **FAST)
    assert len(server.log) == before
    assert len(again.skipped) == 5 and not (again.fetched or again.refetched or again.extracted)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stamps


def test_server_that_ignores_range_still_yields_the_whole_file(server, tmp_path):
    _gldv2(server)
    tar_path = "/google-landmark/train/images_001.tar"
    server.drop_first.add(tar_path)
    server.ignore_range = True
    summary = download_gldv2(tmp_path, splits=("train",), base_url=f"{server.base}/google-landmark",
                             max_archives=2, **FAST)
    assert len(server.requests(tar_path)) == 2 and server.requests(tar_path)[1] is not None
    assert str(tmp_path / "train/images_001.tar") not in summary.resumed
    assert not (tmp_path / "train/images_001.tar").exists()  # verified, extracted, then removed
    assert (tmp_path / "train/.images_001.tar.extracted").exists()
    image = _image_id("train", 1, 2)
    assert (tmp_path / f"train/{image[0]}/{image[1]}/{image[2]}/{image}.jpg").stat().st_size == 3000


def test_corrupt_archive_is_rejected_unextracted_and_refetched(server, tmp_path):
    expected = _gldv2(server)
    tar_path = "/google-landmark/train/images_000.tar"
    impostor = "z/z/z/zzzzzzzzzzzzzzzz.jpg"
    server.bodies[tar_path].insert(0, _tar({impostor: b"bad"}))
    summary = download_gldv2(tmp_path, splits=("train",), base_url=f"{server.base}/google-landmark",
                             max_archives=2, **FAST)
    assert len(server.requests(tar_path)) == 2
    assert summary.refetched == [str(tmp_path / "train/images_000.tar")]
    assert not (tmp_path / "train" / impostor).exists()
    tree = _tree(tmp_path)
    assert {rel: tree[rel] for rel in expected} == expected


def test_archive_that_stays_corrupt_fails_naming_the_url_and_is_never_extracted(server, tmp_path):
    _gldv2(server)
    tar_path = "/google-landmark/train/images_001.tar"
    server.bodies[tar_path] = [_tar({"z/z/z/zzzzzzzzzzzzzzzz.jpg": b"bad"})]
    with pytest.raises(ChecksumError, match=re.escape(f"{server.base}{tar_path}") + ".*md5"):
        download_gldv2(tmp_path, splits=("train",), base_url=f"{server.base}/google-landmark",
                       max_archives=2, **FAST)
    assert len(server.requests(tar_path)) == 3
    assert not (tmp_path / "train/z").exists()
    assert not (tmp_path / "train/images_001.tar").exists()
    assert not list(tmp_path.rglob("*.part")) and not (tmp_path / "train/.images_001.tar.extracted").exists()
    assert (tmp_path / "train/.images_000.tar.extracted").exists()  # the good archive still finished


def test_the_progress_bar_counts_files_out_of_all(server, tmp_path, capsys):
    """Byte totals grow only as transfers start, so the bar also says how many files of all are done."""
    for name in ("a", "b", "c"):
        server.bodies[f"/files/{name}.bin"] = [name.encode() * 1000]
    items = [RemoteFile(f"{server.base}/files/{name}.bin", tmp_path / f"{name}.bin") for name in ("a", "b", "c")]
    download_files(items, workers=2, progress=True, retry_wait=0.01)
    err = capsys.readouterr().err
    assert "0/3 files" in err and "3/3 files" in err
    assert (tmp_path / "c.bin").read_bytes() == b"c" * 1000


def test_http_error_names_url_and_status(server, tmp_path):
    missing = f"{server.base}/nowhere/file.bin"
    with pytest.raises(DownloadError, match=re.escape(missing) + ": HTTP 404"):
        download_files([RemoteFile(missing, tmp_path / "file.bin")], **FAST)
    assert server.requests("/nowhere/file.bin") == [None]  # a 404 is not retried


def test_a_full_disk_is_not_retried_as_a_lost_connection_and_names_the_files(server, tmp_path, monkeypatch):
    """ENOSPC while writing stops at once naming the part file (kept, for resuming); while extracting,
    the error names the archive and its target, and the sound archive stays."""
    import errno

    import retrieval_lightning.download as download_module

    _gldv2(server)
    tar_path = "/google-landmark/train/images_000.tar"

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open
    monkeypatch.setattr(download_module, "open",
                        lambda path, mode="r", *a, **k: FullDisk() if str(path).endswith(".tar.part")
                        else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(DownloadError, match=r"images_000\.tar\.part: cannot write after 0 bytes \(No space left"):
        download_gldv2(tmp_path, splits=("train",), base_url=f"{server.base}/google-landmark", max_archives=1,
                       workers=1, **FAST)
    assert len(server.requests(tar_path)) == 1  # not retried
    monkeypatch.undo()

    def no_room(archive, target, flatten=False, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download_module, "extract_archive", no_room)
    with pytest.raises(DownloadError, match=r"images_000\.tar: extracting into .*train failed \(No space left"):
        download_gldv2(tmp_path, splits=("train",), base_url=f"{server.base}/google-landmark", max_archives=1,
                       workers=1, **FAST)
    assert (tmp_path / "train/images_000.tar").is_file()


def test_part_file_left_by_a_killed_run_is_continued(server, tmp_path):
    body = os.urandom(10_000)
    server.bodies["/blob.bin"] = [body]
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(body[:4000])
    summary = download_files([RemoteFile(f"{server.base}/blob.bin", dest, md5=hashlib.md5(body).hexdigest())],
                             **FAST)
    assert server.requests("/blob.bin") == ["bytes=4000-"]
    assert dest.read_bytes() == body and summary.resumed == [str(dest)]


# --------------------------------------------------------------------------- revisitop end to end


def test_revisitop_lands_in_the_official_layout_and_reruns_as_no_op(server, tmp_path):
    expected = _revisitop(server)
    summary = download_revisitop(tmp_path, datasets="roxford5k,rparis6k,revisitop1m", base_url=_hosts(server),
                                 workers=4, **FAST)
    assert len(summary.fetched) == 2 + 3 + 1 + REVISITOP1M_ARCHIVES
    tree = _tree(tmp_path)
    assert {rel: tree[rel] for rel in expected} == expected
    for name in ("roxford5k", "rparis6k"):
        gnd = pickle.loads((tmp_path / f"datasets/{name}/gnd_{name}.pkl").read_bytes())
        for image in gnd["imlist"] + gnd["qimlist"]:
            assert (tmp_path / f"datasets/{name}/jpg/{image}.jpg").is_file()
        assert not list((tmp_path / f"datasets/{name}").glob("*.tgz"))
    listed = (tmp_path / "datasets/revisitop1m/revisitop1m.txt").read_text().splitlines()
    assert all((tmp_path / "datasets/revisitop1m/jpg" / rel).is_file() for rel in listed)
    before = len(server.log)
    again = download_revisitop(tmp_path, datasets=("roxford5k", "rparis6k", "revisitop1m"),
                               base_url=_hosts(server), **FAST)
    assert len(server.log) == before and len(again.skipped) == len(summary.fetched)


def test_revisitop_archive_escaping_its_folder_is_refused(server, tmp_path):
    _revisitop(server, paris_extra={"../../escape.jpg": b"evil"})
    with pytest.raises(UnsafeArchiveError, match=r"paris_1-v1\.tgz: member '\.\./\.\./escape\.jpg'"):
        download_revisitop(tmp_path, datasets=("rparis6k",), base_url=_hosts(server), **FAST)
    assert [p.name for p in tmp_path.rglob("escape.jpg")] == []
    assert not (tmp_path / "datasets/rparis6k/.paris_1-v1.tgz.extracted").exists()
    assert (tmp_path / "datasets/rparis6k/.paris_2-v1.tgz.extracted").exists()
    assert not (tmp_path / "datasets/rparis6k/jpg/paris_000000.jpg").exists()


def test_unreadable_archive_without_md5_is_refetched(server, tmp_path):
    _revisitop(server)
    good = server.bodies["/oxford/oxbuild_images-v1.tgz"][0]
    server.bodies["/oxford/oxbuild_images-v1.tgz"].insert(0, good[: len(good) // 2])
    summary = download_revisitop(tmp_path, datasets=("roxford5k",), base_url=_hosts(server), **FAST)
    assert len(server.requests("/oxford/oxbuild_images-v1.tgz")) == 2
    assert summary.refetched == [str(tmp_path / "datasets/roxford5k/oxbuild_images-v1.tgz")]
    assert len(list((tmp_path / "datasets/roxford5k/jpg").iterdir())) == 4


def test_a_download_root_that_is_a_file_is_one_error_before_any_request(server, tmp_path):
    from retrieval_lightning.errors import UsageError

    _revisitop(server)
    (tmp_path / "root").write_text("x")
    with pytest.raises(UsageError, match=r"download folder .*root/datasets/roxford5k: is inside .*root, a file"):
        download_revisitop(tmp_path / "root", datasets=("roxford5k",), base_url=_hosts(server), **FAST)
    assert server.log == []


def test_a_file_without_md5_found_in_place_unmarked_is_fetched_again(server, tmp_path):
    """The official download.py writes revisitop1m.txt and the gnd pickles in place: an interrupted run of it
    leaves a truncated file where this tool looks. Nothing can verify it (no md5, no archive), so it is replaced."""
    expected = _revisitop(server)
    listing = tmp_path / "datasets/revisitop1m/revisitop1m.txt"
    listing.parent.mkdir(parents=True)
    listing.write_bytes(expected["datasets/revisitop1m/revisitop1m.txt"][:5])
    summary = download_revisitop(tmp_path, datasets=("revisitop1m",), base_url=_hosts(server), **FAST)
    assert listing.read_bytes() == expected["datasets/revisitop1m/revisitop1m.txt"]
    assert str(listing) in summary.refetched


# --------------------------------------------------------------------------- extraction guard


@pytest.mark.parametrize("members, links, culprit", [
    ({"ok.txt": b"1", "../escape.txt": b"2"}, None, "../escape.txt"),
    ({"ok.txt": b"1", "/tmp/absolute-escape.txt": b"2"}, None, "/tmp/absolute-escape.txt"),
    ({"ok.txt": b"1", "sub/../../escape.txt": b"2"}, None, "sub/../../escape.txt"),
    ({"ok.txt": b"1"}, {"link": (tarfile.SYMTYPE, "../outside")}, "link"),
    ({"ok.txt": b"1"}, {"link": (tarfile.SYMTYPE, "/etc")}, "link"),
    ({"ok.txt": b"1"}, {"hard": (tarfile.LNKTYPE, "../../etc/passwd")}, "hard"),
])
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path, members, links, culprit):
    archive = tmp_path / "evil.tar"
    archive.write_bytes(_tar(members, links=links))
    target = tmp_path / "sandbox" / "target"
    with pytest.raises(UnsafeArchiveError, match=re.escape(f"evil.tar: member {culprit!r}")):
        extract_archive(archive, target)
    assert sorted(p.name for p in (tmp_path / "sandbox").rglob("*")) == ["target"]
    assert not Path("/tmp/absolute-escape.txt").exists()


def test_symlink_chain_resolving_outside_is_refused(tmp_path):
    archive = tmp_path / "chain.tar"
    links = {"d/e": (tarfile.SYMTYPE, ".."), "f": (tarfile.SYMTYPE, "d/e/..")}
    buffer = io.BytesIO(_tar({"d/keep.txt": b"k"}, links=links))
    with tarfile.open(fileobj=buffer, mode="a") as tar:
        info = tarfile.TarInfo("f/escape.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    archive.write_bytes(buffer.getvalue())
    sandbox = tmp_path / "sandbox"
    with pytest.raises(UnsafeArchiveError, match="chain.tar: member 'f' links outside"):
        extract_archive(archive, sandbox / "target")
    assert not (sandbox / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert {p.name for p in sandbox.iterdir()} == {"target"}


def test_writing_through_an_existing_link_to_outside_is_refused(tmp_path):
    outside, target = tmp_path / "outside", tmp_path / "target"
    outside.mkdir()
    target.mkdir()
    (target / "f").symlink_to(outside)
    archive = tmp_path / "plain.tar"
    archive.write_bytes(_tar({"f/escape.txt": b"evil"}))
    with pytest.raises(UnsafeArchiveError, match="member 'f/escape.txt' would be written outside"):
        extract_archive(archive, target)
    assert list(outside.iterdir()) == []


def test_safe_archives_extract_tar_links_and_zip(tmp_path):
    archive = tmp_path / "good.tar"
    archive.write_bytes(_tar({"a/b.txt": b"hello"}, links={"a/alias": (tarfile.SYMTYPE, "b.txt"),
                                                            "copy.txt": (tarfile.LNKTYPE, "a/b.txt")}))
    assert extract_archive(archive, tmp_path / "out") == 2
    assert (tmp_path / "out/a/alias").read_bytes() == b"hello"
    assert (tmp_path / "out/copy.txt").read_bytes() == b"hello"
    zipped = tmp_path / "good.zip"
    with zipfile.ZipFile(zipped, "w") as handle:
        handle.writestr("x/y.txt", b"zip")
        handle.writestr("../bad.txt", b"evil")
    with pytest.raises(UnsafeArchiveError, match=r"good\.zip: member '\.\./bad\.txt'"):
        extract_archive(zipped, tmp_path / "zout")
    assert not (tmp_path / "bad.txt").exists() and not (tmp_path / "zout/x").exists()


def test_cli_download_subcommand_reaches_the_datamodule_download(server, tmp_path, capsys):
    from retrieval_lightning.cli import main

    expected = _gldv2(server)
    code = main(["download", "gldv2", "--root", str(tmp_path), "--splits", "train",
                 "--base_url", f"{server.base}/google-landmark", "--workers", "2", "--max_archives", "2"])
    assert code == 0
    tree = _tree(tmp_path)
    assert {rel: tree[rel] for rel in expected} == expected
    assert "fetched" in capsys.readouterr().out
    assert main(["download", "gldv3", "--root", str(tmp_path)]) == 2
    assert "did you mean 'gldv2'" in capsys.readouterr().err
    assert main(["download", "revisitop", "--datasets", "roxford6k", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown revisitop dataset ['roxford6k']; choose from roxford5k")
    assert main(["download", "gldv2", "--splits", "train,tset", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown GLDv2 split ['tset']")


# --------------------------------------------------------------------------- issue 12: md5 lists, malformed archives


def test_malformed_cached_md5_list_is_fetched_again(server, tmp_path):
    expected = _gldv2(server)
    listing = tmp_path / "train/md5.images_000.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text("<html>503 Service Unavailable</html>\n")  # what a killed earlier run may have kept
    download_gldv2(tmp_path, splits="train", base_url=f"{server.base}/google-landmark", max_archives=2, **FAST)
    assert server.requests("/google-landmark/md5sum/train/md5.images_000.txt") == [None]
    assert listing.read_text().split()[1] == "images_000.tar"
    tree = _tree(tmp_path)
    assert {rel: tree[rel] for rel in expected} == expected


def test_md5_list_that_stays_malformed_is_a_download_error_naming_it(server, tmp_path):
    _gldv2(server)
    server.bodies["/google-landmark/md5sum/train/md5.images_001.txt"] = [b"Not Found\n"]
    with pytest.raises(DownloadError, match=r"md5\.images_001\.txt.*malformed"):
        download_gldv2(tmp_path, splits="train", base_url=f"{server.base}/google-landmark", max_archives=2, **FAST)
    assert not (tmp_path / "train/images_001.tar").exists()
    assert not (tmp_path / "train/.images_001.tar.extracted").exists()


@pytest.mark.parametrize("bad", ["cut_header", "hardlink_missing"])
def test_malformed_archive_without_md5_is_refetched_and_nothing_stays_half_extracted(server, tmp_path, bad):
    _revisitop(server)
    path = "/oxford/oxbuild_images-v1.tgz"
    good = server.bodies[path][0]
    if bad == "cut_header":  # a plain tar (no gzip) cut inside its second header
        whole = _tar({"oxbuild_images/cut_000000.jpg": b"x" * 100, "oxbuild_images/cut_000001.jpg": b"y"})
        body = whole[:1024 + 200]
    else:
        body = _tar({"oxbuild_images/cut_000000.jpg": b"x"},
                    links={"oxbuild_images/cut_000001.jpg": (tarfile.LNKTYPE, "oxbuild_images/none.jpg")}, gz=True)
    server.bodies[path] = [body, good]
    summary = download_revisitop(tmp_path, datasets=("roxford5k",), base_url=_hosts(server), **FAST)
    assert len(server.requests(path)) == 2
    assert summary.refetched == [str(tmp_path / "datasets/roxford5k/oxbuild_images-v1.tgz")]
    names = sorted(p.name for p in (tmp_path / "datasets/roxford5k/jpg").iterdir())
    assert names == [f"oxford_{k:06d}.jpg" for k in range(4)]  # nothing of the bad archive was kept


def test_a_stale_saved_md5_list_is_fetched_again_before_the_archive_is_given_up(server, tmp_path):
    """A saved list was trusted for ever: an archive republished with its list failed every run, 3 downloads each."""
    expected = _gldv2(server)
    listing = tmp_path / "train/md5.images_000.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text(f"{'0' * 32}  images_000.tar\n")  # well-formed, but not the published digest (any more)
    download_gldv2(tmp_path, splits="train", base_url=f"{server.base}/google-landmark", max_archives=1, **FAST)
    assert server.requests("/google-landmark/md5sum/train/md5.images_000.txt") == [None]
    assert len(server.requests("/google-landmark/train/images_000.tar")) == 3 + 1  # the stale digest's, the fresh one
    tree = _tree(tmp_path)
    first = [rel for rel in expected if any(_image_id("train", 0, k) in rel for k in range(3))]
    assert len(first) == 3 and all(tree.get(rel) == expected[rel] for rel in first)
    # a list that is the server's own and still does not match: named in the error
    server.bodies["/google-landmark/md5sum/train/md5.images_001.txt"] = [f"{'1' * 32}  images_001.tar\n".encode()]
    with pytest.raises(ChecksumError, match=r"images_001\.tar: still bad .*digest from .*md5\.images_001\.txt"):
        download_gldv2(tmp_path, splits="train", base_url=f"{server.base}/google-landmark", max_archives=2, **FAST)
    assert len(server.requests("/google-landmark/train/images_001.tar")) == 3  # the list unchanged: not a 4th


def test_archives_kept_by_an_earlier_run_go_when_a_later_run_does_not_keep_them(server, tmp_path):
    _gldv2(server)
    base = f"{server.base}/google-landmark"
    download_gldv2(tmp_path, splits="train", base_url=base, max_archives=1, keep_archives=True, **FAST)
    assert (tmp_path / "train/images_000.tar").is_file()
    before = len(server.log)
    download_gldv2(tmp_path, splits="train", base_url=base, max_archives=1, **FAST)
    assert not (tmp_path / "train/images_000.tar").exists() and not (tmp_path / "train/.images_000.tar.done").exists()
    assert len(server.log) == before  # nothing fetched again
    assert (tmp_path / "train/.images_000.tar.extracted").is_file()


def test_an_html_page_served_for_a_file_without_digest_is_refused_not_kept(server, tmp_path):
    """A maintenance page with status 200 was saved as the ground-truth pickle and marked done for ever."""
    server.bodies["/gnd.pkl"] = [b"<html>maintenance</html>", pickle.dumps({"imlist": []})]
    server.content_types["/gnd.pkl"] = "text/html; charset=utf-8"
    dest = tmp_path / "gnd.pkl"
    with pytest.raises(DownloadError, match=r"gnd\.pkl: the server sent an HTML page"):
        download_files([RemoteFile(f"{server.base}/gnd.pkl", dest)], **FAST)
    assert not dest.exists() and not (tmp_path / ".gnd.pkl.done").exists()
    del server.content_types["/gnd.pkl"]
    download_files([RemoteFile(f"{server.base}/gnd.pkl", dest)], **FAST)
    assert pickle.loads(dest.read_bytes()) == {"imlist": []}


def test_a_full_disk_reports_the_bytes_on_disk_where_the_rerun_resumes(server, tmp_path, monkeypatch):
    import errno

    import retrieval_lightning.download as download_module

    body = os.urandom(300_000)
    server.bodies["/blob.bin"] = [body]
    real_open = open

    class Quota:  # writes 1000 bytes of the first chunk, then the disk is full
        def __init__(self, path, mode):
            self.file = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[:1000])
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(download_module, "open", lambda path, mode="r", *a, **k: Quota(path, mode)
                        if str(path).endswith(".part") else real_open(path, mode, *a, **k), raising=False)
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match=r"blob\.bin\.part: cannot write after 1000 bytes \(Disk quota"):
        download_files([RemoteFile(f"{server.base}/blob.bin", dest)], **FAST)
    monkeypatch.undo()
    download_files([RemoteFile(f"{server.base}/blob.bin", dest)], **FAST)
    assert server.requests("/blob.bin")[-1] == "bytes=1000-" and dest.read_bytes() == body


def test_a_host_that_never_answers_is_not_asked_again_for_every_file(server, tmp_path):
    """Nothing listens on the port: the first file's attempts are refused, and the other files fail at once
    naming why (each retried on its own: GLDv2's 629 files took about 16 minutes to report a host that was down).
    A host that answered in the run keeps every file's retries."""
    down = f"http://127.0.0.1:{free_port()}"
    items = [RemoteFile(f"{down}/train/{i}.tar", tmp_path / "down" / f"{i}.tar") for i in range(6)]
    with pytest.raises(DownloadError, match=r"0\.tar: failed after 3 attempts: URLError") as failed:
        download_files(items, workers=1, retries=2, **FAST)
    notes = failed.value.__notes__
    assert len(notes) == 5 and all(re.search(r"\d\.tar: not tried, 127.0.0.1:\d+ did not answer an earlier file's 3 "
                                             r"attempts \(URLError.*refused", note) for note in notes), notes
    answered = [RemoteFile(f"{server.base}/busy/{i}.bin", tmp_path / "up" / f"{i}.bin") for i in range(3)]
    for i in range(3):
        server.status[f"/busy/{i}.bin"] = 503
    with pytest.raises(DownloadError):
        download_files(answered, workers=1, retries=2, **FAST)
    assert [len(server.requests(f"/busy/{i}.bin")) for i in range(3)] == [3, 3, 3]


def test_other_failures_are_noted_on_python_without_add_note() -> None:
    """``add_note`` is Python 3.11+; setup.cfg allows 3.10, where two failed downloads raised an AttributeError
    in place of the first download's error."""
    from retrieval_lightning.download import with_others

    class WithoutNotes(OSError):  # an exception as Python 3.10 makes it
        def __getattribute__(self, name: str):
            if name == "add_note":
                raise AttributeError(name)
            return super().__getattribute__(name)

    first = with_others(WithoutNotes("a.tar: 404"), [OSError("b.tar: 404"), OSError("c.tar: 404")])
    assert str(first) == "a.tar: 404; also failed: b.tar: 404; also failed: c.tar: 404"
    noted = with_others(OSError("a.tar: 404"), [OSError("b.tar: 404")])
    assert str(noted) == "a.tar: 404" and noted.__notes__ == ["also failed: b.tar: 404"]
