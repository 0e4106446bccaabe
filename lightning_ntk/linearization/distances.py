"""How far a network's logits are from its linearization's.

Between a network's logits ``f = f(X; θt)``, its linearization ``f_lin = f_lin(X; θt)`` and
its initial logits ``f0 = f(X; θ0)``, all ``(N, C)``:

* :func:`linearization_error` ``= ‖f − f_lin‖_F / max(‖f − f0‖_F, eps)``: the part of the
  function's change the linear model misses, relative to the change itself;
* :func:`prob_tv`: mean over rows of the total-variation distance
  ``½ Σ_a |softmax(f)_a − softmax(f_lin)_a|``;
* :func:`argmax_agreement`: fraction of rows where ``argmax f == argmax f_lin``.

Sigmoid outputs ``z`` (binary, multilabel) are read as the softmax logits ``[0, z]``
(:func:`softmax_form`): binary cross-entropy on ``z`` is cross-entropy on ``[0, z]``.

The ``_..._rows`` / ``_update`` / ``_compute`` helpers are the streamed forms the
torchmetrics classes of :mod:`lightning_ntk.metrics` accumulate.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["argmax_agreement", "linearization_error", "prob_tv", "softmax_form"]


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


def prob_tv(logits: Tensor, logits_lin: Tensor, task: Optional[str] = None) -> Tensor:
    """Mean over rows of ``½ Σ_a |softmax(f)_a − softmax(f_lin)_a|``, in ``[0, 1]``.

    Sigmoid outputs ``z`` (``task="binary"``, or one output; ``"multilabel"``) are read
    through :func:`softmax_form`, as rows ``[0, z]``: ``|σ(z) − σ(z_lin)|`` per output.

    Args:
        logits: ``(N, C)``; ``(N, 1)`` for one binary output.
        logits_lin: the same shape.
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``None`` (one output is
            binary, several are multiclass).

    Returns:
        A 0-dim tensor.
    """
    _check_logits(logits=logits, logits_lin=logits_lin)
    return _prob_tv_rows(softmax_form(logits, task), softmax_form(logits_lin, task)).mean()


def argmax_agreement(logits: Tensor, logits_lin: Tensor, task: Optional[str] = None) -> Tensor:
    """Fraction of rows whose predicted class is the same under ``f`` and ``f_lin``.

    Sigmoid outputs (``task="binary"``, or one output; ``"multilabel"``): the fraction of
    outputs where ``sign z == sign z_lin`` (the argmax of ``[0, z]``).

    Args:
        logits: ``(N, C)``; ``(N, 1)`` for one binary output.
        logits_lin: the same shape.
        task: as in :func:`prob_tv`.

    Returns:
        A 0-dim floating tensor in ``[0, 1]``.
    """
    _check_logits(logits=logits, logits_lin=logits_lin)
    dtype = logits.dtype if logits.is_floating_point() else torch.float32
    rows = softmax_form(logits, task), softmax_form(logits_lin, task)
    return _argmax_equal_rows(*rows).to(dtype).mean()


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


# ------------------------------------------------------------- sigmoid outputs

TASKS = ("multiclass", "binary", "multilabel")


def softmax_form(logits: Tensor, task: Optional[str] = None) -> Tensor:
    """The logits as softmax logits: sigmoid outputs ``z`` become rows ``[0, z]``.

    Binary cross-entropy on ``z`` is cross-entropy on ``[0, z]``, so every softmax metric
    (``prob_tv``, ``argmax_agreement``) reads a binary or multilabel model through this form.

    Args:
        logits: ``(N, C)``; ``(N, 1)`` or ``(N,)`` for one binary output.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``; ``None`` infers it from the
            shape: ``"binary"`` for one output, else ``"multiclass"``.

    Returns:
        ``(N, C)`` unchanged for ``"multiclass"``; ``(N·K, 2)`` rows ``[0, z_ik]`` for
        ``"binary"`` (``K = 1``) and ``"multilabel"`` (row-major over examples, outputs).
    """
    z, task = _check_task_logits(logits, task)
    if task == "multiclass":
        return z
    flat = z.reshape(-1, 1)
    return torch.cat([torch.zeros_like(flat), flat], dim=1)


def _check_task_logits(logits: Tensor, task: Optional[str]) -> tuple[Tensor, str]:
    """``(logits as (N, C), task)`` after checking both; ``(N,)`` is one binary output."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"Expected `logits` to be a torch.Tensor but got {type(logits).__name__}.")
    if task is not None and task not in TASKS:
        raise ValueError(f"Expected `task` to be one of {TASKS} or None but got {task!r}.")
    if not logits.is_floating_point():
        raise TypeError(f"Expected `logits` to be a floating tensor but got dtype {logits.dtype}.")
    if logits.ndim == 1 and task == "binary":
        logits = logits[:, None]
    if logits.ndim != 2:
        raise ValueError(
            f"Expected `logits` to be of shape (N, C) but got shape {tuple(logits.shape)}."
        )
    C = logits.shape[1]
    if task is None:
        task = "binary" if C == 1 else "multiclass"
    if task == "multiclass" and C < 2:
        raise ValueError(
            f"Expected multiclass `logits` with C >= 2 columns but got shape "
            f"{tuple(logits.shape)}; one output is a binary classifier (task='binary')."
        )
    if task == "binary" and C != 1:
        raise ValueError(
            f"Expected binary `logits` of shape (N,) or (N, 1) but got shape "
            f"{tuple(logits.shape)}; several sigmoid outputs are task='multilabel'."
        )
    return logits, task
