"""Jacobian contraction: materialise per-example Jacobians, then contract.

``J(X) = vmap(jacrev(f))(θ, X)`` gives ``{name: (N, C, *shape)}``; flattened to
``(N, C, P_l)`` per parameter, the kernel is ``Σ_l J1_l J2_lᵀ``. Every chunk's Jacobians
are checked against plain autograd along a random direction (:func:`._checks.check_jacobians`:
one more backward pass), so a batching rule PyTorch gets wrong makes the method fail
(and the call fall back) instead of returning a wrong kernel.

Cost: ``C`` backward passes per example (batched by ``vmap``) plus ``N1·N2·C²·P``
multiply-adds for the full layout (``N1·N2·C·P`` for diagonal / trace). Memory:
``(N1 + N2)·C·P`` numbers per block, bounded through ``chunk_size``. Works for any
differentiable model: it is the fallback of every other method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from ._checks import check_jacobians
from ._functional import FunctionalModel
from ._layout import contract_jacobians
from ._optimizer import KernelSpec


def jacobians(fm: FunctionalModel, x: Any, names: Sequence[str]) -> dict[str, Tensor]:
    """Per-example Jacobians ``{name: (N, C, P_l)}`` of the logits w.r.t. ``names``."""
    wrt = {name: fm.params[name] for name in names}
    fixed = {name: p for name, p in fm.params.items() if name not in wrt}

    def logits(wrt_params: dict[str, Tensor], x_single: Any) -> Tensor:
        return fm.single({**fixed, **wrt_params}, x_single)

    jac = vmap(jacrev(logits), in_dims=(None, 0))(wrt, x)  # {name: (N, C, *shape)}
    out = {name: j.reshape(*j.shape[:2], -1) for name, j in jac.items()}
    check_jacobians(fm, x, list(names), out, "vmap(jacrev)")
    return out


def contract(
    J1: dict[str, Tensor], J2: dict[str, Tensor], output: str, per_layer: bool
) -> dict[str, Tensor]:
    """Kernel blocks from Jacobians: one per parameter, or the total under key ``""``."""
    if per_layer:
        return {name: contract_jacobians(J1[name], J2[name], output) for name in J1}
    cat1 = torch.cat(list(J1.values()), dim=2)  # (N1, C, P)
    cat2 = cat1 if J2 is J1 else torch.cat(list(J2.values()), dim=2)  # (N2, C, P)
    return {"": contract_jacobians(cat1, cat2, output)}


class JacobianMethod:
    """``method="jacobian"``: see the module docstring.

    Subclasses change only how per-example Jacobians are computed (:meth:`jacobians`).
    """

    name = "jacobian"

    def __init__(
        self, fm: FunctionalModel, output: str, per_layer: bool, spec: Optional[KernelSpec] = None
    ) -> None:
        self.fm, self.output, self.per_layer = fm, output, per_layer
        self.spec = spec or KernelSpec()

    def features(self, x: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The kernel's left and right factors ``{name: (N, C, P_l)}`` of a chunk.

        Per-example Jacobians, mapped by :meth:`.KernelSpec.sides` (e.g. ``sign J``).
        """
        return self.spec.sides(self.jacobians(x))

    def jacobians(self, x: Any) -> dict[str, Tensor]:
        """Per-example Jacobians ``{name: (N, C, P_l)}`` of a chunk, by ``vmap(jacrev)``."""
        return jacobians(self.fm, x, self.fm.names)

    def block(self, f1: tuple, f2: tuple) -> dict[str, Tensor]:
        """Kernel block ``L(x1) R(x2)ᵀ``: one entry per parameter, or the total under ``""``."""
        return contract(f1[0], f2[1], self.output, self.per_layer)
