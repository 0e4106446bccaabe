"""The spectrum of a kernel's ``(N·C, N·C)`` matrix: extreme eigenvalues, effective rank."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import check_symmetric, layout_of

__all__ = ["Spectrum", "kernel_matrix", "spectrum"]


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
    layout = layout_of(K, "K")
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
        ValueError: ``K`` is not square (``N1 != N2``), not symmetric, or holds NaN / inf.
    """
    layout = layout_of(K, "K")
    if K.shape[0] != K.shape[1]:
        raise ValueError(
            "Expected a square kernel of a batch with itself (N1 == N2, e.g. from "
            f"empirical_ntk(model, x) with x2=None) but got shape {tuple(K.shape)}."
        )
    if not bool(torch.isfinite(K).all()):
        bad = int((~torch.isfinite(K)).sum())
        raise ValueError(
            f"Expected a finite kernel `K` but {bad} of its {K.numel()} entries are NaN or "
            "inf; the spectrum is undefined (the logits or parameters that made it are not "
            "finite)."
        )
    if layout == "diagonal":
        blocks = K.permute(2, 0, 1).double()  # (C, N, N)
    else:
        blocks = kernel_matrix(K).double().unsqueeze(0)  # (1, M, M)
    check_symmetric(blocks, K.dtype)
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
