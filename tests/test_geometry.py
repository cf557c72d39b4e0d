"""Matching and geometric verification (retrieval_lightning.retrieval.geometry) on synthetic scenes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from retrieval_lightning.retrieval.geometry import (
    MatchOptions,
    match_and_verify,
    similarity_floor,
    tentative_matches,
    verify_shortlist,
)

AFFINE = np.array([[0.9, -0.2, 35.0], [0.15, 1.1, -12.0], [0.0, 0.0, 1.0]])  # db -> query


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def scene(
    seed: int, n_true: int = 150, n_out: int = 150, dim: int = 64, model: np.ndarray = AFFINE, noise_px: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Query/db features: ``n_true`` correspondences under ``model`` (db -> query) + outliers."""
    rng = np.random.default_rng(seed)
    db_kp = rng.uniform(0, 400, (n_true + n_out, 2))
    db_desc = unit(rng.standard_normal((n_true + n_out, dim)))
    proj = cv2.perspectiveTransform(db_kp[:n_true].reshape(-1, 1, 2), model).reshape(-1, 2)
    q_kp = np.concatenate([proj + rng.normal(0, noise_px, proj.shape), rng.uniform(0, 400, (n_out, 2))])
    q_desc = np.concatenate([unit(db_desc[:n_true] + 0.05 * rng.standard_normal((n_true, dim))),
                             unit(rng.standard_normal((n_out, dim)))])
    return q_kp.astype(np.float32), q_desc, db_kp.astype(np.float32), db_desc


def test_affine_ground_truth_recovered() -> None:
    q_kp, q_desc, d_kp, d_desc = scene(0)
    res = match_and_verify(q_kp, q_desc, d_kp, d_desc, threshold=3.0)
    assert res.matches >= 150 and 145 <= res.inliers <= 150
    np.testing.assert_allclose(res.model, AFFINE, atol=0.05 * np.abs(AFFINE).max())
    mapped = cv2.perspectiveTransform(res.db_points.reshape(-1, 1, 2).astype(np.float64), AFFINE).reshape(-1, 2)
    assert np.median(np.linalg.norm(mapped - res.query_points, axis=1)) < 1.5
    assert len(res.query_points) == len(res.db_points) == res.inliers


@pytest.mark.parametrize("method", ["ransac", "magsac"])
def test_homography_ground_truth_recovered(method: str) -> None:
    homography = np.array([[1.05, 0.1, 20.0], [-0.05, 0.95, 10.0], [4e-4, -2e-4, 1.0]])
    q_kp, q_desc, d_kp, d_desc = scene(1, model=homography)
    res = match_and_verify(q_kp, q_desc, d_kp, d_desc, model="homography", method=method, threshold=3.0)
    assert res.inliers >= 140
    probe = np.array([[[50.0, 50.0]], [[350.0, 80.0]], [[200.0, 380.0]]])
    err = cv2.perspectiveTransform(probe, res.model) - cv2.perspectiveTransform(probe, homography)
    assert np.abs(err).max() < 2.0


@pytest.mark.parametrize("method", ["ransac", "magsac"])
def test_seed_is_deterministic_across_threads_and_rng_state(method: str) -> None:
    # 6 % inliers and 30 iterations: RANSAC's outcome depends on its random samples
    q_kp, q_desc, d_kp, d_desc = scene(2, n_true=12, n_out=188)
    opts = {"threshold": 2.0, "max_iters": 30, "matching": "one_way", "max_distance": 2.0, "method": method}
    first = {s: match_and_verify(q_kp, q_desc, d_kp, d_desc, seed=s, **opts) for s in range(8)}
    assert len({r.inliers for r in first.values()}) > 1, "the seed has no effect"
    results: dict[tuple[int, int], tuple[int, bytes]] = {}

    def run(worker: int) -> None:
        cv2.setRNGSeed(1000 + worker)  # OpenCV's per-thread RNG must not matter
        for s in reversed(range(8)) if worker % 2 else range(8):
            r = match_and_verify(q_kp, q_desc, d_kp, d_desc, seed=s, **opts)
            results[worker, s] = (r.inliers, r.query_indices.tobytes())

    with ThreadPoolExecutor(max_workers=4) as pool:
        for done in [pool.submit(run, w) for w in range(4)]:
            done.result()  # re-raises a worker's exception here
    assert len(results) == 4 * 8
    for (_, s), got in results.items():
        assert got == (first[s].inliers, first[s].query_indices.tobytes())


def test_repetitive_texture_does_not_inflate_inliers() -> None:
    """30 query keypoints on a repeated motif near one spot all resemble one db keypoint."""
    rng = np.random.default_rng(3)
    q_kp, q_desc, d_kp, d_desc = scene(3, n_true=10, n_out=0)
    motif = unit(rng.standard_normal((1, 64)))
    spot = cv2.perspectiveTransform(np.array([[[200.0, 200.0]]]), AFFINE).reshape(2)
    rep_kp = spot + rng.uniform(-8, 8, (30, 2))
    rep_desc = unit(motif + 0.05 * rng.standard_normal((30, 64)))
    q_kp = np.concatenate([q_kp, rep_kp]).astype(np.float32)
    q_desc = np.concatenate([q_desc, rep_desc])
    d_kp = np.concatenate([d_kp, [[200.0, 200.0]]]).astype(np.float32)
    d_desc = np.concatenate([d_desc, motif])

    reference = match_and_verify(q_kp, q_desc, d_kp, d_desc, reference=True, reference_trials=200)
    assert reference.inliers >= 35  # one-way 1-NN, raw count: the motif counts ~30 times
    one_way = match_and_verify(q_kp, q_desc, d_kp, d_desc, matching="one_way")
    mutual = match_and_verify(q_kp, q_desc, d_kp, d_desc)
    assert one_way.matches >= 35 and one_way.inliers == 11  # same matches, each db keypoint once
    assert mutual.matches == 11 and mutual.inliers == 11
    assert len(np.unique(one_way.db_indices)) == len(one_way.db_indices) == 11


def test_duplicate_positions_count_once() -> None:
    """Two descriptors at one position (SIFT orientations) are one keypoint."""
    q_kp, q_desc, d_kp, d_desc = scene(4, n_true=20, n_out=0)
    q_kp2 = np.concatenate([q_kp, q_kp[:10]])
    d_kp2 = np.concatenate([d_kp, d_kp[:10]])
    rng = np.random.default_rng(4)
    extra = unit(rng.standard_normal((10, 64)))
    res = match_and_verify(q_kp2, np.concatenate([q_desc, extra]), d_kp2, np.concatenate([d_desc, extra]))
    assert res.matches == 30 and res.inliers == 20


def test_distinct_places_are_a_distance_not_a_grid() -> None:
    """Points a hair apart are one place wherever they fall (a 1-px floor grid split 0.99/1.01 and
    merged 0.01/0.99): whether a place stored at two scales merges must not depend on grid lines."""
    q_kp, q_desc, d_kp, d_desc = scene(4, n_true=20, n_out=0)
    rng = np.random.default_rng(4)
    extra = unit(rng.standard_normal((10, 64)))
    for shift in (0.02, -0.02, 0.3):  # across a grid line, inside one cell, both sides of an integer
        q_kp2 = np.concatenate([q_kp, np.floor(q_kp[:10]) + shift]).astype(np.float32)
        d_kp2 = np.concatenate([d_kp, np.floor(d_kp[:10]) - shift]).astype(np.float32)
        q_kp2[:10], d_kp2[:10] = np.floor(q_kp[:10]), np.floor(d_kp[:10])
        res = match_and_verify(q_kp2, np.concatenate([q_desc, extra]), d_kp2, np.concatenate([d_desc, extra]),
                               threshold=2.0)
        assert res.matches == 30 and res.inliers == 20, shift
        far = match_and_verify(q_kp2, np.concatenate([q_desc, extra]), d_kp2, np.concatenate([d_desc, extra]),
                               threshold=2.0, distinct_px=abs(shift))  # closer than: not at exactly the radius
        assert far.inliers == 30, shift


def test_distinct_px_zero_counts_every_inlier_as_the_paper() -> None:
    """The official DELG score is the raw inlier count: many-to-one matches count as often as they occur."""
    rng = np.random.default_rng(3)
    q_kp, q_desc, d_kp, d_desc = scene(3, n_true=10, n_out=0)
    motif = unit(rng.standard_normal((1, 64)))
    spot = cv2.perspectiveTransform(np.array([[[200.0, 200.0]]]), AFFINE).reshape(2)
    q_kp = np.concatenate([q_kp, spot + rng.uniform(-3, 3, (30, 2))]).astype(np.float32)
    q_desc = np.concatenate([q_desc, unit(motif + 0.05 * rng.standard_normal((30, 64)))])
    d_kp = np.concatenate([d_kp, [[200.0, 200.0]]]).astype(np.float32)
    d_desc = np.concatenate([d_desc, motif])
    raw = match_and_verify(q_kp, q_desc, d_kp, d_desc, matching="one_way", distinct_px=0)
    distinct = match_and_verify(q_kp, q_desc, d_kp, d_desc, matching="one_way")
    assert raw.matches == distinct.matches == 40
    assert raw.inliers == 40 and distinct.inliers == 11
    with pytest.raises(ValueError, match="distinct_px must be >= 0"):
        match_and_verify(q_kp, q_desc, d_kp, d_desc, distinct_px=-1)


def test_tentative_matches_against_brute_force() -> None:
    rng = np.random.default_rng(5)
    q, d = unit(rng.standard_normal((60, 16))), unit(rng.standard_normal((50, 16)))
    sims = q @ d.T
    dist = np.linalg.norm(q[:, None] - d[None], axis=2)
    opts = MatchOptions(max_distance=1.2)
    expect = {(i, int(dist[i].argmin())) for i in range(60)
              if dist[i].min() < 1.2 and dist[:, dist[i].argmin()].argmin() == i}
    got = set(zip(*(a.tolist() for a in tentative_matches(sims, 16, False, opts))))
    assert got == expect and len(expect) > 5
    ratio = MatchOptions(max_distance=1.2, matching="one_way", ratio=0.9)
    top2 = np.sort(dist, axis=1)[:, :2]
    expect = {(i, int(dist[i].argmin())) for i in range(60) if top2[i, 0] < 1.2 and top2[i, 0] < 0.9 * top2[i, 1]}
    assert set(zip(*(a.tolist() for a in tentative_matches(sims, 16, False, ratio)))) == expect


def test_hamming_threshold_and_distances() -> None:
    assert similarity_floor(128, True, MatchOptions()) == 128 - 2 * 42 - 0.5  # hamming <= 42 < 128/3
    assert similarity_floor(96, True, MatchOptions()) == 96 - 2 * 31 - 0.5
    rng = np.random.default_rng(6)
    qb = np.packbits(rng.standard_normal((40, 128)) > 0, axis=1)
    db = np.packbits(rng.standard_normal((30, 128)) > 0, axis=1)
    db[:5] = qb[:5] ^ np.packbits(rng.random((5, 128)) < 0.1, axis=1)  # ~13 bits apart
    ham = np.unpackbits(qb[:, None] ^ db[None], axis=2).sum(axis=2)  # independent XOR popcount
    signs = lambda b: np.unpackbits(b, axis=1).astype(np.float32) * 2 - 1  # noqa: E731
    q_idx, d_idx = tentative_matches(signs(qb) @ signs(db).T, 128, True, MatchOptions(matching="one_way"))
    expect = [(i, int(ham[i].argmin())) for i in range(40) if ham[i].min() <= 42]
    assert list(zip(q_idx.tolist(), d_idx.tolist())) == expect and len(expect) >= 5


def test_hamming_agrees_with_float_on_sign_bits() -> None:
    q_kp, q_desc, d_kp, d_desc = scene(7, n_true=150, n_out=150, dim=128)
    fl = match_and_verify(q_kp, q_desc, d_kp, d_desc, threshold=3.0)
    bits = match_and_verify(q_kp, np.packbits(q_desc > 0, axis=1), d_kp, np.packbits(d_desc > 0, axis=1), threshold=3.0)
    assert fl.inliers >= 145 and abs(bits.inliers - fl.inliers) <= 0.05 * fl.inliers
    probe = np.array([[[0.0, 0.0]], [[400.0, 0.0]], [[0.0, 400.0]], [[400.0, 400.0]]])
    for res in (fl, bits):  # both models within a pixel or two of the truth over the image
        err = cv2.perspectiveTransform(probe, res.model) - cv2.perspectiveTransform(probe, AFFINE)
        assert np.abs(err).max() < 2.0
    common = set(fl.query_indices.tolist()) & set(bits.query_indices.tolist())
    assert len(common) >= 0.9 * fl.inliers


@pytest.mark.parametrize("binary", [False, True])
def test_verify_shortlist_equals_per_pair(binary: bool) -> None:
    q_kp, q_desc, *_ = scene(8)
    cands = []
    for k in range(7):
        _, _, d_kp, d_desc = scene(8 if k % 3 == 0 else 100 + k)  # related every third, others not
        cands.append((d_kp, d_desc))
    cands.append((np.zeros((0, 2), np.float32), np.zeros((0, 64), np.float32)))  # an image with no features
    pack = (lambda x: np.packbits(x > 0, axis=1)) if binary else (lambda x: x.astype(np.float16))
    cands = [(kp, pack(desc)) for kp, desc in cands]
    seeds = [11 * k + 3 for k in range(len(cands))]
    batch = verify_shortlist(q_kp, pack(q_desc), cands, seeds, workers=2, threshold=4.0)
    single = [match_and_verify(q_kp, pack(q_desc), kp, desc, seed=s, threshold=4.0)
              for (kp, desc), s in zip(cands, seeds)]
    assert [r.inliers for r in batch] == [r.inliers for r in single]
    assert batch[0].inliers > 100 and batch[1].inliers < 10 and batch[-1].inliers == 0
    for a, b in zip(batch, single):
        assert a.query_indices.tolist() == b.query_indices.tolist()
        assert (a.model is None) == (b.model is None) and (a.model is None or np.array_equal(a.model, b.model))


def test_reference_path_runs_and_is_seeded() -> None:
    q_kp, q_desc, d_kp, d_desc = scene(9)
    runs = [match_and_verify(q_kp, q_desc, d_kp, d_desc, reference=True, reference_trials=30, seed=5)
            for _ in range(2)]
    assert runs[0].inliers == runs[1].inliers >= 145
    assert runs[0].query_indices.tolist() == runs[1].query_indices.tolist()
    np.testing.assert_allclose(runs[0].model, AFFINE, atol=0.05 * np.abs(AFFINE).max())
    # a scene where RANSAC's draws matter (40 true correspondences, 60 matched at unrelated places, 4 trials):
    # each seed gives its own result, and the same one every time
    q_kp, q_desc, d_kp, d_desc = scene(9, n_true=40, n_out=0)
    rng = np.random.default_rng(1)
    shared = unit(rng.standard_normal((60, q_desc.shape[1])))
    q_kp, d_kp = (np.concatenate([kp, rng.uniform(0, 400, (60, 2)).astype(np.float32)]) for kp in (q_kp, d_kp))
    q_desc, d_desc = np.concatenate([q_desc, shared]), np.concatenate([d_desc, shared])
    found = {}
    for seed in range(6):
        twice = [match_and_verify(q_kp, q_desc, d_kp, d_desc, reference=True, reference_trials=4, seed=seed)
                 for _ in range(2)]
        assert twice[0].query_indices.tolist() == twice[1].query_indices.tolist(), seed
        found[seed] = tuple(twice[0].query_indices.tolist())
    assert len(set(found.values())) >= 3, found
    with pytest.raises(TypeError, match="float descriptors only"):
        match_and_verify(q_kp, np.packbits(q_desc > 0, axis=1), d_kp, np.packbits(d_desc > 0, axis=1), reference=True)


def test_reference_path_counts_matches_along_one_line_as_the_official_code() -> None:
    """DELG keypoints sit on a grid: one row of a facade matched alone is collinear. The final affine fit
    then fails (scikit-image >= 0.26: a falsy ``FailedEstimation``); the official code counts the best
    trial's inliers anyway, and one such pair must not stop a whole evaluation."""
    q_kp = np.array([[0, 64], [32, 64], [64, 64], [96, 64], [128, 64]], np.float32)
    d_kp = np.array([[0, 96], [64, 96], [128, 96], [192, 96], [256, 96]], np.float32)
    desc = np.eye(5, 128, dtype=np.float32)
    result = match_and_verify(q_kp, desc, d_kp, desc, reference=True, reference_trials=50)
    assert result.inliers == 5 and result.model is None
    assert result.query_indices.tolist() == result.db_indices.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("model", ["affine", "homography"])
def test_matches_along_one_line_count_without_the_reference_path(model: str) -> None:
    """The same collinear row through OpenCV: every affine (or homography) sample is degenerate, so USAC found
    no model and the pair scored 0 (a 2000x10 strip against its exact copy too). A similarity fit counts them."""
    q_kp = np.array([[0, 64], [32, 64], [64, 64], [96, 64], [128, 64]], np.float32)
    d_kp = np.array([[0, 96], [64, 96], [128, 96], [192, 96], [256, 96]], np.float32)
    desc = np.eye(5, 128, dtype=np.float32)
    runs = [match_and_verify(q_kp, desc, d_kp, desc, model=model, threshold=3.0, seed=s) for s in (0, 0, 1)]
    assert [r.inliers for r in runs] == [5, 5, 5]
    np.testing.assert_allclose(runs[0].model, [[0.5, 0, 0], [0, 0.5, 16], [0, 0, 1]], atol=1e-6)
    moved = q_kp.copy()
    moved[2, 1] += 40  # off the line the other four follow: an outlier of the similarity
    assert match_and_verify(moved, desc, d_kp, desc, model=model, threshold=3.0).query_indices.tolist() == [0, 1, 3, 4]


def test_too_few_matches_and_bad_options() -> None:
    q_kp, q_desc, d_kp, d_desc = scene(10, n_true=3, n_out=0)
    res = match_and_verify(q_kp, q_desc, d_kp, d_desc)
    assert res.matches == 3 and res.inliers == 0 and res.model is None
    with pytest.raises(TypeError, match="unknown matching option"):
        match_and_verify(q_kp, q_desc, d_kp, d_desc, treshold=3.0)
    with pytest.raises(ValueError, match="keypoints but"):
        match_and_verify(q_kp[:2], q_desc, d_kp, d_desc)
    with pytest.raises(ValueError, match=r"keypoints must be \(n, 2\).*\(2, 3\)"):  # (2, n) is not re-paired
        match_and_verify(q_kp.T.copy(), q_desc, d_kp, d_desc)
    with pytest.raises(ValueError, match="must be L2-normalised.*3 of 3 rows"):  # the 1.0 threshold means nothing
        match_and_verify(q_kp, q_desc * 200, d_kp, d_desc)
    with pytest.raises(TypeError, match="seeds="):
        verify_shortlist(q_kp, q_desc, [(d_kp, d_desc)], [0], seed=1)
