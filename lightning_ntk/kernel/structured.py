"""Structured per-layer contraction: the kernel from layer inputs and output cotangents.

One forward pass records, for every supported layer, its input ``H``; one batched
backward pass (``C`` cotangents at once) gives the cotangents ``G[a]`` of its output for
every class ``a``. No parameter gradient is ever taken by autograd. Then, per layer:

* ``nn.Linear`` (any leading dimensions): ``Θ_W = Σ_{t,s} (H Hᵀ) ⊙ (G Gᵀ)``, which for a
  plain ``(N, d_in)`` input is ``(H Hᵀ) ⊙ (G Gᵀ)``; the bias adds ``G Gᵀ`` (folded into
  the same product as ``(H Hᵀ + 1) ⊙ (G Gᵀ)``).
* ``nn.Conv1d/2d/3d`` (zero padding, any stride / dilation / groups): the same with the
  unfolded input patches as ``H``; per layer the cheaper of the patch Gram and
  per-example-gradient contraction is used (:func:`._factors.prefer_gram`).
* ``nn.Embedding``: the same with one-hot ``H``, i.e. the token-equality Gram, summed
  over the matching token positions only.
* affine parameters of ``nn.LayerNorm``, ``nn.BatchNorm1d/2d/3d`` (running statistics)
  and ``nn.GroupNorm``: small per-example gradients ``Σ G ⊙ x̂`` and ``Σ G``.
* layers written as calls, ``F.linear`` / ``F.conv1d/2d/3d`` on a selected weight or on
  a constant multiple of it (``F.linear(h, w * c, b * c_b)``, the NTK parameterization),
  wherever the forward makes them (:mod:`._calls`): the ``Linear`` / convolution factors
  with the input scaled by ``c`` and the bias gradient by ``c_b``.

Everything else falls back to exact Jacobian contraction (:mod:`.jacobian`) for that
parameter: parameters used otherwise (custom operations, attention's packed
projections, ``w * c`` with a learned or per-row ``c``), tied or reused weights (a
parameter held by two modules, a module or weight called twice),
convolutions with non-zero padding modes, embeddings with ``max_norm``, BatchNorm without
running statistics, subclasses that override ``forward``.

Before use, every structured parameter is *verified per example* on the call's own
inputs: for a random cotangent ``u_r`` on each of a few examples ``r`` (one backward pass
for all of them), the layer's input and output must have one row per example, the output
cotangent must vanish on every other example's rows, and the gradient rebuilt from the
layer's factors must equal autograd's gradient of ``⟨u_r, f(x_r)⟩``. A layer applied to a
batch-free input whose output is broadcast over the batch (a ``(1, T)`` position-index
buffer, ``arange``, a learned constant), applied to a sequence-first layout, or whose
parameter is also used outside its call fails that test and falls back.

A verified plan is cached per model structure, but every chunk of every call checks it
again (:func:`._plan.check_call`), at the cost of one more backward pass: each layer
must have been called exactly once, with one input and output row per example, its
output rows must reach only their own example's logits and its parameters must act only
through its call. A layer that fails (data-dependent control flow that runs it twice on
some inputs, an attribute that changed the forward) hands its parameters to per-example
Jacobians for that call. The kernel is therefore always exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from . import _inputs
from ._factors import (
    LayerInput,
    contract_gram,
    contract_token_pairs,
    per_example_outer,
    prefer_gram,
)
from ._functional import FunctionalModel
from ._layout import contract_jacobians
from ._plan import StructurePlan, check_call, fingerprint, plan_structure
from ._recording import (
    NORMS,
    Layer,
    record,
    small_per_example,
    weight_factors,
)
from .jacobian import jacobians
from .loop import loop_jacobians

__all__ = ["StructurePlan", "StructuredMethod", "fingerprint", "plan_structure"]

_CONCAT_BELOW = 1024  # parameters: smaller per-example gradient blocks share one product


class StructuredMethod:
    """``method="structured"``: see the module docstring."""

    name = "structured"

    def __init__(
        self,
        fm: FunctionalModel,
        output: str,
        per_layer: bool,
        plan: StructurePlan,
        block_size: int,
        on_fallback: Optional[Callable[[BaseException], None]] = None,
        loop_fallback: bool = False,
    ) -> None:
        self.fm, self.output, self.per_layer, self.plan = fm, output, per_layer, plan
        self._block_size = block_size
        self._on_fallback = on_fallback
        self._loop_fallback = loop_fallback  # per-example Jacobians by a loop (no vmap)

    # ----------------------------------------------------------------- features
    def features(self, x: Any) -> dict[str, Any]:
        """Per-example gradients ``{name: (N, C, P)}`` and Gram factors for a chunk.

        Raises:
            PlanMismatch: a planned layer did not behave as the plan assumes on ``x``
                (:func:`._plan.check_call`); the call then hands that layer's parameters
                to per-example Jacobians.
        """
        per_example: dict[str, Tensor] = {}
        grams: dict[str, tuple[LayerInput, Tensor, Optional[str], float]] = {}
        if self.plan.layers:
            rec = record(self.fm, self.plan.layers, x, probe=True)
            inputs, cotangents = rec.inputs, rec.cotangents
            check_call(self.fm, self.plan.layers, rec, _inputs.batch_size(x))
            for layer in self.plan.layers:
                H, G = weight_factors(layer, inputs[layer.name], cotangents[layer.name], self.fm)
                for name, J in small_per_example(
                    layer, inputs[layer.name], cotangents[layer.name], self.fm
                ).items():
                    per_example[name] = J
                if layer.weight is None or isinstance(layer.module, NORMS):
                    continue  # norm weights are among the small per-example gradients
                if self._use_gram(layer, H, G):
                    # the bias kernel c_b c_b' Σ G·G' reuses the weight's cotangent Gram
                    bias = layer.bias if layer.bias in per_example else None
                    if bias is not None:
                        del per_example[bias]
                    scale = layer.spec.bias_scale if layer.spec is not None else 1.0
                    grams[layer.weight] = (H, G, bias, scale)
                else:
                    per_example[layer.weight] = per_example_outer(H, G, layer.groups)
        if self.plan.fallback_names:
            per_example.update(self._fallback_jacobians(x))
        return {"per_example": per_example, "grams": grams}

    def _fallback_jacobians(self, x: Any) -> dict[str, Tensor]:
        """Per-example Jacobians of the unstructured parameters: ``vmap``, else a loop."""
        names = self.plan.fallback_names
        if not self._loop_fallback:
            try:
                return jacobians(self.fm, x, names)
            except Exception as err:
                self._loop_fallback = True
                if self._on_fallback is not None:
                    self._on_fallback(err)
        return loop_jacobians(self.fm, x, names)

    def _use_gram(self, layer: Layer, H: LayerInput, G: Tensor) -> bool:
        if layer.groups != 1:
            return False
        C, _, T, D = G.shape
        matches = None
        if H.tokens is not None:  # per example of this block, scaled to a full block
            matches = H.matches() * self._block_size // max(1, H.tokens.shape[0])
        return prefer_gram(self._block_size, C, T, H.width, D, self.output, matches)

    # ------------------------------------------------------------------- blocks
    def block(self, f1: dict[str, Any], f2: dict[str, Any]) -> dict[str, Tensor]:
        """Kernel block: one entry per parameter, or the total under ``""``."""
        J1, J2 = f1["per_example"], f2["per_example"]
        parts: dict[str, Tensor] = {}
        for name, (H1, G1, bias, bias_scale1) in f1["grams"].items():
            H2, G2, _, bias_scale2 = f2["grams"][name]
            if H1.tokens is not None:  # an embedding (no bias): matching tokens only
                parts[name] = contract_token_pairs(H1, H2, G1, G2, self.output)
                continue
            A = H1.gram(H2)  # (N1, T, N2, S)
            if bias is None:
                parts[name] = contract_gram(A, G1, G2, self.output)
            elif self.per_layer:
                parts[name], bias_part = contract_gram(A, G1, G2, self.output, with_bias=True)
                parts[bias] = bias_part * (bias_scale1 * bias_scale2)
            else:  # bias gradient c_b Σ_t G: the same product with H·H' + c_b c_b'
                parts[name] = contract_gram(A + bias_scale1 * bias_scale2, G1, G2, self.output)
        if self.per_layer:
            for name in J1:
                parts[name] = contract_jacobians(J1[name], J2[name], self.output)
            return parts
        # large per-example blocks are contracted one by one (concatenating them would
        # copy them all); the small ones together, as one product
        small = [name for name, J in J1.items() if J.shape[2] < _CONCAT_BELOW]
        if small:
            cat1 = torch.cat([J1[name] for name in small], dim=2)  # (N1, C, P')
            cat2 = cat1 if J2 is J1 else torch.cat([J2[name] for name in small], dim=2)
            parts[""] = contract_jacobians(cat1, cat2, self.output)
        for name, J in J1.items():
            if name not in small:
                parts[name] = contract_jacobians(J, J2[name], self.output)
        total = None
        for K in parts.values():
            total = K if total is None else total + K
        return {"": total}
