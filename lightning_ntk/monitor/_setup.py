"""The training set-up as training really runs it: targets, label smoothing, L2 strength.

The theory's prediction hangs on two facts: is there parameter-space regularization
(``λ > 0``), and does every class have positive target probability? The monitor
establishes each one from the most direct evidence available, and says which:

* **declared** — ``weight_decay=`` / ``label_smoothing=`` given to the tracker or monitor;
* **observed** — the label smoothing ``ε`` is *inferred from the training loss*. For a
  batch with logits ``f`` and targets ``y``, a (smoothed) cross-entropy with any
  reduction scale ``s`` is ``L = s·[(1 − ε)·H + ε·U]`` with ``H = CE(f, y)`` and
  ``U = mean_i mean_c(−log softmax(f_i)_c)``; that is ``L = a·H + b·U`` with
  ``ε = b / (a + b)``. The loss training computed is compared with ``H`` and ``U`` of the
  same batch's logits (evaluated functionally at the same parameters) over a few batches;
  a least-squares fit that leaves no residual identifies ``ε`` exactly, whether the
  smoothing is in an ``nn.CrossEntropyLoss``, in ``F.cross_entropy(...,
  label_smoothing=ε)`` or in smoothed soft targets. A fit that does not close (dropout,
  extra loss terms, mixed precision, another loss) leaves ``ε`` to the other sources;
* **read** — the optimizer's ``weight_decay`` (coupled, or decoupled for ``AdamW``) and
  its learning rate; an ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` found in the module;
  integer (hard) or soft ``(N, C)`` targets in the probe and the observed batches (mixup
  of one-hot labels leaves classes at probability 0: degenerate);
* **unknown** — then the predicted regime is ``"unknown"`` and no message asserts a cause.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..theory.regime import read_optimizer

__all__ = ["LossObserver", "Setup", "find_loss", "logit_optimum", "resolve_setup"]

# the fit of the training loss must close to this relative residual (float32 round-off
# gives ~1e-8; an L2 term of 0.003·‖θ − θ0‖²/2 in the loss gave 5e-5 after two steps) ...
_RESIDUAL = 1e-6
# ... with this many batches, and ``[H U]`` at most this ill-conditioned
_MIN_BATCHES = 4
_MAX_CONDITION = 1e4
_MAX_BATCHES = 8


_OBSERVER_STATE = ("rows", "steps", "min_target", "soft", "smoothing", "detail", "done", "calls")


class LossObserver:
    """Infers the label smoothing of the training loss from a few batches.

    :meth:`add` takes the logits training saw, the batch's targets and the loss it
    returned; :attr:`smoothing` is ``ε`` once the fit closes, ``None`` before or if it
    never does (:attr:`detail` says why).
    """

    def __init__(self, max_batches: int = _MAX_BATCHES) -> None:
        self.max_batches = max_batches
        self.rows: list[tuple[float, float, float]] = []  # (H, U, L)
        self.steps: list[int] = []
        self.min_target: Optional[float] = None  # smallest target before smoothing
        self.soft = False
        self.smoothing: Optional[float] = None
        self.detail = "no training batch observed"
        self.done = False
        self.calls = 0

    @property
    def wants_more(self) -> bool:
        """Whether another batch would help (not decided yet, below the batch budget)."""
        return not self.done

    def add(self, logits: Tensor, targets: Tensor, loss: float, step: int) -> None:
        """One batch: logits ``(N, C)``, targets ``(N,)`` int or ``(N, C)`` soft, its loss."""
        if self.done:
            return
        self.calls += 1
        if self.calls >= self.max_batches:  # a bounded number of extra forwards, whatever comes
            self.done = True
        if not math.isfinite(loss):
            self.detail = "the training loss was not finite"
            return
        logp = torch.log_softmax(logits.detach().double(), dim=1)  # (N, C)
        C = logp.shape[1]
        if targets.ndim == 2 and targets.is_floating_point() and targets.shape == logp.shape:
            Y = targets.detach().double().to(logp.device)
            self.soft = True
            H = float(-(Y * logp).sum(dim=1).mean())
            batch_min = float(Y.min())
        elif targets.ndim == 1 and not targets.is_floating_point():
            y = targets.detach().long().to(logp.device)
            if int(y.min()) < 0 or int(y.max()) >= C:  # ignore_index or another loss
                self._give_up("the batch labels are outside [0, C) (ignore_index?)")
                return
            H = float(-logp.gather(1, y[:, None]).mean())
            batch_min = 0.0
        else:
            self._give_up(f"targets of shape {tuple(targets.shape)} are not labels or (N, C)")
            return
        U = float(-logp.mean())
        self.min_target = batch_min if self.min_target is None else min(self.min_target, batch_min)
        self.rows.append((H, U, float(loss)))
        self.steps.append(int(step))
        self._solve()

    def add_batch(self, logits: Tensor, y: Any, loss: Any, step: int) -> None:
        """:meth:`add` for what a training step hands over, stopping on what does not fit.

        Args:
            logits: the batch's logits as training computed them.
            y: its targets, integer labels ``(N,)`` or soft targets ``(N, C)``.
            loss: the loss training computed on it (a scalar tensor or number).
            step: the step, for the report's account of the set-up.
        """
        if not isinstance(y, Tensor) or y.shape[:1] != logits.shape[:1]:
            self.stop("the training batches carry no targets matching the logits")
            return
        try:
            value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        except (TypeError, ValueError, RuntimeError):
            self.stop(f"the training loss is not a number ({type(loss).__name__})")
            return
        self.add(logits, y, value, int(step))

    def state_dict(self) -> dict[str, Any]:
        """What was observed and concluded (for checkpoints)."""
        return {k: getattr(self, k) for k in _OBSERVER_STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for key in _OBSERVER_STATE:
            if key in state:
                setattr(self, key, state[key])

    def stop(self, why: str) -> None:
        """Stop observing without a conclusion, saying why."""
        self._give_up(why)

    def _give_up(self, why: str) -> None:
        self.done, self.smoothing, self.detail = True, None, why

    def _solve(self) -> None:
        if len(self.rows) < _MIN_BATCHES:
            self.detail = f"{len(self.rows)} batch(es) observed, {_MIN_BATCHES} needed"
            return
        A = torch.tensor([[h, u] for h, u, _ in self.rows], dtype=torch.float64)
        L = torch.tensor([loss for _, _, loss in self.rows], dtype=torch.float64)
        sv = torch.linalg.svdvals(A)
        if not bool(sv[-1] > 0) or float(sv[0] / sv[-1]) > _MAX_CONDITION:
            self.detail = "the batches' cross-entropies are too alike to separate ε"
            return
        coef = torch.linalg.lstsq(A, L[:, None]).solution.flatten()
        a, b = float(coef[0]), float(coef[1])
        residual = float((A @ coef - L).norm() / L.norm().clamp_min(1e-30))
        steps = f"steps {self.steps[0]}–{self.steps[-1]}"
        if residual > _RESIDUAL or not (a + b) > 0:
            self.detail = (
                f"the training loss is not a (smoothed) cross-entropy of the logits "
                f"(relative residual {residual:.1e} over {steps}: dropout, extra loss terms, "
                "mixed precision or another loss)"
            )
            if len(self.rows) >= _MIN_BATCHES + 1:
                self.done = True
            return
        eps = b / (a + b)
        if not -1e-3 < eps < 1.0:
            self.detail = f"the fit gives ε = {eps:.3g}, outside [0, 1)"
            self.done = True
            return
        eps = 0.0 if abs(eps) < 1e-4 else eps
        self.smoothing = eps
        self.detail = (
            f"inferred from the training loss at {steps} (loss = {a + b:.3g}·[(1−ε)·CE + "
            f"ε·mean(−log p)], relative residual {residual:.0e})"
        )
        self.done = True


# why a fact is unknown when no source said anything about it
_NOT_FOUND = {
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
        min_target: smallest target probability before smoothing (0 for hard labels),
            ``None`` when unknown.
        weight_decay: ``λ`` or ``None`` when unknown.
        decoupled: ``λ`` is decoupled (AdamW-style) weight decay.
        lr: the optimizer's learning rate (of its weight groups), if known.
        sources: ``{"label_smoothing" | "targets" | "weight_decay": how it was found}``.
    """

    label_smoothing: Optional[float] = None
    min_target: Optional[float] = None
    weight_decay: Optional[float] = None
    decoupled: bool = False
    lr: Optional[float] = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def non_degenerate(self) -> Optional[bool]:
        """Every class has positive target probability (``None``: unknown)."""
        if self.label_smoothing is not None and self.label_smoothing > 0:
            return True
        if self.min_target is not None and self.min_target > 0:
            return True
        if self.label_smoothing is not None and self.min_target is not None:
            return False
        return None

    @property
    def equilibrium_step(self) -> float:
        """``1/(lr·λ)``, the L2 regularization's time scale in steps (``nan`` if unknown)."""
        if self.weight_decay and self.lr:
            return 1.0 / (self.lr * self.weight_decay)
        return math.nan

    def prediction(self) -> dict[str, str]:
        """``{"regime": "lazy" | "divergent" | "unknown", "reason": ...}``."""
        nd, lam = self.non_degenerate, self.weight_decay
        if nd:
            eps = self.label_smoothing or 0.0
            source = f"label smoothing ε={eps:g}" if eps > 0 else "soft targets"
            return {
                "regime": "lazy",
                "reason": f"Lazy: with {source} every class has positive target probability, "
                "so zero loss needs only finite logits (the paper's non-degenerate-target "
                "condition)",
            }
        if lam is not None and lam > 0:
            kind = "decoupled (AdamW-style) weight decay" if self.decoupled else "L2 regularization"
            return {
                "regime": "lazy",
                "reason": f"Lazy: {kind} λ={lam:g} gives the objective a finite optimum near "
                "initialisation, the paper's first condition for a constant NTK",
            }
        if nd is False and lam == 0:
            return {
                "regime": "divergent",
                "reason": "Divergent: hard one-hot targets with no L2 regularization (λ = 0) "
                "need infinite logits for zero loss, so the logits grow without bound; add "
                "weight decay or label smoothing",
            }
        missing = []
        if nd is None:
            missing.append("whether the targets are smoothed or soft")
        if lam is None:
            missing.append("the weight decay")
        return {
            "regime": "unknown",
            "reason": f"Unknown: {' and '.join(missing)} could not be established; if the "
            "targets are hard one-hot and there is no weight decay the theory predicts "
            "diverging logits, otherwise lazy training (pass `label_smoothing` / "
            "`weight_decay`, or `loss` / `optimizer`)",
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
        else:
            targets = "with classes at probability 0 before smoothing (hard labels, mixup)"
        return (
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
) -> Setup:
    """The :class:`Setup` from every source, in the order declared > observed > read.

    Raises:
        TypeError / ValueError: an optimizer without ``param_groups``, a negative decay.
    """
    setup = Setup()
    sources = setup.sources
    # ---- weight decay and learning rate
    if optimizer is not None:
        decay = read_optimizer(optimizer)
        setup.lr = decay.lr
        setup.weight_decay, setup.decoupled = decay.weight_decay, decay.decoupled
        sources["weight_decay"] = f"read from the optimizer {decay.name}"
    if weight_decay is not None:
        setup.weight_decay = float(weight_decay)
        setup.decoupled = setup.decoupled and setup.weight_decay > 0
        sources["weight_decay"] = "declared"
    # ---- label smoothing
    if loss is not None:
        if isinstance(loss, nn.CrossEntropyLoss):
            setup.label_smoothing = float(loss.label_smoothing)
            sources["label_smoothing"] = f"read from the module's {type(loss).__name__}"
        elif isinstance(loss, nn.NLLLoss):
            setup.label_smoothing = 0.0
            sources["label_smoothing"] = "read from the module's NLLLoss"
    if observer is not None and observer.smoothing is not None:
        read = setup.label_smoothing
        setup.label_smoothing = observer.smoothing
        note = ""
        if read is not None and abs(read - observer.smoothing) > 1e-3:
            note = f"; the module's loss says {read:g}, but training does not use it"
        sources["label_smoothing"] = observer.detail + note
    elif observer is not None and (observer.rows or observer.done or observer.calls):
        if setup.label_smoothing is None:
            sources["label_smoothing"] = f"unknown: {observer.detail}"
        elif observer.done:
            sources["label_smoothing"] += f", not confirmed by training: {observer.detail}"
    if label_smoothing is not None:
        setup.label_smoothing = float(label_smoothing)
        sources["label_smoothing"] = "declared"
    # ---- targets
    mins, where = [], []
    if probe_y is not None:
        if probe_y.ndim == 2 and probe_y.is_floating_point():
            mins.append(float(probe_y.min()))
            where.append("soft probe targets")
        else:
            mins.append(0.0)
            where.append("integer probe labels")
    if observer is not None and observer.min_target is not None:
        mins.append(observer.min_target)
        where.append(
            "soft targets in the training batches"
            if observer.soft
            else "integer labels in the training batches"
        )
    if mins:
        setup.min_target = min(mins)
        sources["targets"] = "read from the " + " and ".join(where)
    return setup


def logit_optimum(setup: Setup, probe_y: Optional[Tensor], num_classes: int) -> Optional[Tensor]:
    """Centered optimum ``f* (N, C)`` of the probe's targets, when finite and known.

    Known when the targets are non-degenerate and ``ε`` is known (the probe's labels or
    soft targets smoothed by ``ε``); ``None`` otherwise (hard targets: no finite optimum).
    """
    from ..theory import optimal_logits

    if probe_y is None or not setup.non_degenerate or setup.label_smoothing is None:
        return None
    try:
        return optimal_logits(
            probe_y, label_smoothing=setup.label_smoothing, num_classes=num_classes
        )
    except (TypeError, ValueError):
        return None


def find_loss(pl_module: nn.Module) -> Optional[nn.Module]:
    """The first ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` in the module.

    Sub-modules at any depth (also in ``ModuleList`` / ``ModuleDict``), and loss modules
    kept in plain ``dict`` / ``list`` / ``tuple`` attributes, which are not registered.
    """
    kinds = (nn.CrossEntropyLoss, nn.NLLLoss)
    for module in pl_module.modules():
        if isinstance(module, kinds):
            return module
        for value in vars(module).values():
            items = value.values() if isinstance(value, dict) else value
            if isinstance(value, (dict, list, tuple)):
                for item in items:
                    if isinstance(item, kinds):
                        return item
    return None
