"""DELG's local head: attention + autoencoder on conv4, multi-scale keypoints, geometric verification.

Training (REFERENCE.md §1): the conv4 map is subsampled by 2 (``subsample``: DELG's
``conv4[..., ::2, ::2]``, stride 32 on a ResNet, in training and extraction alike) and detached
(the local losses never train the backbone; configure ``detach: [local]`` on the module as well).
Attention: 1x1 conv C -> hidden, BN, ReLU, 1x1 conv hidden -> 1, softplus. Autoencoder: 1x1 conv
C -> dim (no activation: the local descriptor), 1x1 conv dim -> C + ReLU (the reconstruction). The
attention loss classifies the attention-weighted mean of the per-location L2-normalised
reconstruction with a linear classifier (with bias); the reconstruction loss is the MSE between
conv4 and its reconstruction.

Inference: the paper's 7-scale pyramid; every conv4 cell of every scale is a candidate keypoint
at its receptive-field centre (traced from the backbone's real ops, :mod:`heads._delg.receptive_field`),
mapped back to the original image's pixels (before an eval set's resize: ``resize_factors``); the
cells with attention >= ``attention_threshold`` (if set), then the ``max_keypoints`` strongest across
scales, are kept. Descriptors are stored L2-normalised as fp16, or as packed sign bits (16 bytes per
128-D feature) with ``binarize``.
A pair's score is its inlier count from :func:`retrieval_lightning.retrieval.geometry.verify_shortlist`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads._delg.extraction import (
    PAPER_SCALES,
    PYRAMID_RESIZES,
    ScaleFeatures,
    cell_keypoints,
    pack_signs,
    resize,
    select,
    usable_scales,
)
from heads._delg.receptive_field import CentreCache
from retrieval_lightning.head import EntryKind, FeatureFn, LocalHead
from retrieval_lightning.layers.scale_resize import scaled_size
from retrieval_lightning.retrieval.geometry import MatchOptions, verify_shortlist


class DelgLocalHead(LocalHead):
    """DELG local features (attention + autoencoder), scored by RANSAC inlier counts.

    Args:
        stage: backbone stage read (DELG: ``conv4``).
        subsample: keep every n-th cell of the stage on each axis, in training and extraction (DELG: 2,
            so ResNet's stride-16 conv4 gives keypoints 32 px apart, as conv5; 1: every cell).
        dim: local descriptor size (the autoencoder's bottleneck; DELG: 128).
        attention_hidden: width of the attention network's hidden 1x1 conv (DELG: 512).
        reconstruction_weight: factor on the reconstruction MSE inside this head's losses
            (DELG: 10.0). The module weighs each *head* once (``loss_weights: {local: 1.0}``),
            so the returned ``reconstruction`` loss is already multiplied by this factor and
            the two local losses come back weighted relative to each other as in the paper.
        reconstruction_normalize: divide the MSE by the batch's mean squared conv4 value (the
            relative reconstruction error, 1.0 for an all-zero reconstruction). The paper's raw
            MSE scales with the backbone's feature energy: EfficientNet-Lite0's signed conv4 has a
            mean square near 50, so 10 x MSE starts near 500 and its gradient (norm ~190) takes
            the whole of a joint run's clipping budget (global norm 10) from the global head.
            Normalised, the loss and its gradient do not depend on the feature scale.
        decoder_relu: end the decoder with a ReLU (DELG: ResNet's conv4 is post-ReLU). Backbones
            whose stage ends in a linear projection (EfficientNet: signed conv4) reconstruct
            better without it.
        attention_bn_momentum, attention_bn_eps: the attention network's BatchNorm. DELG's is Keras's
            default (momentum 0.99, i.e. 0.01 here, eps 1e-3): running statistics over ~100 batches,
            right for a long GLDv2 run; PyTorch's 0.1 (~10 batches) suits a short demo, whose
            extraction reads running statistics that 0.01 would leave mostly at their init.
        scales: image pyramid of extraction (default: the paper's 7 scales).
        max_keypoints: keep the N strongest cells by attention across scales (None: all).
        attention_threshold: keep only cells with attention >= this (None: no threshold).
        min_side: skip pyramid levels whose short side would be below this many pixels.
        pyramid_resize: how each pyramid level is resized (sizes ``round(side * scale)`` either way):
            ``antialias`` (default) low-passes when shrinking; ``bilinear`` does not, as DELG's
            extractor (``tf.image.resize``), for parity with its published features.
        binarize: store sign bits (``descriptor_bits``) instead of fp16 ``descriptors``.
        matching, ratio, max_distance, max_hamming, model, method, threshold, max_iters, confidence,
            distinct_px, reference, reference_trials: options of
            :func:`~retrieval_lightning.retrieval.geometry.match_and_verify`. The default counts inliers
            on distinct keypoints after OpenCV's USAC; ``reference: true`` is the official DELG
            scoring (one-way 1-NN, scikit-image affine RANSAC over ``reference_trials`` trials, raw
            inlier count), about 100x slower, for comparing with published numbers; ``distinct_px:
            0`` keeps the fast path but counts every inlier as the official code does.
        workers: threads verifying a shortlist (None or 0: one per CPU).
    """

    training_only = ("classifier.",)  # the attention loss's classifier over the training classes
    #: matching and RANSAC settings score stored features, they do not change them: a store stays valid
    scoring_only = ("matching", "ratio", "max_distance", "max_hamming", "model", "method", "threshold",
                    "max_iters", "confidence", "distinct_px", "reference", "reference_trials", "workers")
    #: 1: keypoints in the original image's pixels (stores written before hold those of the image as extracted)
    store_revision = 1

    def __init__(
        self,
        stage: str = "conv4",
        subsample: int = 2,
        dim: int = 128,
        attention_hidden: int = 512,
        reconstruction_weight: float = 10.0,
        reconstruction_normalize: bool = False,
        decoder_relu: bool = True,
        attention_bn_momentum: float = 0.1,
        attention_bn_eps: float = 1e-5,
        scales: Sequence[float] = PAPER_SCALES,
        max_keypoints: int | None = 1000,
        attention_threshold: float | None = None,
        min_side: int = 32,
        pyramid_resize: str = "antialias",
        binarize: bool = False,
        matching: str = "mutual",
        ratio: float | None = None,
        max_distance: float = 1.0,
        max_hamming: int | None = None,
        model: str = "affine",
        method: str = "ransac",
        threshold: float = 20.0,
        max_iters: int = 1000,
        confidence: float = 0.999,
        distinct_px: float = 1.0,
        reference: bool = False,
        reference_trials: int = 1000,
        workers: int | None = None,
    ) -> None:
        super().__init__()
        if binarize and dim % 8:
            raise ValueError(f"binarize needs dim divisible by 8, got {dim}")
        if binarize and reference:  # refused here, not when a whole store has been extracted
            raise ValueError("reference: true scores as DELG's official code, on float descriptors; "
                             "it cannot score binarize: true (sign-bit) descriptors")
        if subsample < 1:
            raise ValueError(f"subsample must be >= 1 (1: every cell), got {subsample}")
        self.subsample = int(subsample)
        self.stages = (stage,)
        self.stage = stage
        self.dim = int(dim)
        self.attention_hidden = int(attention_hidden)
        self.reconstruction_weight = float(reconstruction_weight)
        self.reconstruction_normalize = bool(reconstruction_normalize)
        self.decoder_relu = bool(decoder_relu)
        if not (0.0 < attention_bn_momentum <= 1.0 and attention_bn_eps > 0):
            raise ValueError(f"attention_bn_momentum must be in (0, 1] and attention_bn_eps > 0, got "
                             f"{attention_bn_momentum} and {attention_bn_eps}")
        self.attention_bn = dict(momentum=float(attention_bn_momentum), eps=float(attention_bn_eps))
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be one or more factors > 0, got {list(scales)}")
        if max_keypoints is not None and max_keypoints < 0:
            raise ValueError(f"max_keypoints must be >= 0 or None (None: every selected cell), got {max_keypoints}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.max_keypoints = max_keypoints
        self.attention_threshold = attention_threshold
        self.min_side = int(min_side)
        if pyramid_resize not in PYRAMID_RESIZES:
            raise ValueError(f"pyramid_resize must be one of {PYRAMID_RESIZES}, got {pyramid_resize!r}")
        self.pyramid_resize = pyramid_resize
        self.binarize = bool(binarize)
        self.match_options = dict(
            matching=matching, ratio=ratio, max_distance=max_distance, max_hamming=max_hamming,
            model=model, method=method, threshold=threshold, max_iters=max_iters, confidence=confidence,
            distinct_px=distinct_px, reference=reference, reference_trials=reference_trials,
        )
        MatchOptions.from_kwargs(self.match_options)  # a bad value is refused when the head is built
        if workers is not None and workers < 0:  # -2 meant one thread, silently
            raise ValueError(f"workers must be >= 1, or null (or 0) for one per CPU; got {workers}")
        self.workers = workers
        self._centres = CentreCache()

    def _build(self, stage_channels: dict[str, int], num_classes: int) -> None:
        channels = stage_channels[self.stage]
        self.attention = nn.Sequential(
            nn.Conv2d(channels, self.attention_hidden, 1),
            nn.BatchNorm2d(self.attention_hidden, **self.attention_bn),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.attention_hidden, 1, 1),
            nn.Softplus(),
        )
        self.encoder = nn.Conv2d(channels, self.dim, 1)
        self.decoder = nn.Conv2d(self.dim, channels, 1)
        self.classifier = nn.Linear(channels, num_classes) if num_classes > 0 else None

    # ------------------------------------------------------------------ training
    def forward_maps(self, conv4: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, h, w) -> attention (B, 1, h, w), descriptors (B, dim, h, w), reconstruction (B, C, h, w)."""
        encoded = self.encoder(conv4)
        decoded = self.decoder(encoded)
        return self.attention(conv4), encoded, F.relu(decoded) if self.decoder_relu else decoded

    def losses(self, features: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        if self.classifier is None:
            raise RuntimeError("DelgLocalHead was built with num_classes=0: it cannot be trained")
        # DELG's gradient stop, whatever the module does
        conv4 = self._subsampled(features[self.stage].detach().float())
        # fp32 under bf16-mixed too, as extraction: the attention these layers learn is the one it ranks by
        with torch.autocast(conv4.device.type, enabled=False):
            attention, _, reconstruction = self.forward_maps(conv4)
            pooled = (F.normalize(reconstruction, dim=1) * attention).mean(dim=(2, 3))
            mse = F.mse_loss(reconstruction, conv4)
            if self.reconstruction_normalize:
                mse = mse / conv4.square().mean().clamp_min(1e-12)
            logits = self.classifier(pooled)
        self.watch(attention_accuracy=(logits.detach().argmax(dim=1) == labels).float().mean())
        return {
            "attention": F.cross_entropy(logits, labels),
            "reconstruction": self.reconstruction_weight * mse,
        }

    def _subsampled(self, conv4: Tensor) -> Tensor:
        step = self.subsample
        return conv4[..., ::step, ::step] if step > 1 else conv4

    # ------------------------------------------------------------------ extraction
    def entry_kinds(self) -> dict[str, EntryKind]:
        kinds = {"keypoints": EntryKind("float32", (2,), True)}
        if self.binarize:
            kinds["descriptor_bits"] = EntryKind("uint8", (self.dim // 8,), True)
        else:
            kinds["descriptors"] = EntryKind("float16", (self.dim,), True)
        kinds["attention"] = EntryKind("float16", (), True)
        kinds["scale"] = EntryKind("float16", (), True)
        return kinds

    @torch.no_grad()
    def _levels(self, image: Tensor, features_at: FeatureFn) -> list[ScaleFeatures]:
        height, width = int(image.shape[-2]), int(image.shape[-1])
        levels = []
        antialias = self.pyramid_resize == "antialias"
        for scale in usable_scales(height, width, self.scales, self.min_side):
            size = scaled_size(height, width, scale)
            conv4, centres = self._centres(features_at, resize(image, size, antialias=antialias), self.stage)
            conv4, centres = self._subsampled(conv4), centres.subsampled(self.subsample)
            # fp32 even inside a bf16-mixed test loop: bf16 attention (0.4 % steps) would tie cells
            # at the top-N cut and reorder them
            with torch.autocast(conv4.device.type, enabled=False):
                attention, encoded, _ = self.forward_maps(conv4.float())
            h, w = conv4.shape[-2:]
            levels.append(ScaleFeatures(
                keypoints=cell_keypoints(centres, (h, w), size, (height, width)),
                attention=attention[0, 0].reshape(-1).cpu(),
                descriptors=encoded[0].reshape(self.dim, -1).t().cpu(),
                scale=size[1] / width,
            ))
        return levels

    def extract_entries(self, images: Sequence[Tensor], features_at: FeatureFn,
                        resize_factors: Tensor | None = None) -> list[dict[str, Tensor]]:
        """One entry per (3, H, W) RGB [0, 1] image; keypoints (x, y) in the pixels of the original image:
        those of the image given, divided by its row of ``resize_factors`` ((height, width) as given over
        the original's; 1 if ``None``). DELG's extractor maps them back alike, so RANSAC's ``threshold``
        is in original pixels whatever size an image was extracted at (``eval_max_side``)."""
        was_training = self.training
        self.eval()  # extraction is inference: BatchNorm uses its running statistics
        try:
            entries = []
            for i, image in enumerate(images):
                chosen = select(self._levels(image, features_at), self.attention_threshold, self.max_keypoints)
                keypoints = chosen["keypoints"].float()
                if resize_factors is not None:
                    factor_y, factor_x = (float(f) for f in resize_factors[i])
                    keypoints = keypoints / keypoints.new_tensor([factor_x, factor_y])
                entry = {"keypoints": keypoints.contiguous()}
                if self.binarize:
                    entry["descriptor_bits"] = pack_signs(chosen["descriptors"])
                else:
                    entry["descriptors"] = chosen["descriptors"].half()
                entry["attention"] = chosen["attention"].half()
                entry["scale"] = chosen["scale"].half()
                entries.append(entry)
            return entries
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ scoring
    def _numpy_features(self, entry: Mapping[str, Tensor]) -> tuple[np.ndarray, np.ndarray]:
        key = "descriptor_bits" if self.binarize else "descriptors"
        if key not in entry:
            raise KeyError(f"entry has no {key!r} (binarize={self.binarize}); it has {sorted(entry)}")
        keypoints = entry["keypoints"].detach().cpu().numpy().astype(np.float32, copy=False)
        return keypoints, entry[key].detach().cpu().numpy()

    def score(
        self, query: Mapping[str, Tensor], candidates: Sequence[Mapping[str, Tensor]], seeds: Sequence[int]
    ) -> Tensor:
        """Inlier counts (float) of the query against each candidate (geometric verification)."""
        if not candidates:
            return torch.zeros(0)
        q_kp, q_desc = self._numpy_features(query)
        results = verify_shortlist(
            q_kp, q_desc, [self._numpy_features(c) for c in candidates], [int(s) for s in seeds],
            workers=self.workers, **self.match_options,
        )
        return torch.tensor([float(r.inliers) for r in results], dtype=torch.float32)
