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
