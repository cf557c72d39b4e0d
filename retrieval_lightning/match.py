"""``retrieval-lightning match``: verify two images and draw their inlier correspondences.

Features come from a trained model's local head (``--checkpoint``, through
``RetrievalModule.rerank_entries``) or, without a checkpoint, from OpenCV SIFT (RootSIFT
descriptors, 1000 per image), so the command is useful on its own and as a sanity check of the
geometry apart from any model. The first image is the query: its pixels are the RANSAC residuals'.

A checkpoint whose re-ranking head is not local (a verifier, with or without a sparsifier) is
asked to explain its score instead (``RetrievalModule.explain_pair``), and the picture shows where
the two images agree (:mod:`retrieval_lightning.pair_picture`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.io import load_image
from .errors import UsageError
from .outputs import picture_path, user_path
from .retrieval.geometry import REFERENCE_SETTINGS, VerificationResult, match_and_verify

Features = tuple[np.ndarray, np.ndarray]  # (n, 2) float32 x, y; (n, d) descriptors


def read_rgb(path: str | os.PathLike[str], max_side: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF-upright, the long side shrunk to ``max_side`` if given; raises
    ``ImageLoadError`` naming the file if unreadable."""
    return load_image(path, max_side=max_side).permute(1, 2, 0).contiguous().numpy()


def model_image(path: str | os.PathLike[str], max_side: int | None) -> tuple[Any, tuple[float, float]]:
    """(3, h, w) float image for a model, sized as `search` and the eval sets size images (the long side
    shrunk to ``max_side``), and its (height, width) over the original's: the pair's score is then the
    one re-ranking gives at that size."""
    from .data.types import ImageResize
    from .search_cli import load_query_sized

    return load_query_sized(str(path), ImageResize(max_side))


def sift_features(image: np.ndarray, n_features: int = 1000) -> Features:
    """The ``n_features`` strongest OpenCV SIFT keypoints with RootSIFT descriptors (unit L2).

    RootSIFT (L1-normalise, square root) makes Euclidean distance a Hellinger kernel and gives
    unit-L2 rows, the form the DELG distance threshold is defined on.
    """
    gray = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    keypoints, desc = cv2.SIFT_create(nfeatures=n_features).detectAndCompute(gray, None)
    if desc is None or not keypoints:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    order = np.argsort([-kp.response for kp in keypoints], kind="stable")[:n_features]
    xy = np.array([keypoints[i].pt for i in order], np.float32)
    desc = desc[order].astype(np.float32)
    desc /= np.maximum(desc.sum(axis=1, keepdims=True), 1e-12)
    return xy, np.sqrt(desc)


def _image_tensor(image: np.ndarray) -> Any:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1], the module's image convention."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)


def explain_local_pair(query: Mapping[str, Any], candidate: Mapping[str, Any], query_hw: tuple[int, int],
                       candidate_hw: tuple[int, int], options: Mapping[str, Any]) -> Any:
    """A :class:`~retrieval_lightning.head.PairExplanation` of two local-feature entries (keypoints in
    the pixels of images of ``query_hw`` / ``candidate_hw``): the inliers of the head's own matching
    settings, RANSAC seed 0 (as ``match`` draws them), strongest descriptor similarity first."""
    from .head import PairExplanation

    features = [*entry_features(query), *entry_features(candidate)]
    result = match_and_verify(*features, seed=0, **dict(options))
    if result.inliers:
        q_desc, d_desc = features[1][result.query_indices], features[3][result.db_indices]
        if q_desc.dtype == np.uint8:  # packed sign bits: the share of equal bits
            strengths = 1.0 - np.unpackbits(q_desc ^ d_desc, axis=1).mean(axis=1)
        else:
            strengths = (q_desc.astype(np.float32) * d_desc.astype(np.float32)).sum(axis=1)
    else:
        strengths = np.zeros(0, np.float32)
    order = np.argsort(-strengths, kind="stable")
    (qh, qw), (ch, cw) = query_hw, candidate_hw
    matches = np.concatenate([result.query_points / np.float32([qw, qh]),
                              result.db_points / np.float32([cw, ch])], axis=1)[order]
    return PairExplanation(score=float(result.inliers), matches=matches.astype(np.float32),
                           strengths=np.clip(strengths[order], 0.0, 1.0).astype(np.float32),
                           caption=f"{result.inliers} RANSAC inliers of {result.matches} matches (seed 0)")


def has_local_features(kinds: Mapping[str, Any]) -> bool:
    """Whether a head's entries follow the local-feature convention the core matches and verifies:
    ``keypoints`` (n, 2) plus ``descriptors`` (unit float rows) or ``descriptor_bits`` (packed bits)."""
    return "keypoints" in kinds and bool({"descriptors", "descriptor_bits"} & set(kinds))


def model_features(module: Any, image: Any, resize_factor: tuple[float, float] = (1.0, 1.0)) -> Features:
    """Local features of one image ((3, H, W) float in [0, 1], or (H, W, 3) uint8) from a module's re-ranking
    head (fp16 or packed-bit entries); keypoints in the pixels of the original image, which was ``image``'s
    size divided by ``resize_factor`` ((height, width))."""
    tensor = _image_tensor(image) if isinstance(image, np.ndarray) else image
    return entry_features(module.rerank_entries([tensor], resize_factors=[resize_factor])[0])


def entry_features(entry: Mapping[str, Any]) -> Features:
    """(keypoints, descriptors) of one local-feature entry (fp16 rows or packed sign bits) as numpy."""
    if not has_local_features(entry):
        raise KeyError(f"the model's re-ranking entries have no local features (keys: {sorted(entry)})")
    desc = entry["descriptor_bits"] if "descriptor_bits" in entry else entry["descriptors"]
    return np.asarray(entry["keypoints"], np.float32), np.asarray(desc)


#: the height a match picture draws both images at, at most (a phone photo beside a small one: both at one size)
MATCH_HEIGHT = 960


def draw_matches(
    image_a: np.ndarray, image_b: np.ndarray, result: VerificationResult, path: str | os.PathLike[str]
) -> Path:
    """Side-by-side PNG (query left, database right) with one line per inlier correspondence, both images at one
    height (at most :data:`MATCH_HEIGHT`), the count in a band above them (it covered the query's corner)."""
    from .pair_picture import panel_scale  # as a verifier's pair is drawn (matplotlib loaded only to draw)

    a, b = (Image.fromarray(np.asarray(im, np.uint8)).convert("RGB") for im in (image_a, image_b))
    target = min(max(a.height, b.height), MATCH_HEIGHT)
    scale_a, scale_b = (panel_scale(im.width, im.height, target) for im in (a, b))
    a, b = (im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BILINEAR)
            for im, s in ((a, scale_a), (b, scale_b)))
    font = ImageFont.load_default(size=max(14, round(target / 28)))  # PIL's default is 11 px at any size
    label = f"{result.inliers} inliers / {result.matches} matches"
    band = font.getbbox(label)[3] + 12
    canvas = Image.new("RGB", (a.width + b.width, band + max(a.height, b.height)), (255, 255, 255))
    canvas.paste(a, (0, band))
    canvas.paste(b, (a.width, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), label, fill=(200, 0, 0), font=font)
    width = max(1, round(target / 500))
    colours = _colours(len(result.query_points))
    for (xa, ya), (xb, yb), colour in zip(result.query_points, result.db_points, colours):
        start = (float(xa) * scale_a, float(ya) * scale_a + band)
        end = (float(xb) * scale_b + a.width, float(yb) * scale_b + band)
        draw.line([start, end], fill=colour, width=width)
        for x, y in (start, end):
            r = 2 * width
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=width)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out


def _colours(n: int) -> list[tuple[int, int, int]]:
    """Distinct saturated colours (HSV wheel) so crossing lines can be told apart."""
    hues = (np.arange(n) * 0.61803398875) % 1.0
    hsv = np.stack([hues * 179, np.full(n, 255), np.full(n, 230)], axis=1).astype(np.uint8)
    rgb = cv2.cvtColor(hsv.reshape(-1, 1, 3), cv2.COLOR_HSV2RGB).reshape(-1, 3) if n else hsv
    return [tuple(int(c) for c in row) for row in rgb]


def _pixels(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of pixels (0: full size), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


#: long side of both images when a model matches them: DELG caps its inference images at 1024 px and
#: CVNet's tester reads ROxford's (<= 1024 px); a phone photo at full size, with DELG's scales up to
#: 2x, needs more memory than most machines have
MODEL_MAX_SIDE = 1024
#: long side of both images SIFT matches by default: OpenCV's SIFT doubles the image first, so a 12-megapixel
#: phone photo took 3.5 GB (and its picture 7 MB); ``--max-side 0`` matches at full size
SIFT_MAX_SIDE = 2048


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrieval-lightning match",
        description="Match two images' local features, verify them geometrically, draw the inliers "
                    "(or, with a verifier checkpoint, draw where the verifier finds the pair alike).",
    )
    parser.add_argument("image_a", type=user_path, help="query image (RANSAC residuals are in its pixels)")
    parser.add_argument("image_b", type=user_path, help="database image")
    parser.add_argument("--checkpoint", type=user_path,
                        help="RetrievalModule checkpoint with a re-ranking head (local or verifier)")
    parser.add_argument("--features", choices=("sift", "model"), help="default: model with --checkpoint, else sift")
    parser.add_argument("--out", default="match.png", type=user_path, help="PNG to write (default: match.png)")
    parser.add_argument("--num-features", type=_positive, default=1000, help="SIFT keypoints per image")
    parser.add_argument("--seed", type=int, default=0, help="RANSAC seed")
    parser.add_argument("--reference", action="store_true",
                        help="the paper's path (KD-tree + skimage RANSAC; a head's USAC settings do not apply)")
    parser.add_argument("--max-side", type=_pixels, help="shrink each image so its long side is at most this "
                        f"(e.g. the model's eval size; 0: full size); default: {MODEL_MAX_SIDE} with a model, "
                        f"{SIFT_MAX_SIDE} with SIFT")
    return parser


def run_match(argv: list[str]) -> int:
    """Entry point of ``retrieval-lightning match``; prints the inlier count, writes the PNG."""
    args = _parser().parse_args(argv)
    args.out = picture_path(args.out, "match.png")
    features = args.features or ("model" if args.checkpoint else "sift")
    if features == "model" and not args.checkpoint:
        raise UsageError("--features model needs --checkpoint")
    max_side = args.max_side if args.max_side is not None else (MODEL_MAX_SIDE if features == "model" else
                                                               SIFT_MAX_SIDE)
    factors: list[tuple[float, float]] = [(1.0, 1.0), (1.0, 1.0)]
    if features == "model":
        from .head import RerankHead
        from .module import RetrievalModule

        (tensor_a, factors[0]), (tensor_b, factors[1]) = (model_image(path, max_side or None)
                                                          for path in (args.image_a, args.image_b))
        image_a, image_b = (t.mul(255.0).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
                            for t in (tensor_a, tensor_b))
        module = RetrievalModule.load_from_checkpoint(args.checkpoint)
        module.eval()
        if module.rerank_head is None:
            raise UsageError(f"{args.checkpoint} has no re-ranking head (heads: {', '.join(sorted(module.heads))}); "
                             "match needs a local head or a verifier, or no --checkpoint for SIFT")
        explains_itself = type(module.rerank_head).explain is not RerankHead.explain
        if explains_itself or not has_local_features(module.rerank_entry_kinds(database=False)):
            # a head that explains its scores (as RetrievalModule.explain_pair asks it: its inliers may not be them)
            return _explain(module, tensor_a, tensor_b, image_a, image_b, args.out)
        # keypoints in the original images' pixels, as re-ranking measures RANSAC's threshold
        feats_a, feats_b = model_features(module, tensor_a, factors[0]), model_features(module, tensor_b, factors[1])
        # the head's own matching settings: the inliers drawn are the score its re-ranking gives
        options = dict(getattr(module.rerank_head, "match_options", {}))
    else:
        image_a, image_b = read_rgb(args.image_a, max_side or None), read_rgb(args.image_b, max_side or None)
        feats_a = sift_features(image_a, args.num_features)
        feats_b = sift_features(image_b, args.num_features)
        options = {}
    if args.reference:  # the paper's path with the head's threshold, distance and trials; its USAC settings unused
        options = {name: value for name, value in options.items() if name in REFERENCE_SETTINGS}
        options["reference"] = True
    result = match_and_verify(*feats_a, *feats_b, seed=args.seed, **options)
    (fy_a, fx_a), (fy_b, fx_b) = factors  # drawn on the images as shown
    shown = replace(result, query_points=result.query_points * np.float32([fx_a, fy_a]),
                    db_points=result.db_points * np.float32([fx_b, fy_b]))
    out = draw_matches(image_a, image_b, shown, args.out)
    print(f"inliers: {result.inliers} (tentative matches: {result.matches}; features: {features}, "
          f"{len(feats_a[0])} / {len(feats_b[0])})")
    print(f"wrote {out}")
    return 0


def _explain(module: Any, tensor_a: Any, tensor_b: Any, image_a: np.ndarray, image_b: np.ndarray,
             out_path: str) -> int:
    """A verifier's evidence for the pair, printed and drawn; the score alone from a head that does not explain."""
    from .pair_picture import draw_explanation

    try:
        explanation = module.explain_pair(tensor_a, tensor_b)
    except NotImplementedError as exc:
        score = float(module.rerank_scores(tensor_a, [tensor_b])[0])
        print(f"score: {score:.4f}")
        print(f"no picture: {exc}", file=sys.stderr)
        return 0
    out = draw_explanation(image_a, image_b, explanation, out_path)
    print(f"score: {explanation.score:.4f} ({len(explanation.matches)} correspondences drawn)")
    print(f"wrote {out}")
    return 0
