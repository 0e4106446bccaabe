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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._checks import expect, is_int
from ._slopes import SlopeFit, fit_loglog_slope
from ._train import DECAY_TO, LOSSES, SWEEP_METRICS, SweepConfig, build_model, train_one

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
    config = SweepConfig.check(
        model_factory, data, widths=widths, steps=steps, lr=lr, loss=loss,
        weight_decay=weight_decay, decay_to=decay_to, label_smoothing=label_smoothing,
        seeds=seeds, probe=probe, batch_size=batch_size, num_checkpoints=num_checkpoints,
        kernel_output=kernel_output, method=method,
    )  # fmt: skip
    runs = {(w, s): train_one(config, w, s) for w in config.widths for s in config.seeds}
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


# ---------------------------------------------------------------------------- helpers
