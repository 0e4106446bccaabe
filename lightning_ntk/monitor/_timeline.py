"""The run's diagnosis: the regimes of its reports strung together, with their figures.

``"lazy until step 16; feature learning 16–256, kernel aligning with the labels (target
alignment 0.21 → 0.48); locally linear from 256; logits bounded (+0.05 per doubling of
steps)"``. Consecutive reports of one regime form a segment; a segment runs from its
first report to the first report of the next one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._verdict import (
    CAUSE_GROWING,
    CAUSE_LOGITS,
    DIVERGING,
    FEATURE_LEARNING,
    LAZY,
    LOCALLY_LINEAR,
    Thresholds,
)

__all__ = ["timeline"]


def timeline(
    reports: Sequence[Any],
    thresholds: Thresholds,
    initial_alignment: float = math.nan,
    trend_wait: str = "",
) -> str:
    """One line: each regime of the run with its steps and figures, then the logits.

    Args:
        reports: the run's :class:`~lightning_ntk.NTKReport` objects, oldest first.
        thresholds: the tracker's thresholds (for the logit trend's first step).
        initial_alignment: target alignment of ``Θ0`` (where the first segment starts).
        trend_wait: when the logit trend is read, in words, while it is not (``""``: the
            reports it needs).

    Returns:
        The diagnosis; ``"no report yet"`` for an empty run.
    """
    if not reports:
        return "no report yet"
    segments: list[list[Any]] = []
    for report in reports:
        if segments and segments[-1][0].regime == report.regime:
            segments[-1].append(report)
        else:
            segments.append([report])
    parts = []
    for i, segment in enumerate(segments):
        before = segments[i - 1][-1].target_alignment if i else initial_alignment
        end = segments[i + 1][0].step if i + 1 < len(segments) else None
        parts.append(_segment(segment, i == 0, end, before))
    if reports[-1].regime != DIVERGING:
        parts.append(_logits(reports, thresholds, trend_wait))
    return "; ".join(parts)


def _segment(reports: Sequence[Any], first: bool, end: Any, alignment_before: float) -> str:
    regime = reports[0].regime or "unknown"
    start = reports[0].step
    if end is None and first:
        last = reports[-1].step
        span = f"at step {start}" if len(reports) == 1 else f"throughout (steps {start}–{last})"
    elif end is None:
        span = f"from step {start}"
    elif first:
        span = f"until step {end}"
    else:
        span = f"{start}–{end}"
    figures = _figures(regime, reports, alignment_before)
    return f"{regime} {span}" + (f", {figures}" if figures else "")


def _figures(regime: str, reports: Sequence[Any], alignment_before: float) -> str:
    if regime == LAZY:
        worst = max((r.linearization_error for r in reports), key=_finite_key)
        return f"linearization error ≤ {worst:.2f}" if math.isfinite(worst) else ""
    if regime == LOCALLY_LINEAR:
        worst = max((r.local_linearization_error for r in reports), key=_finite_key)
        return f"local linearization error ≤ {worst:.2f}" if math.isfinite(worst) else ""
    if regime == FEATURE_LEARNING:
        out = []
        speeds = [r.kernel_velocity for r in reports if math.isfinite(r.kernel_velocity)]
        if speeds:
            path = [speeds[0], max(speeds), speeds[-1]]  # first, peak, last
            if path[1] in (path[0], path[2]):
                path.pop(1)
            if len(speeds) == 1:
                path = path[:1]
            figures = " → ".join(f"{v:.2f}" for v in path)
            out.append(f"kernel velocity {figures} per doubling of steps")
        before, now = alignment_before, reports[-1].target_alignment
        if not math.isfinite(before):
            before = reports[0].target_alignment
        if math.isfinite(before) and math.isfinite(now) and abs(now - before) > 0.01:
            way = "aligning with" if now > before else "moving away from"
            out.append(f"kernel {way} the labels (target alignment {before:.2f} → {now:.2f})")
        return ", ".join(out)
    if regime == DIVERGING:
        slopes = [r.logit_slope for r in reports if math.isfinite(r.logit_slope)]
        if slopes:
            return f"logit norm {slopes[-1]:+.2f} per doubling of steps"
    return ""


def _logits(reports: Sequence[Any], thresholds: Thresholds, trend_wait: str) -> str:
    growing = [r for r in reports if CAUSE_GROWING in r.causes or CAUSE_LOGITS in r.causes]
    last = reports[-1]
    if growing and (CAUSE_GROWING in last.causes or CAUSE_LOGITS in last.causes):
        return (
            f"logits growing from step {growing[0].step} ({last.logit_slope:+.2f} per "
            "doubling of steps)"
        )
    rising = last.logit_slope >= thresholds.logit_slope[0]
    if rising and math.isfinite(last.logit_optimum):
        # rising, yet no finding: short of the finite optimum the targets allow
        return (
            f"logits converging on the optimum the targets allow (norm "
            f"{last.logit_norm:.2f} against {last.logit_optimum:.2f}, "
            f"{last.logit_slope:+.2f} per doubling of steps)"
        )
    if math.isfinite(last.logit_slope):
        return f"logits bounded ({last.logit_slope:+.2f} per doubling of steps)"
    wait = trend_wait or f"it needs two reports from step {thresholds.min_trend_step}"
    return f"logit trend not measured yet ({wait}; logit norm ×{last.logit_growth:.2f} since θ0)"


def _finite_key(value: float) -> float:
    return value if math.isfinite(value) else -math.inf
