"""Per-layer factors of the Jacobian and their contractions into kernel blocks.

For a layer ``y = W h`` applied at ``T`` positions (1 for a plain ``Linear``, the output
pixels of a convolution, the tokens of a sequence), the Jacobian of the logits with
respect to ``W`` for example ``i`` and class ``a`` is ``Σ_t G[a,i,t] ⊗ H[i,t]``, with
``H[i, t] ∈ R^K`` the layer input at position ``t`` and ``G[a, i, t] ∈ R^D`` the cotangent
``∂f_a(x_i)/∂y[i, t]``. Hence

    Θ_W(x_i, x_j)[a, b] = Σ_{t,s} (H[i,t]·H[j,s]) (G[a,i,t]·G[b,j,s]).

Two exact ways to evaluate it, chosen per layer by :func:`prefer_gram`:

* **Gram** ("patch Gram" for convolutions): ``A = H Hᵀ`` and ``B = G Gᵀ``, then the
  Hadamard-and-sum above; never forms a per-example gradient. Costs
  ``N1·N2·T·S·(K + C²·D)`` for the full layout; wins when ``T`` is small.
* **Per-example gradients**: ``J[i, a] = Σ_t G[a,i,t] ⊗ H[i,t] ∈ R^{D·K}``, then
  ``J1 J2ᵀ``. Costs ``N·C·T·D·K + N1·N2·C²·D·K``; wins for convolutions with many
  output pixels.

An embedding is the same layer with a one-hot ``H``: ``H[i,t]·H[j,s] = [tok_it = tok_js]``.
Its Gram route (:func:`contract_token_pairs`) visits only the ``M`` matching position
pairs, found by a sorted join, instead of all ``N1·T·N2·S``: ``M·C²·D`` for the full
layout, in chunks of bounded memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._layout import from_class_diagonal

# Above this many numbers, a per-example gradient block is not materialised.
_JP_BUDGET = 2**27
# Above this many numbers, the cotangent Gram of one block is not materialised.
_GRAM_BUDGET = 2**25


@dataclass
class LayerInput:
    """The input ``H`` of a weight, per example and position.

    Exactly one of ``dense`` (``(N, T, K)`` features) and ``tokens`` (``(N, T)`` indices
    into ``vocab`` rows, ``-1`` where the row gets no gradient, e.g. ``padding_idx``) is set.
    """

    dense: Optional[Tensor] = None
    tokens: Optional[Tensor] = None
    vocab: int = 0
    dtype: torch.dtype = torch.float32  # of the one-hot rows built from tokens

    @property
    def width(self) -> int:
        """``K``: input features (the vocabulary size for tokens)."""
        return self.dense.shape[2] if self.dense is not None else self.vocab

    def gram(self, other: LayerInput) -> Tensor:
        """``A[i, t, j, s] = H[i,t]·H'[j,s]``: ``(N1, T, N2, S)``, for dense inputs.

        Tokens never form this Gram: see :func:`contract_token_pairs`.
        """
        N1, T, K = self.dense.shape
        N2, S, _ = other.dense.shape
        return (self.dense.reshape(N1 * T, K) @ other.dense.reshape(N2 * S, K).T).view(N1, T, N2, S)

    def matches(self) -> int:
        """``M``: pairs of positions of this block with equal tokens (itself included)."""
        tokens = self.tokens.reshape(-1)
        counts = torch.bincount(tokens[tokens >= 0], minlength=1)
        return int((counts * counts).sum())

    def as_dense(self) -> Tensor:
        """``H`` as dense features ``(N, T, K)`` (one-hot rows for tokens)."""
        if self.dense is not None:
            return self.dense
        onehot = F.one_hot(self.tokens.clamp(min=0), self.vocab).to(self.dtype)
        return onehot * (self.tokens >= 0).unsqueeze(-1).to(self.dtype)

    def summed_outer(self, G: Tensor) -> Tensor:
        """``Σ_{i,t} G[i,t] ⊗ H[i,t]`` for one cotangent ``G (N, T, D)``, in the weight's layout.

        That is ``(D, K)`` for a Linear or convolution weight and ``(V, D)`` for an
        embedding table.
        """
        D = G.shape[-1]
        if self.dense is not None:
            return G.reshape(-1, D).T @ self.dense.reshape(-1, self.dense.shape[-1])
        tokens = self.tokens.reshape(-1)
        keep = tokens >= 0
        rows = G.reshape(-1, D)[keep]
        return G.new_zeros(self.vocab, D).index_add_(0, tokens[keep], rows)


def per_example_outer(H: LayerInput, G: Tensor, groups: int = 1) -> Tensor:
    """Per-example gradients ``J[i, a] = Σ_t G[a,i,t] ⊗ H[i,t]``: ``(N, C, D·K)``.

    With ``groups > 1`` (grouped convolution) input and output channels split into
    ``groups`` blocks and only matching blocks interact.
    """
    dense = H.as_dense()  # (N, T, K)
    C, N, T, D = G.shape
    if groups == 1:
        # (N, C·D, T) @ (N, T, K) -> (N, C·D, K)
        J = G.permute(1, 0, 3, 2).reshape(N, C * D, T) @ dense
        return J.reshape(N, C, D * dense.shape[-1])
    K = dense.shape[-1] // groups
    Hg = dense.reshape(N, T, groups, K)
    Gg = G.reshape(C, N, T, groups, D // groups)
    J = torch.einsum("aitgd,itgk->iagdk", Gg, Hg)
    return J.reshape(N, C, D * K)


def contract_gram(
    A: Tensor, G1: Tensor, G2: Tensor, output: str, with_bias: bool = False
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``Θ[i,j,a,b] = Σ_{t,s} A[i,t,j,s] (G1[a,i,t]·G2[b,j,s])`` in the requested layout.

    Args:
        A: input Gram ``(N1, T, N2, S)``.
        G1: cotangents ``(C, N1, T, D)``.
        G2: cotangents ``(C, N2, S, D)``.
        output: ``"full"``, ``"diagonal"`` or ``"trace"``.
        with_bias: also return the bias kernel ``Σ_{t,s} G1[a,i,t]·G2[b,j,s]`` (the same
            formula with ``A = 1``), which reuses the cotangent Gram ``B``.

    Returns:
        The weight's kernel, or ``(weight kernel, bias kernel)``.
    """
    C, N1, T, D = G1.shape
    N2, S = G2.shape[1], G2.shape[2]
    c2 = C * C if output == "full" else C
    rows = max(1, math.isqrt(_GRAM_BUDGET // max(1, c2 * T * S)))
    if rows < max(N1, N2):  # the cotangent Gram of the block would not fit: tiles
        return _tiled(A, G1, G2, output, with_bias, rows)
    if output == "full":
        B = (G1.reshape(C * N1 * T, D) @ G2.reshape(C * N2 * S, D).T).view(C, N1, T, C, N2, S)
        if T == 1 and S == 1:  # plain Linear: a Hadamard product
            bias = B.view(C, N1, C, N2).permute(1, 3, 0, 2)  # (N1, N2, C, C)
            weight = A.view(N1, N2, 1, 1) * bias
        else:
            weight = torch.einsum("itjs,aitbjs->ijab", A, B)
            bias = B.sum(dim=(2, 5)).permute(1, 3, 0, 2) if with_bias else None
        return (weight, bias) if with_bias else weight
    B = torch.bmm(G1.reshape(C, N1 * T, D), G2.reshape(C, N2 * S, D).transpose(1, 2))
    B = B.view(C, N1, T, N2, S)
    if T == 1 and S == 1:
        bias = B.view(C, N1, N2)
        weight = A.view(1, N1, N2) * bias
    else:
        weight = torch.einsum("itjs,aitjs->aij", A, B)
        bias = B.sum(dim=(2, 4)) if with_bias else None
    weight = from_class_diagonal(weight, output)
    return (weight, from_class_diagonal(bias, output)) if with_bias else weight


def _tiled(
    A: Tensor, G1: Tensor, G2: Tensor, output: str, with_bias: bool, rows: int
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`contract_gram` over tiles of ``rows × rows`` examples, assembled."""
    N1, N2 = G1.shape[1], G2.shape[1]
    tiles = [
        [
            contract_gram(A[i : i + rows, :, j : j + rows], G1[:, i : i + rows],
                          G2[:, j : j + rows], output, with_bias)
            for j in range(0, N2, rows)
        ]
        for i in range(0, N1, rows)
    ]  # fmt: skip
    if not with_bias:
        return torch.cat([torch.cat(row, dim=1) for row in tiles], dim=0)
    weight = torch.cat([torch.cat([t[0] for t in row], dim=1) for row in tiles], dim=0)
    bias = torch.cat([torch.cat([t[1] for t in row], dim=1) for row in tiles], dim=0)
    return weight, bias


def prefer_gram(
    N: int, C: int, T: int, K: int, D: int, output: str, matches: Optional[int] = None
) -> bool:
    """Whether the Gram evaluation of a weight's kernel is cheaper than per-example gradients.

    Flop counts for a block of ``N × N`` examples; ``c2`` is ``C²`` for the full layout and
    ``C`` otherwise. Memory decides first: per-example gradients are ruled out when one
    block of them (``N·C·D·K`` numbers; for embeddings ``K`` is the vocabulary) exceeds
    its budget, and the dense Gram when its cotangent Gram (``c2·N²·T²`` numbers, large
    for long sequences and many classes) exceeds its own while per-example gradients fit
    (when neither fits, :func:`contract_gram` works through tiles of examples).
    For an embedding (``matches``: the block's ``M`` equal-token position pairs) the Gram
    route is :func:`contract_token_pairs`, ``2·M·c2·D`` flops in bounded memory.
    """
    c2 = C * C if output == "full" else C
    per_example = 2 * N * C * T * D * K + N * N * c2 * D * K
    if N * C * D * K > _JP_BUDGET:
        return True
    if matches is not None:
        return 2 * matches * c2 * D <= per_example + N * T * K  # + the one-hot expansion
    if c2 * N * N * T * T > _GRAM_BUDGET:
        return False
    return N * N * T * T * (K + 2 * c2 * D) <= per_example


def contract_token_pairs(
    H1: LayerInput, H2: LayerInput, G1: Tensor, G2: Tensor, output: str
) -> Tensor:
    """An embedding's kernel ``Θ[i,j,a,b] = Σ_{(t,s): tok[i,t] = tok'[j,s]} G1[a,i,t]·G2[b,j,s]``.

    The input Gram of one-hot rows is the token-equality indicator, so only the ``M``
    matching position pairs contribute; they are contracted in chunks of at most
    ``_GRAM_BUDGET`` numbers and summed into their example pair. Tokens ``-1`` (no
    gradient, e.g. ``padding_idx``) match nothing.

    Args:
        H1: token input ``(N1, T)`` of the first block.
        H2: token input ``(N2, S)`` of the second.
        G1: cotangents ``(C, N1, T, D)``.
        G2: cotangents ``(C, N2, S, D)``.
        output: ``"full"``, ``"diagonal"`` or ``"trace"``.
    """
    C, N1, T, D = G1.shape
    N2, S = G2.shape[1], G2.shape[2]
    p, q = _matching_positions(H1.tokens.reshape(-1), H2.tokens.reshape(-1))
    full = output == "full"
    width = C * C if full else C
    g1 = G1.reshape(C, N1 * T, D)
    g2 = G2.reshape(C, N2 * S, D)
    out = G1.new_zeros(N1 * N2, width)
    step = max(1, _GRAM_BUDGET // (2 * C * D + width))
    for start in range(0, p.numel(), step):
        pc, qc = p[start : start + step], q[start : start + step]
        X, Y = g1[:, pc], g2[:, qc]  # (C, m, D)
        if full:
            part = torch.bmm(X.transpose(0, 1), Y.permute(1, 2, 0)).reshape(-1, width)
        else:
            part = (X * Y).sum(dim=-1).T  # (m, C)
        out.index_add_(0, (pc // T) * N2 + qc // S, part)
    if full:
        return out.view(N1, N2, C, C)
    return from_class_diagonal(out.view(N1, N2, C).permute(2, 0, 1), output)


def _matching_positions(t1: Tensor, t2: Tensor) -> tuple[Tensor, Tensor]:
    """All ``(p, q)`` with ``t1[p] = t2[q] ≥ 0`` (a sorted join): two ``(M,)`` index tensors."""
    order = torch.argsort(t2)
    sorted2 = t2[order]
    lo = torch.searchsorted(sorted2, t1)
    counts = torch.where(t1 >= 0, torch.searchsorted(sorted2, t1, right=True) - lo, 0)
    p = torch.repeat_interleave(torch.arange(t1.numel(), device=t1.device), counts)
    run_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    offset = torch.arange(p.numel(), device=t1.device) - run_start
    q = order[torch.repeat_interleave(lo, counts) + offset]
    return p, q
