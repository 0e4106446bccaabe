"""The architectures people train: linearization, mapping / tuple inputs and a monitored run.

The kernels of every registry case, every method and layout are checked against the
float64 reference in ``test_kernel.py``; here each case of ``ARCHITECTURES`` also gets
its linearized model checked, and every registry model trains under ``NTKMonitor()``
with finite metrics.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ntk import empirical_ntk, linearize, reference_ntk
from lightning_ntk.exceptions import NTKMeasurementWarning
from lightning_ntk.kernel import last_call_info
from lightning_ntk.kernel._functional import FunctionalModel
from lightning_ntk.kernel._inputs import call, map_tensors, take
from lightning_ntk.kernel.loop import loop_jacobians

from ._lightning_models import one_thread, trainer_kwargs  # noqa: F401
from .cases import ARCHITECTURES, CASES, CASES_BY_NAME, ModelCase
from .test_kernel import assert_kernel_close


@pytest.fixture(params=ARCHITECTURES, ids=lambda case: case.name)
def arch(request) -> ModelCase:
    return request.param


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def any_case(request) -> ModelCase:
    return request.param


def _tangent(model: nn.Module, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def test_linearized_model_matches_reference_jacobian(arch):
    """``J0(x) v`` against float64 per-example Jacobians, whatever route computed it."""
    model, x = arch.model(), arch.inputs(4, seed=3)
    v = _tangent(model)
    lin = linearize(model, output_fn=arch.output_fn)
    Jv = lin.tangent_logits(x, v)
    fm = FunctionalModel(model, output_fn=arch.output_fn, dtype=torch.float64)
    J = loop_jacobians(fm, fm.cast_input(x), fm.names)
    expected = sum(J[n] @ v[n].reshape(-1) for n in fm.names)
    assert lin.mode is not None
    torch.testing.assert_close(Jv, expected, rtol=1e-9, atol=1e-12)
    f0 = lin.initial_logits(x)
    shifted = {n: p.detach() + v[n] for n, p in model.named_parameters()}
    torch.testing.assert_close(lin(x, shifted), f0 + expected, rtol=1e-9, atol=1e-12)


def test_lstm_without_forward_ad_linearizes_by_composite_cells():
    """float32 CPU ``nn.LSTM`` runs oneDNN's ``mkldnn_rnn_layer``: no forward-mode rule."""
    case = CASES_BY_NAME["lstm"]
    model = case.model().float()
    x = case.inputs(3)
    lin = linearize(model)
    v = _tangent(model)
    Jv = lin.tangent_logits(x, v)
    if torch.backends.mkldnn.is_available():
        assert lin.mode == "jvp_composite", lin.fallbacks
    fm = FunctionalModel(model, dtype=torch.float64)
    J = loop_jacobians(fm, x, fm.names)
    expected = sum(J[n] @ v[n].double().reshape(-1) for n in fm.names)
    torch.testing.assert_close(Jv.double(), expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ inputs
class _TwoInputs(nn.Module):
    """``model(features, mask)``: a tuple batch, passed positionally."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, features, mask):
        h = torch.tanh(self.fc(features)) * mask[..., None]
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


def test_tuple_and_mapping_inputs_on_every_method():
    torch.manual_seed(0)
    model = _TwoInputs().double()
    g = torch.Generator().manual_seed(0)

    def batch(n):
        features = torch.randn(n, 5, 3, generator=g, dtype=torch.float64)
        mask = (torch.rand(n, 5, generator=g) > 0.3).double()
        mask[:, 0] = 1.0
        return features, mask

    x1, x2 = batch(4), batch(3)
    R = reference_ntk(model, x1, x2)
    for method in ("auto", "structured", "jacobian", "ntk_vp", "loop"):
        assert_kernel_close(empirical_ntk(model, x1, x2, method=method), R, 1e-10, method)
        named = ({"features": x1[0], "mask": x1[1]}, {"features": x2[0], "mask": x2[1]})
        assert_kernel_close(empirical_ntk(model, *named, method=method), R, 1e-10, method)
    lin = linearize(model)
    torch.testing.assert_close(lin(x1), model(*x1).detach())


def test_mismatched_structured_inputs_are_refused():
    model = _TwoInputs()
    x = {"features": torch.randn(4, 5, 3), "mask": torch.ones(4, 5)}
    with pytest.raises(ValueError, match="share a non-empty batch dimension"):
        empirical_ntk(model, {"features": torch.randn(4, 5, 3), "mask": torch.ones(3, 5)})
    with pytest.raises(ValueError, match="structure and per-example shapes of `x1`"):
        empirical_ntk(model, x, {"features": torch.randn(2, 5, 3)})
    with pytest.raises(TypeError, match="mapping / tuple of tensors"):
        empirical_ntk(model, {"features": [1, 2]})


# ------------------------------------------------------------------ monitor
class _Items(Dataset):
    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        x = take(self.x, slice(i, i + 1))
        x = map_tensors(x, lambda t: t[0])
        if isinstance(x, dict):
            return {**x, "labels": self.y[i]}
        return x, self.y[i]


def _lightning_module(case: ModelCase):
    import pytorch_lightning as pl

    class CaseModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = case.model().float()
            out = case.output_fn or (lambda o: o)
            self.classes = out(call(self.net, self._float(case.inputs(1)))).shape[1]

        @staticmethod
        def _float(x):
            return map_tensors(x, lambda t: t.float() if t.is_floating_point() else t)

        def forward(self, *args, **kwargs):
            return self.net(*args, **kwargs)

        def training_step(self, batch, batch_idx):
            if isinstance(batch, dict):
                y = batch.pop("labels")
                out = self(**batch)
            else:
                x, y = batch
                out = self(x)
            logits = case.output_fn(out) if case.output_fn else out
            return F.cross_entropy(logits, y)

        def configure_optimizers(self):
            sparse = any(getattr(m, "sparse", False) for m in self.modules())
            # (SGD's weight decay cannot take sparse gradients)
            return torch.optim.SGD(self.parameters(), lr=0.05, weight_decay=0 if sparse else 1e-4)

        def train_dataloader(self):
            x = self._float(case.inputs(16, seed=5))
            y = torch.arange(16) % self.classes
            return DataLoader(_Items(x, y), batch_size=8, shuffle=True)

    return CaseModule()


def test_monitor_trains_alongside_every_registry_model(any_case):
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    arch = any_case
    pl.seed_everything(0, verbose=False)
    module = _lightning_module(arch)
    monitor = NTKMonitor(n_probe=6, log_base=2, output_fn=arch.output_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NTKMeasurementWarning)  # every metric computed
        pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=4)).fit(module)
    assert [r.step for r in monitor.history] == [2, 4]
    for report in monitor.history:
        for field in ("relative_change", "kernel_distance", "linearization_error", "logit_norm"):
            value = getattr(report, field)
            assert torch.isfinite(torch.tensor(value)), (arch.name, report.step, field, value)
    info = monitor.tracker.kernel_info
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    if not batch_norm:  # (with BatchNorm the monitor uses the whole-batch kernel instead)
        assert info is not None and info.method in ("structured", "jacobian", "ntk_vp", "loop")
    assert last_call_info() is not None
