"""The per-layer contractions behind the structured method, checked against dense formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_ntk import empirical_ntk
from lightning_ntk.kernel import _factors, structured
from lightning_ntk.kernel._factors import LayerInput, contract_token_pairs, prefer_gram
from lightning_ntk.kernel.reference import reference_ntk
from tests.cases import CASES_BY_NAME

DT = torch.float64


def _tokens(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    return tokens.masked_fill(torch.rand(n, length, generator=g) < 0.2, -1)  # no gradient


def _dense_embedding_kernel(t1, t2, G1, G2, output):
    """``Σ_{t,s} [t1[i,t] = t2[j,s] ≥ 0] G1[a,i,t]·G2[b,j,s]`` by the dense one-hot Gram."""
    vocab = int(max(t1.max(), t2.max())) + 1
    h1 = F.one_hot(t1.clamp(min=0), vocab).to(DT) * (t1 >= 0).unsqueeze(-1)
    h2 = F.one_hot(t2.clamp(min=0), vocab).to(DT) * (t2 >= 0).unsqueeze(-1)
    A = torch.einsum("itv,jsv->itjs", h1, h2)
    K = torch.einsum("itjs,aitd,bjsd->ijab", A, G1, G2)
    if output == "full":
        return K
    diag = K.diagonal(dim1=2, dim2=3)
    return diag if output == "diagonal" else diag.mean(dim=-1)


def test_matching_positions_are_every_equal_token_pair():
    t1 = torch.tensor([3, -1, 0, 3, 7, 2])
    t2 = torch.tensor([3, 3, -1, 2, 9, 0, 3])
    p, q = _factors._matching_positions(t1, t2)
    found = sorted(zip(p.tolist(), q.tolist()))
    expected = sorted(
        (i, j) for i, a in enumerate(t1.tolist()) for j, b in enumerate(t2.tolist()) if a == b >= 0
    )
    assert found == expected


@pytest.mark.parametrize("output", ["full", "diagonal", "trace"])
@pytest.mark.parametrize("budget", [None, 50])  # 50 numbers: many small chunks
def test_token_pairs_equal_the_dense_one_hot_gram(output, budget, monkeypatch):
    if budget is not None:
        monkeypatch.setattr(_factors, "_GRAM_BUDGET", budget)
    C, D = 3, 4
    t1, t2 = _tokens(5, 6, 7, seed=0), _tokens(4, 3, 7, seed=1)
    g = torch.Generator().manual_seed(2)
    G1 = torch.randn(C, 5, 6, D, generator=g, dtype=DT)
    G2 = torch.randn(C, 4, 3, D, generator=g, dtype=DT)
    got = contract_token_pairs(
        LayerInput(tokens=t1, vocab=7), LayerInput(tokens=t2, vocab=7), G1, G2, output
    )
    expected = _dense_embedding_kernel(t1, t2, G1, G2, output)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_matches_counts_equal_token_pairs_of_a_block_with_itself():
    tokens = _tokens(6, 5, 4, seed=3)
    p, _ = _factors._matching_positions(tokens.reshape(-1), tokens.reshape(-1))
    assert LayerInput(tokens=tokens, vocab=4).matches() == p.numel()


@pytest.mark.parametrize("route", ["gram", "per_example"])
@pytest.mark.parametrize("output", ["full", "trace"])
def test_text_model_is_exact_by_either_route(route, output, monkeypatch):
    monkeypatch.setattr(structured, "prefer_gram", lambda *args: route == "gram")
    case = CASES_BY_NAME["text_embedding_layernorm"]
    model, x = case.model(), case.inputs(6)
    expected = reference_ntk(model, x, output=output)
    got = empirical_ntk(model, x, output=output, method="structured", chunk_size=4)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_embedding_beyond_both_memory_budgets_is_contracted_in_chunks(monkeypatch):
    """Where neither per-example gradients nor the dense Gram fit, the token pairs do."""
    monkeypatch.setattr(_factors, "_JP_BUDGET", 10)
    monkeypatch.setattr(_factors, "_GRAM_BUDGET", 200)
    assert prefer_gram(8, 3, 7, 13, 6, "full", matches=100)  # not per-example
    case = CASES_BY_NAME["text_embedding_layernorm"]
    model, x = case.model(), case.inputs(8)
    got = empirical_ntk(model, x, method="structured", params="embed", per_layer=True)
    expected = reference_ntk(model, x, params="embed")
    torch.testing.assert_close(got["embed.weight"], expected, rtol=1e-10, atol=1e-12)


def test_cost_model_prefers_token_pairs_for_a_large_vocabulary():
    # N=16, C=10, T=16 tokens of a 1000-word vocabulary, width 64; M ≈ N·T for rare repeats
    assert prefer_gram(16, 10, 16, 1000, 64, "full", matches=16 * 16)
    # a 4-symbol alphabet: almost every pair of positions matches; per-example is cheaper
    assert not prefer_gram(16, 10, 16, 4, 64, "full", matches=(16 * 16) ** 2 // 4)


@pytest.mark.parametrize("output", ["full", "diagonal", "trace"])
@pytest.mark.parametrize("T", [1, 3])
def test_gram_contraction_in_tiles_equals_one_piece(output, T, monkeypatch):
    g = torch.Generator().manual_seed(4)
    C, N1, N2, K, D = 3, 5, 7, 4, 6
    H1 = LayerInput(dense=torch.randn(N1, T, K, generator=g, dtype=DT))
    H2 = LayerInput(dense=torch.randn(N2, T, K, generator=g, dtype=DT))
    G1 = torch.randn(C, N1, T, D, generator=g, dtype=DT)
    G2 = torch.randn(C, N2, T, D, generator=g, dtype=DT)
    A = H1.gram(H2)
    whole = _factors.contract_gram(A, G1, G2, output, with_bias=True)
    monkeypatch.setattr(_factors, "_GRAM_BUDGET", 4 * 9 * T * T)  # tiles of 2 × 2 examples
    tiled = _factors.contract_gram(A, G1, G2, output, with_bias=True)
    for got, expected in zip(tiled, whole):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_convolutions_beyond_both_memory_budgets_are_exact(monkeypatch):
    monkeypatch.setattr(_factors, "_JP_BUDGET", 10)  # no per-example gradients
    monkeypatch.setattr(_factors, "_GRAM_BUDGET", 5_000)  # and small Gram tiles
    tiled, calls = _factors._tiled, []
    monkeypatch.setattr(_factors, "_tiled", lambda *a: calls.append(1) or tiled(*a))
    case = CASES_BY_NAME["cnn_batchnorm"]
    model, x = case.model(), case.inputs(5)
    got = empirical_ntk(model, x, method="structured")
    torch.testing.assert_close(got, reference_ntk(model, x), rtol=1e-10, atol=1e-12)
    assert calls  # the convolutions went through tiles
