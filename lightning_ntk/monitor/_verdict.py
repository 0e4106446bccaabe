"""From measured drift to a verdict, its causes and one sentence with the reason and the fix.

Two findings are kept apart because they have different causes and remedies:

* **logits diverging** — the mean centered logit norm keeps growing linearly in
  ``log(step)``. Cross-entropy with hard one-hot targets and no regularization has no
  finite minimiser: the margin grows like ``log t``, i.e. by a constant amount per
  doubling of steps (≈ ``ln 2 · √((C−1)/C)`` at the very least). The signal is the
  least-squares slope of ``logit_norm`` against ``log2(step)`` over the reports in the
  last ``trend_octaves`` doublings of steps. Fix: weight decay or label smoothing.
* **kernel moving** — ``relative_change = ‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F`` is large although the
  logits may well converge: finite-width feature learning (standard parameterization,
  narrow layers) or a large learning rate. Fix: wider layers, NTK parameterization, a
  smaller learning rate — or accept that the model is not in the kernel regime.

A third signal, ``linearization_error``, says directly how far the model is from its
linearization ``f_lin``; it is large whenever either finding has gone far.

Each signal has a *drift* and a *break* threshold; the verdict is the worst level:
``"lazy"`` (below every drift threshold), ``"drifting"``, ``"broken"``. Default values
and the measurements behind them: ``docs/verdicts.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

VERDICTS = ("lazy", "drifting", "broken")
LAZY_SCORE = {"lazy": 1.0, "drifting": 0.5, "broken": 0.0}

CAUSE_LOGITS = "logits diverging"
CAUSE_KERNEL = "kernel moving"
CAUSE_LINEARIZATION = "linearization error"
CAUSE_NONFINITE = "non-finite logits"


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
    """

    relative_change: tuple[float, float] = (0.1, 0.5)
    linearization_error: tuple[float, float] = (0.2, 0.5)
    logit_slope: tuple[float, float] = (0.5, 0.8)
    trend_octaves: float = 2.0
    min_trend_step: int = 100

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
        if not self.trend_octaves > 0:
            raise ValueError(
                f"Expected `trend_octaves` to be positive but got {self.trend_octaves!r}."
            )


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


def diagnose(
    *,
    relative_change: float,
    linearization_error: float,
    slope: float,
    finite: bool,
    thresholds: Thresholds,
    predicted_regime: str,
) -> Diagnosis:
    """Verdict, causes and message from the signals of one report.

    Args:
        relative_change: kernel drift ``‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F``.
        linearization_error: ``‖f − f_lin‖_F / ‖f − f_0‖_F``.
        slope: logit-norm growth per doubling of steps (``nan`` when not yet known).
        finite: whether the logits on the probe were finite.
        thresholds: the drift / break thresholds.
        predicted_regime: ``"lazy"``, ``"divergent"`` or ``"unknown"`` from the set-up.
    """
    if not finite:
        return Diagnosis(
            "broken",
            [CAUSE_NONFINITE],
            "The logits on the probe set are not finite: training has diverged — lower the "
            "learning rate.",
        )
    levels = {
        CAUSE_LOGITS: _level(slope, thresholds.logit_slope),
        CAUSE_KERNEL: _level(relative_change, thresholds.relative_change),
        CAUSE_LINEARIZATION: _level(linearization_error, thresholds.linearization_error),
    }
    worst = max(levels.values())
    verdict = VERDICTS[worst]
    causes = [cause for cause, level in levels.items() if level > 0]
    if not causes:
        return Diagnosis(verdict, [], _lazy_message(predicted_regime))
    return Diagnosis(
        verdict, causes, _message(verdict, levels, slope, relative_change, predicted_regime)
    )


def _level(value: Optional[float], pair: tuple[float, float]) -> int:
    if value is None or not math.isfinite(value):
        return 0
    return 2 if value >= pair[1] else 1 if value >= pair[0] else 0


def _lazy_message(predicted: str) -> str:
    if predicted == "divergent":
        return (
            "Training is in the kernel regime so far, but hard one-hot targets without weight "
            "decay predict diverging logits later — add weight decay or label smoothing to "
            "stay there."
        )
    return "Training is in the kernel (lazy) regime: the NTK and the logits are stable."


def _message(verdict: str, levels: dict[str, int], slope: float, rc: float, predicted: str) -> str:
    state = "has left" if verdict == "broken" else "is drifting from"
    parts = []
    if levels[CAUSE_LOGITS]:
        if predicted == "divergent":
            parts.append(
                f"logits diverging (+{slope:.2f} centered logit norm per doubling of steps): "
                "hard one-hot targets and no weight decay, so the logits must diverge — add "
                "weight decay or label smoothing"
            )
        else:
            parts.append(
                f"logits diverging (+{slope:.2f} centered logit norm per doubling of steps) "
                "although the set-up predicts bounded logits: the regularization is too weak "
                "to act yet (its equilibrium takes ~1/(lr·λ) steps) or the targets are nearly "
                "hard — increase weight decay or label smoothing"
            )
    if levels[CAUSE_KERNEL]:
        lead = "and the kernel is moving" if levels[CAUSE_LOGITS] else "kernel moving"
        if predicted == "lazy":
            reason = (
                " although the set-up predicts lazy training: the network is far from the "
                "wide limit (width, parameterization) or the learning rate is large"
            )
        else:
            reason = ": finite-width feature learning or a large learning rate"
        parts.append(
            f"{lead} (relative change {rc:.2f}){reason} — widen the layers or lower the "
            "learning rate"
        )
    if not parts:  # only the linearization error crossed its threshold
        parts.append(
            "the model's outputs no longer match its linearization around θ0 (large "
            "learning rate or narrow layers) — lower the learning rate or widen the layers"
        )
    return f"Training {state} the kernel regime: " + "; ".join(parts) + "."
