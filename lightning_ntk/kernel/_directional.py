"""Exact directional derivatives ``J v`` of a model's logits, by several routes.

Each route takes ``evaluate(θ, x) -> logits (N, C)``, a batch ``x``, the point ``θ0`` and
a tangent ``v`` (both ``{name: tensor}``) and returns ``(f(x; θ0), J0(x) v)``:

* :func:`forward_mode`: one ``torch.func.jvp`` (optionally with oneDNN off, so that CPU
  ``nn.LSTM`` runs as cells, which have forward-mode rules);
* :func:`double_vjp`: the reverse-mode identity ``J v = ∂/∂u ⟨Jᵀ u, v⟩``;
* :func:`loop_jvp`: per-example reverse-mode gradients, one example and class at a time.

Reverse mode equals the forward pass's derivative only where every backward is that
derivative (not ``Embedding(padding_idx=...)`` once the padding row moved, nor a custom
function whose backward detaches), so :func:`checked` accepts a reverse-mode result only
when it matches a float64 central finite difference of the forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import vjp

from . import _inputs
from ._compat import forward_ad_kernels, jvp
from ._functional import as_dense

__all__ = [
    "BackwardMismatch",
    "checked",
    "double_vjp",
    "finite_difference",
    "forward_mode",
    "loop_jvp",
]

Evaluate = Callable[[Mapping[str, Tensor], Any], Tensor]
Params = dict[str, Tensor]

# Relative agreement a reverse-mode J v must reach with the float64 finite difference.
_CHECK_RTOL = {torch.float64: 1e-6}
_CHECK_RTOL_DEFAULT = 1e-3


def forward_mode(
    evaluate: Evaluate, x: Any, theta0: Params, tangent: Params, composite: bool = False
) -> tuple[Tensor, Tensor]:
    """``(f0, J v)`` by forward mode; ``composite`` turns oneDNN kernels off meanwhile."""
    if not composite:
        return jvp(lambda p: evaluate(p, x), (theta0,), (tangent,))
    with forward_ad_kernels():
        return jvp(lambda p: evaluate(p, x), (theta0,), (tangent,))


def double_vjp(
    evaluate: Evaluate, x: Any, theta0: Params, tangent: Params
) -> tuple[Tensor, Tensor]:
    """``J v`` as the vjp of ``u ↦ Jᵀ u`` (linear in ``u``) with cotangent ``v``.

    Autograd is switched on inside (the route works under a caller's ``torch.no_grad()``).
    """
    with torch.enable_grad():
        f0, vjp_fn = vjp(lambda p: evaluate(p, x), theta0)
        _, transpose_fn = vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(f0))
        (Jv,) = transpose_fn(tangent)
    return f0.detach(), Jv


def loop_jvp(evaluate: Evaluate, x: Any, theta0: Params, tangent: Params) -> tuple[Tensor, Tensor]:
    """``(J v)[i, a] = ⟨∂f_a(x_i)/∂θ, v⟩``, one backward pass per example and class.

    Autograd is switched on inside (the route works under a caller's ``torch.no_grad()``).
    """
    rows_f0, rows_Jv = [], []
    with torch.enable_grad():
        for i in range(_inputs.batch_size(x)):
            wrt = {n: t.detach().requires_grad_() for n, t in theta0.items()}
            logits = evaluate(wrt, _inputs.take(x, slice(i, i + 1)))[0]  # (C,)
            entries = []
            for a in range(logits.shape[0]):
                grads = torch.autograd.grad(
                    logits[a], list(wrt.values()), retain_graph=True, allow_unused=True
                )
                terms = [
                    (as_dense(g) * tangent[n]).sum() for n, g in zip(wrt, grads) if g is not None
                ]
                entries.append(sum(terms) + logits.new_zeros(()))
            rows_f0.append(logits.detach())
            rows_Jv.append(torch.stack(entries))
    return torch.stack(rows_f0), torch.stack(rows_Jv)


def checked(
    result: tuple[Tensor, Tensor],
    evaluate64: Callable[[Mapping[str, Tensor]], Tensor],
    theta0: Params,
    tangent: Params,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """A reverse-mode ``(f0, J v)``, returned only if it matches a float64 finite difference.

    Args:
        result: the route's ``(f0, J v)``.
        evaluate64: ``θ ↦ f(x; θ)`` in float64 on the same batch.
        theta0: the point, as given to the route.
        tangent: the direction, as given to the route.
        dtype: the compute dtype, which sets the tolerance.

    Raises:
        BackwardMismatch: the two differ: the model's backward is not its forward's
            derivative.
    """
    f0, Jv = result
    reference = finite_difference(evaluate64, theta0, tangent)
    err = (Jv.detach().double() - reference).norm().item()
    scale = reference.norm().item()
    rtol = _CHECK_RTOL.get(dtype, _CHECK_RTOL_DEFAULT)
    if not err <= rtol * scale + 1e-12 * (1.0 + f0.detach().double().norm().item()):
        raise BackwardMismatch(
            f"reverse-mode J v differs from the float64 finite difference of the forward "
            f"pass by {err:.3e} (relative {err / max(scale, 1e-300):.3e}): the model's "
            "backward is not the derivative of its forward here"
        )
    return f0, Jv


class BackwardMismatch(RuntimeError):
    """A reverse-mode ``J v`` that differs from the finite difference of the forward pass."""


def finite_difference(
    evaluate64: Callable[[Mapping[str, Tensor]], Tensor], theta0: Params, tangent: Params
) -> Tensor:
    """``J v`` by central differences in float64, Richardson-extrapolated (``O(h⁴)``)."""
    theta = {n: t.detach().double() for n, t in theta0.items()}
    v = {n: t.detach().double() for n, t in tangent.items()}
    v_norm = sum(float(t.square().sum()) for t in v.values()) ** 0.5
    theta_norm = sum(float(t.square().sum()) for t in theta.values()) ** 0.5

    def f(s: float) -> Tensor:
        return evaluate64({n: theta[n] + s * v[n] for n in theta})

    if v_norm == 0.0:
        return torch.zeros_like(f(0.0))
    h = 1e-6 * max(theta_norm, 1.0) / v_norm  # small: few ReLU kinks crossed

    def central(step: float) -> Tensor:
        return (f(step) - f(-step)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3
