"""Deep ensembles: networks trained from different seeds; see :mod:`lightning_ntk.uncertainty`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn

from ..theory._checks import check_labels_fit, check_nonnegative, check_smoothing
from ._common import (
    EnsemblePrediction,
    build_model,
    check_inputs,
    check_option,
    check_positive_int,
    check_targets_rows,
)

_DECAY_TO = ("init", "zero")
_REDUCTIONS = ("mean", "sum")


def deep_ensemble(
    model_fn: Callable[[], nn.Module],
    x_train: Tensor,
    targets: Tensor,
    x_test: Tensor,
    *,
    steps: int,
    lr: float,
    num_members: int = 16,
    weight_decay: float = 0.0,
    decay_to: str = "init",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    batch_size: Optional[int] = None,
    seed: int = 0,
) -> EnsemblePrediction:
    """Train ``num_members`` networks from different seeds; summarise their test logits.

    Each member is built by ``model_fn()`` with the global RNG forked and seeded from a
    private generator (the caller's RNG state is left as found), then trained by plain
    gradient descent ``θ ← θ − η ∇_θ [loss + (λ/2) ‖θ − θ_ref‖²]`` for ``steps`` steps,
    with ``loss = CE(f(x_B), y_B)`` over a batch (all ``N`` examples when
    ``batch_size=None``, matching :func:`kernel_ensemble`; else reshuffled batches),
    ``θ_ref = θ0`` (``decay_to="init"``, the kernel set-up) or 0 (``"zero"``).

    Args:
        model_fn: returns a freshly initialised network mapping ``(N, ...)`` to ``(N, C)``;
            its dtype is the training dtype.
        x_train: training inputs ``(N, ...)``.
        targets: integer labels ``(N,)`` or soft targets ``(N, C)``.
        x_test: test inputs ``(M, ...)``.
        steps: gradient steps per member (``≥ 0``).
        lr: learning rate ``η > 0``.
        num_members: ``S ≥ 2``.
        weight_decay: ``λ ≥ 0``.
        decay_to: ``"init"`` or ``"zero"``.
        label_smoothing: ``ε ∈ [0, 1)``.
        reduction: ``"mean"`` or ``"sum"`` over the batch.
        batch_size: ``None`` for full-batch gradient descent.
        seed: seed of the private generator (initialisations and batches).

    Returns:
        :class:`EnsemblePrediction` (float64) over the ``M`` test points, with the
        members' initial test logits and final training logits.
    """
    if not callable(model_fn) or isinstance(model_fn, nn.Module):
        raise TypeError(
            "Expected `model_fn` to be a callable returning a freshly initialised nn.Module "
            f"but got {type(model_fn).__name__}."
        )
    check_positive_int(steps, "steps", allow_zero=True)
    eta = check_nonnegative(lr, "lr")
    if eta == 0:
        raise ValueError(f"Expected `lr` to be a positive float but got {lr!r}.")
    check_positive_int(num_members, "num_members", minimum=2)
    lam = check_nonnegative(weight_decay, "weight_decay")
    check_option(decay_to, "decay_to", _DECAY_TO)
    eps = check_smoothing(label_smoothing)
    check_option(reduction, "reduction", _REDUCTIONS)
    x_train, x_test = check_inputs(x_train, x_test)
    N = x_train.shape[0]
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    check_targets_rows(targets, N)
    generator = torch.Generator().manual_seed(int(seed))
    logits0, logits, train_logits0, train_logits = [], [], [], []
    for _ in range(num_members):
        model = build_model(model_fn, generator)
        dtype = next(model.parameters()).dtype
        xs, xt = x_train.to(dtype), x_test.to(dtype)
        y = targets.to(dtype) if targets.is_floating_point() else targets
        with torch.no_grad():
            logits0.append(model(xt).double())
            train_logits0.append(model(xs).double())
        if len(logits0) == 1:  # the first member's logits say C, before any training
            C = train_logits0[0].shape[1] if train_logits0[0].ndim == 2 else 1
            check_labels_fit(targets, C, "the output of `model_fn()`")
        _train(model, xs, y, steps, eta, lam, decay_to, eps, reduction, batch_size, generator)
        with torch.no_grad():
            logits.append(model(xt).double())
            train_logits.append(model(xs).double())
    return EnsemblePrediction.from_member_logits(
        torch.stack(logits),
        member_logits0=torch.stack(logits0),
        member_train_logits0=torch.stack(train_logits0),
        member_train_logits=torch.stack(train_logits),
    )


# ---------------------------------------------------------------------- helpers


def _train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    lam: float,
    decay_to: str,
    eps: float,
    reduction: str,
    batch_size: Optional[int],
    generator: torch.Generator,
) -> None:
    """Plain gradient descent on ``CE + (λ/2) ‖θ − θ_ref‖²`` (see :func:`deep_ensemble`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    ref = [p.detach().clone() if decay_to == "init" else torch.zeros_like(p) for p in params]
    N = x.shape[0]
    order = torch.arange(N)
    position = N
    for _ in range(steps):
        if batch_size is None:
            xb, yb = x, y
        else:
            if position + batch_size > N:
                order, position = torch.randperm(N, generator=generator), 0
            index = order[position : position + batch_size]
            position += batch_size
            xb, yb = x[index], y[index]
        loss = nn.functional.cross_entropy(model(xb), yb, label_smoothing=eps, reduction=reduction)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, r in zip(params, grads, ref):
                p.sub_(lr * (g + lam * (p - r)))
