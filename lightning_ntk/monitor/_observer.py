"""What the training loss says about the targets: the label smoothing, inferred from a few batches.

For a batch with logits ``f`` and targets ``y`` the training loss ``L`` is compared with
features of the same logits, one linear family per loss:

* **cross-entropy** (softmax, ``C ≥ 2``): a (smoothed) cross-entropy with any reduction
  scale ``s`` is ``L = s·[(1 − ε)·H + ε·U]`` with ``H = CE(f, y)`` and
  ``U = mean_i mean_c(−log softmax(f_i)_c)``, that is ``L = a·H + b·U`` with
  ``ε = b / (a + b)``;
* **binary cross-entropy** (sigmoid outputs ``z``, targets ``t ∈ [0, 1]``): with smoothed
  targets ``t' = (1 − ε) t + ε/2`` and a ``pos_weight`` ``p``,
  ``L = s·mean[−p·t'·log σ(z) − (1 − t')·log σ(−z)] = α1·A1 + α2·A2 + α3·A3 + α4·A4`` with
  ``A1 = mean(−t log σ(z))``, ``A2 = mean(−(1 − t) log σ(−z))``, ``A3 = mean(−log σ(z))``,
  ``A4 = mean(−log σ(−z))``; then ``ε = 2α4 / (α2 + 2α4)`` and ``p = α1 / α2``.

A least-squares fit over a few batches that leaves no residual identifies the loss and
``ε`` exactly, whether the smoothing is in a loss module, in a functional call or in the
targets. The residual allowed follows the precision in effect: float32 round-off
(``1e-6``) for a float32 loss of the logits training computed, more for a loss computed
in bfloat16 / float16, or for logits re-evaluated under autocast. An ``ε`` the fit cannot
tell from 0 at that precision (three standard errors) is left unknown. A fit that does not
close (extra loss terms, another loss, dropout or mixup the observation did not see)
leaves ``ε`` unknown and marks any reading of a loss module as contradicted.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["LossObserver", "OutputCapture", "active_dropout", "class_weights"]

# the fit of a float32 training loss must close to this relative residual (float32
# round-off gives ~1e-8; an L2 term of 0.003·‖θ − θ0‖²/2 in the loss gave 5e-5 after two
# steps) ...
_RESIDUAL = 1e-6
# ... a 16-bit loss or 16-bit re-evaluated logits to this many units of their round-off
_ROUNDOFF_UNITS = 4.0
# batches beyond the features the fit needs (a fit with as many batches as features closes
# whatever the loss), and the conditioning allowed of the features
_EXTRA_BATCHES = 2
_MAX_CONDITION = 1e5
_MAX_BATCHES = 8
# ε below this is no smoothing; an ε this uncertain (three standard errors) is not decided
_ZERO_SMOOTHING = 1e-4
_MAX_UNCERTAINTY = 1e-3

FAMILIES = {"cross_entropy": 2, "binary_cross_entropy": 4}
LOSS_NAMES = {"cross_entropy": "cross-entropy", "binary_cross_entropy": "binary cross-entropy"}

_OBSERVER_STATE = (
    "rows", "steps", "min_target", "soft", "smoothing", "pos_weight", "family", "detail",
    "done", "calls", "contradicted", "tolerance", "captured", "dropout", "weighted",
)  # fmt: skip


def tolerance_of(loss_dtype: Optional[torch.dtype], logits: Tensor, captured: bool) -> float:
    """The relative residual a fit may leave at the precision in effect.

    Float32 round-off for a float32 (or float64) loss of the logits training computed;
    ``4·eps`` of a 16-bit loss; and ``4·eps`` of 16-bit logits that were re-evaluated
    (under autocast) rather than captured from the training step.
    """
    tol = _RESIDUAL
    if loss_dtype in (torch.bfloat16, torch.float16):
        tol = max(tol, _ROUNDOFF_UNITS * torch.finfo(loss_dtype).eps)
    if not captured and logits.dtype in (torch.bfloat16, torch.float16):
        tol = max(tol, _ROUNDOFF_UNITS * torch.finfo(logits.dtype).eps)
    return tol


def class_weights(loss: Optional[nn.Module]) -> Optional[tuple[Tensor, str]]:
    """``(w (C,), reduction)`` of a class-weighted ``nn.CrossEntropyLoss`` / ``nn.NLLLoss``.

    ``None`` for any other loss, for no ``weight`` and for ``reduction="none"`` (the
    training step then reduces the losses in a way the module does not say).
    """
    if not isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return None
    weight = getattr(loss, "weight", None)
    if not isinstance(weight, Tensor) or loss.reduction not in ("mean", "sum"):
        return None
    return weight.detach(), loss.reduction


def active_dropout(module: nn.Module) -> list[str]:
    """Names of the dropout modules that are active (training mode, ``p > 0``)."""
    return [
        name or type(m).__name__
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]


class OutputCapture:
    """The outputs of a module's own forward calls while attached (a forward hook).

    The hook only keeps a reference to each output (at most two: more than one call in a
    training step is already ambiguous); it changes nothing the forward computes.
    ``children=True`` also keeps the outputs of the module's direct children, for a
    training step that calls a wrapped model rather than the module itself (a Hugging
    Face model called with its labels, ``self.model(x)``).
    """

    def __init__(self) -> None:
        self.outputs: list[Any] = []
        self.child_outputs: dict[str, list[Any]] = {}
        self._handles: list[Any] = []

    def attach(self, module: nn.Module, children: bool = False) -> None:
        """Start keeping ``module``'s outputs (replacing any earlier attachment)."""
        self.release()
        self.child_outputs = {}
        self._handles.append(module.register_forward_hook(self._keep_own))
        if children:
            for name, child in module.named_children():
                hook = functools.partial(self._keep_child, name)
                self._handles.append(child.register_forward_hook(hook))

    def _keep_own(self, module: nn.Module, args: Any, output: Any) -> None:
        if len(self.outputs) < 2:
            self.outputs.append(output)

    def _keep_child(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        kept = self.child_outputs.setdefault(name, [])
        if len(kept) < 2:
            kept.append(output)

    def release(self) -> list[Any]:
        """Remove the hooks; return the module's kept outputs and forget them.

        The children's outputs stay in :attr:`child_outputs` until the next attachment.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        outputs, self.outputs = self.outputs, []
        return outputs

    def child_logits(self, rows: int, columns: Optional[int]) -> Optional[Tensor]:
        """The one child output called once that reads as ``(rows, columns)`` logits.

        A tensor, or an output object with a ``logits`` tensor (Hugging Face's model
        outputs); ``None`` when no child, or more than one, gives such logits. The loss
        fit decides whether they are the loss's input: other tensors do not fit it.
        """
        found = []
        for outputs in self.child_outputs.values():
            if len(outputs) != 1:
                continue
            out = outputs[0]
            logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
            if not isinstance(logits, Tensor) or not logits.is_floating_point():
                continue
            logits = logits.detach()
            logits = logits[:, None] if logits.ndim == 1 else logits
            if logits.ndim == 2 and logits.shape[0] == rows and logits.shape[1] == columns:
                found.append(logits)
        return found[0] if len(found) == 1 else None


class LossObserver:
    """Infers the loss and its label smoothing from a few batches of training.

    :meth:`add` takes the logits training saw, the batch's targets and the loss it
    returned; :attr:`smoothing` is ``ε`` once a fit closes (:attr:`family` names the loss:
    ``"cross_entropy"`` or ``"binary_cross_entropy"``), ``None`` before or if none does
    (:attr:`detail` says why; :attr:`contradicted` when enough batches were fitted).
    """

    def __init__(self, max_batches: int = _MAX_BATCHES) -> None:
        self.max_batches = max_batches
        self.rows: dict[str, list[list[float]]] = {}  # family -> [features..., L] per batch
        self.steps: list[int] = []
        self.min_target: dict[str, float] = {}  # family -> smallest outcome probability
        self.soft = False
        self.smoothing: Optional[float] = None
        self.pos_weight = 1.0
        self.family: Optional[str] = None
        self.detail = "no training batch observed"
        self.done = False
        self.calls = 0
        self.contradicted = False
        self.tolerance = _RESIDUAL
        self.captured = True  # every batch's logits were those of the training step
        self.dropout: list[str] = []  # active dropout modules while logits were re-evaluated
        self.weighted = False  # the cross-entropy features carry a module's class weights

    @property
    def wants_more(self) -> bool:
        """Whether another batch would help (not decided yet, below the batch budget)."""
        return not self.done

    def add(
        self,
        logits: Tensor,
        targets: Tensor,
        loss: float,
        step: int,
        *,
        loss_dtype: Optional[torch.dtype] = None,
        captured: bool = True,
        task: Optional[str] = None,
        class_weight: Optional[tuple[Tensor, str]] = None,
    ) -> None:
        """One batch: its logits ``(N, C)``, targets and the loss training computed on them.

        Args:
            logits: the batch's logits, ``(N, C)`` (``(N, 1)`` or ``(N,)`` for one output).
            targets: integer labels ``(N,)``, soft targets ``(N, C)``, or sigmoid targets
                in ``[0, 1]`` of the logits' shape (``(N,)`` for one output).
            loss: the loss value.
            step: the step, for the account of the set-up.
            loss_dtype: the dtype the loss was computed in (its residual allowance).
            captured: the logits are those training computed (not re-evaluated).
            task: ``"multiclass"``, ``"binary"`` or ``"multilabel"`` narrows the losses
                tried; ``None`` tries every loss the targets fit.
            class_weight: ``(w (C,), reduction)`` of a class-weighted cross-entropy module
                (:func:`class_weights`): the cross-entropy features are then weighted.
        """
        if self.done:
            return
        self.calls += 1
        if self.calls >= self.max_batches:  # a bounded number of extra forwards, whatever comes
            self.done = True
        if not math.isfinite(loss):
            self.detail = "the training loss was not finite"
            return
        self.tolerance = max(self.tolerance, tolerance_of(loss_dtype, logits, captured))
        self.captured = self.captured and captured
        z = logits.detach().double()
        z = z[:, None] if z.ndim == 1 else z
        weighted = None
        if class_weight is not None and class_weight[0].numel() == z.shape[1] > 1:
            weighted = (class_weight[0].detach().to(z.device, torch.float64), class_weight[1])
            self.weighted = True
        features = _features(z, targets.detach().to(z.device), task, weighted)
        if isinstance(features, str):
            self._give_up(features)
            return
        for family, (row, min_target, soft) in features.items():
            self.rows.setdefault(family, []).append([*row, float(loss)])
            previous = self.min_target.get(family, min_target)
            self.min_target[family] = min(previous, min_target)
            self.soft = self.soft or soft
        self.steps.append(int(step))
        self._solve()

    def add_batch(self, logits: Tensor, y: Any, loss: Any, step: int, **options: Any) -> None:
        """:meth:`add` for what a training step hands over, stopping on what does not fit.

        Args:
            logits: the batch's logits as training computed them.
            y: its targets.
            loss: the loss training computed on it (a scalar tensor or number); a tensor's
                dtype sets the residual the fit may leave.
            step: the step, for the report's account of the set-up.
            **options: ``captured``, ``task`` and ``class_weight`` of :meth:`add`.
        """
        if not isinstance(y, Tensor) or y.shape[:1] != logits.shape[:1]:
            self.stop("the training batches carry no targets matching the logits")
            return
        try:
            value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        except (TypeError, ValueError, RuntimeError):
            self.stop(f"the training loss is not a number ({type(loss).__name__})")
            return
        dtype = loss.dtype if isinstance(loss, Tensor) else None
        self.add(logits, y, value, int(step), loss_dtype=dtype, **options)

    def state_dict(self) -> dict[str, Any]:
        """What was observed and concluded (for checkpoints)."""
        return {k: getattr(self, k) for k in _OBSERVER_STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also of the cross-entropy-only observer before it)."""
        for key in _OBSERVER_STATE:
            if key in state:
                setattr(self, key, state[key])
        if isinstance(self.rows, list):  # earlier checkpoints: cross-entropy rows (H, U, L)
            self.rows = {"cross_entropy": [list(r) for r in self.rows]}
        if not isinstance(self.min_target, dict):
            value = self.min_target
            self.min_target = {} if value is None else {"cross_entropy": float(value)}
        if self.smoothing is not None and self.family is None:
            self.family = "cross_entropy"

    def stop(self, why: str) -> None:
        """Stop observing without a conclusion, saying why."""
        self._give_up(why)

    def target_minimum(self, task: Optional[str]) -> Optional[float]:
        """Smallest outcome probability of the observed targets as ``task`` reads them."""
        family = {"multiclass": "cross_entropy", None: self.family}.get(
            task, "binary_cross_entropy"
        )
        if family is None and len(self.min_target) == 1:
            family = next(iter(self.min_target))
        return self.min_target.get(family) if family is not None else None

    def _give_up(self, why: str) -> None:
        self.done, self.smoothing, self.detail = True, None, why

    def _solve(self) -> None:
        fits = [_fit(family, rows, self.tolerance) for family, rows in self.rows.items()]
        ready = [fit for fit in fits if fit is not None]
        steps = f"steps {self.steps[0]}–{self.steps[-1]}"
        if not ready:
            needed = min(FAMILIES[f] + _EXTRA_BATCHES for f in self.rows)
            self.detail = f"{len(self.steps)} batch(es) observed, {needed} needed"
            return
        closed = [fit for fit in ready if fit.closes]
        if closed:
            best = min(closed, key=lambda fit: fit.residual)
            self.done = True
            self.family = best.family
            if best.smoothing is None:  # a loss of this form, ε not told from 0
                self.detail = best.why + f" at {steps}"
                return
            self.smoothing, self.pos_weight = best.smoothing, best.pos_weight
            why = best.why
            if self.weighted and best.family == "cross_entropy":
                why += "; CE and mean(−log p) weighted by the loss module's class weights"
            self.detail = f"inferred from the training loss at {steps} ({why})"
            return
        fitted = [fit for fit in ready if math.isfinite(fit.residual)]
        if not fitted:  # not a contradiction: these batches cannot decide
            self.detail = f"{ready[0].why} (over {steps})"
            return
        nearest = min(fitted, key=lambda fit: fit.residual)
        losses = " or ".join(LOSS_NAMES[fit.family] for fit in fitted)
        self.detail = (
            f"the training loss is not a (smoothed) {losses} of the logits ({nearest.why} over "
            f"{steps}, allowed {self.tolerance:.0e}: extra loss terms, another loss, or "
            f"inputs / targets changed inside the training step{self._dropout_note()})"
        )
        if len(fitted) == len(self.rows) and all(
            len(self.rows[fit.family]) >= FAMILIES[fit.family] + _EXTRA_BATCHES + 1
            for fit in fitted
        ):
            self.done = self.contradicted = True

    def _dropout_note(self) -> str:
        if self.dropout and not self.captured:
            return (
                f"; dropout is active in training ({', '.join(self.dropout[:3])}) and the "
                "logits were re-evaluated without its masks, because the training step did "
                "not call the module itself once"
            )
        return ""


class _Fit:
    """One loss family's least-squares fit of the training losses."""

    def __init__(self, family: str, residual: float, closes: bool, why: str) -> None:
        self.family, self.residual, self.closes, self.why = family, residual, closes, why
        self.smoothing: Optional[float] = None
        self.pos_weight = 1.0


def _fit(family: str, rows: list[list[float]], tolerance: float) -> Optional[_Fit]:
    """The fit of ``L`` on the family's features, or ``None`` with too few batches."""
    k = FAMILIES[family]
    if len(rows) < k + _EXTRA_BATCHES:
        return None
    data = torch.tensor(rows, dtype=torch.float64)
    A, L = data[:, :k], data[:, k]
    sv = torch.linalg.svdvals(A)
    if not bool(sv[-1] > 0) or float(sv[0] / sv[-1]) > _MAX_CONDITION:
        return _Fit(family, math.inf, False, "the batches' losses are too alike to separate ε")
    coef = torch.linalg.lstsq(A, L[:, None]).solution.flatten()
    r = A @ coef - L
    residual = float(r.norm() / L.norm().clamp_min(1e-30))
    why = f"relative residual {residual:.1e}"
    if residual > tolerance:
        return _Fit(family, residual, False, why)
    # noise of each loss: the residual's, at least float32 round-off
    sigma2 = max(
        float(r.square().sum()) / max(len(rows) - k, 1), (1e-7 * float(L.abs().max())) ** 2
    )
    cov = sigma2 * torch.linalg.inv(A.T @ A)
    c = coef.tolist()
    g = torch.zeros(k, dtype=torch.float64)
    if family == "cross_entropy":
        a, b = c[0], c[1]
        g[0], g[1] = -b, a
    else:
        a, b = c[1], 2 * c[3]
        g[1], g[3] = -b, 2 * a
    if not (a > 0 and a + b > 0):
        return _Fit(family, residual, False, f"{why} but a negative scale")
    eps = b / (a + b)
    g /= (a + b) ** 2
    se = math.sqrt(max(float(g @ cov @ g), 0.0))
    fit = _Fit(family, residual, True, "")
    if family == "binary_cross_entropy":
        fit.pos_weight = c[0] / c[1]
        if (
            eps > 3 * se
            and c[3] > 0
            and not math.isclose(c[2] / c[3], fit.pos_weight, rel_tol=0.05)
        ):
            return _Fit(family, residual, False, f"{why} but no single pos_weight fits")
        if not fit.pos_weight > 0:
            return _Fit(family, residual, False, f"{why} but a non-positive pos_weight")
    if not -1e-3 - 3 * se < eps < 1.0:
        return _Fit(family, residual, False, f"{why} but ε = {eps:.3g} outside [0, 1)")
    if abs(eps) <= max(_ZERO_SMOOTHING, 3 * se) and 3 * se <= _MAX_UNCERTAINTY:
        fit.smoothing = 0.0
    elif eps > 3 * se:
        fit.smoothing = min(max(eps, 0.0), 1.0)
    else:
        fit.why = (
            f"the training loss is a {LOSS_NAMES[family]} of the logits ({why}), but its "
            f"smoothing ε = {eps:.2g} ± {se:.1g} cannot be told from 0 from these batches"
        )
        return fit
    fit.why = f"{_form(family, a + b, fit.pos_weight)}, {why}"
    return fit


def _form(family: str, scale: float, pos_weight: float) -> str:
    """The loss the fit found, as a formula."""
    if family == "cross_entropy":
        return f"loss = {scale:.3g}·[(1−ε)·CE + ε·mean(−log p)]"
    weighted = f" with pos_weight {pos_weight:.3g}" if abs(pos_weight - 1) > 1e-3 else ""
    return f"loss = {scale:.3g}·BCE(z, (1−ε)·t + ε/2){weighted}"


def _features(
    z: Tensor,
    y: Tensor,
    task: Optional[str],
    weighted: Optional[tuple[Tensor, str]] = None,
) -> dict[str, tuple[list[float], float, bool]] | str:
    """``{family: (features, min outcome probability, soft)}`` of one batch, or why none.

    With class weights ``w (C,)`` (``weighted``, as ``nn.CrossEntropyLoss(weight=w)``
    computes them) the cross-entropy features are
    ``H = Σ_i w[y_i]·(−log p_i,y_i) / D`` and ``U = Σ_i Σ_c w_c·(−log p_ic) / (C·D)``
    with ``D = Σ_i w[y_i]`` for labels and reduction ``"mean"``, ``D = N`` otherwise
    (soft targets: ``H = −Σ_i Σ_c w_c·Y_ic·log p_ic / D``). Examples with a negative
    label (``ignore_index``, ``-100`` by default) are left out of both sums and of ``D``,
    as PyTorch leaves them out.
    """
    N, C = z.shape
    out: dict[str, tuple[list[float], float, bool]] = {}
    if task in (None, "multiclass") and C >= 2:
        logp = torch.log_softmax(z, dim=1)  # (N, C)
        w = weighted[0] if weighted is not None else torch.ones(C, dtype=z.dtype, device=z.device)
        per_mean = weighted is None or weighted[1] == "mean"
        U_sum = float(-(logp * w).sum() / C)
        if y.ndim == 1 and not y.is_floating_point():
            labels = y.long()
            if int(labels.max()) >= C:  # another loss, or an ignore_index of C or more
                return f"the batch labels reach {int(labels.max())}, outside [0, {C})"
            labelled = labels >= 0  # (N,) a negative label: `ignore_index`, no loss term
            if not bool(labelled.any()):
                return "every label of the batch is ignored (negative)"
            if not bool(labelled.all()):  # ignored rows enter neither CE nor the smoothing
                logp, labels = logp[labelled], labels[labelled]
                U_sum = float(-(logp * w).sum() / C)
            w_i = w[labels]  # (N',)
            D = float(w_i.sum()) if per_mean else float(N)
            if not D > 0:
                return "the batch's class weights sum to zero"
            H = float(-(w_i * logp.gather(1, labels[:, None])[:, 0]).sum()) / D
            out["cross_entropy"] = ([H, U_sum / D], 0.0, False)
        elif y.ndim == 2 and y.is_floating_point() and y.shape == z.shape:
            Y = y.double()
            if float(Y.min()) >= 0 and float((Y.sum(dim=1) - 1).abs().max()) <= 1e-4:
                H = float(-(Y * logp * w).sum()) / N
                out["cross_entropy"] = ([H, U_sum / N], float(Y.min()), True)
    if task in (None, "binary", "multilabel"):
        shaped = (y.ndim == 1 and C == 1) or (y.ndim == 2 and tuple(y.shape) == (N, C))
        if shaped:
            t = y.double().reshape(N, C)
            if t.numel() and float(t.min()) >= 0 and float(t.max()) <= 1:
                ls, lsn = nn.functional.logsigmoid(z), nn.functional.logsigmoid(-z)
                row = [
                    float(-(t * ls).mean()),
                    float(-((1 - t) * lsn).mean()),
                    float(-ls.mean()),
                    float(-lsn.mean()),
                ]
                soft = bool(((t > 0) & (t < 1)).any())
                out["binary_cross_entropy"] = (row, float(torch.minimum(t, 1 - t).min()), soft)
    if not out:
        if y.is_floating_point() and y.numel() and y.shape[0] == N:
            low, high = float(y.min()), float(y.max())
            if low < 0 or high > 1:  # a regression's targets
                return f"targets in [{low:.3g}, {high:.3g}] are no class labels or probabilities"
        return f"targets of shape {tuple(y.shape)} are not labels or targets of the logits"
    return out
