"""Assertions on kernels and on training.

Each returns a result object when it passes and otherwise raises :class:`AssertionError`
with a diagnostic report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._analytic import NTKMLP, analytic_nngp, analytic_ntk
from ._sweep import (
    SlopeFit,
    WidthSweepResult,
    as_ints,
    build_model,
    expect,
    fit_loglog_slope,
    is_number,
    make_classification_data,
    width_sweep,
)

__all__ = [
    "NTKMLP",
    "ConvergenceResult",
    "KernelComparison",
    "SlopeFit",
    "WidthSweepResult",
    "analytic_nngp",
    "analytic_ntk",
    "assert_breaks_down",
    "assert_converges_to_analytic",
    "assert_lazy_scaling",
    "assert_lazy_training",
    "assert_ntk_close",
    "fit_loglog_slope",
    "make_classification_data",
    "width_sweep",
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
    _check_nonnegative("rtol", rtol)
    _check_nonnegative("atol", atol)
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

    widths = _check_widths(widths)
    seeds = as_ints("seeds", seeds, None)
    if normalize not in _NORMALIZE:
        raise ValueError(f"Expected `normalize` to be one of {_NORMALIZE} but got {normalize!r}.")
    _check_nonnegative("slope_tol", slope_tol)
    if max_error is not None:
        _check_nonnegative("max_error", max_error)
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


def assert_lazy_training(
    model_factory: Callable[[int], nn.Module],
    data: tuple[Tensor, Tensor],
    *,
    width: int,
    steps: int,
    lr: Union[float, Callable[[int], float]],
    max_relative_change: float = 0.1,
    max_linearization_error: Optional[float] = None,
    **sweep_kwargs: object,
) -> WidthSweepResult:
    """Assert that training at ``width`` stays in the kernel regime.

    Checks that the seed-averaged ``relative_change`` of the kernel on the probe is at most
    ``max_relative_change`` and, if given, that the seed-averaged ``linearization_error``
    is at most ``max_linearization_error``.

    Args:
        model_factory: ``width -> nn.Module``.
        data: ``(x, y)`` training data.
        width: the width to train.
        steps: SGD steps.
        lr: learning rate, or a callable ``width -> lr``.
        max_relative_change: bound on the kernel drift.
        max_linearization_error: optional bound on the linearization error.
        **sweep_kwargs: any other argument of :func:`width_sweep` (``loss``,
            ``weight_decay``, ``label_smoothing``, ``seeds``, ``probe``, ``batch_size``, ...).

    Returns:
        The :class:`WidthSweepResult` (when it passed).

    Raises:
        AssertionError: with :meth:`WidthSweepResult.report` as the message.
    """
    _check_nonnegative("max_relative_change", max_relative_change)
    if max_linearization_error is not None:
        _check_nonnegative("max_linearization_error", max_linearization_error)
    result = width_sweep(model_factory, [width], data, steps=steps, lr=lr, **sweep_kwargs)
    _check_at_most(result, "relative_change", max_relative_change)
    if max_linearization_error is not None:
        _check_at_most(result, "linearization_error", max_linearization_error)
    return _raise_unless_passed(result)


def assert_lazy_scaling(
    model_factory: Callable[[int], nn.Module],
    data: tuple[Tensor, Tensor],
    *,
    widths: Sequence[int],
    steps: int,
    lr: Union[float, Callable[[int], float]],
    max_slope: float = -0.25,
    **sweep_kwargs: object,
) -> WidthSweepResult:
    """Assert that the kernel drift shrinks with the width like a power ``≤ max_slope``.

    The log-log slope of the seed-averaged ``relative_change`` against the width must be at
    most ``max_slope`` (the kernel regime predicts ``−1/2``; a network that is not
    approaching a kernel limit gives a slope near 0).

    Args:
        model_factory: ``width -> nn.Module``.
        data: ``(x, y)`` training data.
        widths: at least two distinct widths.
        steps: SGD steps.
        lr: learning rate, or a callable ``width -> lr``.
        max_slope: upper bound on the fitted slope.
        **sweep_kwargs: any other argument of :func:`width_sweep`.

    Returns:
        The :class:`WidthSweepResult` (when it passed).

    Raises:
        AssertionError: with :meth:`WidthSweepResult.report` as the message.
    """
    _check_widths(widths)
    _check_finite_number("max_slope", max_slope)
    result = width_sweep(model_factory, widths, data, steps=steps, lr=lr, **sweep_kwargs)
    fit = result.slopes["relative_change"]
    text = f"slope of relative_change vs width {fit.slope:+.3f} <= {max_slope:+.3f}"
    result.checks.append((text, bool(fit.slope <= max_slope)))
    return _raise_unless_passed(result)


def assert_breaks_down(
    model_factory: Callable[[int], nn.Module],
    data: tuple[Tensor, Tensor],
    *,
    width: Union[int, Sequence[int]],
    steps: int,
    lr: Union[float, Callable[[int], float]],
    min_logit_slope: float = 0.25,
    min_logit_growth: Optional[float] = None,
    **sweep_kwargs: object,
) -> WidthSweepResult:
    """Assert that training leaves the kernel regime: the centered logits keep growing.

    The counterpart of :func:`assert_lazy_training` for degenerate, unregularized
    training (hard one-hot targets, ``weight_decay=0``): zero loss needs infinite logits,
    so the centered logit norm grows without bound, about logarithmically in the steps.
    At each width, the seed-averaged slope of the centered logit norm against
    ``ln(step)`` over the late checkpoints must be at least ``min_logit_slope`` and, if
    given, the seed-averaged ``logit_growth`` at least ``min_logit_growth``.

    Args:
        model_factory: ``width -> nn.Module``.
        data: ``(x, y)`` training data.
        width: a width, or several (breakdown happens at every finite width).
        steps: SGD steps; enough for the training loss to get small.
        lr: learning rate, or a callable ``width -> lr``.
        min_logit_slope: lower bound on ``d logit_norm / d ln(step)``.
        min_logit_growth: optional lower bound on ``logit_norm_T / logit_norm_0``.
        **sweep_kwargs: any other argument of :func:`width_sweep`.

    Returns:
        The :class:`WidthSweepResult` (when it passed).

    Raises:
        AssertionError: with :meth:`WidthSweepResult.report` as the message.
    """
    _check_finite_number("min_logit_slope", min_logit_slope)
    if min_logit_growth is not None:
        _check_finite_number("min_logit_growth", min_logit_growth)
    widths = [width] if isinstance(width, int) else list(width)
    result = width_sweep(model_factory, widths, data, steps=steps, lr=lr, **sweep_kwargs)
    for w, slope in zip(result.widths, result.mean_logit_step_slope):
        text = f"width {w}: d logit_norm / d ln(step) = {slope:.3f} >= {min_logit_slope:g}"
        result.checks.append((text, bool(slope >= min_logit_slope)))
    if min_logit_growth is not None:
        for w, growth in zip(result.widths, result.mean["logit_growth"]):
            text = f"width {w}: logit_growth = {growth:.3f} >= {min_logit_growth:g}"
            result.checks.append((text, bool(growth >= min_logit_growth)))
    return _raise_unless_passed(result)


# ---------------------------------------------------------------------------- helpers


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


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    values = as_ints("widths", widths, 1)
    expect(len(set(values)) >= 2, "widths", "at least two distinct positive ints", widths)
    return tuple(sorted(values))


def _check_nonnegative(name: str, value: object) -> None:
    expect(is_number(value) and value >= 0, name, "a finite float >= 0", value)


def _check_finite_number(name: str, value: object) -> None:
    expect(is_number(value), name, "a finite float", value)


def _check_at_most(result: WidthSweepResult, metric: str, bound: float) -> None:
    for w, value in zip(result.widths, result.mean[metric]):
        result.checks.append((f"width {w}: {metric} = {value:.4g} <= {bound:g}", value <= bound))


def _raise_unless_passed(result: WidthSweepResult) -> WidthSweepResult:
    if not result.passed:
        raise AssertionError(result.report())
    return result
