"""The kernel of the function training differentiates: BatchNorm with batch statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_ntk import empirical_ntk
from lightning_ntk.kernel.batch_statistics import (
    BatchStatisticsModel,
    batch_ntk,
    batch_statistics_mode,
    linearized_logits,
    uses_batch_statistics,
)
from tests._lightning_models import one_thread  # noqa: F401


def _bn_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    )


def _bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 16, 4),
        nn.BatchNorm1d(4, track_running_stats=False),
    )


def _dense_jacobian(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: ∂F/∂θ_name (N·C, P_name)}`` of the whole-batch function, in float64."""
    fm = BatchStatisticsModel(model, dtype=torch.float64)
    names = fm.names
    shapes = [fm.params[n].shape for n in names]
    flat0 = torch.cat([fm.params[n].reshape(-1) for n in names])
    x = x.double() if x.is_floating_point() else x

    def batch_function(flat):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return fm(params, x).reshape(-1)

    J = torch.autograd.functional.jacobian(batch_function, flat0)  # (N·C, P)
    return dict(zip(names, J.split([shape.numel() for shape in shapes], dim=1)))


def _as_kernel(J: torch.Tensor, n: int) -> torch.Tensor:
    """``J Jᵀ`` of ``J (N·C, P)`` in the full layout ``(N, N, C, C)``."""
    C = J.shape[0] // n
    return (J @ J.T).reshape(n, C, n, C).permute(0, 2, 1, 3)


def _dense_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J Jᵀ`` of the flattened whole-batch function, by autograd.functional, in float64."""
    J = torch.cat(list(_dense_jacobian(model, x).values()), dim=1)
    return _as_kernel(J, x.shape[0])


@pytest.mark.parametrize("make, shape", [(_bn_mlp, (6, 5)), (_bn_cnn, (5, 1, 4, 4))])
def test_batch_kernel_matches_the_dense_float64_jacobian(make, shape):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(*shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    K = batch_ntk(model, x)
    for key, value in model.state_dict().items():  # running statistics untouched
        assert torch.equal(value, state[key]), key
    assert all(m.training for m in model.modules())  # modes restored
    reference = _dense_reference(model, x)
    scale = reference.abs().max()
    assert torch.allclose(K.double(), reference, atol=1e-5 * scale), (
        (K.double() - reference).abs().max()
    )
    diag = batch_ntk(model, x, output="diagonal")
    trace = batch_ntk(model, x, output="trace")
    assert torch.allclose(diag, K.diagonal(dim1=2, dim2=3), atol=1e-5 * scale)
    assert torch.allclose(trace, diag.mean(-1), atol=1e-5 * scale)
    parts = batch_ntk(model, x, per_layer=True)
    assert torch.allclose(sum(parts.values()), K, atol=1e-5 * scale)
    K64 = batch_ntk(copy.deepcopy(model).double(), x.double())
    assert torch.allclose(K64, reference, atol=1e-12 * scale)


def test_without_normalisation_it_is_the_ordinary_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    assert not uses_batch_statistics(model) and uses_batch_statistics(_bn_mlp())
    assert torch.allclose(batch_ntk(model, x), empirical_ntk(model, x), atol=1e-5)


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm1d(6),
        nn.BatchNorm1d(6, track_running_stats=False),
        nn.SyncBatchNorm(6),
        nn.BatchNorm1d(6, momentum=None),
    ],
    ids=["bn1d", "no-running-stats", "syncbn", "cumulative"],
)
def test_mode_uses_batch_statistics_and_restores_everything(norm):
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Dropout(0.9), nn.Linear(6, 2))
    model.train()
    if norm.running_mean is not None:
        norm.running_mean.fill_(5.0)  # would change the output if read
    x = torch.randn(8, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with batch_statistics_mode(model), torch.no_grad():
        out = model(x)
    h = model[0](x)
    expected = model[3]((h - h.mean(0)) / (h.var(0, unbiased=False) + norm.eps).sqrt())
    assert torch.allclose(out, expected, atol=1e-5)  # batch statistics, dropout off
    assert all(m.training for m in model.modules()) and "forward" not in vars(norm)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_batch_norm_3d_and_lazy_layers():
    model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(3, 1, 3, 3, 3)
    model(x)  # materialise the lazy layer
    K = batch_ntk(model, x, output="trace")
    assert K.shape == (3, 3) and torch.allclose(K, K.T)


def test_unmoved_parameters_give_exactly_zero_linearization_drift():
    torch.manual_seed(0)
    model = _bn_cnn()
    x = torch.randn(6, 1, 4, 4)
    fm = BatchStatisticsModel(model)
    theta0 = {n: t.clone() for n, t in fm.params.items()}
    with torch.no_grad():  # a training step at lr 0: only the running statistics move
        model(torch.randn(6, 1, 4, 4))
    fm = BatchStatisticsModel(model)
    f_lin, f0 = linearized_logits(fm, theta0, fm.params, x)
    with torch.no_grad():
        f = fm(fm.params, x)
    assert torch.equal(f, f0) and torch.equal(f_lin, f0)
    moved = {n: t + 1e-3 for n, t in theta0.items()}
    f_lin, f0 = linearized_logits(fm, theta0, moved, x)
    f = fm(moved, x).detach()
    assert 0 < (f - f_lin).norm() < 0.05 * (f - f0).norm()


def test_vmapped_and_looped_pullbacks_agree(monkeypatch):
    from lightning_ntk.kernel import batch_statistics

    torch.manual_seed(0)
    model = _bn_cnn()
    x = torch.randn(5, 1, 4, 4)
    fm = BatchStatisticsModel(model)
    looped = batch_statistics.batch_jacobian(fm, x)
    monkeypatch.setattr(batch_statistics, "_LOOP_DEVICES", ())  # as on accelerators
    monkeypatch.setattr(batch_statistics, "_JACOBIAN_BUDGET", 7 * 100)  # several chunks
    batched = batch_statistics.batch_jacobian(fm, x)
    scale = max(J.abs().max() for J in looped.values())  # a bias before BatchNorm has J = 0
    for name, J in looped.items():
        assert torch.allclose(batched[name], J, atol=1e-6 * scale), name


class _KeywordBatchNormNet(nn.Module):
    """A model called by keyword, as Hugging Face image models are (``pixel_values=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _bn_cnn()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(pixel_values)


def test_a_mapping_batch_is_passed_by_keyword():
    torch.manual_seed(0)
    model = _KeywordBatchNormNet().double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    reference = _dense_reference(model.body, x)
    K = batch_ntk(model, {"pixel_values": x})
    assert torch.allclose(K, reference, atol=1e-12 * reference.abs().max())
    fm = BatchStatisticsModel(model, dtype=torch.float64)
    moved = {name: p + 0.01 for name, p in fm.params.items()}
    f_lin, f0 = linearized_logits(fm, fm.params, moved, {"pixel_values": x})
    torch.testing.assert_close(f0, fm(fm.params, {"pixel_values": x}))
    assert f_lin.shape == f0.shape and not torch.equal(f_lin, f0)
