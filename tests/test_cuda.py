"""CUDA path: exact against the float64 CPU reference. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from lightning_ntk import empirical_ntk, linearize, reference_ntk
from lightning_ntk.kernel import last_call_info
from lightning_ntk.kernel._inputs import map_tensors

from .cases import CASES, CASES_BY_NAME


def _on(x, device, dtype=None):
    return map_tensors(
        x, lambda t: t.to(device, dtype if dtype is not None and t.is_floating_point() else None)
    )


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("method", ["structured", "jacobian", "ntk_vp", "loop", "auto"])
def test_cuda_kernel_matches_cpu_reference(case, method):
    model = case.model()
    x = case.inputs(5)
    R = reference_ntk(model, x, output_fn=case.output_fn)  # float64 on CPU
    K = empirical_ntk(model.cuda(), _on(x, "cuda"), method=method, output_fn=case.output_fn)
    assert K.device.type == "cuda"
    torch.testing.assert_close(K.cpu(), R, rtol=1e-10, atol=1e-10 * R.abs().max().item())
    K32 = empirical_ntk(model.float().cuda(), _on(x, "cuda", torch.float32),
                        method=method, output_fn=case.output_fn)  # fmt: skip
    err = (K32.double().cpu() - R).abs().max() / R.abs().max()
    assert err < 1e-5, f"float32 on CUDA: relative error {err:.2e} (TF32 must be off)"


@pytest.mark.parametrize("name", ["sdpa_attention", "transformer_encoder", "vit"])
def test_fused_attention_kernels_are_switched_off_only_inside_the_engine(name):
    """Flash / memory-efficient SDPA and the Transformer fast path have no forward-mode
    rule; the engine evaluates their math equivalents and restores the user's flags."""
    case = CASES_BY_NAME[name]
    model = case.model()
    x = case.inputs(4)
    R = reference_ntk(model, x)
    flags = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.mha.get_fastpath_enabled(),
    )
    model32, x32 = model.float().cuda(), _on(x, "cuda", torch.float32)
    for method in ("ntk_vp", "auto"):
        K = empirical_ntk(model32, x32, method=method)
        err = (K.double().cpu() - R).abs().max() / R.abs().max()
        assert err < 1e-5, (method, err, last_call_info())
    lin = linearize(model32)
    torch.testing.assert_close(lin(x32), model32.eval()(x32).detach(), rtol=1e-4, atol=1e-5)
    assert lin.mode == "jvp", lin.fallbacks
    assert flags == (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.mha.get_fastpath_enabled(),
    )


def test_cuda_blocks_kept_on_cpu():
    model = CASES[0].model().cuda()
    x = CASES[0].inputs(9).cuda()
    K = empirical_ntk(model, x, output="trace", chunk_size=4, store_on="cpu")
    assert K.device.type == "cpu"
    torch.testing.assert_close(K, empirical_ntk(model, x, output="trace").cpu())


def test_tf32_set_through_the_precision_api_is_off_inside_the_engine_and_restored():
    """``torch.backends.cuda.matmul.fp32_precision = "tf32"``: the kernel stays exact."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this PyTorch has no per-backend fp32_precision API")
    case = CASES_BY_NAME["mlp"]
    model, x = case.model(), case.inputs(8)
    K_ref = reference_ntk(model, x)
    before = (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        for method in ("structured", "jacobian", "ntk_vp"):
            K = empirical_ntk(model.cuda(), x.cuda(), method=method).cpu().double()
            torch.testing.assert_close(K, K_ref, rtol=1e-4, atol=1e-4)
        assert (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (
            "tf32",
            "tf32",
        )
    finally:
        matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_lightning_run_reads_hard_labels_and_alarms_once(precision):
    """Autocast on the GPU: the set-up is read from the step's own logits (ε 0 inferred)."""
    import warnings

    import pytorch_lightning as pl
    import torch.nn.functional as F
    from torch import nn

    from lightning_ntk import LinearizationBreakdownWarning, NTKMonitor

    pl.seed_everything(0, verbose=False)
    x = torch.randn(512, 20)
    y = (x[:, :5].argmax(dim=1) + 5 * (x[:, 5] > 0)).long()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return F.cross_entropy(self(inputs), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(x, y)
            return torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)

    monitor = NTKMonitor(n_probe=16, log_base=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(
            accelerator="gpu", devices=1, precision=precision, max_steps=512,
            callbacks=[monitor], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(Module())
    setup = monitor.tracker.setup
    assert setup.label_smoothing == 0 and setup.min_target == 0, setup.describe()
    assert "inferred from the training loss" in setup.sources["label_smoothing"]
    alarms = [w for w in caught if w.category is LinearizationBreakdownWarning]
    assert len(alarms) == 1 and "Logits diverging" in str(alarms[0].message)
    assert monitor.history[-1].regime == "logits diverging"
