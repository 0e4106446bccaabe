"""The logits a training set-up predicts, bounded or diverging, and where they are headed.

:func:`predict_regime` reads the paper's conditions (L2 strength, target smoothing) off an
optimizer, a loss and targets. :func:`optimal_logits` gives the finite optimum of
non-degenerate targets, ``softmax(f*) = t``, centered ``f* = log t − mean(log t)`` (for
sigmoid outputs ``z* = log(t / (1 − t))``): where unregularized training on those targets
converges, and what "the logits are still approaching their optimum" is measured against.

Tasks follow torchmetrics' convention (:mod:`._targets`): ``"multiclass"`` (softmax,
cross-entropy), ``"binary"`` (one sigmoid output, binary cross-entropy: BCE on ``z`` is CE
on ``[0, z]``) and ``"multilabel"`` (each sigmoid output its own binary problem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import _targets
from ._checks import check_nonnegative, check_smoothing, check_tensor

__all__ = [
    "OptimizerDecay",
    "RegimePrediction",
    "optimal_logits",
    "predict_regime",
    "read_optimizer",
]


# ---------------------------------------------------------------------- regime


@dataclass(frozen=True)
class RegimePrediction:
    """The regime the paper's conditions predict for a training setup.

    Attributes:
        regime: ``"bounded"`` (the cross-entropy objective has a finite optimum, so the
            logits stay bounded) or ``"diverging"`` (zero loss needs infinite logits, so
            they grow without bound). The prediction is about the logits, the paper's
            dichotomy; whether the kernel stays constant (laziness) is measured, not
            predicted.
        reason: one sentence naming the condition that decided it.
        weight_decay: the effective L2 strength ``λ`` found (0.0 if none).
        min_target_prob: the smallest target probability of any outcome (0.0 for hard
            labels; NaN when label smoothing is on but the number of classes is unknown).
            For sigmoid outputs, ``min(t, 1 − t)``.
        decoupled_decay: ``λ`` is decoupled (AdamW-style) weight decay, which is not an
            L2 term in the loss; it is counted as regularisation, with a note in ``reason``.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"`` (``"multiclass"`` unless
            declared or read from the loss and targets).
    """

    regime: str
    reason: str
    weight_decay: float
    min_target_prob: float
    decoupled_decay: bool
    task: str = "multiclass"

    @property
    def bounded(self) -> bool:
        """``regime == "bounded"``."""
        return self.regime == "bounded"


def predict_regime(
    *,
    weight_decay: Optional[float] = None,
    optimizer: Optional[Any] = None,
    label_smoothing: Optional[float] = None,
    loss: Optional[nn.Module] = None,
    targets: Optional[Tensor] = None,
    num_classes: Optional[int] = None,
    decoupled_decay: Optional[bool] = None,
    task: Optional[str] = None,
) -> RegimePrediction:
    """Predict bounded / diverging logits of (binary) cross-entropy training.

    Bounded when ``λ > 0`` (L2 regularisation) or when every outcome has a positive target
    probability (label smoothing ``ε > 0``: minimum ``ε / C``, ``ε / 2`` for sigmoid
    outputs; soft targets: their minimum); diverging otherwise (hard targets, ``λ = 0``).
    What is not given takes its default (``λ = 0``, ``ε = 0``, hard targets), and a
    diverging prediction's reason names the defaults it rests on.

    Args:
        weight_decay: declared ``λ ≥ 0``.
        optimizer: a ``torch.optim.Optimizer`` (anything with ``param_groups``); ``λ`` is
            read from its groups' ``weight_decay``. Rule: groups holding a parameter with
            two or more dimensions are weight groups and ``λ`` is the smallest decay among
            them; groups of biases and norm parameters only may have 0 (reported in the
            reason). ``AdamW`` and ``decoupled_weight_decay=True`` groups are decoupled.
        label_smoothing: declared ``ε ∈ [0, 1)``.
        loss: an ``nn.CrossEntropyLoss`` (its ``label_smoothing`` is read),
            ``nn.NLLLoss`` (no smoothing) or ``nn.BCEWithLogitsLoss`` (sigmoid outputs, no
            smoothing: smoothed BCE targets are soft ``targets``).
        targets: multiclass integer labels ``(N,)`` or soft targets ``(N, C)`` (rows sum
            to 1); binary 0/1 or soft targets ``(N,)`` / ``(N, 1)``; multilabel multi-hot
            or soft targets ``(N, K)``.
        num_classes: ``C``, for ``ε / C`` when no soft targets give it.
        decoupled_decay: declare whether ``weight_decay`` is decoupled (default: read from
            the optimizer, else ``False``).
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``; ``None`` reads it from
            the loss (``BCEWithLogitsLoss``: sigmoid outputs), ``num_classes == 1`` and
            the targets, else multiclass.

    Returns:
        A :class:`RegimePrediction`.

    Raises:
        ValueError: negative ``λ``, ``ε`` outside ``[0, 1)``, soft targets that are
            negative or do not sum to 1, or declared values that contradict the
            optimizer / loss / targets.
        TypeError: an optimizer without ``param_groups`` or an unsupported loss.
    """
    lam, decoupled, decay_note = _resolve_weight_decay(weight_decay, optimizer, decoupled_decay)
    eps = _resolve_smoothing(label_smoothing, loss)
    task = _resolve_task(task, loss, targets, num_classes)
    base_min, C = _resolve_targets(targets, num_classes, task)
    outcomes = C if task == "multiclass" else 2
    if eps > 0:
        min_prob = (1 - eps) * base_min + eps / outcomes if outcomes is not None else math.nan
    else:
        min_prob = base_min
    positive_targets = eps > 0 or min_prob > 0
    if lam > 0:
        regime = "bounded"
        if decoupled:
            reason = (
                f"Bounded: decoupled (AdamW-style) weight decay λ={lam:g} is not an L2 term in "
                "the loss, but it keeps the parameters bounded like the paper's "
                "parameter-space regularisation and is treated as such"
            )
        else:
            reason = (
                f"Bounded: L2 regularisation λ={lam:g} gives the cross-entropy objective a "
                "finite optimum, so the logits stay bounded (the paper's first condition)"
            )
    elif positive_targets:
        regime = "bounded"
        source = f"label smoothing ε={eps:g}" if eps > 0 else "soft targets"
        prob = "ε/C" if math.isnan(min_prob) else f"{min_prob:.3g}"
        reason = (
            f"Bounded: with {source} every outcome has target probability ≥ {prob}, so zero "
            "loss needs only finite logits (the paper's non-degenerate-target condition), "
            "even without regularisation"
        )
    else:
        regime = "diverging"
        hard = "hard one-hot targets" if task == "multiclass" else "hard 0/1 targets"
        reason = (
            f"Diverging: {hard} with no L2 regularisation (λ = 0) need infinite logits for "
            "zero loss, so the logits grow without bound and training leaves the kernel "
            "regime at any width; add weight decay or label smoothing"
        )
        assumed = _assumed_defaults(
            weight_decay is None and optimizer is None,
            label_smoothing is None and loss is None,
            targets is None,
        )
        if assumed:
            reason += f" (assumed, as none was given: {assumed})"
    return RegimePrediction(
        regime=regime,
        reason=reason + decay_note + ".",
        weight_decay=lam,
        min_target_prob=float(min_prob),
        decoupled_decay=decoupled,
        task=task,
    )


# ---------------------------------------------------------------------- optimum


def optimal_logits(
    targets: Tensor,
    *,
    label_smoothing: float = 0.0,
    num_classes: Optional[int] = None,
    task: Optional[str] = None,
    pos_weight: float = 1.0,
) -> Optional[Tensor]:
    """The finite optimum of the loss on each example, or ``None`` when there is none.

    Multiclass: the targets the loss sees are ``t = (1 − ε) y + ε / C`` (``y`` one-hot
    for integer labels, or the soft targets); when every ``t`` is positive the
    cross-entropy of a point is minimised exactly at ``softmax(f*) = t``, centered
    ``f* = log t − mean_c(log t)``. Binary / multilabel: ``t = (1 − ε) y + ε / 2`` per
    sigmoid output, and binary cross-entropy is minimised at ``z* = log(p·t / (1 − t))``
    (``p`` the ``pos_weight``). When some ``t`` is 0 (or 1 for a sigmoid) — hard labels
    and ``ε = 0``, mixup of one-hot labels — there is no finite optimum.

    Args:
        targets: multiclass integer labels ``(N,)`` or soft targets ``(N, C)``; binary
            targets ``(N,)`` / ``(N, 1)``; multilabel targets ``(N, K)``.
        label_smoothing: ``ε ∈ [0, 1)``.
        num_classes: ``C`` (required for integer multiclass labels).
        task: ``"multiclass"`` (default), ``"binary"`` or ``"multilabel"``.
        pos_weight: BCE's weight of the positive term (sigmoid tasks), ``> 0``.

    Returns:
        ``(N, C)`` float64 centered logits (multiclass), ``(N, K)`` float64 logits ``z*``
        (binary ``K = 1``, multilabel), or ``None`` for degenerate targets.

    Example: ``ε = 0.1``, ``C = 10``: ``t = (0.91, 0.01, …)``, ``‖f*‖ ≈ 4.28`` per point;
    binary ``ε = 0.1``, ``y = 1``: ``t = 0.95``, ``z* = log 19 ≈ 2.94``.
    """
    eps = check_smoothing(label_smoothing)
    check_tensor(targets, "targets")
    task = _targets.check_task(task) or "multiclass"
    if not (isinstance(pos_weight, (int, float)) and pos_weight > 0):
        raise ValueError(f"Expected `pos_weight` to be a positive float but got {pos_weight!r}.")
    Y = _targets.probabilities(targets, task, num_classes)
    return _targets.optimum(_targets.smoothed(Y, eps, task), task, float(pos_weight))


# ---------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class OptimizerDecay:
    """The weight decay an optimizer applies to its weights, as the theory reads it.

    Attributes:
        weight_decay: ``λ``, the smallest decay of the groups holding weight matrices
            (all groups if none does): biases and norm parameters may go undecayed.
        decoupled: whether the decay is decoupled (``AdamW``, ``decoupled_weight_decay``).
        lr: the largest learning rate of those groups, if numeric (for ``1/(lr·λ)``).
        name: the optimizer's class name.
        note: what a reader should know (undecayed biases, groups that differ).
    """

    weight_decay: float
    decoupled: bool
    lr: Optional[float]
    name: str
    note: str = ""


def read_optimizer(optimizer: Any) -> OptimizerDecay:
    """The :class:`OptimizerDecay` of a ``torch.optim.Optimizer``.

    Raises:
        TypeError: an object without ``param_groups``.
        ValueError: a negative weight decay.
    """
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, (list, tuple)):
        raise TypeError(
            "Expected `optimizer` to be a torch.optim.Optimizer (with `param_groups`) but "
            f"got {type(optimizer).__name__}."
        )
    groups = [g for g in groups if len(g.get("params", ())) > 0]
    weight_groups = [g for g in groups if any(p.ndim >= 2 for p in g["params"])]
    considered = weight_groups or groups
    decays = [float(g.get("weight_decay", 0.0) or 0.0) for g in considered]
    lam = min(decays) if decays else 0.0
    if lam < 0:
        raise ValueError(f"Expected the optimizer's `weight_decay` to be >= 0 but got {lam}.")
    note = ""
    weight_ids = {id(g) for g in weight_groups}  # identity: groups hold tensors
    undecayed = [
        g for g in groups if id(g) not in weight_ids and float(g.get("weight_decay", 0)) == 0
    ]
    if weight_groups and undecayed and lam > 0:
        note = " (biases / norm parameters without decay are fine: λ is the weight groups')"
    if len(set(decays)) > 1:
        note += (
            f" (parameter groups differ in weight decay {sorted(set(decays))}; λ is their minimum)"
        )
    decoupled = lam > 0 and (
        isinstance(optimizer, torch.optim.AdamW)
        or any(g.get("decoupled_weight_decay", False) for g in considered)
    )
    lrs = [float(g["lr"]) for g in considered if isinstance(g.get("lr"), (int, float))]
    return OptimizerDecay(lam, decoupled, max(lrs) if lrs else None, type(optimizer).__name__, note)


def _assumed_defaults(no_decay: bool, no_smoothing: bool, no_targets: bool) -> str:
    """The facts of a diverging prediction that were defaults, not given, in words."""
    parts = []
    if no_decay:
        parts.append("λ = 0 (`weight_decay` or `optimizer`)")
    if no_smoothing:
        parts.append("ε = 0 (`label_smoothing` or `loss`)")
    if no_targets:
        parts.append("hard targets (`targets`)")
    return ", ".join(parts)


def _resolve_weight_decay(
    declared: Optional[float], optimizer: Optional[Any], decoupled: Optional[bool]
) -> tuple[float, bool, str]:
    """``(λ, decoupled, note)`` from a declared value and / or an optimizer."""
    lam = None if declared is None else check_nonnegative(declared, "weight_decay")
    note = ""
    found_decoupled = False
    if optimizer is not None:
        read = read_optimizer(optimizer)
        note, found_decoupled = read.note, read.decoupled
        if lam is not None and not math.isclose(lam, read.weight_decay, rel_tol=1e-9, abs_tol=0):
            raise ValueError(
                f"Declared `weight_decay`={lam:g} contradicts the optimizer's weight decay "
                f"{read.weight_decay:g}; pass only one of them."
            )
        lam = read.weight_decay
    if decoupled is not None:
        if not isinstance(decoupled, bool):
            raise TypeError(f"Expected `decoupled_decay` to be a bool but got {decoupled!r}.")
        found_decoupled = decoupled
    return (lam or 0.0), bool(found_decoupled and (lam or 0.0) > 0), note


def _resolve_smoothing(declared: Optional[float], loss: Optional[nn.Module]) -> float:
    eps = None if declared is None else check_smoothing(declared)
    if loss is not None:
        if isinstance(loss, nn.CrossEntropyLoss):
            from_loss = float(loss.label_smoothing)
        elif isinstance(loss, (nn.NLLLoss, nn.BCEWithLogitsLoss)):
            from_loss = 0.0
        else:
            raise TypeError(
                "Expected `loss` to be an nn.CrossEntropyLoss, nn.NLLLoss or "
                "nn.BCEWithLogitsLoss (the theory is about (binary) cross-entropy) but got "
                f"{type(loss).__name__}; declare `label_smoothing` instead."
            )
        if eps is not None and not math.isclose(eps, from_loss, abs_tol=1e-12):
            raise ValueError(
                f"Declared `label_smoothing`={eps:g} contradicts the loss's "
                f"label_smoothing={from_loss:g}; pass only one of them."
            )
        eps = from_loss
    return eps or 0.0


def _resolve_task(
    declared: Optional[str],
    loss: Optional[nn.Module],
    targets: Optional[Tensor],
    num_classes: Optional[int],
) -> str:
    """The task: declared, else sigmoid outputs for a BCE loss, else read from the targets."""
    task = _targets.check_task(declared)
    if task is not None:
        return task
    found, _ = _targets.infer_task(targets, num_classes)
    if isinstance(loss, nn.BCEWithLogitsLoss):
        return (
            found
            if found in ("binary", "multilabel")
            else ("binary" if targets is None or targets.ndim == 1 else "multilabel")
        )
    return found or "multiclass"


def _resolve_targets(
    targets: Optional[Tensor], num_classes: Optional[int], task: str
) -> tuple[float, Optional[int]]:
    """``(min target probability before smoothing, C or None)``; hard labels give 0."""
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or num_classes < (2 if task == "multiclass" else 1)
    ):
        raise ValueError(
            f"Expected `num_classes` to be an int >= 2 (>= 1 for sigmoid outputs) but got "
            f"{num_classes!r}."
        )
    if targets is None:
        return 0.0, num_classes
    check_tensor(targets, "targets")
    if task == "multiclass" and targets.ndim == 1 and not targets.is_floating_point():
        return 0.0, num_classes  # integer labels: hard, whatever C
    Y = _targets.probabilities(targets, task, num_classes)
    if task == "multiclass" and num_classes is not None and num_classes != Y.shape[1]:
        raise ValueError(
            f"Expected soft `targets` with `num_classes`={num_classes} columns but got "
            f"shape {tuple(targets.shape)}."
        )
    return _targets.min_probability(Y, task), Y.shape[1]
