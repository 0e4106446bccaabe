"""A readable kernel heat map drawn with torch alone: blocks, class borders, a colour bar.

The ``(N, N)`` kernel (probe sorted by class) becomes an RGB figure ``(3, H, W)`` in
``[0, 1]``:

* each entry is a square block of ``cell = ⌈side / N⌉`` pixels, so the map is at least
  ``side`` (default 288) pixels wide whatever ``N``;
* colours follow a diverging map (blue, white at 0, red) on the symmetric range
  ``[−m, m]``, ``m = max |K|``: the sign of an entry is its hue, its size the depth;
* thin dark lines mark where one class's block ends and the next begins;
* a colour bar on the right, labelled ``+m``, ``0`` and ``−m`` (digits drawn from a
  small built-in pixel font, so neither matplotlib nor a font file is needed).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["kernel_figure"]

# blue - white - red, anchored at -1, -0.5, 0, 0.5, 1 (the "RdBu" family, reversed)
_ANCHORS = torch.tensor(
    [
        [0.019, 0.188, 0.380],
        [0.263, 0.576, 0.765],
        [0.969, 0.969, 0.969],
        [0.839, 0.376, 0.302],
        [0.404, 0.000, 0.122],
    ],
    dtype=torch.float64,
)
_BORDER = 0.15  # grey level of the class borders and the tick marks
_BAR_WIDTH = 18
_GAP = 10
_MARGIN = 6
_FONT_SCALE = 2

# 3 × 5 pixel glyphs, one string of 15 bits per character (rows top to bottom)
_GLYPHS = {
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "111001111100111",
    "3": "111001111001111",
    "4": "101101111001001",
    "5": "111100111001111",
    "6": "111100111101111",
    "7": "111001001001001",
    "8": "111101111101111",
    "9": "111101111001111",
    ".": "000000000000010",
    "-": "000000111000000",
    "+": "000010111010000",
    "e": "000111101110011",
    " ": "000000000000000",
}


def kernel_figure(kernel: Tensor, labels: Optional[Tensor] = None, *, side: int = 288) -> Tensor:
    """The heat-map figure ``(3, H, W)`` of an ``(N, N)`` kernel, as described above.

    Args:
        kernel: the ``(N, N)`` kernel matrix.
        labels: integer probe labels ``(N,)``: rows and columns are sorted by class and
            the class blocks are outlined. Soft targets ``(N, C)`` are sorted by argmax.
        side: minimal width of the heat map in pixels.

    Returns:
        A float tensor ``(3, H, W)`` in ``[0, 1]``, ``W > side``.
    """
    K = kernel.detach().double().cpu()
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(
            f"Expected `kernel` to be a square (N, N) matrix but got {tuple(K.shape)}."
        )
    N = K.shape[0]
    classes = _classes(labels, N)
    if classes is not None:
        order = torch.argsort(classes, stable=True)
        K, classes = K[order][:, order], classes[order]
    scale = float(K.abs().max())
    v = (K / scale if scale > 0 else K).clamp(-1, 1)  # (N, N) in [-1, 1]
    cell = max(1, math.ceil(side / N))
    S = N * cell
    heat = _colour(v).repeat_interleave(cell, 1).repeat_interleave(cell, 2)  # (3, S, S)
    if classes is not None and cell >= 2:
        for b in (torch.nonzero(classes[1:] != classes[:-1]).flatten() + 1).tolist():
            heat[:, b * cell - 1 : b * cell + 1, :] = _BORDER
            heat[:, :, b * cell - 1 : b * cell + 1] = _BORDER
    labels_text = [_number(scale), "0", _number(-scale)]
    text_w = max(len(t) for t in labels_text) * 4 * _FONT_SCALE
    H = S + 2 * _MARGIN
    W = _MARGIN + S + _GAP + _BAR_WIDTH + 4 + text_w + _MARGIN
    fig = torch.ones(3, H, W, dtype=torch.float64)
    fig[:, _MARGIN : _MARGIN + S, _MARGIN : _MARGIN + S] = heat
    # colour bar: +1 at the top, -1 at the bottom
    x0 = _MARGIN + S + _GAP
    ramp = torch.linspace(1, -1, S, dtype=torch.float64)
    fig[:, _MARGIN : _MARGIN + S, x0 : x0 + _BAR_WIDTH] = _colour(ramp)[:, :, None]
    x_text = x0 + _BAR_WIDTH + 4
    glyph_h = 5 * _FONT_SCALE
    for text, y in zip(labels_text, (_MARGIN, _MARGIN + S // 2, _MARGIN + S - 1)):
        fig[:, y, x0 + _BAR_WIDTH : x0 + _BAR_WIDTH + 3] = _BORDER  # tick
        top = min(max(y - glyph_h // 2, 0), H - glyph_h)
        _draw_text(fig, text, top, x_text)
    return fig.float()


def _classes(labels: Optional[Tensor], N: int) -> Optional[Tensor]:
    """Integer class of each probe example, or ``None`` if unknown."""
    if labels is None or labels.shape[0] != N:
        return None
    labels = labels.detach().cpu()
    if labels.ndim == 2:
        return labels.argmax(dim=1)
    if labels.ndim == 1 and not labels.is_floating_point():
        return labels.long()
    return None


def _colour(v: Tensor) -> Tensor:
    """RGB ``(3, *v.shape)`` of values in ``[-1, 1]`` on the diverging map."""
    position = (v.clamp(-1, 1) + 1) * 2  # in [0, 4]: between anchors
    low = position.floor().clamp(max=3).long()
    frac = (position - low)[..., None]
    rgb = _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac  # (*v.shape, 3)
    return rgb.movedim(-1, 0)


def _number(value: float) -> str:
    """A short label for the colour bar: 3 significant digits, a sign for non-zeros."""
    text = f"{value:+.3g}"
    return text.replace("e+0", "e+").replace("e-0", "e-")


def _draw_text(fig: Tensor, text: str, top: int, left: int) -> None:
    """Draw ``text`` in the pixel font, dark grey, at ``(top, left)`` of ``fig (3, H, W)``."""
    s = _FONT_SCALE
    for i, char in enumerate(text):
        bits = _GLYPHS.get(char, _GLYPHS[" "])
        glyph = torch.tensor([float(b == "1") for b in bits], dtype=torch.float64).view(5, 3)
        glyph = glyph.repeat_interleave(s, 0).repeat_interleave(s, 1)  # (5s, 3s)
        x = left + i * 4 * s
        region = fig[:, top : top + 5 * s, x : x + 3 * s]
        h, w = region.shape[1:]
        mask = glyph[:h, :w].bool()
        region[:, mask] = _BORDER
