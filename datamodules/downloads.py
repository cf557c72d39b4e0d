"""The official file lists of GLDv2 and revisitop, fetched through :mod:`retrieval_lightning.download`.

Why: the readers in this package look for files where the official tools put them, so the
downloader reproduces those layouts (facts from cvdfoundation/google-landmark README and
``download-dataset.sh``, and filipradenovic/revisitop ``python/download.py``).

GLDv2 layout under ``root``::

    train.csv, train_clean.csv, train_label_to_category.csv       (split "train")
    index.csv, index_image_to_landmark.csv, index_label_to_category.csv   (split "index")
    test.csv, recognition_solution_v2.1.csv, retrieval_solution_v2.1.csv  (split "test")
    <split>/md5.images_NNN.txt          the official md5 list of each archive
    <split>/<a>/<b>/<c>/<id>.jpg        images, as the official script extracts them

The csv files sit at ``root`` (the official script handles images only and leaves the
csv files wherever one saves them). Archives ``<split>/images_NNN.tar`` are deleted once
verified and extracted unless ``keep_archives``.

revisitop layout under ``root`` (the official ``data_root``)::

    datasets/<name>/gnd_<name>.pkl      ground truth of roxford5k / rparis6k
    datasets/<name>/jpg/<image>.jpg     images, flattened out of the archives' folders
    datasets/revisitop1m/revisitop1m.txt
    datasets/revisitop1m/jpg/<path from revisitop1m.txt>
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

from retrieval_lightning.download import DownloadSummary, RemoteFile, download_files
from retrieval_lightning.errors import UsageError

GLDV2_BASE_URL = "https://s3.amazonaws.com/google-landmark"
GLDV2_ARCHIVES = MappingProxyType({"train": 500, "index": 100, "test": 20})
GLDV2_CSVS = MappingProxyType({
    "train": ("metadata/train.csv", "metadata/train_clean.csv", "metadata/train_label_to_category.csv"),
    "index": ("metadata/index.csv", "metadata/index_image_to_landmark.csv", "metadata/index_label_to_category.csv"),
    "test": ("metadata/test.csv", "ground_truth/recognition_solution_v2.1.csv",
             "ground_truth/retrieval_solution_v2.1.csv"),
})

REVISITOP_BASE_URLS = MappingProxyType({
    "oxford": "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings",
    "paris": "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings",
    "gnd": "http://cmp.felk.cvut.cz/revisitop/data/datasets",
    "revisitop1m": "http://ptak.felk.cvut.cz/revisitop/revisitop1m",
})
REVISITOP_IMAGE_ARCHIVES = MappingProxyType({
    "roxford5k": ("oxford", ("oxbuild_images-v1.tgz",)),
    "rparis6k": ("paris", ("paris_1-v1.tgz", "paris_2-v1.tgz")),
})
REVISITOP1M_ARCHIVES = 100


def _choose(kind: str, asked: Sequence[str], known: Sequence[str]) -> list[str]:
    """Validate a list of names (a comma-separated string is accepted), keeping the given order."""
    names = [part.strip() for part in asked.split(",")] if isinstance(asked, str) else list(asked)
    names = [name for name in names if name]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UsageError(f"unknown {kind} {unknown or names!r}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def _limit(count: int, max_archives: int | None) -> int:
    if max_archives is None:
        return count
    if max_archives < 0:
        raise UsageError(f"max_archives must be >= 0, got {max_archives}")
    return min(count, max_archives)


def gldv2_files(root: str | Path, splits: Sequence[str] = ("train", "index", "test"),
                base_url: str = GLDV2_BASE_URL, extract: bool = True, max_archives: int | None = None,
                keep_archives: bool = False) -> list[RemoteFile]:
    """The GLDv2 csv files, then each split's archives with their official md5 lists."""
    root, base = Path(root).expanduser(), base_url.rstrip("/")
    chosen = _choose("GLDv2 split", splits, tuple(GLDV2_ARCHIVES))
    items = [RemoteFile(f"{base}/{rel}", root / Path(rel).name) for split in chosen for rel in GLDV2_CSVS[split]]
    for split in chosen:
        for number in range(_limit(GLDV2_ARCHIVES[split], max_archives)):
            name = f"images_{number:03d}.tar"
            items.append(RemoteFile(
                url=f"{base}/{split}/{name}", dest=root / split / name,
                md5_url=f"{base}/md5sum/{split}/md5.images_{number:03d}.txt",
                md5_dest=root / split / f"md5.images_{number:03d}.txt",
                extract_to=root / split if extract else None, keep_archive=keep_archives))
    return items


def revisitop_files(root: str | Path, datasets: Sequence[str] = ("roxford5k", "rparis6k"),
                    base_url: Mapping[str, str] = REVISITOP_BASE_URLS, extract: bool = True,
                    max_archives: int | None = None, keep_archives: bool = False) -> list[RemoteFile]:
    """Ground truth and image archives of the chosen revisitop datasets (and the 1M distractors).

    ``max_archives`` keeps the first archives of revisitop1m only: Oxford and Paris come whole
    (their few archives are one data set each), so it is refused without revisitop1m.
    """
    unknown = sorted(set(base_url) - set(REVISITOP_BASE_URLS))
    if unknown:
        raise UsageError(f"unknown revisitop host keys {unknown}; choose from {', '.join(REVISITOP_BASE_URLS)}")
    urls = {key: value.rstrip("/") for key, value in {**REVISITOP_BASE_URLS, **base_url}.items()}
    chosen = _choose("revisitop dataset", datasets, (*REVISITOP_IMAGE_ARCHIVES, "revisitop1m"))
    if max_archives is not None and "revisitop1m" not in chosen:
        raise UsageError(f"max_archives limits the revisitop1m distractor archives only, and the datasets chosen "
                         f"({', '.join(chosen)}) do not include revisitop1m: Oxford and Paris are fetched whole")
    items: list[RemoteFile] = []
    for name in chosen:
        folder = Path(root).expanduser() / "datasets" / name
        if name == "revisitop1m":
            items.append(RemoteFile(f"{urls['revisitop1m']}/revisitop1m.txt", folder / "revisitop1m.txt"))
            for number in range(1, _limit(REVISITOP1M_ARCHIVES, max_archives) + 1):
                archive = f"revisitop1m.{number}.tar.gz"
                items.append(RemoteFile(f"{urls['revisitop1m']}/jpg/{archive}", folder / archive,
                                        extract_to=folder / "jpg" if extract else None,
                                        keep_archive=keep_archives))
            continue
        items.append(RemoteFile(f"{urls['gnd']}/{name}/gnd_{name}.pkl", folder / f"gnd_{name}.pkl"))
        host, archives = REVISITOP_IMAGE_ARCHIVES[name]
        for archive in archives:
            items.append(RemoteFile(f"{urls[host]}/{archive}", folder / archive,
                                    extract_to=folder / "jpg" if extract else None, flatten=True,
                                    keep_archive=keep_archives))
    return items


def download_gldv2(root: str | Path, splits: Sequence[str] = ("train", "index", "test"),
                   base_url: str = GLDV2_BASE_URL, workers: int = 4, extract: bool = True,
                   max_archives: int | None = None, progress: bool = True, keep_archives: bool = False,
                   retries: int = 3, retry_wait: float = 1.0) -> DownloadSummary:
    """Fetch GLDv2 (csv files, md5-checked image tars, extracted per split); resumable, re-runnable.

    ``max_archives`` keeps only the first archives of each split (a partial download).
    """
    items = gldv2_files(root, splits, base_url, extract, max_archives, keep_archives)
    return download_files(items, workers=workers, progress=progress, retries=retries,
                          retry_wait=retry_wait, desc="GLDv2")


def download_revisitop(root: str | Path, datasets: Sequence[str] = ("roxford5k", "rparis6k"),
                       base_url: Mapping[str, str] = REVISITOP_BASE_URLS, workers: int = 4,
                       extract: bool = True, progress: bool = True, max_archives: int | None = None,
                       keep_archives: bool = False, retries: int = 3,
                       retry_wait: float = 1.0) -> DownloadSummary:
    """Fetch Revisited Oxford/Paris (and ``revisitop1m``) in the official ``datasets/`` layout.

    ``base_url`` maps host keys (``oxford``, ``paris``, ``gnd``, ``revisitop1m``) to URLs;
    keys left out keep their official value. No md5 is published for these files: integrity
    rests on the transfer length and on the archive reading cleanly to its end. ``max_archives``
    keeps the first revisitop1m archives (Oxford and Paris always come whole).
    """
    items = revisitop_files(root, datasets, base_url, extract, max_archives, keep_archives)
    return download_files(items, workers=workers, progress=progress, retries=retries,
                          retry_wait=retry_wait, desc="revisitop")
