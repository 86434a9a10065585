"""Legends drawn on overlays: which colour is which id, and what that id is called.

The colours are the label PNGs' own palette (:data:`segcli.io.outputs.VOC_PALETTE`), so an id has the same colour
in a label PNG, an overlay and the HTML report. Names come from ``--class-names``: a dataset preset
(``voc``, ``camvid``, ``cityscapes27``, ``cocostuff27``: id i is the preset's class i), a text file (one name per
line, line i naming id i, or ``ID NAME`` lines), or the ``--json`` file of ``segcli evaluate`` (each cluster id is
named by the ground-truth class it was matched to); they are read by :mod:`segcli.evaluate.class_names`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Legend:
    """How an overlay shows its legend: ``names`` (id -> name, as sorted pairs so it pickles small and
    hashes) and whether to draw it at all (``--no-legend``)."""

    names: tuple[tuple[int, str], ...] = ()
    show: bool = True

    @classmethod
    def of(cls, names: Mapping[int, str] | None = None, show: bool = True) -> Legend:
        return cls(tuple(sorted((int(k), str(v)) for k, v in (names or {}).items())), show)

    def name(self, i: int) -> str | None:
        return dict(self.names).get(int(i))


def legend_entries(ids, legend: Legend) -> list[tuple[int, str]]:
    """(id, text) of each id to show: ``"3 road"`` when named, ``"3"`` otherwise."""
    out = []
    for i in ids:
        name = legend.name(int(i))
        out.append((int(i), f"{int(i)} {name}" if name else str(int(i))))
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_legend(image, ids, legend: Legend, colours: np.ndarray):
    """Draw a compact legend of ``ids`` (colour swatch, id, name) in the image's top-left corner, in place.

    The panel is sized to the image (text about 1/28 of its short side, at least 10 px) and wraps into columns;
    entries that do not fit are summarised as ``+N more``. Returns the image.
    """
    from PIL import ImageDraw

    entries = legend_entries(ids, legend)
    if not entries:
        return image
    W, H = image.size
    size = max(10, round(min(W, H) / 28))
    font = _font(size)
    draw = ImageDraw.Draw(image, "RGBA")
    pad, gap, sw = max(2, size // 4), max(2, size // 5), size
    line = size + gap
    rows = max(1, (H - 2 * pad) // line - 1)  # one line kept for '+N more'
    widths = [draw.textlength(t, font=font) for _, t in entries]
    max_text = max(W // 3, sw * 4)
    cols: list[list[int]] = [list(range(i, min(i + rows, len(entries)))) for i in range(0, len(entries), rows)]
    col_w = [min(max_text, max(widths[j] for j in col)) + sw + 2 * gap for col in cols]
    shown = 0
    x = pad
    for col, cw in zip(cols, col_w):
        if x + cw + pad > W and shown:
            break
        shown += len(col)
        x += cw + gap
    more = len(entries) - shown
    used_cols = [c for c in cols if c and c[-1] < shown]
    n_rows = max(len(c) for c in used_cols) + (1 if more else 0)
    panel_w = min(W, x + pad)
    panel_h = min(H, n_rows * line + 2 * pad)
    draw.rectangle((0, 0, panel_w, panel_h), fill=(0, 0, 0, 150))
    x = pad
    for col, cw in zip(used_cols, col_w):
        for r, j in enumerate(col):
            i, text = entries[j]
            y = pad + r * line
            draw.rectangle((x, y, x + sw - 1, y + sw - 1), fill=tuple(int(v) for v in colours[i]) + (255,),
                           outline=(255, 255, 255, 255))
            while text and draw.textlength(text, font=font) > max_text - sw - gap:
                text = text[:-1]
            draw.text((x + sw + gap, y), text, fill=(255, 255, 255, 255), font=font)
        x += cw + gap
    if more:
        draw.text((pad, pad + (n_rows - 1) * line), f"+{more} more", fill=(255, 255, 255, 255), font=font)
    return image
