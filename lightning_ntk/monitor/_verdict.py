"""From the measured signals of one report to its regime, its verdict and its message.

**The regime** says what the network is doing at a report, from measurements only:

* ``"lazy"`` — the linearization around ``θ0`` holds: ``relative_change`` and
  ``linearization_error`` are below their first thresholds;
* ``"feature learning"`` — the kernel moves: its velocity
  ``‖Θ_t − Θ_prev‖_F / ‖Θ_prev‖_F / log2(t / t_prev)`` since the previous report is at
  least ``settled_velocity`` per doubling of steps, or the network is neither lazy nor
  locally linear;
* ``"locally linear"`` — the kernel has settled (velocity below ``settled_velocity``) and
  the linearization around the previous report's parameters predicts the logits
  (``local_linearization_error`` below its threshold): a kernel describes the run from
  there on (Fort et al. 2020: the NTK moves fast early, then settles);
* ``"logits diverging"`` — the paper's pathology, the one alarm that always fires (see
  below); also non-finite logits;
* ``"unknown"`` — neither the kernel nor the linearization could be measured.

**The logit trend** is the least-squares slope of ``logit_norm`` against ``log2(step)``
over the reports in the last ``trend_octaves`` doublings of steps. Cross-entropy with hard
one-hot targets and no regularization has no finite minimiser: the margin grows like
``log t``, a constant amount per doubling. How the slope is read depends on the set-up:

* non-degenerate targets ``t`` (label smoothing, soft labels): the optimum is finite,
  centered ``f* = log t − mean(log t)``. Logits short of ``optimum_overshoot · ‖f*‖``
  are converging whatever their slope; only logits past it and still growing diverge;
* hard targets and no regularization: a steady slope is the predicted divergence;
* L2 regularization only: before ``equilibrium_factor · 1/(lr·λ)`` steps the slope only
  says "logits growing";
* hard targets and no regularization, but a training loss the set-up does not recognise
  (focal loss, a loss written out): a slope past the alarm that is still past it between
  the last two reports is a measured divergence;
* set-up otherwise unknown: the slope only says "logits growing", and the message says
  how to declare the set-up.

**The verdict** keeps its three values but names alarm states: ``"broken"`` is an alarm
(logits diverging or not finite, always; leaving the lazy regime, only with
``expect="lazy"``), ``"lazy"`` the lazy regime, ``"drifting"`` everything else
(feature learning, locally linear, logits growing). Thresholds and the measurements
behind them: ``docs/verdicts.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

VERDICTS = ("lazy", "drifting", "broken")
LAZY_SCORE = {"lazy": 1.0, "drifting": 0.5, "broken": 0.0}
EXPECTATIONS = (None, "lazy")

LAZY = "lazy"
LOCALLY_LINEAR = "locally linear"
FEATURE_LEARNING = "feature learning"
DIVERGING = "logits diverging"
UNKNOWN = "unknown"
# ``ntk/regime``: its code as a logged scalar (``nan`` when unknown)
REGIME_CODE = {LAZY: 0.0, LOCALLY_LINEAR: 1.0, FEATURE_LEARNING: 2.0, DIVERGING: 3.0}

CAUSE_LOGITS = "logits diverging"
CAUSE_GROWING = "logits growing"
CAUSE_KERNEL = "kernel moving"
CAUSE_LINEARIZATION = "linearization error"
CAUSE_NONFINITE = "non-finite logits"
CAUSE_NONFINITE_DATA = "non-finite training data"


@dataclass(frozen=True)
class Thresholds:
    """Thresholds of the regimes, the alarms and the logit trend (see ``docs/verdicts.md``).

    Args:
        relative_change: ``(lazy, alarm)`` for ``‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F``: below the first
            the kernel counts as unmoved; the second is an alarm only with ``expect="lazy"``.
        linearization_error: ``(lazy, alarm)`` for ``‖f − f_lin‖_F / ‖f − f_0‖_F``, read
            the same way.
        logit_slope: ``(growing, alarm)`` for the growth of the mean centered logit norm
            per doubling of steps.
        settled_velocity: kernel velocity (relative change per doubling of steps since
            the previous report) below which the kernel counts as settled.
        local_linearization_error: ``‖f − f_lin,prev‖_F / ‖f − f_prev‖_F`` below which the
            linearization around the previous report's parameters predicts the logits.
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
    settled_velocity: float = 0.1
    local_linearization_error: float = 0.2
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
                    f"Expected `{name}` thresholds to be (lower, alarm) with "
                    f"0 < lower <= alarm but got {pair!r}."
                )
        for name in (
            "settled_velocity",
            "local_linearization_error",
            "trend_octaves",
            "optimum_overshoot",
            "equilibrium_factor",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Expected `{name}` to be positive but got {value!r}.")


@dataclass(frozen=True)
class Signals:
    """What one report measured that the regime and the verdict are read from.

    Attributes:
        relative_change: ``‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F``.
        linearization_error: ``‖f − f_lin‖_F / ‖f − f_0‖_F`` (around ``θ0``).
        kernel_velocity: ``‖Θ_t − Θ_prev‖_F / ‖Θ_prev‖_F / log2(t / t_prev)``.
        local_linearization_error: ``‖f − f_lin,prev‖_F / ‖f − f_prev‖_F``.
        slope: logit-norm growth per doubling of steps (``nan`` when not yet known).
        finite: whether the logits on the probe were finite.
        data_finite: whether every training batch seen held finite inputs and targets.
        target_alignment: ``A(Θ_t, YYᵀ)`` now, and ``previous_alignment`` at the
            previous report (or ``θ0``).
        previous_step: the step of the previous report (or of ``θ0``).
        too_close: the report is less than ``MIN_SPAN`` doublings of steps after the
            previous one: no velocity or local error, the previous regime holds.
        previous_regime: the previous report's regime.
    """

    relative_change: float = math.nan
    linearization_error: float = math.nan
    kernel_velocity: float = math.nan
    local_linearization_error: float = math.nan
    slope: float = math.nan
    finite: bool = True
    data_finite: bool = True
    target_alignment: float = math.nan
    previous_alignment: float = math.nan
    previous_step: int = 0
    too_close: bool = False
    previous_regime: str = ""


@dataclass(frozen=True)
class LogitContext:
    """What the set-up says about the logits' destination (all optional).

    Attributes:
        logit_norm: the mean centered logit norm now.
        optimum_norm: mean centered norm of the optimum ``f*`` the targets allow on the
            probe (finite for non-degenerate targets, ``nan`` when none / unknown).
        equilibrium_step: ``1/(lr·λ)`` for L2 regularization (``nan`` when none / unknown).
        step: the report's step.
        reading: the set-up is still being read from the training loss (batches were
            observed, not enough to decide yet): an unknown set-up is then not yet news.
        hard_unregularized: the targets are hard and no regularization was found, but the
            training loss is not one the set-up recognises (focal loss, a loss written
            out): the divergence is then read from the measured growth alone.
        recent_slope: the logit norm's growth per doubling of steps between the last two
            reports (``nan`` when not measured).
        hard_targets: the task's hard targets in words: ``"hard one-hot targets"`` for a
            softmax, ``"hard 0/1 targets"`` for sigmoid outputs (binary, multilabel).
        to_declare: the settings that would settle an unknown set-up, in words: those of
            ``label_smoothing`` / ``weight_decay`` the set-up could not establish.
        norm_words: what ``logit_norm`` measures, in words: the centered norm of softmax
            logits, the mean ``|z|`` of sigmoid outputs.
        trend_wait: when the logit trend is read, in words (``""``: the reports it needs;
            see :meth:`~lightning_ntk.monitor.tracker.NTKTracker.trend_wait`).
        not_classification: the probe targets lie outside ``[0, 1]`` (a regression's):
            no setting makes the set-up a classifier's, so none is asked for.
    """

    logit_norm: float = math.nan
    optimum_norm: float = math.nan
    equilibrium_step: float = math.nan
    step: int = 0
    reading: bool = False
    hard_unregularized: bool = False
    recent_slope: float = math.nan
    hard_targets: str = "hard one-hot targets"
    to_declare: str = "`label_smoothing` and `weight_decay`"
    norm_words: str = "centered logit norm"
    trend_wait: str = ""
    not_classification: bool = False


@dataclass(frozen=True)
class Diagnosis:
    """The regime, the verdict, its causes and the message of one report."""

    verdict: str
    causes: list[str]
    message: str
    regime: str = UNKNOWN


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


# doublings of steps below which a report is too close to the previous one for a
# velocity: over a few steps SGD's noise, not the kernel's drift, dominates the change
# (reports every 50 steps beside the log grid's 512 read 12 steps apart)
MIN_SPAN = 0.1


def doublings(step: int, previous_step: int) -> float:
    """``log2(step / previous_step)``, step 0 counted as step 1."""
    return math.log2(max(step, 1) / max(previous_step, 1))


def velocity(change: float, step: int, previous_step: int) -> float:
    """``change / log2(step / previous_step)``, step 0 counted as step 1 (``nan`` if no time).

    Args:
        change: ``‖Θ_t − Θ_prev‖_F / ‖Θ_prev‖_F``.
        step: the report's step ``t``.
        previous_step: the step ``t_prev`` of the previous report (or of ``θ0``).
    """
    span = doublings(step, previous_step)
    return change / span if span > 0 else math.nan


def regime_of(signals: Signals, thresholds: Thresholds) -> str:
    """The regime of one report from its kernel and linearization signals (not the logits)."""
    rc, lin = signals.relative_change, signals.linearization_error
    if not (math.isfinite(rc) or math.isfinite(lin)):
        return UNKNOWN
    if (
        _level(rc, thresholds.relative_change) == 0
        and _level(lin, thresholds.linearization_error) == 0
    ):
        return LAZY
    if signals.too_close and signals.previous_regime in (LOCALLY_LINEAR, FEATURE_LEARNING):
        return signals.previous_regime
    v, local = signals.kernel_velocity, signals.local_linearization_error
    settled = not (v >= thresholds.settled_velocity)  # nan: not measured, not moving
    if settled and local < thresholds.local_linearization_error:
        return LOCALLY_LINEAR
    return FEATURE_LEARNING


def diagnose(
    signals: Signals,
    *,
    thresholds: Thresholds,
    predicted_regime: str,
    expect: Optional[str] = None,
    context: Optional[LogitContext] = None,
) -> Diagnosis:
    """Regime, verdict, causes and message from the signals of one report.

    Args:
        signals: the report's measured signals.
        thresholds: the thresholds.
        predicted_regime: ``"bounded"``, ``"diverging"`` or ``"unknown"`` from the set-up.
        expect: ``"lazy"`` when the user expects lazy training (leaving it is an alarm);
            ``None`` (default): feature learning is information, not an alarm.
        context: the logits' optimum and the regularization's time scale, when known.

    Returns:
        The :class:`Diagnosis`; its message has one sentence per finding.
    """
    ctx = context or LogitContext()
    predicted = predicted_regime
    if not signals.finite and not signals.data_finite:
        return Diagnosis(
            "broken",
            [CAUSE_NONFINITE_DATA],
            "Logits not finite on the probe set because a training batch holds NaN or inf, "
            "which made the parameters non-finite — clean the training data.",
            UNKNOWN,
        )
    if not signals.finite:
        return Diagnosis(
            "broken",
            [CAUSE_NONFINITE],
            "Logits not finite on the probe set: training has diverged — lower the learning rate.",
            DIVERGING,
        )
    logit_cause, logit_level, logit_note = _logit_finding(signals.slope, thresholds, predicted, ctx)
    kernel_level = _level(signals.relative_change, thresholds.relative_change)
    lin_level = _level(signals.linearization_error, thresholds.linearization_error)
    if expect != "lazy":  # leaving the lazy regime is information, not an alarm
        kernel_level, lin_level = min(kernel_level, 1), min(lin_level, 1)
    regime = regime_of(signals, thresholds)
    if logit_level == 2:
        regime = DIVERGING
    levels = {logit_cause: logit_level, CAUSE_KERNEL: kernel_level, CAUSE_LINEARIZATION: lin_level}
    verdict = VERDICTS[max(levels.values())]
    causes = [cause for cause, level in levels.items() if level > 0]
    sentences = [
        _regime_sentence(regime, signals, thresholds),
        _expectation_sentence(signals, thresholds) if expect == "lazy" else "",
        _logit_sentence(logit_cause, logit_level, logit_note, signals, thresholds, predicted, ctx),
    ]
    return Diagnosis(verdict, causes, " ".join(s for s in sentences if s), regime)


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
                f"Logits converging: mean {ctx.norm_words} {ctx.logit_norm:.2f} {where} the "
                f"{optimum:.2f} of the optimum the targets allow."
            )
            return CAUSE_LOGITS, 0, note
        return CAUSE_LOGITS, level, ""
    if predicted == "diverging":
        return CAUSE_LOGITS, level, ""
    equilibrium = ctx.equilibrium_step
    if math.isfinite(equilibrium) and equilibrium > 0:
        if ctx.step >= thresholds.equilibrium_factor * equilibrium:
            return CAUSE_LOGITS, level, ""
    if level == 2 and ctx.hard_unregularized and not ctx.reading:
        # measured: a steady growth over the trend window and still between the last reports
        if ctx.recent_slope >= thresholds.logit_slope[1]:
            return CAUSE_LOGITS, level, ""
    return CAUSE_GROWING, min(level, 1), ""


def _wait(ctx: LogitContext, t: Thresholds) -> str:
    """When the logit trend is read, in words."""
    return ctx.trend_wait or f"it needs two reports from step {t.min_trend_step}"


def _level(value: Optional[float], pair: tuple[float, float]) -> int:
    if value is None or not math.isfinite(value):
        return 0
    return 2 if value >= pair[1] else 1 if value >= pair[0] else 0


def _regime_sentence(regime: str, s: Signals, t: Thresholds) -> str:
    """One sentence on what the network is doing, with the figures that say so."""
    if s.too_close and regime in (LOCALLY_LINEAR, FEATURE_LEARNING):
        return (
            f"{regime.capitalize()}, as at step {s.previous_step}: this report is too close "
            f"to it (under {MIN_SPAN:g} doublings of steps) to measure the kernel's velocity."
        )
    if regime == LAZY:
        return (
            f"Lazy: the linearization around θ0 holds (kernel relative change "
            f"{s.relative_change:.2f}, linearization error {s.linearization_error:.2f})."
        )
    if regime == LOCALLY_LINEAR:
        moving = (
            f"moves {s.kernel_velocity:.3f} per doubling of steps"
            if math.isfinite(s.kernel_velocity)
            else "is not measured"
        )
        return (
            f"Locally linear: the kernel {moving} (settled below {t.settled_velocity:g}) and "
            f"the linearization around step {s.previous_step}'s parameters predicts the "
            f"logits (local linearization error {s.local_linearization_error:.2f})."
        )
    if regime == FEATURE_LEARNING:
        local = s.local_linearization_error
        if s.kernel_velocity < t.settled_velocity and local >= t.local_linearization_error:
            return (  # a settled kernel, but no linearization describes the steps since
                f"Feature learning: the kernel moves only {s.kernel_velocity:.2f} per "
                f"doubling of steps since step {s.previous_step}, but the linearization "
                f"around that step's parameters misses the logits (local linearization "
                f"error {local:.2f}, locally linear below {t.local_linearization_error:g}; "
                f"relative change {s.relative_change:.2f} since θ0){_alignment_clause(s)}."
            )
        if math.isfinite(s.kernel_velocity):
            return (
                f"Feature learning: the kernel moves {s.kernel_velocity:.2f} per doubling of "
                f"steps since step {s.previous_step} (relative change "
                f"{s.relative_change:.2f} since θ0){_alignment_clause(s)}."
            )
        return (
            f"Feature learning: the linearization around θ0 no longer holds (linearization "
            f"error {s.linearization_error:.2f})."
        )
    if regime == UNKNOWN:
        return "Regime unknown: neither the kernel nor the linearization could be measured."
    return ""  # logits diverging: the logit sentence says it


def _alignment_clause(s: Signals) -> str:
    before, now = s.previous_alignment, s.target_alignment
    if not (math.isfinite(before) and math.isfinite(now)):
        return ""
    figures = f"(target alignment {before:.2f} → {now:.2f})"
    if now > before + 0.01:
        return f", towards the labels {figures}"
    if now < before - 0.01:
        return f", away from the labels {figures}"
    return f", at a steady alignment with the labels ({now:.2f})"


def _expectation_sentence(s: Signals, t: Thresholds) -> str:
    """With ``expect="lazy"``: the signals past their lazy threshold, with the alarm level."""
    parts = []
    if _level(s.relative_change, t.relative_change) > 0:
        parts.append(
            f"kernel relative change {s.relative_change:.2f} (lazy below "
            f"{t.relative_change[0]:g}, alarm at {t.relative_change[1]:g})"
        )
    if _level(s.linearization_error, t.linearization_error) > 0:
        parts.append(
            f"linearization error {s.linearization_error:.2f} (lazy below "
            f"{t.linearization_error[0]:g}, alarm at {t.linearization_error[1]:g})"
        )
    if not parts:
        return ""
    return (
        "Laziness was expected but training is leaving it: "
        + " and ".join(parts)
        + " — widen the layers or lower the learning rate."
    )


# the set-up of ``LogitContext.hard_unregularized``, closing a sentence on the logits
_UNRECOGNISED = (
    "; hard targets and no weight decay, but the training loss is no cross-entropy the "
    "monitor recognises: a steady growth past {alarm:g} per doubling of steps will be read "
    "as diverging (declare `label_smoothing` if the loss smooths the targets)."
)
# the set-up of ``LogitContext.not_classification``
_NOT_CLASSIFICATION = (
    "No classification set-up: the targets lie outside [0, 1] (a regression?), where the "
    "theory of bounded or diverging logits does not apply; the kernel's drift and the "
    "linearization are measured as for any model."
)


def _logit_sentence(
    cause: str,
    level: int,
    note: str,
    s: Signals,
    t: Thresholds,
    predicted: str,
    ctx: LogitContext,
) -> str:
    """One sentence on the logits: the finding with the level that set it, or the outlook."""
    alarm = t.logit_slope[1]
    rising = f"the {ctx.norm_words} rises {s.slope:+.2f} per doubling of steps"
    if level == 2:
        if math.isfinite(ctx.optimum_norm):
            return (
                f"Logits diverging: {rising} (alarm at {alarm:g}), past the optimum the "
                f"targets allow (mean {ctx.norm_words} {ctx.logit_norm:.2f} against "
                f"{ctx.optimum_norm:.2f}) — lower the learning rate or add weight decay."
            )
        if predicted == "diverging":
            return (
                f"Logits diverging: {rising} (alarm at {alarm:g}), as {ctx.hard_targets} "
                "without weight decay predict — add weight decay or label smoothing."
            )
        if ctx.hard_unregularized:
            return (
                f"Logits diverging: {rising} (alarm at {alarm:g}, {ctx.recent_slope:+.2f} since "
                "the previous report) with hard targets and no weight decay; the training "
                "loss is not a cross-entropy the monitor recognises, so this rests on the "
                "measured growth — add weight decay or label smoothing."
            )
        within = t.equilibrium_factor * ctx.equilibrium_step
        return (
            f"Logits diverging: {rising} (alarm at {alarm:g}) although the set-up predicts "
            f"bounded logits: the regularization does not bound them within "
            f"{t.equilibrium_factor:g} × 1/(lr·λ) = {within:.0f} steps — increase weight "
            "decay or add label smoothing."
        )
    if level == 1:
        if cause == CAUSE_LOGITS:
            return f"Logits growing: {rising} (alarm at {alarm:g})."
        if math.isfinite(ctx.equilibrium_step):
            return (
                f"Logits growing: {rising} before the L2 regularization's equilibrium "
                f"(~1/(lr·λ) = {ctx.equilibrium_step:.0f} steps), not yet a divergence."
            )
        if ctx.reading:
            return (
                f"Logits growing: {rising}; the set-up is still being read from the training loss."
            )
        if ctx.hard_unregularized:
            return f"Logits growing: {rising}" + _UNRECOGNISED.format(alarm=alarm)
        if ctx.not_classification:
            return f"Logits growing: {rising}. " + _NOT_CLASSIFICATION
        return (
            f"Logits growing: {rising}; the set-up is not known — with {ctx.hard_targets} "
            f"and no weight decay this is the divergence the theory predicts (declare "
            f"{ctx.to_declare} to tell)."
        )
    if note:
        return note
    if predicted == "diverging":
        trend = (
            f"Logits bounded so far ({s.slope:+.2f} per doubling of steps), but"
            if math.isfinite(s.slope)
            else f"Logit trend not measured yet ({_wait(ctx, t)}), and"
        )
        return (
            f"{trend} {ctx.hard_targets} without weight decay predict diverging logits — "
            "add weight decay or label smoothing."
        )
    if predicted == "unknown" and ctx.reading:
        return "Set-up still being read from the training loss."
    if predicted == "unknown" and ctx.hard_unregularized:
        trend = (
            f"Logits bounded so far ({s.slope:+.2f} per doubling of steps)"
            if math.isfinite(s.slope)
            else f"Logit trend not measured yet ({_wait(ctx, t)})"
        )
        return trend + _UNRECOGNISED.format(alarm=t.logit_slope[1])
    if predicted == "unknown" and ctx.not_classification:
        return _NOT_CLASSIFICATION
    if predicted == "unknown":
        return (
            f"Set-up unknown: with {ctx.hard_targets} and no weight decay the theory "
            f"predicts diverging logits (declare {ctx.to_declare} to tell)."
        )
    if math.isfinite(s.slope):
        return f"Logits bounded ({s.slope:+.2f} per doubling of steps)."
    return f"Logit trend not measured yet ({_wait(ctx, t)}); the set-up predicts bounded logits."
