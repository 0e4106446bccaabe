"""Targets as the theory reads them, for the three tasks of torchmetrics' convention.

* ``"multiclass"``: softmax over ``C ≥ 2`` logits, cross-entropy; targets are integer
  labels ``(N,)`` (one-hot ``Y``) or soft targets ``(N, C)`` whose rows sum to 1. Label
  smoothing ``ε`` gives ``t = (1 − ε) Y + ε / C``.
* ``"binary"``: one logit ``z``, sigmoid / binary cross-entropy; targets ``t ∈ [0, 1]``
  of shape ``(N,)`` or ``(N, 1)`` (0/1 labels, integer or float, or soft). BCE on ``z``
  is CE on ``[0, z]`` with the two-class targets ``(1 − t, t)``, so smoothing is
  ``t = (1 − ε) y + ε / 2``.
* ``"multilabel"``: ``K`` sigmoid outputs, each its own binary problem; multi-hot
  targets ``(N, K)`` (any number of ones per row) are hard targets, never soft ones.

In every task a target is non-degenerate when each outcome has positive probability
(``t > 0`` for every class; ``0 < t < 1`` for every sigmoid output): then the loss has a
finite optimum (:func:`optimum`), otherwise zero loss needs infinite logits.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "TASKS",
    "check_task",
    "infer_task",
    "min_probability",
    "optimum",
    "probabilities",
    "smoothed",
]

TASKS = ("multiclass", "binary", "multilabel")

# rows of soft targets sum to 1 within this
_ROW_TOLERANCE = 1e-4


def check_task(task: Optional[str]) -> Optional[str]:
    """``task`` itself, after checking it is one of :data:`TASKS` or ``None``."""
    if task is not None and task not in TASKS:
        raise ValueError(f"Expected `task` to be one of {TASKS} or None but got {task!r}.")
    return task


def infer_task(
    targets: Optional[Tensor], num_outputs: Optional[int] = None
) -> tuple[Optional[str], str]:
    """``(task, why)`` from the model's number of outputs and the targets, or ``(None, why)``.

    Unambiguous cases only: one output is binary; integer labels ``(N,)`` with several
    outputs, and soft rows that sum to 1 with fractional entries, are multiclass; float
    ``(N, K)`` targets in ``[0, 1]`` whose rows do not all sum to 1 are multilabel. Hard
    float rows with exactly one 1 (one-hot or one label each) are left undecided.
    """
    if num_outputs == 1:
        return "binary", "the model's single output"
    if targets is None or not isinstance(targets, Tensor):
        return None, "no targets to read"
    if targets.ndim == 1 and not targets.is_floating_point():
        return "multiclass", f"integer labels and {num_outputs or 'several'} outputs"
    if targets.ndim == 2 and targets.is_floating_point() and targets.shape[1] >= 2:
        Y = targets.detach().double()
        if float(Y.min()) < 0 or float(Y.max()) > 1:
            return None, "targets outside [0, 1]"
        rows_sum_to_one = bool(((Y.sum(dim=1) - 1).abs() <= _ROW_TOLERANCE).all())
        hard = bool(((Y == 0) | (Y == 1)).all())
        if not rows_sum_to_one:
            if hard:
                return "multilabel", "multi-hot targets (rows of 0/1 not all summing to 1)"
            return "multilabel", "sigmoid targets in [0, 1] whose rows do not all sum to 1"
        if not hard:
            return "multiclass", "soft targets whose rows sum to 1"
        return None, "one-hot float targets fit both a softmax and sigmoid outputs"
    if targets.ndim == 2 and targets.shape[1] == 1:
        return "binary", "targets of one column"
    return None, f"targets of shape {tuple(targets.shape)} and dtype {targets.dtype}"


def probabilities(targets: Tensor, task: str, num_classes: Optional[int] = None) -> Tensor:
    """Float64 target probabilities ``(N, K)`` before smoothing, validated for the task.

    Multiclass: ``Y (N, C)`` (one-hot of integer labels, needs ``num_classes``, or soft
    rows summing to 1). Binary: ``t (N, 1)``. Multilabel: ``t (N, K)``.

    Raises:
        ValueError: targets of a shape or range the task does not take.
    """
    check_task(task)
    if task == "multiclass":
        if targets.ndim == 1 and not targets.is_floating_point():
            if num_classes is None or isinstance(num_classes, bool) or num_classes < 2:
                raise ValueError(
                    f"Expected `num_classes` >= 2 with integer labels but got {num_classes!r}."
                )
            return torch.nn.functional.one_hot(targets.long(), int(num_classes)).double()
        if targets.ndim == 2 and targets.is_floating_point():
            Y = targets.double()
            if float(Y.min()) < 0:
                raise ValueError(
                    "Expected soft `targets` to be probabilities >= 0 but got "
                    f"{float(Y.min()):.3g}."
                )
            row_error = float((Y.sum(dim=1) - 1).abs().max())
            if row_error > _ROW_TOLERANCE:
                raise ValueError(
                    "Expected each row of soft `targets` to sum to 1 but a row is off by "
                    f"{row_error:.3g} (multi-hot targets are task='multilabel')."
                )
            return Y
        raise ValueError(
            "Expected multiclass `targets` to be integer labels of shape (N,) or soft targets "
            f"of shape (N, C) but got shape {tuple(targets.shape)} with dtype {targets.dtype}."
        )
    t = targets.double()
    if task == "binary":
        if not (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1)):
            raise ValueError(
                f"Expected binary `targets` of shape (N,) or (N, 1) but got {tuple(t.shape)}."
            )
        t = t.reshape(-1, 1)
    elif t.ndim != 2:
        raise ValueError(f"Expected multilabel `targets` of shape (N, K) but got {tuple(t.shape)}.")
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
        raise ValueError(
            f"Expected {task} `targets` in [0, 1] but got values in "
            f"[{float(t.min()):.3g}, {float(t.max()):.3g}]."
        )
    return t


def smoothed(Y: Tensor, label_smoothing: float, task: str) -> Tensor:
    """``(1 − ε) Y + ε / C`` (multiclass) or ``(1 − ε) t + ε / 2`` (binary, multilabel)."""
    outcomes = Y.shape[1] if task == "multiclass" else 2
    return (1.0 - label_smoothing) * Y + label_smoothing / outcomes


def min_probability(Y: Tensor, task: str) -> float:
    """Smallest probability of any outcome: ``min Y`` or, for sigmoids, ``min(t, 1 − t)``."""
    if Y.numel() == 0:
        return math.nan
    if task == "multiclass":
        return float(Y.min())
    return float(torch.minimum(Y, 1.0 - Y).min())


def optimum(Y: Tensor, task: str, pos_weight: float = 1.0) -> Optional[Tensor]:
    """The finite optimum of the loss for smoothed targets ``Y``, or ``None`` if there is none.

    Multiclass: centered ``f* = log t − mean_c log t`` (``softmax(f*) = t``), ``(N, C)``.
    Binary / multilabel: ``z* = log(p·t / (1 − t))`` per output (``p`` the BCE
    ``pos_weight``; ``sigmoid(z*) = t`` for ``p = 1``), ``(N, K)``.
    """
    if task == "multiclass":
        if not bool((Y > 0).all()):
            return None
        log_t = Y.log()
        return log_t - log_t.mean(dim=1, keepdim=True)
    if not bool(((Y > 0) & (Y < 1)).all()):
        return None
    return (pos_weight * Y).log() - (1.0 - Y).log()
