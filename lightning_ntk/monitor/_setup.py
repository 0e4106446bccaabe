"""The training set-up as training really runs it: task, targets, label smoothing, L2 strength.

The theory's prediction — bounded or diverging logits — hangs on two facts: is there
parameter-space regularization (``λ > 0``), and does every outcome have positive target
probability? Both are read in the task's terms (torchmetrics' convention):
``"multiclass"`` (softmax, cross-entropy), ``"binary"`` (one sigmoid output; BCE on ``z``
is CE on ``[0, z]``) or ``"multilabel"`` (each sigmoid output its own binary problem;
multi-hot targets are hard targets). The monitor establishes each fact from the most
direct evidence available, and says which:

* **declared** — ``task=`` / ``weight_decay=`` / ``label_smoothing=`` given to the
  tracker or monitor;
* **observed** — the loss and its label smoothing ``ε`` are *inferred from the training
  loss* (:mod:`lightning_ntk.monitor._observer`): the loss training computed is fitted
  by the (binary) cross-entropy features of the batch's logits, over a few batches;
* **read** — the optimizer's ``weight_decay`` (coupled, or decoupled for ``AdamW``) and
  its learning rate; an ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` / ``nn.BCEWithLogitsLoss``
  found in the module; the task from the model's number of outputs and the targets; hard
  or soft targets in the probe and the observed batches (mixup of one-hot labels leaves
  classes at probability 0: degenerate). A reading of a loss module that observation
  contradicts (the training loss is not that module's loss of the logits: distillation,
  an L2 term or a focal loss written around it) is dropped: no conclusion rests on it;
* **unknown** — then the predicted regime is ``"unknown"`` and no message asserts a cause.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn

from ..theory import _targets
from ..theory.regime import read_optimizer
from ._observer import LOSS_NAMES, LossObserver

__all__ = ["LossObserver", "Setup", "find_loss", "logit_optimum", "resolve_setup"]

_LOSS_KINDS = (nn.CrossEntropyLoss, nn.NLLLoss, nn.BCEWithLogitsLoss)


# why a fact is unknown when no source said anything about it
_NOT_FOUND = {
    "task": "not declared (`task`), no loss identified and neither the head nor the "
    "targets decide it",
    "label_smoothing": "not declared (`label_smoothing`), no loss module read and no "
    "training batch observed",
    "targets": "no probe labels and no training targets observed",
    "weight_decay": "not declared (`weight_decay`) and no optimizer read",
}


@dataclass
class Setup:
    """What is known of the training set-up, and where each fact comes from.

    Attributes:
        label_smoothing: ``ε`` or ``None`` when unknown.
        min_target: smallest target probability of any outcome before smoothing (0 for
            hard labels; ``min(t, 1 − t)`` for sigmoid outputs), ``None`` when unknown.
        weight_decay: ``λ`` or ``None`` when unknown.
        decoupled: ``λ`` is decoupled (AdamW-style) weight decay.
        lr: the optimizer's learning rate (of its weight groups), if known.
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``None`` when unknown.
        pos_weight: the weight of BCE's positive term found by observation (1 if none).
        sources: ``{"task" | "label_smoothing" | "targets" | "weight_decay": how it was
            found}``.
    """

    label_smoothing: Optional[float] = None
    min_target: Optional[float] = None
    weight_decay: Optional[float] = None
    decoupled: bool = False
    lr: Optional[float] = None
    task: Optional[str] = None
    pos_weight: float = 1.0
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def non_degenerate(self) -> Optional[bool]:
        """Every outcome has positive target probability (``None``: unknown)."""
        if self.label_smoothing is not None and self.label_smoothing > 0:
            return True
        if self.min_target is not None and self.min_target > 0:
            return True
        if self.label_smoothing is not None and self.min_target is not None:
            return False
        return None

    @property
    def sigmoid(self) -> bool:
        """The outputs are sigmoids (binary, multilabel), read by binary cross-entropy."""
        return self.task in ("binary", "multilabel")

    @property
    def equilibrium_step(self) -> float:
        """``1/(lr·λ)``, the L2 regularization's time scale in steps (``nan`` if unknown)."""
        if self.weight_decay and self.lr:
            return 1.0 / (self.lr * self.weight_decay)
        return math.nan

    @property
    def hard_unregularized(self) -> bool:
        """Hard targets and no weight decay read, and ``ε`` unknown.

        Where observation found the training loss is no cross-entropy it recognises
        (focal loss, a loss written out), the prediction is unknown for that reason
        alone, and the logits' measured growth decides.
        """
        return self.min_target == 0 and self.weight_decay == 0 and self.label_smoothing is None

    def metric_task(self, num_outputs: Optional[int]) -> str:
        """The task the logit metrics read: the known one, else what the head implies."""
        if self.task is not None:
            return self.task
        return "binary" if num_outputs == 1 else "multiclass"

    def prediction(self) -> dict[str, str]:
        """``{"regime": "bounded" | "diverging" | "unknown", "reason": ...}``.

        The paper's dichotomy about the logits: bounded with L2 regularization or
        non-degenerate targets, diverging with hard targets and ``λ = 0``. Whether the
        kernel stays put (laziness) is measured, never predicted.
        """
        nd, lam = self.non_degenerate, self.weight_decay
        loss = "binary cross-entropy" if self.sigmoid else "cross-entropy"
        if nd:
            eps = self.label_smoothing or 0.0
            source = f"label smoothing ε={eps:g}" if eps > 0 else "soft targets"
            return {
                "regime": "bounded",
                "reason": f"Bounded: with {source} every outcome has positive target "
                f"probability, so the {loss} has a finite optimum and the logits stay "
                "bounded (the paper's non-degenerate-target condition)",
            }
        if lam is not None and lam > 0:
            kind = "decoupled (AdamW-style) weight decay" if self.decoupled else "L2 regularization"
            return {
                "regime": "bounded",
                "reason": f"Bounded: {kind} λ={lam:g} gives the objective a finite optimum, so "
                "the logits stay bounded (the paper's first condition)",
            }
        hard = "hard 0/1 targets" if self.sigmoid else "hard one-hot targets"
        if nd is False and lam == 0:
            return {
                "regime": "diverging",
                "reason": f"Diverging: {hard} with no L2 regularization (λ = 0) need infinite "
                "logits for zero loss, so the logits grow without bound; add weight decay or "
                "label smoothing",
            }
        missing = []
        if nd is None:
            missing.append("whether the targets are smoothed or soft")
        if lam is None:
            missing.append("the weight decay")
        return {
            "regime": "unknown",
            "reason": f"Unknown: {' and '.join(missing)} could not be established; if the "
            f"targets are {hard.removesuffix(' targets')} and there is no weight decay the "
            "theory predicts diverging logits, otherwise bounded ones (declare "
            "`label_smoothing` / `weight_decay`)",
        }

    def describe(self) -> str:
        """One line: each fact with its source."""
        eps = "unknown" if self.label_smoothing is None else f"{self.label_smoothing:.4g}"
        lam = "unknown" if self.weight_decay is None else f"{self.weight_decay:g}"
        if self.decoupled:
            lam += " (decoupled)"
        if self.min_target is None:
            targets = "unknown"
        elif self.min_target > 0:
            targets = f"soft (min probability {self.min_target:.3g})"
        elif self.sigmoid:
            targets = "hard 0/1 (each output's target 0 or 1 before smoothing)"
        else:
            targets = "with classes at probability 0 before smoothing (as hard labels have)"
        task = self.task or "unknown"
        return (
            f"task {task} ({self._source('task')}); "
            f"label smoothing {eps} ({self._source('label_smoothing')}); "
            f"targets {targets} ({self._source('targets')}); weight decay "
            f"{lam} ({self._source('weight_decay')})"
        )

    def _source(self, fact: str) -> str:
        """How ``fact`` was found, or why it is unknown (never a bare "unknown")."""
        source = self.sources.get(fact, _NOT_FOUND[fact])
        return source.removeprefix("unknown: ")


def resolve_setup(
    *,
    weight_decay: Optional[float] = None,
    label_smoothing: Optional[float] = None,
    optimizer: Optional[Any] = None,
    loss: Optional[nn.Module] = None,
    probe_y: Optional[Tensor] = None,
    observer: Optional[LossObserver] = None,
    task: Optional[str] = None,
    num_outputs: Optional[int] = None,
) -> Setup:
    """The :class:`Setup` from every source, in the order declared > observed > read.

    Args:
        weight_decay: declared ``λ``.
        label_smoothing: declared ``ε``.
        optimizer: the optimizer, whose weight decay and learning rate are read, or a
            list of the optimizers training uses (the smallest weight decay on weight
            matrices is ``λ``).
        loss: a loss module found in the model, whose smoothing and kind are read.
        probe_y: the probe's targets.
        observer: what the training loss said.
        task: declared task.
        num_outputs: the model's number of outputs ``C`` (one output is binary).

    Raises:
        TypeError / ValueError: an optimizer without ``param_groups``, a negative decay.
    """
    setup = Setup()
    sources = setup.sources
    # ---- weight decay and learning rate
    if optimizer is not None:
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        decay = _least_decay(optimizers)
        setup.lr = decay.lr
        setup.weight_decay, setup.decoupled = decay.weight_decay, decay.decoupled
        sources["weight_decay"] = f"read from the optimizer {decay.name}"
        if len(optimizers) > 1:
            names = ", ".join(type(o).__name__ for o in optimizers)
            sources["weight_decay"] = (
                f"read from the optimizers {names}: the smallest on weight matrices, {decay.name}'s"
            )
    if weight_decay is not None:
        setup.weight_decay = float(weight_decay)
        setup.decoupled = setup.decoupled and setup.weight_decay > 0
        sources["weight_decay"] = "declared"
    _resolve_task(setup, task, loss, probe_y, observer, num_outputs)
    _resolve_smoothing(setup, label_smoothing, loss, observer)
    _resolve_targets(setup, probe_y, observer, num_outputs)
    return setup


def _least_decay(optimizers: list[Any]) -> Any:
    """The reading of the optimizer whose weights decay least (λ of the whole model).

    Several optimizers (manual optimization, a GAN's two) each decay their own
    parameters; the logits are bounded only if every weight matrix decays, so ``λ`` is
    the smallest over the optimizers holding weight matrices (all, if none does).
    """
    readings = [read_optimizer(o) for o in optimizers]
    holding = [
        r
        for r, o in zip(readings, optimizers)
        if any(p.ndim >= 2 for g in o.param_groups for p in g.get("params", ()))
    ]
    return min(holding or readings, key=lambda r: r.weight_decay)


def _resolve_task(
    setup: Setup,
    declared: Optional[str],
    loss: Optional[nn.Module],
    probe_y: Optional[Tensor],
    observer: Optional[LossObserver],
    num_outputs: Optional[int],
) -> None:
    """The task: declared > the loss training computes > the loss module > head and targets."""
    found, why = _targets.infer_task(probe_y, num_outputs)
    several = num_outputs is None or num_outputs > 1
    sigmoid_task = "multilabel" if several and found != "binary" else "binary"
    if declared is not None:
        setup.task, setup.sources["task"] = _targets.check_task(declared), "declared"
    elif observer is not None and observer.family is not None:
        setup.task = "multiclass" if observer.family == "cross_entropy" else sigmoid_task
        setup.sources["task"] = f"inferred from the training loss, a {LOSS_NAMES[observer.family]}"
    elif isinstance(loss, nn.BCEWithLogitsLoss) and not (observer and observer.contradicted):
        setup.task = sigmoid_task
        setup.sources["task"] = "read from the module's BCEWithLogitsLoss"
    elif found is not None:
        setup.task, setup.sources["task"] = found, f"read from {why}"
    elif observer is not None and list(observer.min_target) == ["cross_entropy"]:
        setup.task = "multiclass"  # only a softmax fits the batches' targets (labels)
        setup.sources["task"] = "read from the training batches' integer labels"
    elif isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)) and not (
        observer and observer.contradicted
    ):
        setup.task = "multiclass"
        setup.sources["task"] = f"read from the module's {type(loss).__name__}"


def _resolve_smoothing(
    setup: Setup,
    declared: Optional[float],
    loss: Optional[nn.Module],
    observer: Optional[LossObserver],
) -> None:
    """``ε``: declared > inferred from the training loss > read from an uncontradicted module."""
    sources = setup.sources
    read: Optional[float] = None
    if isinstance(loss, nn.CrossEntropyLoss):
        read = float(loss.label_smoothing)
    elif isinstance(loss, (nn.NLLLoss, nn.BCEWithLogitsLoss)):
        read = 0.0
    module = f"the module's {type(loss).__name__}"
    if read is not None:
        setup.label_smoothing = read
        sources["label_smoothing"] = f"read from {module}"
    if observer is not None and observer.smoothing is not None:
        setup.label_smoothing = observer.smoothing
        setup.pos_weight = observer.pos_weight
        note = ""
        if read is not None and abs(read - observer.smoothing) > 1e-3:
            note = f"; {module} says {read:g}, but training does not use it"
        sources["label_smoothing"] = observer.detail + note
    elif observer is not None and observer.contradicted and read is not None:
        # a reading observation contradicts: no conclusion rests on it
        setup.label_smoothing = None
        sources["label_smoothing"] = f"unknown: {module} says {read:g}, but {observer.detail}"
    elif observer is not None and (observer.steps or observer.done or observer.calls):
        if setup.label_smoothing is None:
            sources["label_smoothing"] = f"unknown: {observer.detail}"
        elif observer.done:
            sources["label_smoothing"] += f", not confirmed by training: {observer.detail}"
    if declared is not None:
        setup.label_smoothing = float(declared)
        sources["label_smoothing"] = "declared"


def _resolve_targets(
    setup: Setup,
    probe_y: Optional[Tensor],
    observer: Optional[LossObserver],
    num_outputs: Optional[int],
) -> None:
    """The smallest outcome probability of the probe's and the observed batches' targets."""
    mins, where = [], []
    task = setup.task
    if probe_y is not None:
        minimum, what = _probe_targets(probe_y, task, num_outputs)
        if minimum is not None:
            mins.append(minimum)
            where.append(what)
    seen = observer.target_minimum(task) if observer is not None else None
    if seen is not None:
        mins.append(seen)
        kind = "soft targets" if observer is not None and observer.soft else "hard targets"
        where.append(f"{kind} in the training batches")
    if mins:
        setup.min_target = min(mins)
        setup.sources["targets"] = "read from the " + " and ".join(where)


def _probe_targets(
    probe_y: Tensor, task: Optional[str], num_outputs: Optional[int]
) -> tuple[Optional[float], str]:
    """``(smallest outcome probability, description)`` of the probe's targets for ``task``."""
    if task is None:
        # undecided (e.g. one-hot float rows): hard either way when every entry is 0 or 1
        if probe_y.is_floating_point() and bool(((probe_y == 0) | (probe_y == 1)).all()):
            return 0.0, "0/1 probe targets"
        if not probe_y.is_floating_point():
            return 0.0, "integer probe labels"
        return None, ""
    try:
        Y = _targets.probabilities(probe_y, task, num_outputs)
    except ValueError:
        return None, ""
    minimum = _targets.min_probability(Y, task)
    if task == "multiclass":
        kind = "soft probe targets" if probe_y.is_floating_point() else "integer probe labels"
    elif task == "multilabel":
        kind = "multi-hot probe targets" if minimum == 0 else "soft probe targets"
    else:
        dtype = "float" if probe_y.is_floating_point() else "integer"
        kind = f"{dtype} 0/1 probe labels" if minimum == 0 else "soft probe targets"
    return minimum, kind


def logit_optimum(setup: Setup, probe_y: Optional[Tensor], num_outputs: int) -> Optional[Tensor]:
    """The optimum ``f*`` of the probe's targets, when finite and known.

    Known when the targets are non-degenerate and ``ε`` and the task are known (the
    probe's labels or soft targets smoothed by ``ε``): centered ``(N, C)`` for
    multiclass, ``z* (N, K)`` for sigmoid outputs; ``None`` otherwise (hard targets: no
    finite optimum).
    """
    from ..theory import optimal_logits

    if probe_y is None or not setup.non_degenerate or setup.label_smoothing is None:
        return None
    task = setup.metric_task(num_outputs)
    try:
        return optimal_logits(
            probe_y,
            label_smoothing=setup.label_smoothing,
            num_classes=num_outputs,
            task=task,
            pos_weight=setup.pos_weight,
        )
    except (TypeError, ValueError):
        return None


def alignment_targets(probe_y: Tensor, task: str) -> Tensor:
    """The probe's targets as ``target_alignment`` reads them: ``t (N, K)`` for sigmoids.

    Binary targets become one column ``t``: the centered alignment with ``t tᵀ`` equals
    that with the two-class one-hot ``[1 − t, t]``. Multilabel targets are the multi-hot
    ``Y`` itself.
    """
    if task in ("binary", "multilabel"):
        return _targets.probabilities(probe_y, task).float()
    return probe_y


def find_loss(pl_module: nn.Module) -> Optional[nn.Module]:
    """The first ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` / ``nn.BCEWithLogitsLoss`` in the module.

    Sub-modules at any depth (also in ``ModuleList`` / ``ModuleDict``), and loss modules
    kept in plain ``dict`` / ``list`` / ``tuple`` attributes, which are not registered.
    """
    for module in pl_module.modules():
        if isinstance(module, _LOSS_KINDS):
            return module
        for value in vars(module).values():
            items = value.values() if isinstance(value, dict) else value
            if isinstance(value, (dict, list, tuple)):
                for item in items:
                    if isinstance(item, _LOSS_KINDS):
                        return item
    return None
