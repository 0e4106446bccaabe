"""One network of a width sweep: its settings, validated once, and its training run.

:class:`SweepConfig` checks every argument of :func:`~lightning_ntk.testing.width_sweep`;
:func:`train_one` trains one width and seed and records the kernel drift, the
linearization error and the centered logit norms at log-spaced checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernel._layout import check_output
from ._checks import as_ints, expect, is_int, is_number
from ._slopes import line_fit

__all__ = ["DECAY_TO", "LOSSES", "SWEEP_METRICS", "SweepConfig", "build_model", "train_one"]


LOSSES = ("cross_entropy", "mse")


DECAY_TO = ("zero", "init")


SWEEP_METRICS = ("relative_change", "linearization_error", "logit_growth")


@dataclass
class SweepConfig:
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
    def check(cls, model_factory: Any, data: object, **kw: Any) -> SweepConfig:
        """Validate :func:`width_sweep`'s arguments before any training."""
        if not callable(model_factory):
            raise TypeError(
                "Expected `model_factory` to be a callable width -> nn.Module but got "
                f"{type(model_factory).__name__}."
            )
        widths = kw["widths"]
        swapped = (
            isinstance(widths, (tuple, list))
            and len(widths) == 2
            and all(isinstance(t, Tensor) for t in widths)
        )
        hint = (
            " (`widths` got the pair of tensors: width_sweep takes (model_factory, widths, "
            "data) in this order; pass them by keyword, widths=..., data=...)"
            if swapped
            else ""
        )
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(
                f"Expected `data` to be a pair (x, y) of tensors but got {data!r:.80}{hint}."
            )
        x, y = data
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
            raise TypeError(
                "Expected `data` to be a pair (x, y) of torch.Tensors but got a pair of "
                f"{type(x).__name__} and {type(y).__name__}{hint}."
            )
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


def _check_targets_fit(targets: Tensor, logits: Tensor, width: int) -> None:
    """The targets of ``data`` need one logit per class of the model's output."""
    C = logits.shape[1] if logits.ndim == 2 else None
    if C is None:
        raise ValueError(
            f"Expected `model_factory({width})` to return logits of shape (N, C) but got "
            f"{tuple(logits.shape)}."
        )
    if targets.ndim == 2 and targets.shape[1] != C:
        raise ValueError(
            f"Expected the targets of `data` to have one column per logit of "
            f"`model_factory({width})`, (N, {C}), but got {tuple(targets.shape)}."
        )
    if targets.ndim == 1 and int(targets.max()) >= C:
        raise ValueError(
            f"Expected the labels of `data` in [0, {C}), one class per logit of "
            f"`model_factory({width})`, but got label {int(targets.max())}."
        )


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


def train_one(config: SweepConfig, width: int, seed: int) -> dict[str, Any]:
    """Train one network; its drift metrics and logit trajectory."""
    from ..kernel import empirical_ntk
    from ..linearization import linearization_error, linearize
    from ..metrics import logit_norm, relative_change

    model = build_model(config.model_factory, width, seed)
    first = next(model.parameters())
    x, probe = (_like(t, first) for t in (config.x, config.probe))
    targets = config.targets.to(first.device)
    kernel: dict[str, Any] = {"output": config.kernel_output, "method": config.method}

    K_0 = cast(Tensor, empirical_ntk(model, probe, **kernel))  # per_layer=False: a tensor
    f_lin = linearize(model)
    logits_0 = f_lin.initial_logits(probe)
    _check_targets_fit(targets, logits_0, width)
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
    K_t = cast(Tensor, empirical_ntk(model, probe, **kernel))
    logits_lin = f_lin(probe).detach()
    late = [i for i, s in enumerate(config.checkpoints) if s >= config.steps / 8]
    late = late if len(late) >= 2 else list(range(len(config.checkpoints)))[-2:]
    return {
        "relative_change": float(relative_change(K_t, K_0)),
        "linearization_error": float(linearization_error(logits_t, logits_lin, logits_0)),
        "logit_growth": float(logit_norm(logits_t) / logit_norm(logits_0)),
        "logit_norms": tuple(logit_norms),
        "logit_step_slope": line_fit(
            [math.log(config.checkpoints[i]) for i in late], [logit_norms[i] for i in late]
        )[0],
        "final_loss": loss_value,
        "diverged_at": None,
    }


def _diverged(step: int, loss_value: float, num_checkpoints: int) -> dict[str, Any]:
    """The record of a run whose loss or logits stopped being finite at ``step``."""
    record: dict[str, Any] = {metric: math.nan for metric in SWEEP_METRICS}
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


def _loss(config: SweepConfig, logits: Tensor, targets: Tensor) -> Tensor:
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
