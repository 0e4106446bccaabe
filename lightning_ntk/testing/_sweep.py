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
for an MLP on scikit-learn digits about +1 per doubling of the steps, i.e. ``1/ln 2`` per
unit of ``ln(step)``).

Across widths, each metric gets a log-log slope (:func:`fit_loglog_slope`). In the kernel
regime the drift shrinks like ``1/√n`` (slope ``−1/2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernel._layout import check_output

__all__ = [
    "DECAY_TO",
    "LOSSES",
    "SWEEP_METRICS",
    "SlopeFit",
    "WidthSweepResult",
    "build_model",
    "fit_loglog_slope",
    "make_classification_data",
    "width_sweep",
]

LOSSES = ("cross_entropy", "mse")
DECAY_TO = ("zero", "init")
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
    expect(is_int(num_classes) and num_classes >= 2, "num_classes", "an int >= 2", num_classes)
    expect(is_int(in_features) and in_features >= 1, "in_features", "a positive int", in_features)
    expect(
        is_int(num_examples) and num_examples >= num_classes,
        "num_examples",
        f"an int >= num_classes ({num_classes})",
        num_examples,
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
        diverged_at: the step at which a run's loss or logits stopped being finite (its
            metrics are then NaN), else ``None``, ``(W, S)``.
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
    diverged_at: tuple[tuple[Optional[int], ...], ...]
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
        head += f"{'dlogit/dln t':>12} {'final loss':>11}"
        lines = [f"width sweep ({settings}; seeds {self.seeds})", "  " + head]
        for i, width in enumerate(self.widths):
            rc, le, lg = (self.mean[m][i] for m in SWEEP_METRICS)
            loss = sum(self.final_loss[i]) / len(self.final_loss[i])
            lines.append(
                f"  {width:>7} {rc:>12.4g} {le:>11.4g} {lg:>13.4g} "
                f"{self.mean_logit_step_slope[i]:>12.3f} {loss:>11.4g}"
            )
        for width, row in zip(self.widths, self.diverged_at):
            for seed, step in zip(self.seeds, row):
                if step is not None:
                    lines.append(f"  width {width}, seed {seed}: diverged at step {step}")
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
    lr: Union[float, Callable[[int], float]],
    loss: str = "cross_entropy",
    weight_decay: float = 0.0,
    decay_to: str = "zero",
    label_smoothing: float = 0.0,
    seeds: Sequence[int] = (0, 1, 2),
    probe: Optional[Tensor] = None,
    batch_size: Optional[int] = None,
    num_checkpoints: int = 8,
    kernel_output: str = "trace",
    method: str = "auto",
) -> WidthSweepResult:
    """Train ``model_factory(width)`` for each width and seed; measure how lazy it stays.

    Training is plain SGD on ``data``, full batch or in mini-batches drawn by a generator
    seeded with the seed; the model keeps its own train / eval mode while training and
    is measured in eval mode. The global RNG is left as it was.

    Args:
        model_factory: ``width -> nn.Module`` mapping ``(N, ...)`` inputs to ``(N, C)``
            logits; called under ``torch.manual_seed(seed)`` (global RNG restored after).
        widths: one or more positive widths.
        data: ``(x, y)`` with ``x`` ``(N, ...)`` and ``y`` integer labels ``(N,)`` or soft
            targets ``(N, C)``.
        steps: SGD steps ``>= 1``.
        lr: learning rate ``> 0``, or a callable ``width -> lr`` (e.g. ``lambda w: 0.5 / w``
            for a standard-parameterized network, whose kernel grows like the width).
        loss: ``"cross_entropy"`` or ``"mse"`` (squared error to the one-hot / soft targets,
            summed over classes, averaged over examples).
        weight_decay: ``λ >= 0``.
        decay_to: ``"zero"``: plain weight decay, gradient ``+ λθ``
            (``torch.optim.SGD(weight_decay=λ)``); ``"init"``: decay towards the
            initialisation, gradient ``+ λ(θ − θ0)``, the regularizer of the paper's
            kernel-regime theory.
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
        model_factory, data, widths=widths, steps=steps, lr=lr, loss=loss,
        weight_decay=weight_decay, decay_to=decay_to, label_smoothing=label_smoothing,
        seeds=seeds, probe=probe, batch_size=batch_size, num_checkpoints=num_checkpoints,
        kernel_output=kernel_output, method=method,
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
        diverged_at=per_run("diverged_at"),
        settings=config.settings(),
    )


# ---------------------------------------------------------------------------- training


@dataclass
class _SweepConfig:
    model_factory: Callable[[int], nn.Module]
    widths: tuple[int, ...]
    x: Tensor
    targets: Tensor  # integer labels (N,) or soft targets (N, C)
    steps: int
    lr: Union[float, Callable[[int], float]]
    loss: str
    weight_decay: float
    decay_to: str
    label_smoothing: float
    seeds: tuple[int, ...]
    probe: Tensor
    batch_size: Optional[int]
    checkpoints: tuple[int, ...]
    kernel_output: str
    method: str

    @classmethod
    def check(cls, model_factory: object, data: object, **kw: object) -> _SweepConfig:
        """Validate :func:`width_sweep`'s arguments before any training."""
        if not callable(model_factory):
            raise TypeError(
                "Expected `model_factory` to be a callable width -> nn.Module but got "
                f"{type(model_factory).__name__}."
            )
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(f"Expected `data` to be a pair (x, y) of tensors but got {data!r}.")
        x, y = data
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
            raise TypeError("Expected `data` to be a pair (x, y) of torch.Tensors.")
        labels = y.ndim == 1 and not y.is_floating_point()
        soft = y.ndim == 2 and y.is_floating_point()
        expect(
            x.ndim >= 1 and len(x) > 0 and y.shape[:1] == x.shape[:1] and (labels or soft),
            "data",
            "(x, y) with x (N, ...) and y integer labels (N,) or float targets (N, C)",
            f"x {tuple(x.shape)} and y {y.dtype} {tuple(y.shape)}",
        )
        widths, seeds = as_ints("widths", kw["widths"], 1), as_ints("seeds", kw["seeds"], None)
        steps, lr, wd = kw["steps"], kw["lr"], kw["weight_decay"]
        smoothing, batch_size, num_checkpoints = (
            kw["label_smoothing"], kw["batch_size"], kw["num_checkpoints"]
        )  # fmt: skip
        expect(is_int(steps) and steps >= 1, "steps", "a positive int", steps)
        ok_lr = callable(lr) or (is_number(lr) and lr > 0)
        expect(ok_lr, "lr", "a positive float or a callable width -> lr", lr)
        expect(kw["loss"] in LOSSES, "loss", f"one of {LOSSES}", kw["loss"])
        expect(is_number(wd) and wd >= 0, "weight_decay", "a float >= 0", wd)
        expect(kw["decay_to"] in DECAY_TO, "decay_to", f"one of {DECAY_TO}", kw["decay_to"])
        expect(
            is_number(smoothing) and 0 <= smoothing < 1, "label_smoothing", "in [0, 1)", smoothing
        )
        expect(
            batch_size is None or (is_int(batch_size) and batch_size >= 1),
            "batch_size",
            "None or a positive int",
            batch_size,
        )
        expect(
            is_int(num_checkpoints) and num_checkpoints >= 2,
            "num_checkpoints",
            "an int >= 2",
            num_checkpoints,
        )
        probe = x[:32] if kw["probe"] is None else kw["probe"]
        expect(
            isinstance(probe, Tensor) and len(probe) > 0 and probe.shape[1:] == x.shape[1:],
            "probe",
            f"None or a non-empty batch (M, *{tuple(x.shape[1:])}) like the training inputs",
            tuple(probe.shape) if isinstance(probe, Tensor) else probe,
        )
        check_output(kw["kernel_output"])
        return cls(
            model_factory, widths, x, y, steps, lr if callable(lr) else float(lr), kw["loss"],
            float(wd), kw["decay_to"], float(smoothing), seeds, probe, batch_size,
            _log_spaced(steps, num_checkpoints), kw["kernel_output"], kw["method"],
        )  # fmt: skip

    def lr_at(self, width: int) -> float:
        """The learning rate at ``width``."""
        if not callable(self.lr):
            return self.lr
        lr = self.lr(width)
        expect(is_number(lr) and lr > 0, "lr(width)", f"a positive float at width {width}", lr)
        return float(lr)

    def settings(self) -> dict[str, object]:
        decay = f"{self.weight_decay:g}" + (" (to init)" if self.decay_to == "init" else "")
        return {
            "steps": self.steps,
            "lr": "lr(width)" if callable(self.lr) else f"{self.lr:g}",
            "loss": self.loss,
            "weight_decay": decay,
            "label_smoothing": f"{self.label_smoothing:g}",
            "batch_size": self.batch_size or "full",
        }


def build_model(model_factory: Callable[[int], nn.Module], width: int, seed: int) -> nn.Module:
    """``model_factory(width)`` under ``torch.manual_seed(seed)``; the global RNGs are restored.

    The CPU generator is always restored; CUDA generators too once CUDA is initialised.
    """
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model = model_factory(width)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected `model_factory` to return an nn.Module but got {type(model).__name__}."
        )
    return model


def _train_one(config: _SweepConfig, width: int, seed: int) -> dict[str, object]:
    """Train one network; its drift metrics and logit trajectory."""
    from ..kernel import empirical_ntk
    from ..linearization import linearization_error, linearize
    from ..metrics import logit_norm, relative_change

    model = build_model(config.model_factory, width, seed)
    first = next(model.parameters())
    x, probe = (_like(t, first) for t in (config.x, config.probe))
    targets = config.targets.to(first.device)
    kernel = {"output": config.kernel_output, "method": config.method}

    K_0 = empirical_ntk(model, probe, **kernel)
    f_lin = linearize(model)
    logits_0 = f_lin.initial_logits(probe)
    params = [p for p in model.parameters() if p.requires_grad]
    to_init = config.decay_to == "init" and config.weight_decay > 0
    theta_0 = [p.detach().clone() for p in params] if to_init else []
    lr = config.lr_at(width)
    optimizer = torch.optim.SGD(params, lr=lr, weight_decay=0.0 if to_init else config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    logit_norms, loss_value = [], math.nan
    for step in range(1, config.steps + 1):
        index = None
        if config.batch_size is not None and config.batch_size < len(x):
            index = torch.randperm(len(x), generator=generator)[: config.batch_size].to(x.device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x if index is None else x[index])
        loss = _loss(config, logits, targets if index is None else targets[index])
        loss.backward()
        for p, p0 in zip(params, theta_0):  # decay towards θ0: gradient of (λ/2)‖θ − θ0‖²
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p.detach() - p0, alpha=config.weight_decay)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            return _diverged(step, loss_value, len(config.checkpoints))
        optimizer.step()
        if step in config.checkpoints:
            logit_norms.append(float(logit_norm(_eval_logits(model, probe))))
    logits_t = _eval_logits(model, probe)
    if not torch.isfinite(logits_t).all():
        return _diverged(config.steps, loss_value, len(config.checkpoints))
    K_t = empirical_ntk(model, probe, **kernel)
    logits_lin = f_lin(probe).detach()
    late = [i for i, s in enumerate(config.checkpoints) if s >= config.steps / 8]
    late = late if len(late) >= 2 else list(range(len(config.checkpoints)))[-2:]
    return {
        "relative_change": float(relative_change(K_t, K_0)),
        "linearization_error": float(linearization_error(logits_t, logits_lin, logits_0)),
        "logit_growth": float(logit_norm(logits_t) / logit_norm(logits_0)),
        "logit_norms": tuple(logit_norms),
        "logit_step_slope": _line(
            [math.log(config.checkpoints[i]) for i in late], [logit_norms[i] for i in late]
        )[0],
        "final_loss": loss_value,
        "diverged_at": None,
    }


def _diverged(step: int, loss_value: float, num_checkpoints: int) -> dict[str, object]:
    """The record of a run whose loss or logits stopped being finite at ``step``."""
    record: dict[str, object] = {metric: math.nan for metric in SWEEP_METRICS}
    record.update(
        logit_norms=(math.nan,) * num_checkpoints,
        logit_step_slope=math.nan,
        final_loss=loss_value,
        diverged_at=step,
    )
    return record


def _like(t: Tensor, param: Tensor) -> Tensor:
    """``t`` on the parameter's device; floating inputs in its dtype."""
    return t.to(param.device, param.dtype if t.is_floating_point() else None)


def _loss(config: _SweepConfig, logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy or squared error against (smoothed) targets, mean over the batch."""
    if config.loss == "cross_entropy" and targets.ndim == 1:
        return F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
    soft = F.one_hot(targets, logits.shape[1]) if targets.ndim == 1 else targets
    soft = (1 - config.label_smoothing) * soft.to(
        logits.dtype
    ) + config.label_smoothing / logits.shape[1]
    if config.loss == "cross_entropy":
        return F.cross_entropy(logits, soft)
    return (logits - soft).square().sum(dim=1).mean()


def _eval_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits in eval mode, without grad; every submodule's mode restored."""
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


def expect(ok: bool, name: str, expected: str, got: object) -> None:
    """Raise ``ValueError("Expected `name` to be <expected> but got <got>.")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"Expected `{name}` to be {expected} but got {got!r}.")


def as_ints(name: str, values: object, minimum: Optional[int]) -> tuple[int, ...]:
    """A non-empty sequence of ints (each ``>= minimum``) as a tuple, or ValueError."""
    items = tuple(values) if isinstance(values, Sequence) and not isinstance(values, str) else ()
    ok = bool(items) and all(is_int(v) and (minimum is None or v >= minimum) for v in items)
    kind = "ints" if minimum is None else f"ints >= {minimum}"
    expect(ok, name, f"a non-empty sequence of {kind}", values)
    return items


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
