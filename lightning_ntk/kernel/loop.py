"""Per-example loop: reverse-mode gradients one example and one class at a time.

For each example ``x_i`` (a batch of one) one forward pass, then for each class ``a``
one backward pass ``∂f_a(x_i)/∂θ`` with ``torch.autograd.grad``; the rows are stacked
into per-example Jacobians ``J (N, C, P_l)`` and contracted like :mod:`.jacobian`.

No ``vmap``, no forward-mode AD, no batched gradients: it runs on any model that plain
``loss.backward()`` trains (data-dependent control flow, ``.item()``, ops without a
batching or forward-AD rule, fused kernels with a backward). It is the last method of
the fall-back chain and, in float64, the reference (:mod:`.reference`).

Cost: ``N`` forward and ``N·C`` backward passes of batch one, plus the contraction;
memory ``(N1 + N2)·C·P`` per block, like ``"jacobian"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _inputs
from ._functional import FunctionalModel, as_dense
from .jacobian import JacobianMethod


def loop_jacobians(fm: FunctionalModel, x: Any, names: Sequence[str]) -> dict[str, Tensor]:
    """Per-example Jacobians ``{name: (N, C, P_l)}`` of the logits, one backward at a time."""
    N = _inputs.batch_size(x)
    rows: dict[str, list[Tensor]] = {name: [] for name in names}
    with torch.enable_grad():  # also under a caller's torch.no_grad()
        for i in range(N):
            wrt = {name: fm.params[name].detach().requires_grad_() for name in names}
            logits = fm({**fm.params, **wrt}, _inputs.take(x, slice(i, i + 1)))[0]  # (C,)
            C = logits.shape[0]
            per_class: dict[str, list[Tensor]] = {name: [] for name in names}
            for a in range(C):
                if not logits.requires_grad:  # no selected parameter reaches the logits
                    grads: tuple = (None,) * len(wrt)
                else:
                    grads = torch.autograd.grad(
                        logits[a], list(wrt.values()), retain_graph=a < C - 1, allow_unused=True
                    )
                for name, g in zip(wrt, grads):
                    p = wrt[name]
                    per_class[name].append(torch.zeros_like(p) if g is None else as_dense(g))
            for name in names:
                rows[name].append(torch.stack(per_class[name]).reshape(C, -1))  # (C, P_l)
    return {name: torch.stack(rows[name]) for name in names}  # (N, C, P_l)


class LoopMethod(JacobianMethod):
    """``method="loop"``: see the module docstring (the Jacobians of :func:`loop_jacobians`)."""

    name = "loop"

    def jacobians(self, x: Any) -> dict[str, Tensor]:
        """Per-example Jacobians ``{name: (N, C, P_l)}`` of a chunk, one gradient at a time."""
        return loop_jacobians(self.fm, x, self.fm.names)
