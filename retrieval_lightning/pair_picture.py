"""Draw a re-ranking head's :class:`~retrieval_lightning.head.PairExplanation` of one pair.

Why a picture: a verifier's score is one number, and when it is wrong (a texture scored as a
match, a true view scored low) the question is *where* the two images agree. The query is on the
left, the candidate on the right, each under its heat map (where it finds evidence in the other
image); lines join the strongest correspondences; on a sparse store the candidate's kept cells are
outlined; the caption under the images says what each mark means.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from .head import PairExplanation

#: panels are enlarged to at least this height, so maps of small images stay legible
MIN_PANEL_HEIGHT = 384
HEAT_ALPHA = 0.45
#: the widest a panel may be, in heights: a panorama is drawn lower rather than as a strip of thousands of px
MAX_PANEL_ASPECT = 3.0


def panel_scale(width: int, height: int, target: int) -> float:
    """The factor that draws a ``width`` x ``height`` image ``target`` px high, or lower where it would be wider
    than :data:`MAX_PANEL_ASPECT` heights."""
    return min(target / height, MAX_PANEL_ASPECT * target / width)


def _panel(image: np.ndarray, heat: np.ndarray | None, height: int) -> Image.Image:
    """The image ``height`` px high (lower if very wide: :func:`panel_scale`), with ``heat`` (values in [0, 1])
    blended over it cell by cell."""
    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    scale = panel_scale(img.width, img.height, height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.Resampling.BILINEAR)
    if heat is None:
        return img
    rgba = colormaps["inferno"](np.clip(np.asarray(heat, np.float32), 0.0, 1.0))
    cells = Image.fromarray((rgba[..., :3] * 255).astype(np.uint8)).resize(img.size, Image.Resampling.NEAREST)
    return Image.blend(img, cells, HEAT_ALPHA)


def _outline_kept(draw: ImageDraw.ImageDraw, kept: np.ndarray, left: int, size: tuple[int, int]) -> None:
    """A white outline around every kept cell of the candidate panel at x offset ``left``."""
    h, w = kept.shape
    cw, ch = size[0] / w, size[1] / h
    for row, col in zip(*np.nonzero(kept)):
        x0, y0 = left + col * cw, row * ch
        draw.rectangle([x0 + 1, y0 + 1, x0 + cw - 2, y0 + ch - 2], outline=(255, 255, 255), width=1)


def _line_colours(strengths: np.ndarray) -> list[tuple[int, int, int]]:
    """Weak correspondences blue, strong ones yellow (viridis over the strengths' range)."""
    if strengths.size == 0:
        return []
    low, high = float(strengths.min()), float(strengths.max())
    scaled = (strengths - low) / (high - low) if high > low else np.ones_like(strengths)
    return [tuple(int(255 * c) for c in colormaps["viridis"](float(s))[:3]) for s in scaled]


def legend(explanation: PairExplanation) -> str:
    """What the marks drawn mean, only for the marks this explanation has (a head may give no heat map,
    or no correspondences)."""
    parts = []
    if explanation.query_heat is not None or explanation.candidate_heat is not None:
        parts.append(" Heat colours: black 0 to yellow 1.")
    if len(np.asarray(explanation.matches).reshape(-1, 4)):
        parts.append(" Line colours: blue the weakest drawn, yellow the strongest.")
    return "".join(parts)


def _wrapped(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """``text`` in lines at most ``width`` px wide in ``font`` (a word wider than that has a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def draw_explanation(
    image_a: np.ndarray, image_b: np.ndarray, explanation: PairExplanation, path: str | os.PathLike[str]
) -> Path:
    """Side-by-side PNG of ``explanation`` (query left, candidate right), caption underneath."""
    height = max(MIN_PANEL_HEIGHT, image_a.shape[0], image_b.shape[0])
    a = _panel(image_a, explanation.query_heat, height)
    b = _panel(image_b, explanation.candidate_heat, height)
    width = a.width + b.width
    caption = explanation.caption or f"score {explanation.score:.4f}"
    if explanation.candidate_kept is not None:
        kept = np.asarray(explanation.candidate_kept, bool)
        caption += f" White squares: the {int(kept.sum())} of {kept.size} cells the store keeps (candidate)."
    caption += legend(explanation)
    font = ImageFont.load_default(size=max(14, round(height / 40)))  # PIL's default is 11 px at any size
    pitch = round(font.size * 1.3)
    lines = _wrapped(caption, font, width - 12)
    height = max(a.height, b.height)
    canvas = Image.new("RGB", (width, height + pitch * len(lines) + 10), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width, 0))
    draw = ImageDraw.Draw(canvas)
    if explanation.candidate_kept is not None:
        _outline_kept(draw, np.asarray(explanation.candidate_kept, bool), a.width, b.size)
    stroke = max(1, round(height / 300))
    matches = np.asarray(explanation.matches, np.float32).reshape(-1, 4)
    for (qx, qy, cx, cy), colour in zip(matches, _line_colours(np.asarray(explanation.strengths, np.float32))):
        start = (float(qx) * a.width, float(qy) * a.height)
        end = (a.width + float(cx) * b.width, float(cy) * b.height)
        draw.line([start, end], fill=colour, width=stroke)
        for x, y in (start, end):
            r = 2 * stroke
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=stroke)
    for i, line in enumerate(lines):
        draw.text((6, height + 5 + pitch * i), line, fill=(0, 0, 0), font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out
