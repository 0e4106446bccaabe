"""Argument checks shared by the theory and the uncertainty layer.

Each message names the argument, what was expected and what came.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

__all__ = ["check_labels_fit", "check_nonnegative", "check_option", "check_smoothing",
           "check_soft_targets", "check_tensor", "checked_targets"]  # fmt: skip


def check_tensor(t: Any, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor but got {type(t).__name__}.")


def check_option(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices} but got {value!r}.")


def check_nonnegative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"Expected `{name}` to be a non-negative float but got {value!r}.")
    if math.isinf(value):
        raise ValueError(f"Expected `{name}` to be finite but got {value!r}.")
    return float(value)


def check_smoothing(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise ValueError(f"Expected `label_smoothing` to be a float in [0, 1) but got {eps!r}.")
    return float(eps)


def checked_targets(targets: Tensor, N: int, C: int, source: str = "`logits0`") -> Tensor:
    """Float64 ``Y (N, C)`` from labels ``(N,)`` or soft targets ``(N, C)``, validated."""
    from ..metrics.functional import targets_matrix

    check_tensor(targets, "targets")
    check_labels_fit(targets, C, source)
    Y = targets_matrix(targets, C if not targets.is_floating_point() else None, num_rows=N)
    if Y.shape[1] != C:
        raise ValueError(
            f"Expected soft `targets` of shape ({N}, {C}) to match the logits but got "
            f"{tuple(targets.shape)}."
        )
    check_soft_targets(Y)
    return Y


def check_labels_fit(targets: Tensor, C: int, source: str) -> None:
    """Softmax logits (``C ≥ 2``) and, for integer labels, every label below ``C``.

    Args:
        targets: labels ``(N,)`` or soft targets ``(N, C)``.
        C: the number of logits.
        source: where ``C`` was read, for the message (e.g. ``"`logits0`"``).
    """
    if C < 2:
        raise ValueError(
            f"Expected C >= 2 softmax logits in {source} but got one column: a one-logit "
            "(sigmoid) binary classifier is not covered, the cross-entropy solution needs "
            "one logit per class (two for a binary problem)."
        )
    if targets.ndim == 2 and targets.shape[1] != C:
        raise ValueError(
            f"Expected soft `targets` with one column per logit of {source}, (N, {C}), but "
            f"got {tuple(targets.shape)}."
        )
    if targets.ndim == 1 and not targets.is_floating_point() and targets.numel():
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= C:
            raise ValueError(
                f"Expected integer `targets` to be class labels in [0, {C}) for the {C} logits "
                f"of {source} but got label {low if low < 0 else high}."
            )


def check_soft_targets(Y: Tensor) -> None:
    if float(Y.min()) < 0:
        raise ValueError(
            f"Expected soft `targets` to be probabilities >= 0 but got {float(Y.min()):.3g}."
        )
    row_error = float((Y.sum(dim=1) - 1).abs().max())
    if row_error > 1e-4:
        raise ValueError(
            f"Expected each row of soft `targets` to sum to 1 but a row is off by {row_error:.3g}."
        )
