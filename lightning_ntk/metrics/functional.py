"""Kernel, logit and parameter metrics as plain functions (the maths lives here, once).

Kernel layouts (see :func:`lightning_ntk.empirical_ntk`), told apart by their rank:

====================  =====================  ===========================================
layout                shape                  entry
====================  =====================  ===========================================
``"full"``            ``(N1, N2, C, C)``     ``Θ(x_i, x_j)[a, b]``
``"diagonal"``        ``(N1, N2, C)``        ``Θ(x_i, x_j)[a, a]``
``"trace"``           ``(N1, N2)``           ``(1/C) Σ_a Θ(x_i, x_j)[a, a]``
====================  =====================  ===========================================

The linearization metrics (:func:`linearization_error`, :func:`prob_tv`,
:func:`argmax_agreement`) live in :mod:`lightning_ntk.linearization` and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..linearization import argmax_agreement, linearization_error, prob_tv

__all__ = [
    "Spectrum",
    "argmax_agreement",
    "kernel_alignment",
    "kernel_distance",
    "kernel_matrix",
    "linearization_error",
    "logit_norm",
    "param_distance",
    "prob_tv",
    "relative_change",
    "spectrum",
    "target_alignment",
]

_LAYOUTS = {2: "trace", 3: "diagonal", 4: "full"}


# ---------------------------------------------------------------------- kernel drift


def relative_change(K_t: Tensor, K_0: Tensor) -> Tensor:
    """``‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F`` for two kernels of one layout and shape.

    Args:
        K_t: the kernel now, any layout.
        K_0: the initial kernel, same shape.

    Returns:
        A 0-dim tensor; NaN when ``K_0`` is zero.
    """
    _check_same_kernels(K_t, K_0, "K_t", "K_0")
    diff = (K_t.double() - K_0.double()).norm()
    return _safe_divide(diff, K_0.double().norm()).to(_result_dtype(K_t))


def kernel_distance(K_t: Tensor, K_0: Tensor) -> Tensor:
    """``1 − ⟨Θ_t, Θ_0⟩_F / (‖Θ_t‖_F ‖Θ_0‖_F)`` (Fort et al., 2020).

    In ``[0, 1]`` for PSD kernels, 0 for kernels equal up to a positive factor.

    Args:
        K_t: the kernel now, any layout.
        K_0: the initial kernel, same shape.

    Returns:
        A 0-dim tensor; NaN when either kernel is zero.
    """
    _check_same_kernels(K_t, K_0, "K_t", "K_0")
    a, b = K_t.double(), K_0.double()
    cosine = _safe_divide((a * b).sum(), a.norm() * b.norm())
    return (1.0 - cosine).to(_result_dtype(K_t))


# ---------------------------------------------------------------------- alignment


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
    K2 = _square_trace(K, "K")
    L2 = _square_trace(L, "L")
    if K2.shape != L2.shape:
        raise ValueError(
            f"Expected `K` and `L` to be kernels on the same examples but got {K2.shape[0]} "
            f"and {L2.shape[0]} examples (shapes {tuple(K.shape)} and {tuple(L.shape)})."
        )
    Kc, Lc = _center(K2.double()), _center(L2.double())
    value = _safe_divide((Kc * Lc).sum(), Kc.norm() * Lc.norm())
    return value.to(_result_dtype(K))


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
    K2 = _square_trace(K, "K")
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
        raise ValueError(
            "Expected `targets` to be integer labels of shape (N,) or soft targets of shape "
            f"(N, C) but got shape {tuple(targets.shape)} with dtype {targets.dtype}."
        )
    if num_rows is not None and Y.shape[0] != num_rows:
        raise ValueError(
            f"Expected `targets` to hold one row per kernel example ({num_rows}) but got "
            f"{Y.shape[0]}."
        )
    return Y


# ---------------------------------------------------------------------- spectrum


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of a kernel's matrix form and summaries of them.

    Attributes:
        eigenvalues: float64 tensor, descending.
        eig_max: the largest eigenvalue.
        eig_min: the smallest eigenvalue (may be slightly negative from round-off).
        trace: the sum of the eigenvalues.
        effective_rank: ``exp(−Σ p log p)``, ``p = λ / Σλ`` over the positive ``λ``.
        condition_number: ``eig_max / max(eig_min, eps)``.
    """

    eigenvalues: Tensor
    eig_max: float
    eig_min: float
    trace: float
    effective_rank: float
    condition_number: float


def kernel_matrix(K: Tensor) -> Tensor:
    """Matrix form ``M[(i, a), (j, b)] = K[i, j, a, b]``, sample-major.

    Args:
        K: ``(N1, N2, C, C)`` (full), ``(N1, N2, C)`` (diagonal: ``Θ[i, j, a, a]``, zero
            off the class diagonal) or ``(N1, N2)`` (trace: returned as is).

    Returns:
        ``(N1·C, N2·C)``, or ``(N1, N2)`` for the trace layout.
    """
    layout = _layout(K, "K")
    if layout == "trace":
        return K
    if layout == "diagonal":
        K = torch.diag_embed(K)  # (N1, N2, C, C)
    elif K.shape[2] != K.shape[3]:
        raise ValueError(
            "Expected a full kernel of shape (N1, N2, C, C) with equal class dimensions but "
            f"got shape {tuple(K.shape)}."
        )
    N1, N2, C, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(N1 * C, N2 * C)


def spectrum(K: Tensor, eps: float = 1e-12) -> Spectrum:
    """Eigenvalues (float64 ``eigvalsh``) of a kernel of a batch with itself.

    For the full and trace layouts, the spectrum of :func:`kernel_matrix`; for the
    diagonal layout, the union of the ``C`` per-class ``(N, N)`` spectra (the spectrum of
    its block-diagonal matrix form).

    Args:
        K: a square, symmetric kernel (``x2=None``) in any layout.
        eps: floor of ``eig_min`` in the condition number.

    Returns:
        A :class:`Spectrum`.

    Raises:
        ValueError: ``K`` is not square (``N1 != N2``) or not symmetric.
    """
    layout = _layout(K, "K")
    if K.shape[0] != K.shape[1]:
        raise ValueError(
            "Expected a square kernel of a batch with itself (N1 == N2, e.g. from "
            f"empirical_ntk(model, x) with x2=None) but got shape {tuple(K.shape)}."
        )
    if layout == "diagonal":
        blocks = K.permute(2, 0, 1).double()  # (C, N, N)
    else:
        blocks = kernel_matrix(K).double().unsqueeze(0)  # (1, M, M)
    _check_symmetric(blocks, K.dtype)
    blocks = 0.5 * (blocks + blocks.transpose(1, 2))
    eigenvalues = torch.linalg.eigvalsh(blocks).flatten().sort(descending=True).values
    positive = eigenvalues[eigenvalues > 0]
    if positive.numel():
        p = positive / positive.sum()
        effective_rank = math.exp(float(-(p * p.log()).sum()))
    else:
        effective_rank = 0.0
    eig_max, eig_min = float(eigenvalues[0]), float(eigenvalues[-1])
    return Spectrum(
        eigenvalues=eigenvalues,
        eig_max=eig_max,
        eig_min=eig_min,
        trace=float(eigenvalues.sum()),
        effective_rank=effective_rank,
        condition_number=eig_max / max(eig_min, eps),
    )


# ---------------------------------------------------------------------- logits, parameters


def logit_norm(logits: Tensor) -> Tensor:
    """Mean over rows of ``‖f(x) − mean_a f_a(x)‖_2``, the size of the centered logits.

    Softmax ignores a per-row constant, so this is the part of the logits that can
    diverge.

    Args:
        logits: ``(N, C)``.

    Returns:
        A 0-dim tensor.
    """
    return _logit_norm_rows(logits).mean()


def param_distance(params_t: Mapping[str, Tensor], params_0: Mapping[str, Tensor]) -> Tensor:
    """``‖θ_t − θ_0‖_2 / ‖θ_0‖_2`` over all named parameters (sums of squares in float64).

    Args:
        params_t: ``{name: tensor}`` now.
        params_0: ``{name: tensor}`` at the start, with the same names and shapes.

    Returns:
        A 0-dim tensor in the dtype of the parameters; NaN when ``θ_0`` is zero.
    """
    for argname, params in (("params_t", params_t), ("params_0", params_0)):
        if not isinstance(params, Mapping) or not params:
            raise TypeError(
                f"Expected `{argname}` to be a non-empty mapping {{name: tensor}} but got "
                f"{params!r:.80}."
            )
    if set(params_t) != set(params_0):
        only_t = sorted(set(params_t) - set(params_0))
        only_0 = sorted(set(params_0) - set(params_t))
        raise ValueError(
            "Expected `params_t` and `params_0` to name the same parameters; only in "
            f"`params_t`: {only_t}, only in `params_0`: {only_0}."
        )
    diff_norms, ref_norms = [], []
    device = next(iter(params_t.values())).device
    for name, p0 in params_0.items():
        pt = params_t[name]
        if pt.shape != p0.shape:
            raise ValueError(
                f"Expected `params_t[{name!r}]` to have the shape of `params_0[{name!r}]`, "
                f"{tuple(p0.shape)}, but got {tuple(pt.shape)}."
            )
        a, b = pt.detach(), p0.detach().to(pt.device)
        # float64 norms per parameter, gathered on one device: one host sync in all
        diff_norms.append(torch.linalg.vector_norm(a - b, dtype=torch.float64).to(device))
        ref_norms.append(torch.linalg.vector_norm(b, dtype=torch.float64).to(device))
    diff_sq = torch.stack(diff_norms).square().sum().cpu()
    ref_sq = torch.stack(ref_norms).square().sum().cpu()
    first = next(iter(params_0.values()))
    dtype = first.dtype if first.is_floating_point() else torch.float32
    return _safe_divide(diff_sq.sqrt(), ref_sq.sqrt()).to(dtype)


# ---------------------------------------------------------------------- helpers


def _logit_norm_rows(logits: Tensor) -> Tensor:
    """``‖f(x_i) − mean_a f_a(x_i)‖_2`` per row, ``(N,)``."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"Expected `logits` to be a torch.Tensor but got {type(logits).__name__}.")
    if logits.ndim != 2:
        raise ValueError(
            f"Expected `logits` to be of shape (N, C) but got shape {tuple(logits.shape)}."
        )
    centered = logits - logits.mean(dim=1, keepdim=True)
    return centered.norm(dim=1)


def _layout(K: Tensor, name: str) -> str:
    if not isinstance(K, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor but got {type(K).__name__}.")
    if K.ndim not in _LAYOUTS:
        raise ValueError(
            f"Expected `{name}` to be a kernel of shape (N1, N2) (trace), (N1, N2, C) "
            f"(diagonal) or (N1, N2, C, C) (full) but got shape {tuple(K.shape)}."
        )
    if not K.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating tensor but got dtype {K.dtype}.")
    return _LAYOUTS[K.ndim]


def _check_same_kernels(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    _layout(a, name_a)
    _layout(b, name_b)
    if a.shape != b.shape:
        raise ValueError(
            f"Expected `{name_a}` and `{name_b}` to be kernels of the same layout and shape "
            f"but got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def _square_trace(K: Tensor, name: str) -> Tensor:
    """A square kernel reduced to the trace layout ``(N, N)``."""
    layout = _layout(K, name)
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


def _center(K: Tensor) -> Tensor:
    """``H K H`` with ``H = I − 11ᵀ/N``."""
    K = K - K.mean(dim=0, keepdim=True)
    return K - K.mean(dim=1, keepdim=True)


def _check_symmetric(blocks: Tensor, dtype: torch.dtype) -> None:
    scale = blocks.abs().amax()
    asym = (blocks - blocks.transpose(1, 2)).abs().amax()
    tol = math.sqrt(torch.finfo(dtype).eps) * float(scale)
    if float(asym) > tol:
        raise ValueError(
            "Expected a symmetric kernel (of a batch with itself, x2=None) but its matrix "
            f"form is asymmetric by up to {float(asym):.3g} (largest entry {float(scale):.3g}); "
            "the spectrum is defined for symmetric kernels only."
        )


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.nan)


def _result_dtype(K: Tensor) -> torch.dtype:
    return K.dtype if K.is_floating_point() else torch.float32


# ---------------------------------------------------------------------- streaming statistics


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
    layout = _layout(kernel_rows, "kernel_rows")
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
    return _safe_divide(inner, denom)
