"""CUDA path: exact against the float64 CPU reference. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from lightning_ntk import empirical_ntk, reference_ntk

from .cases import CASES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("method", ["structured", "jacobian", "ntk_vp"])
def test_cuda_kernel_matches_cpu_reference(case, method):
    model = case.model()
    x = case.inputs(5)
    R = reference_ntk(model, x, output_fn=case.output_fn)  # float64 on CPU
    K = empirical_ntk(model.cuda(), x.cuda(), method=method, output_fn=case.output_fn)
    assert K.device.type == "cuda"
    torch.testing.assert_close(K.cpu(), R, rtol=1e-10, atol=1e-10 * R.abs().max().item())
    K32 = empirical_ntk(model.float().cuda(), (x.float() if x.is_floating_point() else x).cuda(),
                        method=method, output_fn=case.output_fn)  # fmt: skip
    err = (K32.double().cpu() - R).abs().max() / R.abs().max()
    assert err < 1e-5, f"float32 on CUDA: relative error {err:.2e} (TF32 must be off)"


def test_cuda_blocks_kept_on_cpu():
    model = CASES[0].model().cuda()
    x = CASES[0].inputs(9).cuda()
    K = empirical_ntk(model, x, output="trace", chunk_size=4, store_on="cpu")
    assert K.device.type == "cpu"
    torch.testing.assert_close(K, empirical_ntk(model, x, output="trace").cpu())
