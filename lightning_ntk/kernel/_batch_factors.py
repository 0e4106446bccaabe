"""Layer factors of the whole-batch function: its kernel without the ``N·C × P`` Jacobian.

The whole-batch logits ``F(θ) = f(X; θ) ∈ R^{N×C}`` (rows coupled through batch
statistics) have ``K = N·C`` outputs; output ``k = (i, a)`` pulls back the basis
cotangent ``e_k``. For a layer ``y = W h`` applied at the ``R`` rows of its input ``H``
(``R = N·T``: examples times positions, pixels or tokens), with ``G_k (R, D_out)`` the
cotangent of its output for ``e_k``, the weight's gradient is ``G_kᵀ H`` (whatever
couples the rows elsewhere: ``H`` does not depend on ``W``), so its kernel is

    ``M[k, l] = ⟨G_kᵀ H, G_lᵀ H⟩ = Σ_{r,s} (H Hᵀ)[r, s] (G_k G_lᵀ)[r, s]``.

Two exact routes, chosen per layer by their cost (:func:`_prefers_gradients`):

* **gradients** — ``J_k = G_kᵀ H`` for the ``k`` of a chunk (``k_c × D_out·D_in``),
  then ``J Jᵀ``: ``2·K·R·D_out·D_in + K²·D_out·D_in`` flops;
* **Gram** — ``M[k, l] = ⟨(H Hᵀ) G_k, G_l⟩`` over tiles of rows of ``H Hᵀ``:
  ``R²·D_in + 2·K·R²·D_out + K²·R·D_out`` flops; no weight-sized block is formed.

Convolutions use their unfolded input patches as ``H``; an embedding's ``H`` is one-hot,
so its gradient is kept on the tokens that occur (``U ≤ R`` rows). Biases are
``Σ_r G_k[r]``; a BatchNorm's affine weight is ``Σ_r G_k[r] ⊙ x̂[r]`` with ``x̂`` its input
normalised by the batch's own statistics; LayerNorm / GroupNorm affines as in the
structured method. Every other selected parameter (an unsupported layer, a reused
module, a weight also used outside its layer) gets its Jacobian rows from autograd in the
same backward pass, for those parameters only.

One forward pass records each layer's input ``H``; one batched backward pass of a chunk of
cotangents records the ``G_k`` (:func:`._recording.record`). Before that, every call
verifies the factors on the call's own batch: for one random cotangent ``u (N, C)`` the
gradient rebuilt from each layer's factors must equal autograd's ``∂⟨u, F⟩/∂θ`` (a
linear map that agrees on a random direction agrees everywhere, with probability one);
a parameter that fails falls back to its Jacobian rows.

Memory: with ``B = _CHUNK_BUDGET`` numbers, the ``K`` cotangents go in chunks of ``k_c``
such that ``k_c · (recorded cotangent numbers + features per cotangent) ≤ B``; the
features of all chunks are kept when ``K`` of them fit in ``_KEEP_BUDGET``, otherwise a
chunk's features are recomputed for every pair of chunks (two chunks held at a time).
Peak memory is therefore ``O(B + _KEEP_BUDGET + R·tile + K²)`` numbers, independent of
``N·C·P``; only a fall-back parameter's gradient row (``P_fb`` numbers per cotangent, one
cotangent at a time at worst) grows with its size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._factors import LayerInput, per_example_outer
from ._functional import FunctionalModel
from ._recording import (
    CONVS,
    NORMS,
    Layer,
    Recording,
    candidate_layers,
    record,
    small_per_example,
    weight_factors,
)

__all__ = ["BatchPlan", "batch_kernel_matrix", "plan_batch"]

# Numbers in one chunk of recorded cotangents plus the features built from them.
_CHUNK_BUDGET = 2**24
# Numbers of the features of all K cotangents kept at once (beyond: recomputed per pair).
_KEEP_BUDGET = 2**27
# A weight with more parameters than this never forms per-cotangent gradients.
_GRADIENT_LIMIT = 2**22
# Numbers in one tile of the input Gram ``H Hᵀ``.
_TILE_BUDGET = 2**24

_VERIFY_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}

_BATCH_NORM = nn.modules.batchnorm._BatchNorm


@dataclass
class BatchPlan:
    """Which selected parameters have whole-batch factors, and how they are contracted."""

    layers: list[Layer] = field(default_factory=list)
    gram_weights: set[str] = field(default_factory=set)  # weights on the Gram route
    fallback_names: list[str] = field(default_factory=list)
    num_examples: int = 0  # N of the logits (N, C)
    num_classes: int = 0  # C
    chunk: int = 1  # cotangents per backward pass
    keep_all: bool = True  # keep every chunk's features (else recompute per pair)


# --------------------------------------------------------------------------- plan
def plan_batch(fm: FunctionalModel, x: Tensor) -> BatchPlan:
    """Candidate layers of ``fm``, verified on ``x``; routes and chunk size for ``K = N·C``.

    Raises:
        RuntimeError: the recording fails (the caller then uses the whole Jacobian).
    """
    layers = candidate_layers(fm, _supported)
    rec, logits_shape = _verification_recording(fm, layers, x)
    layers = [layer for layer in layers if _verified(fm, layer, rec)]
    structured = {n for layer in layers for n in layer.param_names}
    plan = BatchPlan(layers, fallback_names=[n for n in fm.names if n not in structured])
    N, C = logits_shape
    plan.num_examples, plan.num_classes = N, C
    K = N * C
    recorded = 0  # numbers recorded per cotangent
    features = sum(fm.params[n].numel() for n in plan.fallback_names)
    for layer in layers:
        grad = rec.cotangents[layer.name][0]
        rows, width_out = _rows_and_width(layer, grad)
        recorded += grad.numel()
        for name in layer.param_names:
            size = fm.params[name].numel()
            if name == layer.weight and _is_dense_weight(layer):
                width_in = size // width_out  # per output feature
                if not _prefers_gradients(K, rows, width_in, width_out, size):
                    plan.gram_weights.add(name)
                    features += 2 * rows * width_out  # G and (H Hᵀ) G
                    continue
            if name == layer.weight and isinstance(layer.module, nn.Embedding):
                size = min(size, rows * width_out)  # rows of the tokens that occur
            features += size
    per_cotangent = max(1, recorded + features)
    plan.chunk = max(1, min(K, _CHUNK_BUDGET // per_cotangent))
    plan.keep_all = K * features <= _KEEP_BUDGET
    return plan


def _supported(module: nn.Module) -> bool:
    """A layer type with whole-batch factors and its stock forward.

    Every BatchNorm is normalised by batch statistics while the kernel is measured
    (:func:`.batch_statistics.batch_statistics_mode` replaces its ``forward``).
    """
    if isinstance(module, _BATCH_NORM):
        return True
    for base in (nn.Linear, *CONVS, nn.Embedding, nn.LayerNorm, nn.GroupNorm):
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                return False
            if isinstance(module, CONVS):
                return module.padding_mode == "zeros"
            if isinstance(module, nn.Embedding):
                return module.max_norm is None
            return True
    return False


def _is_dense_weight(layer: Layer) -> bool:
    """A Linear or ungrouped convolution weight: its Gram ``H Hᵀ`` spans all its inputs."""
    return isinstance(layer.module, (nn.Linear, *CONVS)) and getattr(layer.module, "groups", 1) == 1


def _rows_and_width(layer: Layer, grad: Tensor) -> tuple[int, int]:
    """``(R, D_out)`` of a layer from one cotangent of its output ``grad (N, *out)``."""
    if isinstance(layer.module, CONVS):
        return grad[0, 0].numel() * grad.shape[0], grad.shape[1]
    return grad.numel() // grad.shape[-1], grad.shape[-1]


def _prefers_gradients(K: int, R: int, D_in: int, D_out: int, size: int) -> bool:
    """Whether per-cotangent gradients are cheaper than the Gram route (see module doc)."""
    if size > _GRADIENT_LIMIT:
        return False
    gradients = 2 * K * R * D_out * D_in + K * K * D_out * D_in
    gram = R * R * D_in + 2 * K * R * R * D_out + K * K * R * D_out
    return gradients <= gram


# ----------------------------------------------------------------- verification
def _verification_recording(
    fm: FunctionalModel, layers: list[Layer], x: Tensor
) -> tuple[Recording, tuple[int, int]]:
    """Layer factors and autograd's gradients for one random cotangent ``u (N, C)``."""
    generator = torch.Generator().manual_seed(0)
    shape: list[tuple[int, int]] = []

    def random_cotangent(logits: Tensor) -> Tensor:
        shape.append(tuple(logits.shape))  # type: ignore[arg-type]
        u = torch.randn(logits.shape, generator=generator, dtype=logits.dtype)
        return u.to(logits.device).unsqueeze(0)  # (1, N, C)

    wrt = {
        name: fm.params[name].detach().requires_grad_()
        for layer in layers
        for name in layer.param_names
    }
    rec = record(fm, layers, x, cotangents=random_cotangent, wrt=wrt)
    return rec, shape[0]


def _verified(fm: FunctionalModel, layer: Layer, rec: Recording) -> bool:
    """Keep the layer's parameters whose rebuilt gradient equals autograd's (prunes ``layer``)."""
    if rec.calls.get(layer.name, 0) != 1 or layer.name not in rec.inputs:
        return False
    rebuilt = _gradient_rows(layer, rec.inputs[layer.name], rec.cotangents[layer.name], fm)
    total = sum(float(g.square().sum()) for g in rec.param_grads.values() if g is not None)
    rtol = _VERIFY_RTOL.get(fm.dtype, 1e-3)
    for name, g in rebuilt.items():
        ref = rec.param_grads.get(name)
        ref = torch.zeros_like(g) if ref is None else ref.reshape(g.shape)
        # round-off is judged against the whole gradient: a bias before a BatchNorm has
        # a true gradient of zero and rebuilds to round-off
        scale = max(ref.norm().item(), g.norm().item(), 1e-3 * total**0.5, 1e-30)
        if (g - ref).norm().item() > rtol * scale:
            setattr(layer, "weight" if name == layer.weight else "bias", None)
    return bool(layer.param_names)


# ------------------------------------------------------------------- features
def _gradient_rows(
    layer: Layer,
    inp: Tensor,
    grad: Tensor,
    fm: FunctionalModel,
    compact: bool = False,
    with_weight: bool = True,
) -> dict[str, Tensor]:
    """Whole-batch gradients ``(k, P_l)`` of the layer's parameters for cotangents ``grad``.

    ``grad (k, *output)`` holds the cotangents of the layer's output. With ``compact``,
    an embedding's gradient keeps only the rows of the tokens that occur (its other rows
    are zero), which leaves every inner product unchanged. ``with_weight=False`` leaves
    out a Linear / convolution weight (its kernel goes by the Gram route).
    """
    module = layer.module
    k = grad.shape[0]
    if isinstance(module, _BATCH_NORM):  # y = x̂ ⊙ γ + β, x̂ from the batch's statistics
        x_hat = F.batch_norm(inp, None, None, None, None, True, 0.0, module.eps)
        dims = (1, *range(3, grad.ndim))
        rows = {}
        if layer.weight is not None:
            rows[layer.weight] = (grad * x_hat).sum(dims)  # (k, Ch)
        if layer.bias is not None:
            rows[layer.bias] = grad.sum(dims)
        return rows
    rows = {name: J.sum(0) for name, J in small_per_example(layer, inp, grad, fm).items()}
    if layer.weight is None or isinstance(module, NORMS) or not with_weight:
        return rows
    H, G = weight_factors(layer, inp, grad, fm)  # G (k, N, T, D_out)
    D = G.shape[-1]
    if H is not None and H.tokens is not None:
        rows[layer.weight] = _embedding_rows(H, G.reshape(k, -1, D), compact)
    elif H is not None and H.dense is not None:
        dense = LayerInput(dense=H.dense.reshape(1, -1, H.dense.shape[-1]))
        groups = getattr(module, "groups", 1)
        rows[layer.weight] = per_example_outer(dense, G.reshape(k, 1, -1, D), groups)[0]
    return rows


def _embedding_rows(H: LayerInput, G: Tensor, compact: bool) -> Tensor:
    """``Σ_r G[:, r] ⊗ onehot(tok_r)``: ``(k, V·D)``, or ``(k, U·D)`` on the ``U`` tokens seen."""
    assert H.tokens is not None
    tokens = H.tokens.reshape(-1)
    keep = tokens >= 0
    rows = G[:, keep]  # (k, R', D)
    if compact:
        seen, index = torch.unique(tokens[keep], return_inverse=True)
        width = seen.numel()
    else:
        index, width = tokens[keep], H.vocab
    out = G.new_zeros(G.shape[0], width, G.shape[-1]).index_add_(1, index, rows)
    return out.reshape(G.shape[0], -1)


@dataclass
class _Features:
    """What one chunk of cotangents contributes: per-cotangent rows and Gram factors."""

    rows: dict[str, Tensor]  # name (or "" for the concatenated ones) -> (k, P')
    grams: dict[str, tuple[Tensor, Tensor]]  # weight -> (G, (H Hᵀ) G), each (R, k, D_out)


def _features(
    fm: FunctionalModel, plan: BatchPlan, x: Tensor, cotangents: Tensor, per_layer: bool
) -> _Features:
    """Record the chunk ``cotangents (k, N, C)`` and build its features."""
    wrt = {name: fm.params[name].detach().requires_grad_() for name in plan.fallback_names}
    rec = record(fm, plan.layers, x, cotangents=lambda logits: cotangents, wrt=wrt)
    k = cotangents.shape[0]
    rows: dict[str, Tensor] = {}
    grams: dict[str, tuple[Tensor, Tensor]] = {}
    for name in plan.fallback_names:
        g = rec.param_grads[name]
        rows[name] = (
            fm.params[name].new_zeros(k, fm.params[name].numel())
            if g is None
            else (g.reshape(k, -1))
        )
    for layer in plan.layers:
        inp, grad = rec.inputs[layer.name], rec.cotangents[layer.name]
        if layer.weight in plan.gram_weights:  # (H, G) only: no weight-sized block
            H, G = weight_factors(layer, inp, grad, fm)
            assert H is not None and H.dense is not None
            D_in, D_out = H.dense.shape[-1], G.shape[-1]
            G_rows = G.reshape(k, -1, D_out).transpose(0, 1).contiguous()  # (R, k, D_out)
            grams[layer.weight] = (G_rows, _gram_times(H.dense.reshape(-1, D_in), G_rows))
        gram = layer.weight in plan.gram_weights
        rows.update(_gradient_rows(layer, inp, grad, fm, compact=True, with_weight=not gram))
    if not per_layer and rows:
        rows = {"": torch.cat(list(rows.values()), dim=1)}
    return _Features(rows, grams)


# ----------------------------------------------------------------- contraction
def batch_kernel_matrix(
    fm: FunctionalModel, x: Tensor, plan: BatchPlan, per_layer: bool
) -> dict[str, Tensor]:
    """``M = J Jᵀ (K, K)`` of the whole-batch logits ``(N, C)``, ``K = N·C``, by its factors.

    Returns ``{parameter name: its M}`` with ``per_layer``, else ``{"": M}``; the rows are
    sample-major (``k = i·C + a``). ``M`` is exactly symmetric.
    """
    N, C = plan.num_examples, plan.num_classes
    K = N * C
    eye = torch.eye(K, dtype=fm.dtype, device=fm.device).reshape(K, N, C)
    starts = list(range(0, K, plan.chunk))

    def chunk_features(start: int) -> _Features:
        return _features(fm, plan, x, eye[start : start + plan.chunk], per_layer)

    out: dict[str, Tensor] = {}
    kept: dict[int, _Features] = {}
    for a, start_a in enumerate(starts):
        fa = kept[start_a] if start_a in kept else chunk_features(start_a)
        if plan.keep_all:
            kept[start_a] = fa
        for start_b in starts[a:]:
            if start_b == start_a:
                fb = fa
            elif plan.keep_all and start_b in kept:
                fb = kept[start_b]
            else:
                fb = chunk_features(start_b)
                if plan.keep_all:
                    kept[start_b] = fb
            for name, block in _block(fa, fb):
                M = out.get(name)
                if M is None:
                    M = out[name] = block.new_zeros(K, K)
                rows_a = slice(start_a, start_a + block.shape[0])
                rows_b = slice(start_b, start_b + block.shape[1])
                M[rows_a, rows_b] += block
                if start_b != start_a:
                    M[rows_b, rows_a] += block.T
    if not per_layer and len(out) > 1:
        out = {"": sum(out.values())}  # type: ignore[dict-item]
    return {name: 0.5 * (M + M.T) for name, M in out.items()}


def _block(fa: _Features, fb: _Features) -> Iterator[tuple[str, Tensor]]:
    """``M[k, l]`` for ``k`` in chunk ``a`` and ``l`` in chunk ``b``, per feature."""
    for name, Ja in fa.rows.items():
        yield name, Ja @ fb.rows[name].T
    for name, (Ga, _) in fa.grams.items():
        # M[k, l] = Σ_{r,s} (H Hᵀ)[r, s] Ga[r, k]·Gb[s, l] = ⟨Ga[:, k], ((H Hᵀ) Gb)[:, l]⟩
        Zb = fb.grams[name][1]
        R, ka, D = Ga.shape
        yield name, Ga.transpose(0, 1).reshape(ka, R * D) @ Zb.transpose(0, 1).reshape(-1, R * D).T


def _gram_times(H: Tensor, G: Tensor) -> Tensor:
    """``(H Hᵀ) G`` for ``H (R, D_in)`` and ``G (R, k, D_out)``, over tiles of rows of ``H Hᵀ``."""
    R, k, D = G.shape
    tile = max(1, min(R, _TILE_BUDGET // max(1, R + k * D)))
    flat = G.reshape(R, k * D)
    Z = torch.empty_like(flat)
    for r0 in range(0, R, tile):
        Z[r0 : r0 + tile] = (H[r0 : r0 + tile] @ H.T) @ flat  # (t, R) @ (R, k·D)
    return Z.reshape(R, k, D)
