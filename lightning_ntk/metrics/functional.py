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
:func:`argmax_agreement`) live in :mod:`lightning_ntk.linearization`, the alignments in
:mod:`._alignment` and the spectrum in :mod:`._spectrum`; all are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor

from ..linearization import argmax_agreement, linearization_error, prob_tv
from ..linearization.distances import _check_task_logits, softmax_form
from ._alignment import (
    kernel_alignment,
    target_alignment,
    targets_matrix,
)
from ._common import check_same_kernels, result_dtype, safe_divide
from ._spectrum import Spectrum, kernel_matrix, spectrum

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
    "softmax_form",
    "spectrum",
    "target_alignment",
    "targets_matrix",
]


# ---------------------------------------------------------------------- kernel drift


def relative_change(K_t: Tensor, K_0: Tensor) -> Tensor:
    """``‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F`` for two kernels of one layout and shape.

    Args:
        K_t: the kernel now, any layout.
        K_0: the initial kernel, same shape.

    Returns:
        A 0-dim tensor; NaN when ``K_0`` is zero.
    """
    check_same_kernels(K_t, K_0, "K_t", "K_0")
    diff = (K_t.double() - K_0.double()).norm()
    return safe_divide(diff, K_0.double().norm()).to(result_dtype(K_t))


def kernel_distance(K_t: Tensor, K_0: Tensor) -> Tensor:
    """``1 − ⟨Θ_t, Θ_0⟩_F / (‖Θ_t‖_F ‖Θ_0‖_F)`` (Fort et al., 2020).

    In ``[0, 1]`` for PSD kernels (``[0, 2]`` for any), exactly 0 for kernels equal up to
    a positive factor: the cosine is clamped to ``[−1, 1]``, so its round-off never makes
    the distance negative.

    Args:
        K_t: the kernel now, any layout.
        K_0: the initial kernel, same shape.

    Returns:
        A 0-dim tensor; NaN when either kernel is zero.
    """
    check_same_kernels(K_t, K_0, "K_t", "K_0")
    a, b = K_t.double(), K_0.double()
    cosine = safe_divide((a * b).sum(), a.norm() * b.norm()).clamp(-1.0, 1.0)  # NaN stays NaN
    return (1.0 - cosine).to(result_dtype(K_t))


# ---------------------------------------------------------------------- alignment


# ---------------------------------------------------------------------- spectrum


# ---------------------------------------------------------------------- logits, parameters


def logit_norm(logits: Tensor, task: Optional[str] = None) -> Tensor:
    """Mean size of the logits in margin units, the part of the logits that can diverge.

    Softmax ignores a per-row constant, so a multiclass row is measured by its centered
    norm, scaled so that a one-hot margin ``m`` (the target logit ``m`` above the others)
    reads ``m`` whatever ``C``: ``√(C/(C−1))·‖f(x) − mean_a f_a(x)‖_2`` (the centered norm
    of that margin is ``m·√((C−1)/C)``). A binary logit ``z`` is the two-class logits
    ``[0, z]`` (sigmoid(z) = softmax([0, z])₁), whose margin is ``|z|``; a multilabel row
    is ``K`` such binary problems, averaged. Divergence thresholds read the same for every
    ``C`` and task.

    Args:
        logits: ``(N, C)``; ``(N, 1)`` or ``(N,)`` for one binary output.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``; ``None`` infers it from the
            shape: ``"binary"`` for one output, else ``"multiclass"``.

    Returns:
        A 0-dim tensor: the mean over rows of ``√(C/(C−1))·‖centered f‖`` (multiclass) or
        the mean of ``|z|`` over rows and outputs (binary, multilabel).
    """
    return _logit_norm_rows(logits, task).mean()


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
    return safe_divide(diff_sq.sqrt(), ref_sq.sqrt()).to(dtype)


# ---------------------------------------------------------------------- helpers


def _logit_norm_rows(logits: Tensor, task: Optional[str] = None) -> Tensor:
    """Margin-unit logit norm per example, ``(N,)`` (see :func:`logit_norm`)."""
    z, task = _check_task_logits(logits, task)
    if task != "multiclass":
        return z.abs().mean(dim=1)
    C = z.shape[1]
    centered = z - z.mean(dim=1, keepdim=True)
    return centered.norm(dim=1) * (C / (C - 1)) ** 0.5


# ---------------------------------------------------------------------- streaming statistics
