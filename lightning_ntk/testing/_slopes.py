"""Power-law fits across widths: the log-log slope of a metric, with a confidence interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SlopeFit", "fit_loglog_slope", "line_fit"]


# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30; 1.96 beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


@dataclass
class SlopeFit:
    """Least-squares slope of ``log y`` against ``log x`` (a power law ``y ∝ x^slope``).

    Attributes:
        slope: slope fitted to the seed-averaged values ``log(mean_s y_s)``; NaN when it
            cannot be fitted (fewer than two distinct ``x``, or a value ``<= 0``).
        intercept: its intercept (natural logs).
        seed_slopes: the slope fitted to each seed's values on its own.
        ci_low, ci_high: 95% Student-t interval for the mean of ``seed_slopes``
            (NaN with a single seed).
    """

    slope: float
    intercept: float
    seed_slopes: tuple[float, ...]
    ci_low: float
    ci_high: float

    @property
    def seed_mean(self) -> float:
        """Mean of the per-seed slopes."""
        finite = [s for s in self.seed_slopes if math.isfinite(s)]
        return sum(finite) / len(finite) if finite else math.nan

    def describe(self) -> str:
        """``"-0.48 (per seed -0.45, 95% CI [-0.62, -0.28], 3 seeds)"``.

        Without an interval (a single seed with a finite slope): ``"-0.48 (1 seed, no
        confidence interval)"``.
        """
        seeds = len(self.seed_slopes)
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            count = f"{seeds} seed" if seeds == 1 else f"{seeds} seeds"
            return f"{self.slope:+.3f} ({count}, no confidence interval)"
        return (
            f"{self.slope:+.3f} (per seed {self.seed_mean:+.3f}, 95% CI "
            f"[{self.ci_low:+.3f}, {self.ci_high:+.3f}], {seeds} seeds)"
        )


def fit_loglog_slope(x: Sequence[float], values_per_seed: Sequence[Sequence[float]]) -> SlopeFit:
    """Fit ``log y = intercept + slope · log x``, pooled and per seed.

    Args:
        x: the abscissae ``(W,)`` (e.g. widths), positive.
        values_per_seed: ``(S, W)`` positive values, one row per seed.

    Returns:
        A :class:`SlopeFit`.
    """
    rows = [list(map(float, row)) for row in values_per_seed]
    if not rows or any(len(row) != len(x) for row in rows):
        raise ValueError(
            f"Expected `values_per_seed` to hold rows of {len(x)} values (one per x) but got "
            f"{values_per_seed!r}."
        )
    log_x = [math.log(float(v)) if v > 0 else math.nan for v in x]
    means = [sum(column) / len(column) for column in zip(*rows)]
    slope, intercept = line_fit(log_x, [_log(v) for v in means])
    seed_slopes = tuple(line_fit(log_x, [_log(v) for v in row])[0] for row in rows)
    finite = [s for s in seed_slopes if math.isfinite(s)]
    ci_low = ci_high = math.nan
    if len(finite) >= 2:
        mean = sum(finite) / len(finite)
        sd = math.sqrt(sum((s - mean) ** 2 for s in finite) / (len(finite) - 1))
        df = len(finite) - 1
        half = (_T975[df - 1] if df <= len(_T975) else 1.96) * sd / math.sqrt(len(finite))
        ci_low, ci_high = mean - half, mean + half
    return SlopeFit(slope, intercept, seed_slopes, ci_low, ci_high)


def line_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)``; NaN when undetermined or a value is not finite."""
    if len(xs) < 2 or not all(math.isfinite(v) for v in [*xs, *ys]):
        return math.nan, math.nan
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    if sxx == 0:
        return math.nan, math.nan
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def _log(value: float) -> float:
    return math.log(value) if value > 0 and math.isfinite(value) else math.nan
