"""Verification on real photographs of ../shared/data: real pairs beat unrelated pairs; graf's GT homography."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from retrieval_lightning.match import read_rgb, sift_features
from retrieval_lightning.retrieval.geometry import match_and_verify, verify_shortlist

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PHOTOS = DATA / "photos" / "opencv" / "data"

pytestmark = [
    pytest.mark.shared_photos,
    pytest.mark.skipif(not PHOTOS.is_dir(), reason="needs ../shared/data/photos"),
]


def features(name: str, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    return sift_features(read_rgb(PHOTOS / name), n)


def test_shared_photos_real_pairs_beat_unrelated_pairs() -> None:
    box, scene, books_l, books_r = (features(n) for n in ("box.png", "box_in_scene.png", "left.jpg", "right.jpg"))
    real = [match_and_verify(*box, *scene).inliers, match_and_verify(*books_l, *books_r).inliers]
    unrelated = [r.inliers for r in verify_shortlist(*box, [books_r, books_l], [1, 2])]
    unrelated += [r.inliers for r in verify_shortlist(*books_l, [scene], [3])]
    assert min(real) >= 30 and max(unrelated) < min(real) / 2, (real, unrelated)


def test_shared_photos_graf_inliers_follow_the_ground_truth_homography() -> None:
    fs = cv2.FileStorage(str(PHOTOS / "H1to3p.xml"), cv2.FILE_STORAGE_READ)
    homography = fs.getNode("H13").mat()  # graf1 px -> graf3 px
    fs.release()
    res = match_and_verify(*features("graf1.png"), *features("graf3.png"))
    proj = cv2.perspectiveTransform(res.query_points.reshape(-1, 1, 2).astype(np.float64), homography)
    err = np.linalg.norm(proj.reshape(-1, 2) - res.db_points, axis=1)
    assert res.inliers >= 80 and np.median(err) < 3.0 and np.mean(err < 5.0) > 0.7
