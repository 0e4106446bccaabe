"""Assertions on kernels: close to a reference, converging to the analytic limit.

Each returns a result object when it passes and otherwise raises :class:`AssertionError`
with a diagnostic report (failing entries, ratios, tolerances, fitted slopes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._analytic import NTKMLP
from ._checks import as_ints, check_nonnegative, check_widths
from ._slopes import SlopeFit, fit_loglog_slope
from ._train import build_model

__all__ = [
    "ConvergenceResult",
    "KernelComparison",
    "assert_converges_to_analytic",
    "assert_ntk_close",
]


_NORMALIZE = ("auto", "none", "width")


@dataclass
class KernelComparison:
    """Entrywise comparison of a kernel ``K`` with a reference ``K_ref``.

    Attributes:
        passed: every entry satisfies ``|K − K_ref| ≤ atol + rtol·|K_ref|`` (NaN fails).
        num_failed: number of entries that do not; ``num_entries``: all entries.
        max_abs_error: ``max |K − K_ref|``.
        relative_error: ``‖K − K_ref‖_F / ‖K_ref‖_F``.
        rtol, atol: the tolerances used.
        worst: up to ``num_worst`` entries with the largest excess over their tolerance,
            as ``(index, K, K_ref, ratio K/K_ref, |K − K_ref|, allowed)``.
        shape: the kernels' common shape.
    """

    passed: bool
    num_failed: int
    num_entries: int
    max_abs_error: float
    relative_error: float
    rtol: float
    atol: float
    shape: tuple[int, ...]
    worst: list[tuple[tuple[int, ...], float, float, float, float, float]] = field(
        default_factory=list
    )

    def report(self) -> str:
        """A multi-line diagnostic of the comparison."""
        head = (
            f"kernels {'match' if self.passed else 'differ'}: {self.num_failed} of "
            f"{self.num_entries} entries outside |K - K_ref| <= atol + rtol*|K_ref| "
            f"(rtol={self.rtol:g}, atol={self.atol:g}); shape {self.shape}; "
            f"max |K - K_ref| = {self.max_abs_error:.4g}; "
            f"relative Frobenius error = {self.relative_error:.4g}"
        )
        if not self.worst:
            return head
        rows = [
            f"  {idx!s:<18} {k:>12.6g} {ref:>12.6g} {ratio:>9.4f} {err:>11.4g} {allowed:>11.4g}"
            for idx, k, ref, ratio, err, allowed in self.worst
        ]
        title = (
            f"  {'index':<18} {'K':>12} {'K_ref':>12} {'K/K_ref':>9} {'|K-K_ref|':>11} "
            f"{'allowed':>11}"
        )
        return "\n".join([head, "worst entries:", title, *rows])


@dataclass
class ConvergenceResult:
    """Distance of empirical kernels from their infinite-width limit, per width and seed.

    Attributes:
        widths: the widths ``(W,)``.
        seeds: the seeds ``(S,)``.
        errors: ``errors[w][s] = ‖K_w,s − K_∞‖_F / ‖K_∞‖_F``, nested tuples ``(W, S)``.
        mean_errors: mean over seeds, ``(W,)``.
        slope: log-log fit of the error against the width (see :class:`SlopeFit`).
        expected_slope, slope_tol, max_error: what was asserted (``max_error`` is the
            bound on the mean error at the largest width, or ``None``).
        failures: the reasons the assertion failed (empty when it passed).
    """

    widths: tuple[int, ...]
    seeds: tuple[int, ...]
    errors: tuple[tuple[float, ...], ...]
    mean_errors: tuple[float, ...]
    slope: SlopeFit
    expected_slope: float
    slope_tol: float
    max_error: Optional[float]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No failure."""
        return not self.failures

    def report(self) -> str:
        """A multi-line diagnostic: the error table and the fitted slope."""
        lines = [
            "empirical NTK -> analytic NTK: "
            + ("converges" if self.passed else "; ".join(self.failures)),
            f"  {'width':>7} {'mean rel. error':>16}  per seed {self.seeds}",
        ]
        for width, mean, per_seed in zip(self.widths, self.mean_errors, self.errors):
            seeds = ", ".join(f"{e:.4f}" for e in per_seed)
            lines.append(f"  {width:>7} {mean:>16.4f}  [{seeds}]")
        lines.append(
            f"  fitted slope of log(error) vs log(width): {self.slope.describe()}; "
            f"expected {self.expected_slope:+.3f} ± {self.slope_tol:.3f}"
        )
        return "\n".join(lines)


def assert_ntk_close(
    K: Tensor,
    K_ref: Tensor,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    *,
    num_worst: int = 5,
) -> KernelComparison:
    """Assert ``|K − K_ref| ≤ atol + rtol·|K_ref|`` entrywise, with a diagnostic report.

    The test is that of :func:`torch.isclose`; NaN or inf entries fail. Comparisons are
    made in float64.

    Args:
        K: a kernel in any layout, e.g. ``(N1, N2)`` or ``(N1, N2, C, C)``.
        K_ref: the reference kernel, same shape.
        rtol: relative tolerance ``>= 0``.
        atol: absolute tolerance ``>= 0``, in the kernel's units.
        num_worst: how many of the worst entries the report lists.

    Returns:
        The :class:`KernelComparison` (when it passed).

    Raises:
        AssertionError: some entries differ (the message is :meth:`KernelComparison.report`)
            or the shapes differ.
        TypeError / ValueError: bad arguments.
    """
    for name, value in (("K", K), ("K_ref", K_ref)):
        if not isinstance(value, Tensor):
            raise TypeError(
                f"Expected `{name}` to be a torch.Tensor but got {type(value).__name__}."
            )
    check_nonnegative("rtol", rtol)
    check_nonnegative("atol", atol)
    if K.shape != K_ref.shape:
        raise AssertionError(
            f"kernel shapes differ: K has shape {tuple(K.shape)}, K_ref has {tuple(K_ref.shape)}"
        )
    comparison = _compare(K, K_ref, float(rtol), float(atol), num_worst)
    if not comparison.passed:
        raise AssertionError(comparison.report())
    return comparison


def assert_converges_to_analytic(
    model_factory: Callable[[int], nn.Module],
    widths: Sequence[int],
    x: Tensor,
    K_inf: Union[Tensor, Callable[[Tensor], Tensor], None] = None,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    normalize: str = "auto",
    expected_slope: float = -0.5,
    slope_tol: float = 0.25,
    max_error: Optional[float] = None,
    method: str = "auto",
) -> ConvergenceResult:
    """Assert that the empirical trace NTK tends to its infinite-width limit like ``1/√n``.

    For each width ``n`` and seed, ``model_factory(n)`` is built under
    ``torch.manual_seed(seed)`` (the global RNG is restored afterwards) and its trace NTK
    ``K_n = empirical_ntk(model, x, output="trace")`` compared with ``K_∞`` by
    ``e = ‖K_n − K_∞‖_F / ‖K_∞‖_F``. Finite-width fluctuations of the NTK are
    ``O(1/√n)``, so ``log(mean_seeds e)`` against ``log n`` has slope ``−1/2``.

    Args:
        model_factory: ``width -> nn.Module`` returning ``(N, C)`` logits.
        widths: at least two distinct positive widths.
        x: probe inputs ``(N, ...)``.
        K_inf: the limit ``(N, N)``, or a callable ``x -> K_inf``; ``None`` requires the
            factory to build :class:`NTKMLP` and uses its :meth:`NTKMLP.analytic_ntk`.
        seeds: initialisation seeds; the error is averaged over them.
        normalize: ``"none"`` compares ``K_n``; ``"width"`` compares ``K_n / n`` (the
            standard parameterization); ``"auto"`` means ``"width"`` for a standard
            :class:`NTKMLP` and ``"none"`` otherwise.
        expected_slope: the expected log-log slope (``−0.5``).
        slope_tol: the fitted slope (of the seed-averaged error) must lie within
            ``expected_slope ± slope_tol``.
        max_error: optional bound on the mean error at the largest width.
        method: kernel method passed to :func:`lightning_ntk.empirical_ntk`.

    Returns:
        The :class:`ConvergenceResult` (when it passed).

    Raises:
        AssertionError: with :meth:`ConvergenceResult.report` as the message.
    """
    from ..kernel import empirical_ntk

    widths = check_widths(widths)
    seeds = as_ints("seeds", seeds, None)
    if normalize not in _NORMALIZE:
        raise ValueError(f"Expected `normalize` to be one of {_NORMALIZE} but got {normalize!r}.")
    check_nonnegative("slope_tol", slope_tol)
    if max_error is not None:
        check_nonnegative("max_error", max_error)
    reference = K_inf if isinstance(K_inf, Tensor) else None
    errors = []
    for width in widths:
        row = []
        for seed in seeds:
            model = build_model(model_factory, width, seed)
            if reference is None:
                reference = _reference_kernel(model, x, K_inf)
            K = empirical_ntk(model, x, output="trace", method=method).detach()
            if _divides_by_width(model, normalize):
                K = K / width
            ref = reference.to(device=K.device, dtype=torch.float64)
            if K.shape != ref.shape:
                raise ValueError(
                    f"Expected `K_inf` to have the trace-kernel shape {tuple(K.shape)} but got "
                    f"{tuple(ref.shape)}."
                )
            row.append(float(torch.linalg.norm(K.double() - ref) / torch.linalg.norm(ref)))
        errors.append(tuple(row))
    mean_errors = tuple(sum(row) / len(row) for row in errors)
    slope = fit_loglog_slope(widths, [list(col) for col in zip(*errors)])
    failures = []
    if not abs(slope.slope - expected_slope) <= slope_tol:
        failures.append(
            f"error decays with slope {slope.slope:+.3f}, outside "
            f"{expected_slope:+.3f} ± {slope_tol:.3f}"
        )
    if max_error is not None and not mean_errors[-1] <= max_error:
        failures.append(
            f"mean error {mean_errors[-1]:.4f} at width {widths[-1]} exceeds {max_error:g}"
        )
    result = ConvergenceResult(
        widths=widths,
        seeds=seeds,
        errors=tuple(errors),
        mean_errors=mean_errors,
        slope=slope,
        expected_slope=float(expected_slope),
        slope_tol=float(slope_tol),
        max_error=max_error,
        failures=failures,
    )
    if failures:
        raise AssertionError(result.report())
    return result


def _compare(
    K: Tensor, K_ref: Tensor, rtol: float, atol: float, num_worst: int
) -> KernelComparison:
    k = K.detach().to("cpu", torch.float64)
    ref = K_ref.detach().to("cpu", torch.float64)
    abs_err = (k - ref).abs()
    allowed = atol + rtol * ref.abs()
    excess = torch.where(torch.isfinite(abs_err), abs_err - allowed, torch.inf)
    failed = excess > 0
    ref_norm = float(torch.linalg.norm(ref))
    diff_norm = float(torch.linalg.norm(k - ref))
    relative = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    worst = []
    num_failed = int(failed.sum())
    if num_failed:
        flat = excess.flatten()
        order = torch.argsort(flat, descending=True)[: min(num_worst, num_failed)]
        for position in order.tolist():
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(position), k.shape))
            value, target = float(k[index]), float(ref[index])
            ratio = value / target if target != 0 else math.inf
            worst.append(
                (index, value, target, ratio, float(abs_err[index]), float(allowed[index]))
            )
    return KernelComparison(
        passed=num_failed == 0,
        num_failed=num_failed,
        num_entries=k.numel(),
        max_abs_error=float(abs_err.max()) if k.numel() else 0.0,
        relative_error=relative,
        rtol=rtol,
        atol=atol,
        shape=tuple(k.shape),
        worst=worst,
    )


def _reference_kernel(
    model: nn.Module, x: Tensor, K_inf: Union[Callable[[Tensor], Tensor], None]
) -> Tensor:
    if K_inf is None:
        if not isinstance(model, NTKMLP):
            raise TypeError(
                "Expected `K_inf` (a kernel or a callable x -> kernel) when `model_factory` "
                f"does not build an NTKMLP, but it built a {type(model).__name__}."
            )
        return model.analytic_ntk(x)
    if not callable(K_inf):
        raise TypeError(
            f"Expected `K_inf` to be a tensor, a callable or None but got {type(K_inf).__name__}."
        )
    return K_inf(x)


def _divides_by_width(model: nn.Module, normalize: str) -> bool:
    if normalize == "auto":
        return isinstance(model, NTKMLP) and model.parameterization == "standard"
    return normalize == "width"
