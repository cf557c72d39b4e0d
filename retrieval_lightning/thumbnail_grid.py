"""A grid of captioned thumbnails in one PNG: the evaluation gallery, the mined hard negatives, ``search``'s results.

Drawn with PIL onto one canvas. Through matplotlib (one Axes per thumbnail) a 4-query re-ranked gallery took 2.7 s
on a slow CPU, at every validation and test; pasting the thumbnails takes a few tens of milliseconds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

#: side of the square each thumbnail is fitted into, in px
CELL = 160
#: width of a coloured border (a tile without a colour gets a 1 px black frame)
BORDER = 4
CAPTION_PX = 10
TITLE_PX = 13
PAD = 8


@dataclass(frozen=True)
class Tile:
    """One image of a picture row: the image (C, H, W in [0, 1]; ``None`` leaves the cell empty), its caption
    (``\\n`` separates lines) and optionally a border colour (any colour PIL reads, e.g. ``"#1a9850"``)."""

    image: Tensor | None
    caption: str
    colour: str | None = None


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's data (installed with it), else PIL's own font."""
    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except OSError:
        return ImageFont.load_default(size)


def _fitted(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> str:
    """``text``, cut in its middle with an ellipsis where it is wider than ``width`` px: file names that share a
    long prefix (``trip_2019_photo_0001.jpg``, ``..._0002.jpg``) differ at their ends, which are kept."""
    if draw.textlength(text, font=font) <= width:
        return text
    head, tail = text[: len(text) // 2], text[len(text) // 2:]
    while (head or tail) and draw.textlength(head + "…" + tail, font=font) > width:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return head + "…" + tail


def _thumbnail(image: Tensor, side: int) -> Image.Image:
    """``image`` scaled (up or down, aspect kept) to fit a ``side`` px square."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(np.ascontiguousarray(pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., 0]))
    scale = side / max(picture.width, picture.height)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def draw_rows(rows: Sequence[Sequence[Tile]], title: str, path: Path) -> Path:
    """A grid of captioned thumbnails, one row per list (rows may differ in length), under ``title``
    (``""``: none); saved as PNG."""
    n_cols = max([len(row) for row in rows] + [1])
    caption_font, title_font = _font(CAPTION_PX), _font(TITLE_PX)
    line = CAPTION_PX + 3
    caption_height = max([tile.caption.count("\n") + 1 for row in rows for tile in row] + [1]) * line + 3
    title_lines = title.splitlines()
    top = PAD + len(title_lines) * (TITLE_PX + 5)
    row_height = caption_height + CELL + PAD
    width = max([PAD + n_cols * (CELL + PAD)] + [round(title_font.getlength(t)) + 2 * PAD for t in title_lines])
    canvas = Image.new("RGB", (width, top + max(1, len(rows)) * row_height), "white")  # the whole title shown
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title_lines):
        draw.text(((width - draw.textlength(text, font=title_font)) / 2, PAD + i * (TITLE_PX + 5)), text,
                  fill="black", font=title_font)
    for r, row in enumerate(rows):
        y0 = top + r * row_height
        for c, tile in enumerate(row):
            x0 = PAD + c * (CELL + PAD)
            colour = tile.colour or "black"
            for i, text in enumerate(tile.caption.splitlines()):
                text = _fitted(draw, text, caption_font, CELL)
                draw.text((x0 + (CELL - draw.textlength(text, font=caption_font)) / 2, y0 + i * line), text,
                          fill=colour, font=caption_font)
            if tile.image is None:
                continue
            thumb = _thumbnail(tile.image, CELL - 2 * BORDER)
            x, y = x0 + (CELL - thumb.width) // 2, y0 + caption_height + (CELL - thumb.height) // 2
            canvas.paste(thumb, (x, y))
            width = BORDER if tile.colour else 1
            draw.rectangle([x - width, y - width, x + thumb.width + width - 1, y + thumb.height + width - 1],
                           outline=colour, width=width)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
