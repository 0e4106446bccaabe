"""Width sweeps: train a family of networks of growing width and measure how lazy they stay.

For each width ``n`` and seed, :func:`width_sweep` builds ``model_factory(n)`` under
``torch.manual_seed(seed)``, records on a probe batch ``X`` the kernel ``Θ_0``, the
linearization ``f_lin`` at ``θ_0`` and the initial logits ``f_0``, trains with SGD for
``steps`` steps, and measures

* ``relative_change = ‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F`` (kernel drift),
* ``linearization_error = ‖f_t − f_lin,t‖_F / ‖f_t − f_0‖_F`` (how much of the function's
  change the linearized model misses),
* ``logit_growth = logit_norm(f_t) / logit_norm(f_0)`` with ``logit_norm`` the mean norm
  of the centered logits ``f − mean_a f_a`` (softmax ignores the mean),

and the centered logit norm at log-spaced checkpoints, whose slope against ``log(step)``
separates the regimes of the paper: it goes to 0 when the logits settle (weight decay,
label smoothing) and stays positive when they diverge (hard targets, no regularization;
about ``1/ln 2`` per unit of ``ln(step)``, i.e. +1 per doubling of the steps, in the
measurements of DESIGN §6).

Across widths, each metric gets a log-log slope (:func:`fit_loglog_slope`). In the kernel
regime the drift shrinks like ``1/√n`` (slope ``−1/2``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernel._layout import check_output

__all__ = [
    "LOSSES",
    "SWEEP_METRICS",
    "SlopeFit",
    "WidthSweepResult",
    "assert_breaks_down",
    "assert_lazy_scaling",
    "assert_lazy_training",
    "fit_loglog_slope",
    "make_classification_data",
    "width_sweep",
]

LOSSES = ("cross_entropy", "mse")
SWEEP_METRICS = ("relative_change", "linearization_error", "logit_growth")

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
        """``"-0.48 (per seed -0.45, 95% CI [-0.62, -0.28], 3 seeds)"``."""
        return (
            f"{self.slope:+.3f} (per seed {self.seed_mean:+.3f}, 95% CI "
            f"[{self.ci_low:+.3f}, {self.ci_high:+.3f}], {len(self.seed_slopes)} seeds)"
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
    slope, intercept = _line(log_x, [_log(v) for v in means])
    seed_slopes = tuple(_line(log_x, [_log(v) for v in row])[0] for row in rows)
    finite = [s for s in seed_slopes if math.isfinite(s)]
    ci_low = ci_high = math.nan
    if len(finite) >= 2:
        mean = sum(finite) / len(finite)
        sd = math.sqrt(sum((s - mean) ** 2 for s in finite) / (len(finite) - 1))
        df = len(finite) - 1
        half = (_T975[df - 1] if df <= len(_T975) else 1.96) * sd / math.sqrt(len(finite))
        ci_low, ci_high = mean - half, mean + half
    return SlopeFit(slope, intercept, seed_slopes, ci_low, ci_high)


def make_classification_data(
    num_examples: int = 32,
    in_features: int = 8,
    num_classes: int = 4,
    *,
    seed: int = 0,
    separation: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """A small seeded classification batch: Gaussian clusters around random class means.

    ``x_i = separation · μ_{y_i} + ε_i`` with ``μ_c, ε_i ~ N(0, I_d)``; the labels are
    balanced (``i mod C``, shuffled). The global RNG is not touched.

    Args:
        num_examples: ``N >= num_classes``.
        in_features: ``d >= 1``.
        num_classes: ``C >= 2``.
        seed: seed of the private generator.
        separation: scale of the class means ``>= 0``.
        dtype: floating dtype of ``x``.

    Returns:
        ``(x, y)``: inputs ``(N, d)`` and integer labels ``(N,)``.
    """
    for name, value, minimum in (("num_classes", num_classes, 2), ("in_features", in_features, 1)):
        if not (_is_int(value) and value >= minimum):
            raise ValueError(f"Expected `{name}` to be an int >= {minimum} but got {value!r}.")
    if not (_is_int(num_examples) and num_examples >= num_classes):
        raise ValueError(
            f"Expected `num_examples` to be an int >= num_classes ({num_classes}) but got "
            f"{num_examples!r}."
        )
    generator = torch.Generator().manual_seed(int(seed))
    means = torch.randn(num_classes, in_features, generator=generator, dtype=torch.float64)
    y = torch.arange(num_examples) % num_classes
    y = y[torch.randperm(num_examples, generator=generator)]
    noise = torch.randn(num_examples, in_features, generator=generator, dtype=torch.float64)
    x = float(separation) * means[y] + noise
    return x.to(dtype), y


@dataclass
class WidthSweepResult:
    """What :func:`width_sweep` measured, and what an assertion made of it.

    Attributes:
        widths: ``(W,)``; seeds: ``(S,)``; checkpoints: the steps ``(T,)`` at which the
            centered logit norm was recorded.
        values: ``{metric: ((value per seed) per width)}``, nested tuples ``(W, S)``, for
            each of :data:`SWEEP_METRICS`.
        mean: ``{metric: (mean over seeds per width)}``, ``(W,)``.
        slopes: ``{metric: SlopeFit}`` against the width (NaN slopes with one width).
        logit_norms: centered logit norms ``(W, S, T)`` at the checkpoints.
        logit_step_slopes: slope of the logit norm against ``ln(step)`` over the late
            checkpoints (``step >= steps/8``), ``(W, S)``.
        final_loss: training loss at the last step, ``(W, S)``.
        settings: the training settings, for the report.
        checks: what an assertion compared (``(description, passed)`` lines).
    """

    widths: tuple[int, ...]
    seeds: tuple[int, ...]
    checkpoints: tuple[int, ...]
    values: dict[str, tuple[tuple[float, ...], ...]]
    mean: dict[str, tuple[float, ...]]
    slopes: dict[str, SlopeFit]
    logit_norms: tuple[tuple[tuple[float, ...], ...], ...]
    logit_step_slopes: tuple[tuple[float, ...], ...]
    final_loss: tuple[tuple[float, ...], ...]
    settings: dict[str, object]
    checks: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every recorded check passed."""
        return all(ok for _, ok in self.checks)

    @property
    def mean_logit_step_slope(self) -> tuple[float, ...]:
        """Mean over seeds of :attr:`logit_step_slopes`, per width."""
        return tuple(sum(row) / len(row) for row in self.logit_step_slopes)

    def report(self) -> str:
        """A multi-line table of the sweep, the fitted slopes and the checks."""
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        head = f"{'width':>7} {'rel. change':>12} {'lin. error':>11} {'logit growth':>13} "
        head += f"{'d|f|/dln t':>11} {'final loss':>11}"
        lines = [f"width sweep ({settings}; seeds {self.seeds})", "  " + head]
        for i, width in enumerate(self.widths):
            rc, le, lg = (self.mean[m][i] for m in SWEEP_METRICS)
            loss = sum(self.final_loss[i]) / len(self.final_loss[i])
            lines.append(
                f"  {width:>7} {rc:>12.4g} {le:>11.4g} {lg:>13.4g} "
                f"{self.mean_logit_step_slope[i]:>11.3f} {loss:>11.4g}"
            )
        if len(self.widths) >= 2:
            lines.append("  log-log slope vs width:")
            lines.extend(f"    {m}: {self.slopes[m].describe()}" for m in SWEEP_METRICS)
        lines.extend(f"  [{'ok' if ok else 'FAILED'}] {text}" for text, ok in self.checks)
        return "\n".join(lines)


def width_sweep(
    model_factory: Callable[[int], nn.Module],
    widths: Sequence[int],
    data: tuple[Tensor, Tensor],
    *,
    steps: int,
    lr: float,
    loss: str = "cross_entropy",
    weight_decay: float = 0.0,
    label_smoothing: float = 0.0,
    seeds: Sequence[int] = (0, 1, 2),
    probe: Optional[Tensor] = None,
    batch_size: Optional[int] = None,
    num_checkpoints: int = 8,
    kernel_output: str = "trace",
    method: str = "auto",
) -> WidthSweepResult:
    """Train ``model_factory(width)`` for each width and seed; measure how lazy it stays.

    Training is plain SGD (``torch.optim.SGD(lr, weight_decay)``, i.e. weight decay
    towards 0) on ``data``, full batch or in mini-batches drawn by a generator seeded
    with the seed; the model is in train mode while training and evaluated in eval mode.

    Args:
        model_factory: ``width -> nn.Module`` mapping ``(N, ...)`` inputs to ``(N, C)``
            logits; called under ``torch.manual_seed(seed)`` (global RNG restored after).
        widths: one or more positive widths.
        data: ``(x, y)`` with ``x`` ``(N, ...)`` and ``y`` integer labels ``(N,)`` or soft
            targets ``(N, C)``.
        steps: SGD steps ``>= 1``.
        lr: learning rate ``> 0``.
        loss: ``"cross_entropy"`` or ``"mse"`` (squared error to the one-hot / soft targets,
            summed over classes, averaged over examples).
        weight_decay: ``λ >= 0``.
        label_smoothing: ``ε ∈ [0, 1)``: targets ``(1 − ε) y + ε/C``.
        seeds: initialisation (and mini-batch) seeds.
        probe: inputs on which kernels and logits are measured; ``None``: the first (up
            to) 32 training inputs.
        batch_size: mini-batch size; ``None`` for full-batch training.
        num_checkpoints: log-spaced steps at which the centered logit norm is recorded.
        kernel_output: kernel layout for ``relative_change`` (``"trace"``, ``"diagonal"``
            or ``"full"``).
        method: kernel method for :func:`lightning_ntk.empirical_ntk`.

    Returns:
        A :class:`WidthSweepResult`.
    """
    config = _SweepConfig.check(
        model_factory, widths, data, steps, lr, loss, weight_decay, label_smoothing, seeds,
        probe, batch_size, num_checkpoints, kernel_output, method,
    )  # fmt: skip
    runs = {(w, s): _train_one(config, w, s) for w in config.widths for s in config.seeds}
    values = {
        metric: tuple(tuple(runs[w, s][metric] for s in config.seeds) for w in config.widths)
        for metric in SWEEP_METRICS
    }
    mean = {metric: tuple(sum(row) / len(row) for row in rows) for metric, rows in values.items()}
    slopes = {
        metric: fit_loglog_slope(config.widths, [list(col) for col in zip(*rows)])
        for metric, rows in values.items()
    }

    def per_run(key: str) -> tuple:
        return tuple(tuple(runs[w, s][key] for s in config.seeds) for w in config.widths)

    return WidthSweepResult(
        widths=config.widths,
        seeds=config.seeds,
        checkpoints=config.checkpoints,
        values=values,
        mean=mean,
        slopes=slopes,
        logit_norms=per_run("logit_norms"),
        logit_step_slopes=per_run("logit_step_slope"),
        final_loss=per_run("final_loss"),
        settings=config.settings(),
    )


def assert_lazy_training(
    model_factory: Callable[[int], nn.Module],
    data: tuple[Tensor, Tensor],
    *,
    width: int,
    steps: int,
    lr: float,
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
        lr: learning rate.
        max_relative_change: bound on the kernel drift.
        max_linearization_error: optional bound on the linearization error.
        **sweep_kwargs: any other argument of :func:`width_sweep` (``loss``,
            ``weight_decay``, ``label_smoothing``, ``seeds``, ``probe``, ``batch_size``, ...).

    Returns:
        The :class:`WidthSweepResult` (when it passed).

    Raises:
        AssertionError: with :meth:`WidthSweepResult.report` as the message.
    """
    _check_bound("max_relative_change", max_relative_change)
    if max_linearization_error is not None:
        _check_bound("max_linearization_error", max_linearization_error)
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
    lr: float,
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
        lr: learning rate (the same at every width).
        max_slope: upper bound on the fitted slope.
        **sweep_kwargs: any other argument of :func:`width_sweep`.

    Returns:
        The :class:`WidthSweepResult` (when it passed).

    Raises:
        AssertionError: with :meth:`WidthSweepResult.report` as the message.
    """
    if len(set(widths)) < 2:
        raise ValueError(
            f"Expected `widths` to hold at least two distinct widths but got {widths!r}."
        )
    _check_finite("max_slope", max_slope)
    result = width_sweep(model_factory, widths, data, steps=steps, lr=lr, **sweep_kwargs)
    fit = result.slopes["relative_change"]
    result.checks.append(
        (
            f"slope of relative_change vs width {fit.slope:+.3f} <= {max_slope:+.3f}",
            bool(fit.slope <= max_slope),
        )
    )
    return _raise_unless_passed(result)


def assert_breaks_down(
    model_factory: Callable[[int], nn.Module],
    data: tuple[Tensor, Tensor],
    *,
    width: Union[int, Sequence[int]],
    steps: int,
    lr: float,
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
        lr: learning rate.
        min_logit_slope: lower bound on ``d logit_norm / d ln(step)``.
        min_logit_growth: optional lower bound on ``logit_norm_T / logit_norm_0``.
        **sweep_kwargs: any other argument of :func:`width_sweep`.

    Returns:
        The :class:`WidthSweepResult` (when it passed).

    Raises:
        AssertionError: with :meth:`WidthSweepResult.report` as the message.
    """
    _check_finite("min_logit_slope", min_logit_slope)
    if min_logit_growth is not None:
        _check_finite("min_logit_growth", min_logit_growth)
    widths = [width] if isinstance(width, int) else list(width)
    result = width_sweep(model_factory, widths, data, steps=steps, lr=lr, **sweep_kwargs)
    for w, slope in zip(result.widths, result.mean_logit_step_slope):
        result.checks.append(
            (
                f"width {w}: d logit_norm / d ln(step) = {slope:.3f} >= {min_logit_slope:g}",
                bool(slope >= min_logit_slope),
            )
        )
    if min_logit_growth is not None:
        for w, growth in zip(result.widths, result.mean["logit_growth"]):
            result.checks.append(
                (
                    f"width {w}: logit_growth = {growth:.3f} >= {min_logit_growth:g}",
                    bool(growth >= min_logit_growth),
                )
            )
    return _raise_unless_passed(result)


# ---------------------------------------------------------------------------- training


@dataclass
class _SweepConfig:
    model_factory: Callable[[int], nn.Module]
    widths: tuple[int, ...]
    x: Tensor
    targets: Tensor  # integer labels (N,) or soft targets (N, C)
    steps: int
    lr: float
    loss: str
    weight_decay: float
    label_smoothing: float
    seeds: tuple[int, ...]
    probe: Tensor
    batch_size: Optional[int]
    checkpoints: tuple[int, ...]
    kernel_output: str
    method: str

    @classmethod
    def check(
        cls, model_factory, widths, data, steps, lr, loss, weight_decay, label_smoothing,
        seeds, probe, batch_size, num_checkpoints, kernel_output, method,
    ) -> _SweepConfig:  # fmt: skip
        if not callable(model_factory):
            raise TypeError(
                f"Expected `model_factory` to be a callable width -> nn.Module but got "
                f"{type(model_factory).__name__}."
            )
        widths_t = tuple(widths) if isinstance(widths, Sequence) else ()
        if not widths_t or not all(_is_int(w) and w > 0 for w in widths_t):
            raise ValueError(
                f"Expected `widths` to be a non-empty sequence of positive ints but got {widths!r}."
            )
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(
                f"Expected `data` to be a pair (x, y) of tensors but got {type(data).__name__}."
            )
        x, y = data
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError("Expected `data` to be a pair (x, y) of torch.Tensors.")
        if x.ndim < 1 or x.shape[0] == 0 or y.shape[:1] != x.shape[:1]:
            raise ValueError(
                "Expected `data` = (x, y) with x (N, ...) and y (N,) labels or (N, C) targets, "
                f"N >= 1, but got x {tuple(x.shape)} and y {tuple(y.shape)}."
            )
        if not (y.ndim == 1 and not y.is_floating_point()) and not (
            y.ndim == 2 and y.is_floating_point()
        ):
            raise ValueError(
                "Expected the targets `data[1]` to be integer labels (N,) or float soft targets "
                f"(N, C) but got dtype {y.dtype} and shape {tuple(y.shape)}."
            )
        if not (_is_int(steps) and steps >= 1):
            raise ValueError(f"Expected `steps` to be a positive int but got {steps!r}.")
        if not (_is_number(lr) and lr > 0):
            raise ValueError(f"Expected `lr` to be a positive float but got {lr!r}.")
        if loss not in LOSSES:
            raise ValueError(f"Expected `loss` to be one of {LOSSES} but got {loss!r}.")
        if not (_is_number(weight_decay) and weight_decay >= 0):
            raise ValueError(
                f"Expected `weight_decay` to be a float >= 0 but got {weight_decay!r}."
            )
        if not (_is_number(label_smoothing) and 0 <= label_smoothing < 1):
            raise ValueError(
                f"Expected `label_smoothing` to be a float in [0, 1) but got {label_smoothing!r}."
            )
        seeds_t = tuple(seeds) if isinstance(seeds, Sequence) else ()
        if not seeds_t or not all(_is_int(s) for s in seeds_t):
            raise ValueError(
                f"Expected `seeds` to be a non-empty sequence of ints but got {seeds!r}."
            )
        if probe is None:
            probe = x[:32]
        elif not isinstance(probe, Tensor) or probe.shape[1:] != x.shape[1:] or len(probe) == 0:
            shape = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
            raise ValueError(
                "Expected `probe` to be None or a non-empty batch shaped like the training "
                f"inputs, (M, *{tuple(x.shape[1:])}), but got {shape}."
            )
        if batch_size is not None and not (_is_int(batch_size) and batch_size >= 1):
            raise ValueError(
                f"Expected `batch_size` to be None or a positive int but got {batch_size!r}."
            )
        if not (_is_int(num_checkpoints) and num_checkpoints >= 2):
            raise ValueError(
                f"Expected `num_checkpoints` to be an int >= 2 but got {num_checkpoints!r}."
            )
        check_output(kernel_output)
        checkpoints = _log_spaced(steps, num_checkpoints)
        return cls(
            model_factory, widths_t, x, y, steps, float(lr), loss,
            float(weight_decay), float(label_smoothing), seeds_t, probe, batch_size, checkpoints,
            kernel_output, method,
        )  # fmt: skip

    def settings(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "lr": self.lr,
            "loss": self.loss,
            "weight_decay": self.weight_decay,
            "label_smoothing": self.label_smoothing,
            "batch_size": self.batch_size or "full",
        }


def _train_one(config: _SweepConfig, width: int, seed: int) -> dict[str, object]:
    """Train one network; its drift metrics and logit trajectory."""
    from . import metrics
    from .kernel import empirical_ntk
    from .linearize import linearization_error, linearize

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = config.model_factory(width)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected `model_factory` to return an nn.Module but got {type(model).__name__}."
        )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    x = config.x.to(device, dtype if config.x.is_floating_point() else None)
    probe = config.probe.to(device, dtype if config.probe.is_floating_point() else None)
    targets = config.targets.to(device)
    kernel = {"output": config.kernel_output, "method": config.method}

    K_0 = empirical_ntk(model, probe, **kernel)
    f_lin = linearize(model)
    logits_0 = f_lin.initial_logits(probe)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    logit_norms, checkpoints = [], set(config.checkpoints)
    was_training = model.training
    loss_value = math.nan
    for step in range(1, config.steps + 1):
        index = None
        if config.batch_size is not None and config.batch_size < len(x):
            index = torch.randperm(len(x), generator=generator)[: config.batch_size].to(device)
        batch_x = x if index is None else x[index]
        batch_t = targets if index is None else targets[index]
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(config, model(batch_x), batch_t)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        if step in checkpoints:
            logit_norms.append(float(metrics.logit_norm(_eval_logits(model, probe))))
    model.train(was_training)
    K_t = empirical_ntk(model, probe, **kernel)
    logits_t = _eval_logits(model, probe)
    logits_lin = f_lin(probe).detach()
    late = [i for i, s in enumerate(config.checkpoints) if s >= config.steps / 8]
    late = late if len(late) >= 2 else list(range(len(config.checkpoints)))[-2:]
    return {
        "relative_change": float(metrics.relative_change(K_t, K_0)),
        "linearization_error": float(linearization_error(logits_t, logits_lin, logits_0)),
        "logit_growth": float(metrics.logit_norm(logits_t) / metrics.logit_norm(logits_0)),
        "logit_norms": tuple(logit_norms),
        "logit_step_slope": _line(
            [math.log(config.checkpoints[i]) for i in late], [logit_norms[i] for i in late]
        )[0],
        "final_loss": loss_value,
    }


def _loss(config: _SweepConfig, logits: Tensor, targets: Tensor) -> Tensor:
    num_classes = logits.shape[1]
    if config.loss == "cross_entropy":
        if targets.ndim == 1:
            return F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
        return F.cross_entropy(logits, _smooth(targets.to(logits.dtype), config.label_smoothing))
    soft = F.one_hot(targets, num_classes).to(logits.dtype) if targets.ndim == 1 else targets
    soft = _smooth(soft.to(logits.dtype), config.label_smoothing)
    return (logits - soft).square().sum(dim=1).mean()


def _smooth(targets: Tensor, epsilon: float) -> Tensor:
    return (1 - epsilon) * targets + epsilon / targets.shape[1]


def _eval_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits in eval mode, no grad; every submodule's mode restored."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return model(x).detach()
    finally:
        for m, training in flags:
            m.training = training


def _log_spaced(steps: int, num: int) -> tuple[int, ...]:
    """About ``num`` distinct integers from 1 to ``steps``, geometrically spaced."""
    if steps == 1:
        return (1,)
    points = {round(math.exp(i * math.log(steps) / (num - 1))) for i in range(num)}
    return tuple(sorted(points | {steps}))


# ---------------------------------------------------------------------------- helpers


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
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


def _check_at_most(result: WidthSweepResult, metric: str, bound: float) -> None:
    for w, value in zip(result.widths, result.mean[metric]):
        result.checks.append(
            (f"width {w}: {metric} = {value:.4g} <= {bound:g}", bool(value <= bound))
        )


def _raise_unless_passed(result: WidthSweepResult) -> WidthSweepResult:
    if not result.passed:
        raise AssertionError(result.report())
    return result


def _check_bound(name: str, value: object) -> None:
    if not (_is_number(value) and value >= 0):
        raise ValueError(f"Expected `{name}` to be a float >= 0 but got {value!r}.")


def _check_finite(name: str, value: object) -> None:
    if not (_is_number(value) and math.isfinite(value)):
        raise ValueError(f"Expected `{name}` to be a finite float but got {value!r}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
