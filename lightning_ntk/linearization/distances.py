"""How far a network's logits are from its linearization's.

Between a network's logits ``f = f(X; θt)``, its linearization ``f_lin = f_lin(X; θt)`` and
its initial logits ``f0 = f(X; θ0)``, all ``(N, C)``:

* :func:`linearization_error` ``= ‖f − f_lin‖_F / max(‖f − f0‖_F, eps)``: the part of the
  function's change the linear model misses, relative to the change itself;
* :func:`prob_tv`: mean over rows of the total-variation distance
  ``½ Σ_a |softmax(f)_a − softmax(f_lin)_a|``;
* :func:`argmax_agreement`: fraction of rows where ``argmax f == argmax f_lin``.

The ``_..._rows`` / ``_update`` / ``_compute`` helpers are the streamed forms the
torchmetrics classes of :mod:`lightning_ntk.metrics` accumulate.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["argmax_agreement", "linearization_error", "prob_tv"]


def linearization_error(
    logits: Tensor, logits_lin: Tensor, logits0: Tensor, eps: float = 1e-12
) -> Tensor:
    """``‖f − f_lin‖_F / max(‖f − f0‖_F, eps)`` over a batch.

    Args:
        logits: ``f(X; θt)``, shape ``(N, C)``.
        logits_lin: ``f_lin(X; θt)``, shape ``(N, C)``.
        logits0: ``f(X; θ0)``, shape ``(N, C)``.
        eps: floor of the denominator (the error of an unmoved network is 0, not NaN).

    Returns:
        A 0-dim tensor: 0 for a network that is exactly linear in its parameters, about
        1 when the linear model explains none of the change.
    """
    num_sq, den_sq = _linearization_error_update(logits, logits_lin, logits0)
    return _linearization_error_compute(num_sq, den_sq, eps)


def prob_tv(logits: Tensor, logits_lin: Tensor) -> Tensor:
    """Mean over rows of ``½ Σ_a |softmax(f)_a − softmax(f_lin)_a|``, in ``[0, 1]``.

    Args:
        logits: ``(N, C)``.
        logits_lin: ``(N, C)``.

    Returns:
        A 0-dim tensor.
    """
    _check_logits(logits=logits, logits_lin=logits_lin)
    return _prob_tv_rows(logits, logits_lin).mean()


def argmax_agreement(logits: Tensor, logits_lin: Tensor) -> Tensor:
    """Fraction of rows whose predicted class is the same under ``f`` and ``f_lin``.

    Args:
        logits: ``(N, C)``.
        logits_lin: ``(N, C)``.

    Returns:
        A 0-dim floating tensor in ``[0, 1]``.
    """
    _check_logits(logits=logits, logits_lin=logits_lin)
    dtype = logits.dtype if logits.is_floating_point() else torch.float32
    return _argmax_equal_rows(logits, logits_lin).to(dtype).mean()


def _linearization_error_update(
    logits: Tensor, logits_lin: Tensor, logits0: Tensor
) -> tuple[Tensor, Tensor]:
    """Sums ``(‖f − f_lin‖², ‖f − f0‖²)`` of one batch, in float64."""
    _check_logits(logits=logits, logits_lin=logits_lin, logits0=logits0)
    f = logits.double()
    num_sq = (f - logits_lin.double()).square().sum()
    den_sq = (f - logits0.double()).square().sum()
    return num_sq, den_sq


def _linearization_error_compute(num_sq: Tensor, den_sq: Tensor, eps: float) -> Tensor:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f"Expected `eps` to be a positive float but got {eps!r}.")
    return num_sq.sqrt() / den_sq.sqrt().clamp_min(eps)


def _prob_tv_rows(logits: Tensor, logits_lin: Tensor) -> Tensor:
    """Total-variation distance of each row's softmaxes, ``(N,)``."""
    p = torch.softmax(logits.double(), dim=-1)
    q = torch.softmax(logits_lin.double(), dim=-1)
    return 0.5 * (p - q).abs().sum(dim=-1)


def _argmax_equal_rows(logits: Tensor, logits_lin: Tensor) -> Tensor:
    return logits.argmax(dim=-1) == logits_lin.argmax(dim=-1)


def _check_logits(**named: Tensor) -> None:
    """All arguments must be ``(N, C)`` tensors of one shape."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"Expected `{name}` to be a torch.Tensor but got {type(t).__name__}.")
        if t.ndim != 2:
            raise ValueError(
                f"Expected `{name}` to be logits of shape (N, C) but got shape {tuple(t.shape)}."
            )
        if t.shape != first.shape:
            raise ValueError(
                f"Expected `{name}` to have the shape of `{first_name}`, {tuple(first.shape)}, "
                f"but got {tuple(t.shape)}."
            )
