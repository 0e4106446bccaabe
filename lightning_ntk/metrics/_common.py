"""Checks and small helpers shared by the kernel metrics: layouts, shapes, dtypes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "LAYOUTS",
    "center",
    "check_same_kernels",
    "check_symmetric",
    "layout_of",
    "result_dtype",
    "safe_divide",
    "square_trace",
]


LAYOUTS = {2: "trace", 3: "diagonal", 4: "full"}


def layout_of(K: Tensor, name: str) -> str:
    if not isinstance(K, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor but got {type(K).__name__}.")
    if K.ndim not in LAYOUTS:
        raise ValueError(
            f"Expected `{name}` to be a kernel of shape (N1, N2) (trace), (N1, N2, C) "
            f"(diagonal) or (N1, N2, C, C) (full) but got shape {tuple(K.shape)}."
        )
    if not K.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating tensor but got dtype {K.dtype}.")
    return LAYOUTS[K.ndim]


def check_same_kernels(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    layout_of(a, name_a)
    layout_of(b, name_b)
    if a.shape != b.shape:
        raise ValueError(
            f"Expected `{name_a}` and `{name_b}` to be kernels of the same layout and shape "
            f"but got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def square_trace(K: Tensor, name: str) -> Tensor:
    """A square kernel reduced to the trace layout ``(N, N)``."""
    layout = layout_of(K, name)
    if K.shape[0] != K.shape[1]:
        raise ValueError(
            f"Expected `{name}` to be a square kernel of a batch with itself (N1 == N2) but "
            f"got shape {tuple(K.shape)}."
        )
    if layout == "full":
        return K.diagonal(dim1=2, dim2=3).mean(dim=-1)
    if layout == "diagonal":
        return K.mean(dim=-1)
    return K


def center(K: Tensor) -> Tensor:
    """``H K H`` with ``H = I − 11ᵀ/N``."""
    K = K - K.mean(dim=0, keepdim=True)
    return K - K.mean(dim=1, keepdim=True)


def check_symmetric(blocks: Tensor, dtype: torch.dtype) -> None:
    scale = blocks.abs().amax()
    asym = (blocks - blocks.transpose(1, 2)).abs().amax()
    tol = math.sqrt(torch.finfo(dtype).eps) * float(scale)
    if float(asym) > tol:
        raise ValueError(
            "Expected a symmetric kernel (of a batch with itself, x2=None) but its matrix "
            f"form is asymmetric by up to {float(asym):.3g} (largest entry {float(scale):.3g}); "
            "the spectrum is defined for symmetric kernels only."
        )


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.nan)


def result_dtype(K: Tensor) -> torch.dtype:
    return K.dtype if K.is_floating_point() else torch.float32
