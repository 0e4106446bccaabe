"""Checks that a method's transforms computed the per-example Jacobian the kernel is made of.

The kernel is ``Σ_p J(x)[a, p] J(x')[b, p]`` with ``J(x)`` the reverse-mode Jacobian of
one example alone (a batch of one, as :mod:`.reference` computes it). The fast methods
reach it through PyTorch transforms that can disagree with that definition on some
models, with no error:

* ``vmap`` runs an op by its batching rule, which can be wrong (the backward of
  ``torch.cdist`` under ``vmap`` returns other numbers than plain autograd);
* a whole-batch ``vjp`` / ``jvp`` (``"ntk_vp"``) differentiates the batch function,
  which differs from the per-example one when the forward mixes examples (an attention
  layer fed a batch-first input as sequence-first, a batch mean in the forward) or when
  the backward depends on the batch (``nn.Embedding(scale_grad_by_freq=True)`` scales
  by a token's count in the batch);
* forward mode is the adjoint of reverse mode only when the backward is the derivative
  (``scale_grad_by_freq`` is not).

Each check compares, along a random direction from a generator of its own (the global
RNG is untouched), what the method computed with plain autograd, one example at a time
where it matters. Both sides are linear in the direction: agreement on a random
direction means agreement everywhere, with probability one. A failed check raises
:class:`TransformMismatch`, and the call moves on to the next method of the chain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _inputs
from ._compat import jvp
from ._functional import FunctionalModel, as_dense

__all__ = [
    "TransformMismatch",
    "check_batch_function",
    "check_jacobians",
    "combination_differs",
    "random_weights",
]

_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


class TransformMismatch(RuntimeError):
    """A method's transform disagreed with plain per-example autograd on this model."""


def check_jacobians(
    fm: FunctionalModel, x: Any, names: Sequence[str], J: Mapping[str, Tensor], how: str
) -> None:
    """``Σ_{i,a} u[i,a] J[name][i,a]`` must equal autograd's ``∂⟨u, f⟩/∂θ`` for random ``u``.

    Compared first with one backward pass of the whole batch; where that differs (a
    forward that mixes examples), with the sum of per-example gradients (batches of
    one), which define ``J``.

    Args:
        fm: the functional model.
        x: the chunk ``(N, ...)`` the Jacobians are of.
        names: the parameters of ``J``.
        J: ``{name: (N, C, P_l)}``, as the method computed them.
        how: the transform, for the message (``"vmap(jacrev)"``).

    Raises:
        TransformMismatch: naming the parameters that differ.
    """
    first = J[names[0]]
    u = _direction(first.shape[:2], first)  # (N, C)
    flat_u = u.reshape(-1)  # (N·C,)
    rebuilt = {name: flat_u @ J[name].reshape(flat_u.numel(), -1) for name in names}  # (P_l,)
    if not _differs(rebuilt, _batch_gradient(fm, x, names, u), fm.dtype):
        return
    differs = _differs(rebuilt, _per_example_gradient(fm, x, names, u), fm.dtype)
    if differs:
        raise TransformMismatch(
            f"{how} is wrong on this model (a batching rule PyTorch gets wrong for one of "
            "its ops, e.g. torch.cdist's backward): its per-example Jacobians of "
            f"{differs} differ from autograd's gradient of one example at a time"
        )


def check_batch_function(fm: FunctionalModel, x: Any) -> None:
    """The whole-batch ``vjp`` and ``jvp`` of ``f(X)`` must be those of each example alone.

    For random ``u (N, C)`` and tangent ``v``: ``∂⟨u, f(X)⟩/∂θ`` by one backward pass of
    the batch must equal ``Σ_i ∂⟨u_i, f(x_i)⟩/∂θ`` by one backward pass per example, and
    the forward-mode ``⟨u, J(X) v⟩`` must equal ``⟨∂⟨u, f(X)⟩/∂θ, v⟩`` for a tangent
    ``v = J(X)ᵀ u'`` of the kind the method pushes forward.

    Raises:
        TransformMismatch: saying which of the two differs.
    """
    names = list(fm.names)
    with torch.no_grad():
        logits = fm(fm.params, x)  # (N, C)
    u = _direction(logits.shape, logits)
    batch = _batch_gradient(fm, x, names, u)
    differs = _differs(batch, _per_example_gradient(fm, x, names, u), fm.dtype)
    if differs:
        raise TransformMismatch(
            "the model's forward or backward couples the examples of a batch (e.g. a "
            "batch-first input to a sequence-first layer, or an embedding with "
            f"scale_grad_by_freq=True): the whole-batch gradient of {differs} differs from "
            "the sum of per-example gradients"
        )
    # the tangent is a gradient J(X)ᵀ u', as the ones the method pushes forward (a
    # padding row, which no gradient reaches, is then not a direction of the check)
    other = _direction(logits.shape, logits, seed=1)
    v = {
        name: g.reshape(fm.params[name].shape)
        for name, g in _batch_gradient(fm, x, names, other).items()
    }
    _, tangent_out = jvp(lambda p: fm({**fm.params, **p}, x), (_selected(fm),), (v,))
    forward = (u * tangent_out).sum()
    reverse = sum((batch[name] * v[name].reshape(-1)).sum() for name in names)
    scale = max(
        float(u.norm() * tangent_out.norm()),
        sum(float(batch[name].norm() * v[name].norm()) for name in names),
        1e-30,
    )
    if abs(float(forward - reverse)) > _RTOL.get(fm.dtype, 1e-3) * scale:
        raise TransformMismatch(
            "the model's forward-mode derivative is not the adjoint of its backward (a "
            "backward that is not the derivative, e.g. an embedding with "
            "scale_grad_by_freq=True)"
        )


def random_weights(k: int, like: Tensor, seed: int = 2) -> Tensor:
    """``k`` random weights from a generator of their own (the global RNG is untouched)."""
    return _direction((k,), like, seed)


def combination_differs(
    weights: Tensor, batched: Mapping[str, Tensor], single: Mapping[str, Tensor]
) -> list[str]:
    """Names where ``Σ_k w_k batched[k]`` is not ``single``, the map applied once to ``Σ_k w_k``.

    A map batched by ``vmap`` over ``k`` inputs is linear in them: agreement along random
    weights means every batched result is the map's, with probability one.

    Args:
        weights: ``(k,)``, from :func:`random_weights`.
        batched: ``{name: (k, ...)}``, the batched results.
        single: ``{name: (...)}``, the map applied once to the weighted sum of the inputs.
    """
    combined = {
        name: torch.einsum("k,k...->...", weights, rows).reshape(-1)
        for name, rows in batched.items()
    }
    return _differs(combined, {name: single[name].reshape(-1) for name in batched}, weights.dtype)


def _selected(fm: FunctionalModel) -> dict[str, Tensor]:
    return {name: fm.params[name] for name in fm.names}


def _direction(shape: Sequence[int], like: Tensor, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(like)


def _batch_gradient(
    fm: FunctionalModel, x: Any, names: Sequence[str], u: Tensor
) -> dict[str, Tensor]:
    """``∂⟨u, f(X)⟩/∂θ`` by one plain backward pass of the whole batch, flattened."""
    wrt = {name: fm.params[name].detach().requires_grad_() for name in names}
    with torch.enable_grad():
        logits = fm({**fm.params, **wrt}, x)
        if not logits.requires_grad:  # no selected parameter reaches the logits
            return {name: torch.zeros_like(t).reshape(-1) for name, t in wrt.items()}
        grads = torch.autograd.grad(logits, list(wrt.values()), u, allow_unused=True)
    return {
        name: (torch.zeros_like(wrt[name]) if g is None else as_dense(g)).reshape(-1)
        for name, g in zip(wrt, grads)
    }


def _per_example_gradient(
    fm: FunctionalModel, x: Any, names: Sequence[str], u: Tensor
) -> dict[str, Tensor]:
    """``Σ_i ∂⟨u_i, f(x_i)⟩/∂θ``, one plain backward pass per example, flattened."""
    total: dict[str, Tensor] = {}
    for i in range(_inputs.batch_size(x)):
        one = _batch_gradient(fm, _inputs.take(x, slice(i, i + 1)), names, u[i : i + 1])
        total = one if not total else {name: total[name] + one[name] for name in names}
    return total


def _differs(a: Mapping[str, Tensor], b: Mapping[str, Tensor], dtype: torch.dtype) -> list[str]:
    """Names whose vectors differ beyond round-off (judged against the whole gradient)."""
    rtol = _RTOL.get(dtype, 1e-3)
    total = sum(float(t.square().sum()) for t in b.values()) ** 0.5
    out = []
    for name in a:
        scale = max(float(a[name].norm()), float(b[name].norm()), 1e-2 * total, 1e-30)
        if float((a[name] - b[name]).norm()) > rtol * scale:
            out.append(name)
    return out
