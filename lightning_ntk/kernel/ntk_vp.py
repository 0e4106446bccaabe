"""NTK-vector products: columns of ``Θ(X1, X2)`` without a Jacobian of ``X1``.

Column ``(j, b)`` of the kernel is ``J(X1) J(x_j)[b]ᵀ``: a ``vjp`` of ``f(X2)`` with
the one-hot cotangent ``e_{j,b}`` gives the parameter tangent ``J(x_j)[b]``, and a ``jvp``
of ``f(X1)`` along it gives the column. Both are batched with ``vmap`` over a group of
cotangents whose size bounds the memory (``k·P`` for the tangents plus ``k`` forward
passes over ``X1``), unlike the nested-``vmap`` recipe that pushes all ``N2·C``
cotangents at once.

Cost: ``N2·C`` vjps and jvps, each over a batch of ``N1``: about ``3·N1·N2·C`` forward
passes. It wins when ``P`` is so large that even one Jacobian block does not fit, and it
needs no knowledge of the layers. The full kernel is always computed; ``"diagonal"`` and
``"trace"`` are read from it. ``per_layer=True`` costs one jvp per parameter group.

The method differentiates whole batches, so every chunk is first checked to be the
per-example function the kernel is defined by (:func:`._checks.check_batch_function`:
one backward pass per example, one of the batch and one ``jvp``), and the batched
``vjp`` / ``jvp`` of each group against one plain ``vjp`` / ``jvp`` along a random
combination of its directions; a model that fails a check makes the method fail (the
call then falls back) instead of returning another function's kernel.

Optimizer kernels ``J(X1) T(J(x_j)[b])``: the tangent is mapped before the jvp
(``sign`` for ``"asymmetric_signgd"``, ``d ⊙`` for ``"adam"``); ``"signgd"`` needs the
sign of ``J(X1)`` too, which no jvp gives, so it is not computed here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.func import vjp, vmap

from . import _inputs
from ._checks import (
    TransformMismatch,
    check_batch_function,
    combination_differs,
    random_weights,
)
from ._compat import jvp
from ._functional import FunctionalModel
from ._layout import reduce_full
from ._optimizer import KernelSpec

# Tangent memory budget per group of cotangents (numbers, not bytes).
_TANGENT_BUDGET = 2**24


class NTKVPMethod:
    """``method="ntk_vp"``: see the module docstring."""

    name = "ntk_vp"

    def __init__(
        self,
        fm: FunctionalModel,
        output: str,
        per_layer: bool,
        group_size: Optional[int] = None,
        spec: Optional[KernelSpec] = None,
    ) -> None:
        self.fm, self.output, self.per_layer = fm, output, per_layer
        self.group_size = group_size
        self.spec = spec or KernelSpec()

    def features(self, x: Any) -> Any:
        """The chunk itself (every block runs its own vjp / jvp), once checked.

        Raises:
            TransformMismatch: the chunk's whole-batch derivatives are not those of each
                example alone (:func:`._checks.check_batch_function`).
        """
        check_batch_function(self.fm, x)
        return x

    def block(self, x1: Any, x2: Any) -> dict[str, Tensor]:
        """Kernel block ``Θ(x1, x2)``: one entry per parameter, or the total under ``""``."""
        fm = self.fm
        N1, N2 = _inputs.batch_size(x1), _inputs.batch_size(x2)
        logits2, vjp_fn = vjp(lambda p: fm(p, x2), fm.params)
        C = logits2.shape[1]
        group = self.group_size or max(1, min(N2 * C, _TANGENT_BUDGET // max(fm.num_params, 1)))
        groups = {key: [] for key in (fm.names if self.per_layer else [""])}
        eye = torch.eye(N2 * C, dtype=logits2.dtype, device=logits2.device)
        for start in range(0, N2 * C, group):
            cotangents = eye[start : start + group].reshape(-1, N2, C)  # (k, N2, C)
            (rows,) = vmap(vjp_fn)(cotangents)  # J(x2)[b]: {name: (k, *shape)}
            weights = random_weights(len(cotangents), logits2)  # (k,)
            (combined,) = vjp_fn(torch.einsum("k,knc->nc", weights, cotangents))
            _check_combination(weights, rows, combined, "vmap(vjp)")
            tangents = self.spec.tangents(rows)  # e.g. sign(J(x2)[b]), or d ⊙ J(x2)[b]
            along = {n: torch.einsum("k,k...->...", weights, t) for n, t in tangents.items()}
            columns = {key: self._push_forward(x1, tangents, key) for key in groups}  # (k, N1, C)
            single = {key: self._push_forward(x1, along, key, batched=False) for key in groups}
            _check_combination(weights, columns, single, "vmap(jvp)")
            for key in groups:
                groups[key].append(columns[key])
        blocks = {}
        for key, columns in groups.items():
            cols = torch.cat(columns).reshape(N2, C, N1, C)  # [j, b, i, a]
            blocks[key] = reduce_full(cols.permute(2, 0, 3, 1), self.output)
        return blocks

    def _push_forward(
        self, x1: Any, tangents: dict[str, Tensor], key: str, batched: bool = True
    ) -> Tensor:
        """``J(X1) t`` for each tangent ``t`` in the group: ``(k, N1, C)``.

        With ``batched=False``, ``tangents`` is one tangent and the result ``(N1, C)``.
        """
        fm = self.fm
        if key == "":
            primals = fm.params

            def f(p: dict[str, Tensor]) -> Tensor:
                return fm(p, x1)
        else:
            primals = {key: fm.params[key]}
            tangents = {key: tangents[key]}

            def f(p: dict[str, Tensor]) -> Tensor:
                return fm({**fm.params, **p}, x1)

        def column(t: dict[str, Tensor]) -> Tensor:
            return jvp(f, (primals,), (t,))[1]

        return vmap(column)(tangents) if batched else column(tangents)


def _check_combination(
    weights: Tensor, batched: dict[str, Tensor], single: dict[str, Tensor], how: str
) -> None:
    """Raise :class:`TransformMismatch` where ``vmap`` batched the map wrongly.

    See :func:`._checks.combination_differs`: a batching rule PyTorch gets wrong.
    """
    differs = combination_differs(weights, batched, single)
    if differs:
        names = ", ".join(name or "the model" for name in differs)
        raise TransformMismatch(
            f"{how} of {names} differs from the same map applied once "
            "(a batching rule PyTorch gets wrong for an op of this model)"
        )
