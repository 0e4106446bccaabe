"""From measured drift to a verdict, its causes and one sentence with the reason and the fix.

Two findings are kept apart because they have different causes and remedies:

* **logits diverging** — the mean centered logit norm keeps growing linearly in
  ``log(step)`` where the theory allows no finite optimum. Cross-entropy with hard one-hot
  targets and no regularization has no finite minimiser: the margin grows like
  ``log t``, i.e. by a constant amount per doubling of steps. The signal is the
  least-squares slope of ``logit_norm`` against ``log2(step)`` over the reports in the
  last ``trend_octaves`` doublings of steps. How the slope is read depends on what the
  set-up allows (:func:`diagnose`):

  - non-degenerate targets ``t`` (label smoothing, soft labels): the optimum is finite,
    ``softmax(f*) = t``, centered ``f* = log t − mean(log t)``. Logits still short of
    ``optimum_overshoot · ‖f*‖`` are converging, whatever their slope; only logits past
    it and still growing are diverging;
  - hard targets and no regularization: a steady slope is the predicted divergence;
  - L2 regularization only: the logits may grow until the regularization's equilibrium,
    ``~1/(lr·λ)`` steps; before ``equilibrium_factor`` of those the slope only says
    "logits growing" (at most ``drifting``);
  - set-up unknown: the slope only says "logits growing" (at most ``drifting``), and the
    message states the condition under which that growth would be divergence.
* **kernel moving** — ``relative_change = ‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F`` is large although the
  logits may well converge: finite-width feature learning (standard parameterization,
  narrow layers) or a large learning rate.

A third signal, ``linearization_error``, says directly how far the model is from its
linearization ``f_lin``; it is large whenever either finding has gone far.

Each signal has a *drift* and a *break* threshold; the verdict is the worst level:
``"lazy"`` (below every drift threshold), ``"drifting"``, ``"broken"``, and the message
names first the signal(s) that set it. Defaults and the measurements behind them:
``docs/verdicts.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

VERDICTS = ("lazy", "drifting", "broken")
LAZY_SCORE = {"lazy": 1.0, "drifting": 0.5, "broken": 0.0}

CAUSE_LOGITS = "logits diverging"
CAUSE_GROWING = "logits growing"
CAUSE_KERNEL = "kernel moving"
CAUSE_LINEARIZATION = "linearization error"
CAUSE_NONFINITE = "non-finite logits"
CAUSE_NONFINITE_DATA = "non-finite training data"


@dataclass(frozen=True)
class Thresholds:
    """Drift / break thresholds of the three signals (see ``docs/verdicts.md``).

    Args:
        relative_change: ``(drift, break)`` for ``‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F``.
        linearization_error: ``(drift, break)`` for ``‖f − f_lin‖_F / ‖f − f_0‖_F``.
        logit_slope: ``(drift, break)`` for the growth of the mean centered logit norm
            per doubling of steps.
        trend_octaves: doublings of steps the slope is fitted over.
        min_trend_step: no slope before this step (the first, fast fitting phase moves
            the logits in every regime).
        optimum_overshoot: with non-degenerate targets, logits whose mean centered norm
            is below this multiple of the optimum's are converging, not diverging.
        equilibrium_factor: with L2 regularization only, growing logits are not called
            diverging before this multiple of the equilibrium time ``1/(lr·λ)``.
    """

    relative_change: tuple[float, float] = (0.1, 0.5)
    linearization_error: tuple[float, float] = (0.2, 0.5)
    logit_slope: tuple[float, float] = (0.5, 0.8)
    trend_octaves: float = 2.0
    min_trend_step: int = 100
    optimum_overshoot: float = 1.5
    equilibrium_factor: float = 3.0

    def __post_init__(self) -> None:
        for name in ("relative_change", "linearization_error", "logit_slope"):
            pair = getattr(self, name)
            if (
                not isinstance(pair, (tuple, list))
                or len(pair) != 2
                or not all(isinstance(v, (int, float)) and v > 0 for v in pair)
                or pair[0] > pair[1]
            ):
                raise ValueError(
                    f"Expected `{name}` thresholds to be (drift, break) with "
                    f"0 < drift <= break but got {pair!r}."
                )
        for name in ("trend_octaves", "optimum_overshoot", "equilibrium_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Expected `{name}` to be positive but got {value!r}.")


@dataclass(frozen=True)
class Diagnosis:
    """The verdict on one report."""

    verdict: str
    causes: list[str]
    message: str


def logit_slope(
    steps: Sequence[int], logit_norms: Sequence[float], octaves: float, min_step: int
) -> float:
    """Least-squares slope of ``logit_norm`` against ``log2(step)`` over the last octaves.

    Uses the points with ``step ≥ max(min_step, step_last / 2^octaves)``; ``nan`` with
    fewer than two such points.
    """
    if not steps:
        return math.nan
    lower = max(min_step, steps[-1] / 2.0**octaves)
    pts = [
        (math.log2(s), v)
        for s, v in zip(steps, logit_norms)
        if s >= lower and s > 0 and math.isfinite(v)
    ]
    if len(pts) < 2:
        return math.nan
    mean_t = sum(t for t, _ in pts) / len(pts)
    mean_v = sum(v for _, v in pts) / len(pts)
    var = sum((t - mean_t) ** 2 for t, _ in pts)
    if var == 0:
        return math.nan
    return sum((t - mean_t) * (v - mean_v) for t, v in pts) / var


@dataclass(frozen=True)
class LogitContext:
    """What the set-up says about the logits' destination (all optional).

    Attributes:
        logit_norm: the mean centered logit norm now.
        optimum_norm: mean centered norm of the optimum ``f*`` the targets allow on the
            probe (finite for non-degenerate targets, ``nan`` when none / unknown).
        equilibrium_step: ``1/(lr·λ)`` for L2 regularization (``nan`` when none / unknown).
        step: the report's step.
    """

    logit_norm: float = math.nan
    optimum_norm: float = math.nan
    equilibrium_step: float = math.nan
    step: int = 0


def diagnose(
    *,
    relative_change: float,
    linearization_error: float,
    slope: float,
    finite: bool,
    thresholds: Thresholds,
    predicted_regime: str,
    context: Optional[LogitContext] = None,
    data_finite: bool = True,
) -> Diagnosis:
    """Verdict, causes and message from the signals of one report.

    Args:
        relative_change: kernel drift ``‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F``.
        linearization_error: ``‖f − f_lin‖_F / ‖f − f_0‖_F``.
        slope: logit-norm growth per doubling of steps (``nan`` when not yet known).
        finite: whether the logits on the probe were finite.
        thresholds: the drift / break thresholds.
        predicted_regime: ``"bounded"``, ``"diverging"`` or ``"unknown"`` from the set-up.
        context: the logits' optimum and the regularization's time scale, when known.
        data_finite: whether every training batch seen held finite inputs and targets.
    """
    ctx = context or LogitContext()
    if not finite and not data_finite:
        return Diagnosis(
            "broken",
            [CAUSE_NONFINITE_DATA],
            "The logits on the probe set are not finite because a training batch holds NaN "
            "or inf, which made the parameters non-finite — clean the training data.",
        )
    if not finite:
        return Diagnosis(
            "broken",
            [CAUSE_NONFINITE],
            "The logits on the probe set are not finite: training has diverged — lower the "
            "learning rate.",
        )
    logit_cause, logit_level, logit_note = _logit_finding(slope, thresholds, predicted_regime, ctx)
    levels = {
        logit_cause: logit_level,
        CAUSE_KERNEL: _level(relative_change, thresholds.relative_change),
        CAUSE_LINEARIZATION: _level(linearization_error, thresholds.linearization_error),
    }
    worst = max(levels.values())
    verdict = VERDICTS[worst]
    causes = [cause for cause, level in levels.items() if level > 0]
    if not causes:
        return Diagnosis(verdict, [], _lazy_message(predicted_regime, logit_note))
    values = {
        logit_cause: slope,
        CAUSE_KERNEL: relative_change,
        CAUSE_LINEARIZATION: linearization_error,
    }
    pairs = {
        logit_cause: thresholds.logit_slope,
        CAUSE_KERNEL: thresholds.relative_change,
        CAUSE_LINEARIZATION: thresholds.linearization_error,
    }
    # the signals that set the verdict first, then the others over their drift threshold
    order = sorted(causes, key=lambda c: -levels[c])
    parts = [
        _part(cause, levels[cause], values[cause], pairs[cause], predicted_regime, ctx)
        for cause in order
    ]
    state = "has left" if verdict == "broken" else "is drifting from"
    message = f"Training {state} the kernel regime: " + "; ".join(parts) + "."
    if logit_note and logit_level == 0:
        message += f" ({logit_note}.)"
    return Diagnosis(verdict, causes, message)


def _logit_finding(
    slope: float, thresholds: Thresholds, predicted: str, ctx: LogitContext
) -> tuple[str, int, str]:
    """``(cause, level, note)`` of the logit signal, read against what the set-up allows."""
    level = _level(slope, thresholds.logit_slope)
    optimum = ctx.optimum_norm
    if math.isfinite(optimum) and optimum > 0:
        if not ctx.logit_norm >= thresholds.optimum_overshoot * optimum:
            where = "towards" if ctx.logit_norm < optimum else "near"
            note = (
                f"logits converging: mean centered norm {ctx.logit_norm:.2f} {where} the "
                f"{optimum:.2f} of the optimum the targets allow"
            )
            return CAUSE_LOGITS, 0, note
        return CAUSE_LOGITS, level, ""
    if predicted == "diverging":
        return CAUSE_LOGITS, level, ""
    equilibrium = ctx.equilibrium_step
    if math.isfinite(equilibrium) and equilibrium > 0:
        if ctx.step >= thresholds.equilibrium_factor * equilibrium:
            return CAUSE_LOGITS, level, ""
        return CAUSE_GROWING, min(level, 1), ""
    return CAUSE_GROWING, min(level, 1), ""


def _level(value: Optional[float], pair: tuple[float, float]) -> int:
    if value is None or not math.isfinite(value):
        return 0
    return 2 if value >= pair[1] else 1 if value >= pair[0] else 0


def _lazy_message(predicted: str, note: str) -> str:
    tail = f" ({note})." if note else "."
    if predicted == "diverging":
        return (
            "Training is in the kernel regime so far, but hard one-hot targets without weight "
            "decay predict diverging logits later — add weight decay or label smoothing to "
            "stay there" + tail
        )
    if predicted == "unknown":
        return (
            "Training is in the kernel (lazy) regime so far. The set-up (targets, "
            "regularization) is not known: if the targets are hard one-hot and there is no "
            "weight decay, the theory predicts diverging logits later" + tail
        )
    return "Training is in the kernel (lazy) regime: the NTK and the logits are stable" + tail


def _threshold_text(value: float, level: int, pair: tuple[float, float], fmt: str) -> str:
    if level == 2:
        return f"{value:{fmt}} ≥ break threshold {pair[1]:g}"
    return f"{value:{fmt}} ≥ drift threshold {pair[0]:g}, below break {pair[1]:g}"


def _part(
    cause: str,
    level: int,
    value: float,
    pair: tuple[float, float],
    predicted: str,
    ctx: LogitContext,
) -> str:
    """One clause naming the signal, its value against its threshold, the reason and the fix."""
    if cause in (CAUSE_LOGITS, CAUSE_GROWING):
        measured = (
            f"centered logit norm +{_threshold_text(value, level, pair, '.2f')} per doubling "
            "of steps"
        )
        if cause == CAUSE_GROWING:
            if math.isfinite(ctx.equilibrium_step):
                return (
                    f"logits growing ({measured}) before the L2 regularization's equilibrium "
                    f"(~1/(lr·λ) = {ctx.equilibrium_step:.0f} steps): not yet a divergence — "
                    "watch whether they level off after it"
                )
            return (
                f"logits growing ({measured}); the set-up is not known: if the targets are "
                "hard one-hot and there is no weight decay, this is the divergence the theory "
                "predicts (add weight decay or label smoothing); with smoothing or soft targets "
                "the logits may still be approaching a finite optimum — declare "
                "`label_smoothing` / `weight_decay` to decide"
            )
        if math.isfinite(ctx.optimum_norm):
            return (
                f"logits diverging ({measured}) past the optimum the targets allow (mean "
                f"centered norm {ctx.logit_norm:.2f} against {ctx.optimum_norm:.2f}) — lower "
                "the learning rate or add weight decay"
            )
        if predicted == "diverging":
            return (
                f"logits diverging ({measured}): hard one-hot targets and no weight decay, so "
                "the logits must diverge — add weight decay or label smoothing"
            )
        return (
            f"logits diverging ({measured}) although the set-up predicts bounded logits: the "
            "regularization is too weak to bound them (its equilibrium takes ~1/(lr·λ) steps) "
            "— increase weight decay or add label smoothing"
        )
    if cause == CAUSE_KERNEL:
        measured = f"relative change {_threshold_text(value, level, pair, '.2f')}"
        if predicted == "bounded":
            reason = (
                " although the set-up predicts bounded logits: the network is far from the "
                "wide limit (width, parameterization) or the learning rate is large"
            )
        else:
            reason = ": finite-width feature learning or a large learning rate"
        return f"kernel moving ({measured}){reason} — widen the layers or lower the learning rate"
    measured = _threshold_text(value, level, pair, ".2f")
    return (
        f"linearization error ({measured}): the model's outputs no longer match its "
        "linearization around θ0 (large learning rate or narrow layers) — lower the learning "
        "rate or widen the layers"
    )
