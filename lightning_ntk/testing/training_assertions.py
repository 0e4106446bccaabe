"""Assertions on training: the kernel stays put (and more so when wider), or the logits diverge.

Each runs a :func:`~lightning_ntk.testing.width_sweep` and returns its result when it
passes, and otherwise raises :class:`AssertionError` with the sweep's report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

from torch import Tensor, nn

from ._checks import check_finite_number, check_nonnegative, check_widths
from ._sweep import WidthSweepResult, width_sweep

__all__ = ["assert_breaks_down", "assert_lazy_scaling", "assert_lazy_training"]


def assert_lazy_training(
    model_factory: Callable[[int], nn.Module],
    data: tuple[Tensor, Tensor],
    *,
    width: int,
    steps: int,
    lr: Union[float, Callable[[int], float]],
    max_relative_change: float = 0.1,
    max_linearization_error: Optional[float] = None,
    **sweep_kwargs: Any,
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
    check_nonnegative("max_relative_change", max_relative_change)
    if max_linearization_error is not None:
        check_nonnegative("max_linearization_error", max_linearization_error)
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
    **sweep_kwargs: Any,
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
    check_widths(widths)
    check_finite_number("max_slope", max_slope)
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
    **sweep_kwargs: Any,
) -> WidthSweepResult:
    """Assert that training leaves the kernel regime: the centered logits keep growing.

    The counterpart of :func:`assert_lazy_training` for degenerate, unregularized
    training (hard one-hot targets, ``weight_decay=0``, cross-entropy; any other set-up
    fails the check, as its logits stay bounded): zero loss needs infinite logits,
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
        AssertionError: with :meth:`WidthSweepResult.report` as the message; also for a
            set-up whose loss has a finite optimum (``label_smoothing > 0``,
            ``weight_decay > 0``, ``loss="mse"`` or soft targets without zeros).
    """
    check_finite_number("min_logit_slope", min_logit_slope)
    if min_logit_growth is not None:
        check_finite_number("min_logit_growth", min_logit_growth)
    widths = [width] if isinstance(width, int) else list(width)
    result = width_sweep(model_factory, widths, data, steps=steps, lr=lr, **sweep_kwargs)
    for cause in _finite_optimum_causes(data, sweep_kwargs):
        text = f"degenerate set-up: {cause} gives the loss a finite optimum (bounded logits)"
        result.checks.append((text, False))
    for w, slope in zip(result.widths, result.mean_logit_step_slope):
        text = f"width {w}: d logit_norm / d ln(step) = {slope:.3f} >= {min_logit_slope:g}"
        result.checks.append((text, bool(slope >= min_logit_slope)))
    if min_logit_growth is not None:
        for w, growth in zip(result.widths, result.mean["logit_growth"]):
            text = f"width {w}: logit_growth = {growth:.3f} >= {min_logit_growth:g}"
            result.checks.append((text, bool(growth >= min_logit_growth)))
    return _raise_unless_passed(result)


def _finite_optimum_causes(data: Any, sweep_kwargs: dict[str, Any]) -> list[str]:
    """What gives the sweep's loss a finite optimum, so that its logits stay bounded.

    Logits growing towards such an optimum look like divergence over a short run; a
    breakdown check passing there would say the opposite of the theory.
    """
    causes = []
    if sweep_kwargs.get("loss", "cross_entropy") == "mse":
        causes.append("loss='mse'")
    for name in ("label_smoothing", "weight_decay"):
        value = sweep_kwargs.get(name, 0.0)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            causes.append(f"{name}={value!r}")
    y = data[1] if isinstance(data, (tuple, list)) and len(data) == 2 else None
    if isinstance(y, Tensor) and y.ndim == 2 and y.is_floating_point() and y.numel():
        if float(y.min()) > 0:
            causes.append(f"soft targets (every class at probability >= {float(y.min()):.3g})")
    return causes


def _check_at_most(result: WidthSweepResult, metric: str, bound: float) -> None:
    for w, value in zip(result.widths, result.mean[metric]):
        result.checks.append((f"width {w}: {metric} = {value:.4g} <= {bound:g}", value <= bound))


def _raise_unless_passed(result: WidthSweepResult) -> WidthSweepResult:
    if not result.passed:
        raise AssertionError(result.report())
    return result
