"""DELG local head: receptive-field keypoints vs an empirical measurement, entries, losses, inliers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from torch import nn

from heads._delg.extraction import cell_keypoints, pack_signs, resize
from heads._delg.receptive_field import AxisMap, CellCentres, trace_centres
from heads.delg_local import DelgLocalHead
from retrieval_lightning.backbone import Backbone


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions: 2 OpenMP threads were 14x slower than 1 on this shared, loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_backbone(name: str) -> Backbone:
    """Random weights, BatchNorm scales at 1: timm zero-initialises each residual block's last BN,
    which would hide the residual branches from the gradient (only the shortcuts would remain)."""
    torch.manual_seed(0)
    backbone = Backbone(name, weights=None, stages=("conv4",)).eval()
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    return backbone


def gradient_centroids(
    fn, image_size: tuple[int, int], cells: list[tuple[int, int]], repeats: int = 3
) -> np.ndarray:
    """Empirical receptive-field centres: centroid (x, y) of |d cell / d input| over random inputs.

    One backward for all cells: batch element k carries cell k // repeats, and the gradients of
    different batch elements do not mix (the backbone is in eval mode).
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(len(cells) * repeats, 3, *image_size, generator=gen).requires_grad_(True)
    out = fn(x)
    sum(out[k, :, i, j].sum() for k, (i, j) in enumerate(c for c in cells for _ in range(repeats))).backward()
    weight = x.grad.abs().sum(1).double().view(len(cells), repeats, *image_size).sum(1)  # (K, H, W)
    ys = torch.arange(image_size[0], dtype=torch.float64)
    xs = torch.arange(image_size[1], dtype=torch.float64)
    total = weight.sum(dim=(1, 2))
    cx = (weight.sum(1) * xs).sum(1) / total
    cy = (weight.sum(2) * ys).sum(1) / total
    return torch.stack([cx, cy], dim=1).numpy()


# tf_efficientnet_lite0 pads TF-"same" (more at the bottom/right): its centres are offset by 15 px,
# so a fixed "stride * index" rule would fail there; the other two are centred at stride * index.
@pytest.mark.parametrize("name,size,offset", [
    ("resnet18", (224, 240), 0.0), ("efficientnet_lite0", (320, 320), 0.0), ("tf_efficientnet_lite0", (320, 320), 15.0),
])
def test_traced_centres_match_gradient_centroids(name: str, size: tuple[int, int], offset: float) -> None:
    backbone = random_backbone(name)
    maps, found = trace_centres(backbone, torch.rand(1, 3, *size), ("conv4",))
    centres = found["conv4"]
    h, w = maps["conv4"].shape[-2:]
    assert (centres.y.stride, centres.x.stride) == (16, 16)
    assert (centres.y.offset, centres.x.offset) == (offset, offset)
    ys, xs = centres.centres(h, w)
    # the cells centred nearest the image centre: a receptive field (339 px for the EfficientNets)
    # clipped by the border on one side only would bias the measured centroid, not the prediction
    i, j = int((ys - size[0] / 2).abs().argmin()), int((xs - size[1] / 2).abs().argmin())
    cells = [(i, j), (i - 1, j + 1)]
    measured = gradient_centroids(lambda x: backbone(x)["conv4"], size, cells)
    predicted = np.array([[xs[j].item(), ys[i].item()] for i, j in cells])
    assert np.abs(measured - predicted).max() < 4.0, (measured, predicted)  # a quarter of the stride


def test_keypoints_in_original_pixels_through_the_pyramid() -> None:
    """Keypoints at scales 0.75 and 1.5 sit at the gradient centroid of their cell w.r.t. the ORIGINAL image."""
    backbone = random_backbone("resnet18")
    for scale, size in ((0.75, (304, 320)), (1.5, (152, 160))):
        rh, rw = round(size[0] * scale), round(size[1] * scale)
        resized = lambda x: F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
        maps, found = trace_centres(backbone, torch.rand(1, 3, rh, rw), ("conv4",))
        h, w = maps["conv4"].shape[-2:]
        keypoints = cell_keypoints(found["conv4"], (h, w), (rh, rw), size).view(h, w, 2)
        cells = [(h // 2, w // 2 - 1), (h // 2 + 1, w // 2)]
        measured = gradient_centroids(lambda x: backbone(resized(x))["conv4"], size, cells)
        predicted = np.stack([keypoints[c].numpy() for c in cells])
        assert np.abs(measured - predicted).max() < 2.0 / scale, (scale, measured, predicted)


def test_cell_centres_map_to_the_original_by_pixel_centres() -> None:
    """A resized pixel u has its centre at (u + 0.5) * H / h - 0.5 in the original (align_corners=False), on both
    axes, clipped to the image: cells at 7.5 + 16 i of a 50x40 resize of a 100x120 original."""
    centres = CellCentres(AxisMap(16.0, 7.5), AxisMap(16.0, 7.5))
    keypoints = cell_keypoints(centres, (4, 3), (50, 40), (100, 120)).view(4, 3, 2).double()
    want_y = [min((7.5 + 16 * i + 0.5) * 2.0 - 0.5, 99.0) for i in range(4)]  # 15.5, 47.5, 79.5, 99 (clipped)
    want_x = [min((7.5 + 16 * j + 0.5) * 3.0 - 0.5, 119.0) for j in range(3)]  # 23.5, 71.5, 119 (clipped)
    assert keypoints[:, 0, 1].tolist() == pytest.approx(want_y) and keypoints[0, :, 0].tolist() == pytest.approx(want_x)
    assert keypoints[2, 1].tolist() == pytest.approx([want_x[1], want_y[2]])


def photo(name: str, box: tuple[int, int, int, int], size: int = 192) -> torch.Tensor:
    y0, x0, y1, x1 = box
    image = torch.from_numpy(getattr(skimage.data, name)()[y0:y1, x0:x1]).permute(2, 0, 1).float() / 255
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return Backbone("efficientnet_lite0", weights="efficientnet_lite0_package", stages=("conv4",)).eval()


def built_head(backbone: Backbone, **kwargs) -> DelgLocalHead:
    torch.manual_seed(0)
    kwargs.setdefault("attention_hidden", 32)
    head = DelgLocalHead(**kwargs)
    head.build(backbone.stage_channels, 4)
    return head.eval()


@pytest.mark.parametrize("binarize", [False, True])
def test_entries_follow_the_options(lite0: Backbone, binarize: bool) -> None:
    head = built_head(lite0, binarize=binarize, max_keypoints=150)
    images = [torch.rand(3, 96, 128), torch.rand(3, 150, 70)]
    entries = head.extract_entries(images, lite0)
    kinds = head.entry_kinds()
    assert set(kinds) == {"keypoints", "descriptor_bits" if binarize else "descriptors", "attention", "scale"}
    for image, entry in zip(images, entries):
        n = len(entry["keypoints"])
        assert 0 < n <= 150 and set(entry) == set(kinds)
        for name, kind in kinds.items():
            assert entry[name].shape == (n, *kind.shape) and str(entry[name].dtype) == f"torch.{kind.dtype}"
        kp = entry["keypoints"]
        assert (kp >= 0).all() and (kp[:, 0] <= image.shape[2] - 1).all() and (kp[:, 1] <= image.shape[1] - 1).all()
        assert (entry["attention"][:-1] >= entry["attention"][1:]).all()  # strongest first
        assert set(entry["scale"].float().unique().tolist()) > {1.0}  # several pyramid levels contribute
        if binarize:
            assert entry["descriptor_bits"].shape[1] == 16  # 16 bytes per 128-D feature
        else:
            torch.testing.assert_close(entry["descriptors"].float().norm(dim=1), torch.ones(n), atol=2e-3, rtol=0)


def test_bilinear_pyramid_resize_is_tf_resize_without_antialias(lite0: Backbone) -> None:
    """``pyramid_resize='bilinear'`` samples as DELG's ``tf.image.resize`` (half-pixel centres, no
    low-pass), checked against OpenCV's ``INTER_LINEAR`` on float pixels (the same rule); the
    default low-passes when shrinking, so its entries differ."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 90, 120, generator=gen)
    for size in [(32, 42), (127, 170)]:  # shrinking (scale 0.3536), enlarging (1.4142)
        reference = cv2.resize(image.permute(1, 2, 0).numpy(), size[::-1], interpolation=cv2.INTER_LINEAR)
        ours = resize(image, size, antialias=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, reference.clip(0, 1), atol=1e-5)
    assert (resize(image, (32, 42)) - resize(image, (32, 42), antialias=False)).abs().max() > 0.05
    with pytest.raises(ValueError, match="pyramid_resize must be one of"):
        DelgLocalHead(pyramid_resize="area")
    images = [torch.rand(3, 96, 128, generator=gen)]
    sharp = built_head(lite0, scales=(0.5, 1.0), pyramid_resize="bilinear").extract_entries(images, lite0)[0]
    smooth = built_head(lite0, scales=(0.5, 1.0)).extract_entries(images, lite0)[0]

    def level(entry: dict, shrunk: bool) -> torch.Tensor:
        rows = entry["descriptors"][(entry["scale"].float() < 1) == shrunk].float()
        return rows.sort(0).values  # per column: the rows of a level, whatever their attention order

    assert len(level(sharp, True)) == len(level(smooth, True)) > 0
    assert not torch.equal(level(sharp, True), level(smooth, True))  # only the shrunk level differs
    torch.testing.assert_close(level(sharp, False), level(smooth, False))


def test_binary_entries_are_the_signs_of_the_float_ones(lite0: Backbone) -> None:
    image = [torch.rand(3, 96, 96)]
    floats = built_head(lite0, scales=(1.0,)).extract_entries(image, lite0)[0]
    bits = built_head(lite0, scales=(1.0,), binarize=True).extract_entries(image, lite0)[0]
    torch.testing.assert_close(floats["keypoints"], bits["keypoints"])
    expected = np.packbits(floats["descriptors"].float().numpy() > 0, axis=1)
    np.testing.assert_array_equal(bits["descriptor_bits"].numpy(), expected)
    assert pack_signs(torch.tensor([[1.0] + [-1.0] * 7])).item() == 128


def test_threshold_and_top_n(lite0: Backbone) -> None:
    image = [torch.rand(3, 128, 128)]
    everything = built_head(lite0, max_keypoints=None).extract_entries(image, lite0)[0]
    stored = everything["attention"].float().unique(sorted=True)  # fp16 values: cut between two of them
    cut = float(stored[len(stored) // 2 : len(stored) // 2 + 2].mean())
    kept = built_head(lite0, max_keypoints=None, attention_threshold=cut).extract_entries(image, lite0)[0]
    assert (kept["attention"].float() >= cut).all()
    assert len(kept["attention"]) == int((everything["attention"].float() >= cut).sum())
    assert len(built_head(lite0, max_keypoints=7).extract_entries(image, lite0)[0]["keypoints"]) == 7


def test_losses_train_the_head_and_never_the_backbone() -> None:
    backbone = random_backbone("resnet18").train()
    torch.manual_seed(0)
    head = DelgLocalHead(dim=16, attention_hidden=8, reconstruction_weight=10.0)
    head.build(backbone.stage_channels, 3)
    losses = head.losses(backbone(torch.rand(2, 3, 64, 64)), torch.tensor([0, 2]))
    assert set(losses) == {"attention", "reconstruction"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(p.grad is None for p in backbone.parameters())

    unweighted = DelgLocalHead(dim=16, attention_hidden=8, reconstruction_weight=1.0)
    unweighted.build(backbone.stage_channels, 3)
    unweighted.load_state_dict(head.state_dict())
    with torch.no_grad():
        feats = backbone(torch.rand(2, 3, 64, 64))
        ten, one = head.losses(feats, torch.tensor([0, 1])), unweighted.losses(feats, torch.tensor([0, 1]))
    torch.testing.assert_close(ten["reconstruction"], 10.0 * one["reconstruction"])
    torch.testing.assert_close(ten["attention"], one["attention"])


def test_attention_batch_norm_follows_its_options_and_its_running_statistics_move_at_that_rate() -> None:
    """DELG's Keras BatchNorm (momentum 0.01 here, eps 1e-3) against PyTorch's default; a bad value is refused."""
    backbone = random_backbone("resnet18").train()
    feats = backbone(torch.rand(2, 3, 64, 64))
    moved = {}
    for momentum, eps in ((0.1, 1e-5), (0.01, 1e-3)):
        head = DelgLocalHead(dim=16, attention_hidden=8, attention_bn_momentum=momentum, attention_bn_eps=eps)
        head.build(backbone.stage_channels, 3)
        bn = head.attention[1]
        assert (bn.momentum, bn.eps) == (momentum, eps)
        head.losses(feats, torch.tensor([0, 2]))  # one training step's forward updates the running mean
        moved[momentum] = bn.running_mean.abs().sum().item()
    assert moved[0.01] < 0.2 * moved[0.1]
    with pytest.raises(ValueError, match="attention_bn_momentum"):
        DelgLocalHead(attention_bn_momentum=0.0)


@pytest.mark.parametrize("binarize", [False, True])
def test_a_shifted_rescaled_copy_has_more_inliers_than_unrelated_photos(lite0: Backbone, binarize: bool) -> None:
    """ImageNet conv4 with an UNTRAINED local head (random attention and projection): geometry alone
    separates a crop of a photo and a shifted, 1.25x zoomed crop of it from unrelated photos."""
    head = built_head(lite0, scales=(0.7071, 1.0, 1.4142), max_keypoints=300, binarize=binarize)
    query = photo("astronaut", (100, 120, 356, 376))
    same = photo("astronaut", (130, 140, 450, 460))
    others = [photo("coffee", (0, 0, 256, 256)), photo("chelsea", (0, 0, 256, 256)), photo("rocket", (0, 0, 256, 256))]
    entries = head.extract_entries([query, same, *others], lite0)
    scores = head.score(entries[0], entries[1:], seeds=[1, 2, 3, 4])
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    assert scores[0] >= 30 and scores[0] > 3 * scores[1:].max(), scores
    torch.testing.assert_close(head.score(entries[0], entries[1:], seeds=[1, 2, 3, 4]), scores)  # seeded


def test_a_local_heads_pair_is_explained_by_its_inliers(tmp_path) -> None:
    """``explain_pair`` (the notebook's picture of a pair) on a DELG model: the inliers of the head's own
    matching, as fractions of each image's size, drawn as a verifier's evidence is."""
    from retrieval_lightning.module import RetrievalModule
    from retrieval_lightning.pair_picture import draw_explanation
    from retrieval_lightning.registry import HEADS
    from retrieval_lightning.retrieval.geometry import match_and_verify

    torch.manual_seed(0)
    backbone = Backbone("efficientnet_lite0", weights="efficientnet_lite0_package", stages=("conv4", "conv5"))
    local = DelgLocalHead(attention_hidden=32, scales=(1.0,), max_keypoints=150, matching="one_way")
    module = RetrievalModule(backbone.eval(), {"global": HEADS.get("gem_arcface")(), "local": local},
                             eval_scales=[1.0]).eval()
    query, same = photo("astronaut", (100, 120, 356, 376)), photo("astronaut", (130, 140, 450, 460))
    explained = module.explain_pair(query, same)
    entries = module.rerank_entries([query, same])
    features = [np.asarray(entries[i][k], np.float32) for i in (0, 1) for k in ("keypoints", "descriptors")]
    kept = match_and_verify(*features, seed=0, **local.match_options)
    assert explained.score == kept.inliers >= 10 and len(explained.matches) == kept.inliers
    assert ((explained.matches >= 0) & (explained.matches <= 1)).all()
    np.testing.assert_allclose(np.sort(explained.matches[:, 0] * query.shape[-1]), np.sort(kept.query_points[:, 0]),
                               rtol=1e-6)
    assert (np.diff(explained.strengths) <= 0).all()  # strongest first
    pictures = [(x * 255).round().byte().permute(1, 2, 0).numpy() for x in (query, same)]
    assert draw_explanation(*pictures, explained, tmp_path / "pair.png").stat().st_size > 1000


def test_official_scoring_options_reach_the_shortlist(lite0: Backbone) -> None:
    """``reference`` (the official DELG scoring) and ``distinct_px: 0`` (raw counts) are head options,
    scoring-only, applied by ``score``; a bad value is refused when the head is built."""
    from retrieval_lightning.retrieval.geometry import match_and_verify

    default = built_head(lite0, scales=(1.0,), max_keypoints=150)
    entries = default.extract_entries([photo("astronaut", (100, 120, 356, 376)),
                                       photo("astronaut", (130, 140, 450, 460)), photo("coffee", (0, 0, 256, 256))],
                                      lite0)
    official = built_head(lite0, scales=(1.0,), max_keypoints=150, reference=True, reference_trials=50)
    official.load_state_dict(default.state_dict())
    got = official.score(entries[0], entries[1:], seeds=[7, 8])
    want = [match_and_verify(entries[0]["keypoints"].numpy(), entries[0]["descriptors"].numpy(),
                             c["keypoints"].numpy(), c["descriptors"].numpy(), reference=True,
                             reference_trials=50, seed=s).inliers for c, s in zip(entries[1:], (7, 8))]
    assert got.tolist() == [float(w) for w in want] and want[0] > want[1]
    raw = built_head(lite0, scales=(1.0,), max_keypoints=150, matching="one_way", distinct_px=0)
    distinct = built_head(lite0, scales=(1.0,), max_keypoints=150, matching="one_way")
    for head in (raw, distinct):
        head.load_state_dict(default.state_dict())
    assert (raw.score(entries[0], entries[1:], [7, 8]) >= distinct.score(entries[0], entries[1:], [7, 8])).all()
    assert {"reference", "distinct_px", "confidence"} <= set(DelgLocalHead.scoring_only)
    with pytest.raises(ValueError, match="distinct_px must be >= 0"):
        DelgLocalHead(distinct_px=-1.0)
    with pytest.raises(ValueError, match="cannot score binarize: true"):
        DelgLocalHead(binarize=True, reference=True)
    with pytest.raises(ValueError, match="affine model only, got model 'homography'"):
        DelgLocalHead(reference=True, model="homography")


@pytest.mark.parametrize(("options", "message"), [
    ({"threshold": -5.0}, "threshold must be > 0, got -5.0"),  # OpenCV squares it: it acted as 5 px
    ({"threshold": 0.0}, "threshold must be > 0"),  # every pair scored 0
    ({"max_distance": -1.0}, "max_distance must be > 0"),  # squared too: it acted as 1.0
    ({"max_iters": -1}, r"max_iters must be in \[1, 2\^31 - 1\]"),
    ({"max_iters": 3_000_000_000}, "max_iters must be in"),  # OpenCV's C int: it failed mid-re-ranking
    ({"workers": -2}, "workers must be >= 1, or null"),  # one thread, silently (0, documented: every CPU)
    ({"reference": True, "reference_trials": 0}, "reference_trials must be in"),
    ({"confidence": 1.0}, r"confidence must be in \(0, 1\)"),
    ({"max_hamming": -1}, "max_hamming must be >= 0"),
    ({"reference": True, "ratio": 0.8}, "would ignore ratio; leave it unset"),
    ({"reference": True, "method": "magsac", "max_iters": 50}, "would ignore method, max_iters; leave them unset"),
    ({"reference": True, "distinct_px": 4.0}, "would ignore distinct_px"),
    ({"max_keypoints": -1}, "max_keypoints must be >= 0 or None"),  # order[:-1] dropped the weakest cell
    ({"scales": (0.0, 1.0)}, r"scales must be one or more factors > 0, got \[0.0, 1.0\]"),  # a 1x1 level stored
    ({"scales": ()}, "scales must be one or more factors > 0"),
    ({"dim": 0}, "dim must be >= 1"),
])
def test_settings_that_would_silently_change_scores_are_refused_when_the_head_is_built(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        DelgLocalHead(**options)


def test_reference_scoring_takes_the_settings_it_reads() -> None:
    for options in ({}, {"distinct_px": 0.0}, {"reference_trials": 20, "threshold": 15.0, "max_distance": 0.9}):
        DelgLocalHead(reference=True, **options)  # raw counts asked for explicitly, or what the reference path reads


def test_extraction_under_inference_mode_equals_no_grad(lite0: Backbone) -> None:
    """``Trainer.test`` extracts under ``torch.inference_mode``, where ``aten.conv2d`` reaches the tracer undecomposed."""
    image = [torch.rand(3, 80, 96)]
    plain = built_head(lite0, scales=(1.0,)).extract_entries(image, lite0)[0]
    with torch.inference_mode():
        inference = built_head(lite0, scales=(1.0,)).extract_entries([image[0].clone()], lite0)[0]
    for name, value in plain.items():
        torch.testing.assert_close(inference[name], value, rtol=0, atol=0)


def test_normalised_reconstruction_is_relative_to_the_feature_energy() -> None:
    """``reconstruction_normalize``: MSE / mean(conv4^2), so scaling the features (and the decoder's output
    with them) leaves the loss unchanged, while the raw MSE grows with the square of the scale."""
    torch.manual_seed(0)
    head = DelgLocalHead(dim=8, attention_hidden=4, reconstruction_weight=10.0, reconstruction_normalize=True,
                         decoder_relu=False, subsample=1)
    head.build({"conv4": 6}, 3)
    raw = DelgLocalHead(dim=8, attention_hidden=4, reconstruction_weight=10.0, decoder_relu=False, subsample=1)
    raw.build({"conv4": 6}, 3)
    raw.load_state_dict(head.state_dict())
    conv4, labels = torch.randn(2, 6, 5, 5), torch.tensor([0, 2])
    with torch.no_grad():
        _, _, rebuilt = head.forward_maps(conv4)
        expected = 10.0 * ((rebuilt - conv4) ** 2).mean() / (conv4**2).mean()
        torch.testing.assert_close(head.losses({"conv4": conv4}, labels)["reconstruction"], expected)
        for model in (head, raw):  # biases x 7: the linear autoencoder's reconstruction of 7 x conv4 is 7 x its own
            model.encoder.bias.mul_(7.0), model.decoder.bias.mul_(7.0)
        scaled, scaled_raw = head.losses({"conv4": 7 * conv4}, labels), raw.losses({"conv4": 7 * conv4}, labels)
    torch.testing.assert_close(scaled["reconstruction"], expected)
    torch.testing.assert_close(scaled_raw["reconstruction"], 49.0 * expected * (conv4**2).mean())


def pooled_features(image: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stride-16 'conv4' of 6 channels that autocast leaves in fp32 (pooling and squares)."""
    pooled = F.avg_pool2d(image, 16)
    return {"conv4": torch.cat([pooled, pooled.square()], dim=1)}


def test_subsample_keeps_every_other_cell_as_delg_conv4() -> None:
    """``subsample: 2`` (DELG's ``conv4[..., ::2, ::2]``): in extraction the even cells of the stride-16 map,
    keypoints 32 px apart; in training the losses of that subsampled map."""
    torch.manual_seed(0)
    full = DelgLocalHead(dim=8, attention_hidden=4, subsample=1, scales=[1.0], max_keypoints=None)
    full.build({"conv4": 6}, 3)
    half = DelgLocalHead(dim=8, attention_hidden=4, subsample=2, scales=[1.0], max_keypoints=None)
    half.build({"conv4": 6}, 3)
    half.load_state_dict(full.state_dict())
    full.eval(), half.eval()
    image = torch.rand(3, 160, 224)
    every, even = full.extract_entries([image], pooled_features)[0], half.extract_entries([image], pooled_features)[0]
    assert len(every["keypoints"]) == 10 * 14 and len(even["keypoints"]) == 5 * 7
    xs, ys = even["keypoints"][:, 0].unique(), even["keypoints"][:, 1].unique()
    assert torch.equal(xs[1:] - xs[:-1], torch.full((6,), 32.0))
    assert torch.equal(ys[1:] - ys[:-1], torch.full((4,), 32.0))
    where = {tuple(p): i for i, p in enumerate(every["keypoints"].tolist())}
    rows = torch.tensor([where[tuple(p)] for p in even["keypoints"].tolist()])  # each kept cell is a full-map cell
    assert torch.equal(even["descriptors"], every["descriptors"][rows])
    conv4, labels = torch.randn(2, 6, 10, 14), torch.tensor([0, 2])
    with torch.no_grad():
        got, want = half.losses({"conv4": conv4}, labels), full.losses({"conv4": conv4[..., ::2, ::2]}, labels)
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_extraction_inside_bf16_autocast_stays_fp32() -> None:
    """``test`` under ``precision: bf16-mixed`` extracts inside autocast: the head must not run in bf16,
    whose attention steps (0.4 %) reorder the cells at the top-N cut."""
    head = DelgLocalHead(dim=16, attention_hidden=8, scales=[1.0, 2.0], max_keypoints=40)
    torch.manual_seed(0)
    head.build({"conv4": 6}, 3)
    head.eval()
    image = torch.rand(3, 256, 320)
    plain = head.extract_entries([image], pooled_features)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head.extract_entries([image], pooled_features)[0]
    for name in plain:
        assert torch.equal(plain[name], mixed[name]), name


def test_training_losses_inside_bf16_autocast_stay_fp32() -> None:
    """fit under ``precision: bf16-mixed`` (the R50 recipe) computes the losses inside autocast: the attention,
    autoencoder and classifier ran in bf16 there while the README says the head runs in fp32."""
    head = DelgLocalHead(dim=8, attention_hidden=16, subsample=1)
    torch.manual_seed(0)
    head.build({"conv4": 32}, 3)
    features, labels = {"conv4": torch.randn(3, 32, 6, 6)}, torch.tensor([0, 1, 2])
    dtypes = {}
    for name in ("attention", "decoder", "classifier"):
        getattr(head, name).register_forward_hook(lambda _m, _i, out, name=name: dtypes.__setitem__(name, out.dtype))
    plain = head.losses(features, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head.losses(features, labels)
    assert dtypes == {"attention": torch.float32, "decoder": torch.float32, "classifier": torch.float32}
    for name in plain:
        assert torch.equal(plain[name], mixed[name]), name


def test_keypoints_are_stored_in_the_original_images_pixels_through_every_extraction_path(tmp_path) -> None:
    """An eval image shrunk to ``eval_max_side`` carries its resize factor; DELG maps its keypoints back
    by it, as the official extractor does, so RANSAC's threshold is in original pixels. The same through
    the head, the module, the notebook extraction into a store and the ``extract`` command's predict step."""
    from retrieval_lightning.data.loaders import collate_eval
    from retrieval_lightning.data.types import EvalSet
    from retrieval_lightning.module import RetrievalModule
    from retrieval_lightning.registry import HEADS
    from retrieval_lightning.retrieval.rerank_eval import extract_entries

    backbone = Backbone("efficientnet_lite0", stages=("conv4", "conv5")).eval()
    torch.manual_seed(0)
    local = DelgLocalHead(attention_hidden=8, scales=(1.0,), max_keypoints=20)
    module = RetrievalModule(backbone, {"global": HEADS.get("gem_arcface")(), "local": local},
                             eval_scales=[1.0]).eval()
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 64)]
    factors = [(0.5, 0.25), (1.0, 1.0)]
    plain = local.extract_entries(images, backbone)
    mapped = local.extract_entries(images, backbone, resize_factors=torch.tensor(factors, dtype=torch.float64))
    torch.testing.assert_close(mapped[0]["keypoints"], plain[0]["keypoints"] / torch.tensor([0.25, 0.5]))
    assert torch.equal(mapped[1]["keypoints"], plain[1]["keypoints"])
    assert all(torch.equal(m[k], p[k]) for m, p in zip(mapped, plain) for k in p if k != "keypoints")
    expected = [e["keypoints"] for e in mapped]
    through_module = module.rerank_entries(images, resize_factors=factors)
    assert all(torch.equal(e["keypoints"], x) for e, x in zip(through_module, expected))
    assert torch.equal(module.rerank_entries(images)[0]["keypoints"], plain[0]["keypoints"])  # no factors: 1

    items = [{"image": image, "index": i, "resize_factor": f} for i, (image, f) in enumerate(zip(images, factors))]
    eval_set = EvalSet("scaled", items, 1, "revisitop", [{"easy": [0], "hard": [], "junk": []}])
    _, queries, database = extract_entries(module, eval_set, tmp_path / "store", module.entry_identity(),
                                           progress=False)
    stored = [store.get("local-keypoints", [0])[0] for store in (queries, database)]
    assert all(torch.equal(torch.as_tensor(s), x) for s, x in zip(stored, expected))
    predicted = module.predict_step(collate_eval(items), 0)["local-keypoints"]
    assert all(torch.equal(p, x) for p, x in zip(predicted, expected))


def test_the_notebook_api_seeds_a_pair_by_its_content_not_its_place_in_the_list(monkeypatch) -> None:
    """``rerank_scores`` seeded RANSAC by each candidate's position in the list it was given: the same pair
    scored otherwise when the list was reordered or cut (4 of 24 pairs in a review). A pair's seed now follows
    the query's pixels and the candidate's entries, as ``search`` seeds a query's pairs."""
    from retrieval_lightning.module import RetrievalModule
    from retrieval_lightning.registry import HEADS

    torch.manual_seed(0)
    backbone = Backbone("efficientnet_lite0", weights="efficientnet_lite0_package", stages=("conv4", "conv5"))
    local = DelgLocalHead(attention_hidden=32, scales=(1.0,), max_keypoints=150, matching="one_way")
    module = RetrievalModule(backbone.eval(), {"global": HEADS.get("gem_arcface")(), "local": local},
                             eval_scales=[1.0]).eval()
    query = photo("astronaut", (100, 120, 356, 376))
    candidates = [photo("astronaut", box) for box in ((130, 140, 450, 460), (60, 80, 330, 350), (90, 60, 400, 370))]
    seen: list[list[int]] = []
    score = local.score
    monkeypatch.setattr(local, "score", lambda q, c, seeds: seen.append(list(seeds)) or score(q, c, seeds))
    scores = module.rerank_scores(query, candidates)
    reordered = module.rerank_scores(query, candidates[::-1])
    alone = [module.rerank_scores(query, [candidate]) for candidate in candidates]
    from_entries = module.rerank_scores(query, module.rerank_entries(candidates))
    assert seen[1] == seen[0][::-1] and [s[0] for s in seen[2:5]] == seen[0] and seen[5] == seen[0]
    assert len(set(seen[0])) == 3
    assert torch.equal(reordered.flip(0), scores) and torch.equal(torch.cat(alone), scores)
    assert torch.equal(from_entries, scores) and scores.min() >= 10  # real matches: RANSAC's draw matters


def test_checkpoints_recording_zero_for_the_default_dim_and_workers_still_load(tmp_path) -> None:
    """``dim: 0`` (the backbone's width) and ``workers: 0`` (one thread per CPU) were taken as ``null`` and are
    recorded so in earlier checkpoints: they load (a review of the option checks found them refused)."""
    from retrieval_lightning.module import RetrievalModule
    from retrieval_lightning.registry import HEADS

    module = RetrievalModule(Backbone("resnet18", stages=("conv4", "conv5")),
                             {"global": HEADS.get("gem_arcface")(dim=0), "local": DelgLocalHead(workers=0, dim=8)})
    assert module.heads["global"].dim == 512
    module.save_checkpoint(tmp_path / "zeros.ckpt")
    loaded = RetrievalModule.load_from_checkpoint(tmp_path / "zeros.ckpt")
    assert loaded.heads["global"].dim == 512 and loaded.heads["local"].workers == 0


def test_the_heads_matching_defaults_are_the_cores() -> None:
    """DelgLocalHead repeats MatchOptions' fields as constructor arguments (plain config values): their defaults
    must stay the core's, or `match` with SIFT and a default head would verify differently."""
    import dataclasses
    import inspect

    from retrieval_lightning.retrieval.geometry import MatchOptions

    signature = inspect.signature(DelgLocalHead.__init__).parameters
    fields = {f.name: f.default for f in dataclasses.fields(MatchOptions) if f.name != "seed"}  # a pair's own
    assert set(DelgLocalHead().match_options) == set(fields)
    assert {name: signature[name].default for name in fields} == fields
