"""Centered kernel alignment, with another kernel or with the targets ``Y Yᵀ``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor

from ._common import center, layout_of, result_dtype, safe_divide, square_trace

__all__ = ["kernel_alignment", "target_alignment", "targets_matrix"]


def kernel_alignment(K: Tensor, L: Tensor) -> Tensor:
    """Centered kernel alignment ``⟨HKH, HLH⟩_F / (‖HKH‖_F ‖HLH‖_F)``, ``H = I − 11ᵀ/N``.

    Args:
        K: a kernel of a batch with itself: ``(N, N)``, or ``(N, N, C)`` / ``(N, N, C, C)``,
            which are first reduced to the trace layout (mean over classes of
            ``Θ[i, j, a, a]``).
        L: another such kernel on the same ``N`` examples.

    Returns:
        A 0-dim tensor in ``[-1, 1]`` (``[0, 1]`` for PSD kernels); NaN when a centered
        kernel is zero (e.g. a constant kernel).
    """
    K2 = square_trace(K, "K")
    L2 = square_trace(L, "L")
    if K2.shape != L2.shape:
        raise ValueError(
            f"Expected `K` and `L` to be kernels on the same examples but got {K2.shape[0]} "
            f"and {L2.shape[0]} examples (shapes {tuple(K.shape)} and {tuple(L.shape)})."
        )
    Kc, Lc = center(K2.double()), center(L2.double())
    value = safe_divide((Kc * Lc).sum(), Kc.norm() * Lc.norm())
    return value.to(result_dtype(K))


def target_alignment(K: Tensor, targets: Tensor, num_classes: Optional[int] = None) -> Tensor:
    """Centered alignment ``A(K_trace, Y Yᵀ)`` of a kernel with the targets.

    Args:
        K: kernel of the probe set with itself, any layout (reduced to trace, ``(N, N)``).
        targets: integer labels ``(N,)`` (one-hot ``Y``) or soft targets ``(N, C)``.
        num_classes: for integer labels, the number of classes ``C`` (labels must lie in
            ``[0, C)``); default: the largest label + 1. ``Y Yᵀ`` of one-hot labels does
            not depend on ``C``.

    Returns:
        A 0-dim tensor in ``[0, 1]`` for a PSD ``K``.
    """
    K2 = square_trace(K, "K")
    Y = targets_matrix(targets, num_classes, num_rows=K2.shape[0])
    return kernel_alignment(K2, (Y @ Y.T).to(device=K2.device, dtype=K2.dtype))


def targets_matrix(
    targets: Tensor, num_classes: Optional[int] = None, num_rows: Optional[int] = None
) -> Tensor:
    """``Y (N, C)`` in float64 from integer labels ``(N,)`` or soft targets ``(N, C)``."""
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"Expected `targets` to be a torch.Tensor but got {type(targets).__name__}."
        )
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"Expected `num_classes` to be a positive int but got {num_classes!r}.")
    if targets.ndim == 1 and not targets.is_floating_point() and not targets.is_complex():
        if targets.numel() and int(targets.min()) < 0:
            raise ValueError(
                f"Expected integer `targets` to be class labels >= 0 but got {int(targets.min())}."
            )
        top = int(targets.max()) + 1 if targets.numel() else 1
        C = top if num_classes is None else num_classes
        if top > C:
            raise ValueError(
                f"Expected labels in [0, {C}) for `num_classes`={C} but got label {top - 1}."
            )
        Y = torch.nn.functional.one_hot(targets.long(), C).double()
    elif targets.ndim == 2 and targets.is_floating_point():
        Y = targets.double()
    else:
        hint = (
            ": pass class labels as integers (`targets.long()`) and the targets t of one "
            "sigmoid output as a column (`targets[:, None]`)"
            if targets.ndim == 1 and targets.is_floating_point()
            else ""
        )
        raise ValueError(
            "Expected `targets` to be integer labels of shape (N,) or soft targets of shape "
            f"(N, C) but got shape {tuple(targets.shape)} with dtype {targets.dtype}{hint}."
        )
    if num_rows is not None and Y.shape[0] != num_rows:
        raise ValueError(
            f"Expected `targets` to hold one row per kernel example ({num_rows}) but got "
            f"{Y.shape[0]}."
        )
    return Y


def _target_alignment_update(
    kernel_rows: Tensor, row_targets: Tensor, targets: Tensor, num_classes: Optional[int]
) -> dict[str, Tensor]:
    """Sufficient statistics of ``A(K, YYᵀ)`` from a block of whole rows of ``K``.

    With ``r = K 1`` (row sums) and ``K`` symmetric, the centered quantities expand into
    sums over rows (``Ȳ = mean_i y_i``, ``Ỹ = Y − 1Ȳᵀ``):

    * ``⟨K, ỸỸᵀ⟩ = Σ_ij K_ij y_i·y_j − 2 Ȳ·Σ_i r_i y_i + |Ȳ|² Σ_ij K_ij``,
    * ``‖HKH‖² = Σ_ij K_ij² − (2/N) Σ_i r_i² + (Σ_ij K_ij)² / N²``,
    * ``‖ỸỸᵀ‖² = ‖Σ_i y_i y_iᵀ − N ȲȲᵀ‖²``.

    Args:
        kernel_rows: rows ``K[B, :]`` of the probe kernel, ``(b, N)`` or the same rows of
            a diagonal ``(b, N, C)`` / full ``(b, N, C, C)`` kernel.
        row_targets: targets of the rows in ``B``: labels ``(b,)`` or soft ``(b, C)``.
        targets: targets of all ``N`` probe examples (the columns).
        num_classes: number of classes for integer labels.
    """
    layout = layout_of(kernel_rows, "kernel_rows")
    R = kernel_rows.double()
    if layout == "full":
        R = R.diagonal(dim1=2, dim2=3).mean(dim=-1)
    elif layout == "diagonal":
        R = R.mean(dim=-1)  # (b, N)
    Yr = targets_matrix(row_targets, num_classes, num_rows=R.shape[0]).to(R.device)
    Y = targets_matrix(targets, num_classes, num_rows=R.shape[1]).to(R.device)
    if Yr.shape[1] != Y.shape[1]:
        raise ValueError(
            f"Expected `row_targets` and `targets` to have the same number of classes but "
            f"got {Yr.shape[1]} and {Y.shape[1]}."
        )
    r = R.sum(dim=1)  # (b,)
    return {
        "num_rows": torch.tensor(float(R.shape[0]), dtype=torch.float64),
        "num_entries": torch.tensor(float(R.numel()), dtype=torch.float64),
        "sum_k": R.sum(),
        "sum_k2": R.square().sum(),
        "sum_r2": r.square().sum(),
        "sum_kyy": (R * (Yr @ Y.T)).sum(),
        "ry": r @ Yr,  # (C,)
        "sum_y": Yr.sum(dim=0),  # (C,)
        "yy": Yr.T @ Yr,  # (C, C)
    }


def _target_alignment_compute(stats: Mapping[str, Tensor]) -> Tensor:
    N = stats["num_rows"]
    if float(stats["num_entries"]) != float(N) ** 2:
        raise ValueError(
            "The streamed kernel rows do not form a square kernel: "
            f"{int(N)} rows with {int(stats['num_entries'])} entries in all; update with "
            "every row of the probe kernel exactly once."
        )
    y_bar = stats["sum_y"] / N
    inner = stats["sum_kyy"] - 2 * (y_bar @ stats["ry"]) + (y_bar @ y_bar) * stats["sum_k"]
    k_norm_sq = stats["sum_k2"] - 2 * stats["sum_r2"] / N + stats["sum_k"].square() / N**2
    y_cov = stats["yy"] - N * torch.outer(y_bar, y_bar)
    denom = k_norm_sq.clamp_min(0).sqrt() * y_cov.norm()
    return safe_divide(inner, denom)
