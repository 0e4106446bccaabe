"""The whole-batch kernel from layer factors: exact, per parameter, without ``N·C × P``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ntk.kernel import _batch_factors, batch_statistics
from lightning_ntk.kernel.batch_statistics import BatchStatisticsModel, batch_ntk
from tests._lightning_models import one_thread  # noqa: F401
from tests.test_batch_statistics import _as_kernel, _dense_jacobian


class _SequenceBN(nn.Module):
    """Per-token Linear, BatchNorm1d over channels of ``(N, D, L)``, Conv1d, pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.norm = nn.BatchNorm1d(5)
        self.conv = nn.Conv1d(5, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, L, 3)
        h = self.norm(self.embed(x).transpose(1, 2)).relu()  # (N, 5, L)
        return self.head(self.conv(h).mean(dim=2))


class _Scaled(nn.Module):
    """A BatchNorm MLP with a learned temperature: a parameter of no supported layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        self.log_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.log_scale.exp()


class _Reused(nn.Module):
    """A Linear called twice, a grouped convolution and an embedding, with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.grouped = nn.Conv1d(4, 4, 3, groups=2, padding=1)
        self.norm = nn.BatchNorm1d(4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.grouped(self.embed(tokens).transpose(1, 2))).mean(dim=2)
        return self.head(self.shared(torch.tanh(self.shared(h))))


def _bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
        nn.BatchNorm1d(5, track_running_stats=False),
    )


def _frozen_bn_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    model[1].bias.requires_grad_(False)
    return model


CASES = {
    "bn-mlp": (
        lambda: nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)),
        lambda n: torch.randn(n, 5),
        [],
    ),
    "bn-cnn": (_bn_cnn, lambda n: torch.randn(n, 2, 5, 5), []),
    "bn1d-sequence": (_SequenceBN, lambda n: torch.randn(n, 6, 3), []),
    "unsupported-layer": (_Scaled, lambda n: torch.randn(n, 4), ["log_scale"]),
    "reused-grouped-embedding": (
        _Reused,
        lambda n: torch.randint(0, 7, (n, 5)),
        ["shared.weight", "shared.bias"],
    ),
    "frozen": (_frozen_bn_mlp, lambda n: torch.randn(n, 4), []),
}


def _check(model: nn.Module, x: torch.Tensor, fallback: list[str], layouts: bool = True) -> None:
    """Every layout and the per-parameter split against the float64 dense Jacobian."""
    J = _dense_jacobian(model, x)
    n = x.shape[0]
    reference = _as_kernel(torch.cat(list(J.values()), dim=1), n)
    scale = reference.abs().max()
    model64 = model.double()
    x64 = x.double() if x.is_floating_point() else x
    plan = _batch_factors.plan_batch(BatchStatisticsModel(model64), x64)
    assert plan.fallback_names == fallback
    K = batch_ntk(model64, x64)
    assert torch.allclose(K, reference, atol=1e-10 * scale), (K - reference).abs().max()
    parts = batch_ntk(model64, x64, per_layer=True)
    assert list(parts) == list(J)  # frozen parameters have no part
    for name, part in parts.items():
        expected = _as_kernel(J[name], n)
        assert torch.allclose(part, expected, atol=1e-10 * scale), name
    if not layouts:
        return
    diagonal = batch_ntk(model64, x64, output="diagonal")
    trace = batch_ntk(model64, x64, output="trace")
    assert torch.allclose(diagonal, reference.diagonal(dim1=2, dim2=3), atol=1e-10 * scale)
    assert torch.allclose(trace, reference.diagonal(dim1=2, dim2=3).mean(-1), atol=1e-10 * scale)
    K32 = batch_ntk(model.float(), x.float() if x.is_floating_point() else x)
    assert torch.allclose(K32.double(), reference, atol=1e-5 * scale)


@pytest.mark.parametrize("case", list(CASES))
def test_factored_kernel_is_exact(case, monkeypatch):
    build, make_x, fallback = CASES[case]
    torch.manual_seed(0)
    model = build()
    x = make_x(6)

    def no_jacobian(*args, **kwargs):
        raise AssertionError("the whole-batch Jacobian (N·C × P numbers) was formed")

    monkeypatch.setattr(batch_statistics, "batch_jacobian", no_jacobian)
    _check(model, x, fallback)


@pytest.mark.parametrize("case", ["bn-cnn", "bn1d-sequence", "reused-grouped-embedding"])
def test_gram_route_chunks_and_recomputation_are_exact(case, monkeypatch):
    """Every dense weight by its Gram in tiles; chunks of 4 cotangents, recomputed per pair."""
    monkeypatch.setattr(_batch_factors, "_GRADIENT_LIMIT", 0)
    monkeypatch.setattr(_batch_factors, "_TILE_BUDGET", 4000)
    monkeypatch.setattr(_batch_factors, "_CHUNK_BUDGET", 4000)
    monkeypatch.setattr(_batch_factors, "_KEEP_BUDGET", 1)
    build, make_x, fallback = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    x = make_x(5)
    x = x.double() if x.is_floating_point() else x
    plan = _batch_factors.plan_batch(BatchStatisticsModel(model), x)
    assert plan.gram_weights and not plan.keep_all and plan.chunk < 5 * 3, plan.chunk
    _check(model, x, fallback, layouts=False)


def test_a_failing_recording_falls_back_to_the_whole_jacobian(monkeypatch):
    torch.manual_seed(0)
    model = _bn_cnn().double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    expected = batch_ntk(model, x)

    def failing(*args, **kwargs):
        raise RuntimeError("no recording")

    monkeypatch.setattr(batch_statistics, "plan_batch", failing)
    K = batch_ntk(model, x)
    assert torch.allclose(K, expected, atol=1e-10 * expected.abs().max())
