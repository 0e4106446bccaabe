"""Estimators for many classes, large probe sets in blocks, and blocks shared among ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_ntk import empirical_ntk
from lightning_ntk.kernel.sketch import class_subset_ntk, probe_classes, sketched_trace_ntk


def _many_class_model(classes: int = 40) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, classes)).double()


def test_sketched_trace_is_unbiased_and_its_error_shrinks_like_inverse_sqrt_k():
    model = _many_class_model()
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = empirical_ntk(model, x, output="trace")
    errors = {}
    for k in (4, 64):
        estimates = torch.stack(
            [sketched_trace_ntk(model, x, num_projections=k, seed=s).estimate for s in range(16)]
        )
        errors[k] = (estimates - exact).pow(2).mean().sqrt() / exact.abs().mean()
        if k == 64:
            # unbiased: the mean over 16 seeds is within 4 standard errors of the exact kernel
            se = estimates.std(0) / 16**0.5
            assert ((estimates.mean(0) - exact).abs() <= 4 * se + 1e-12).all()
    ratio = errors[4] / errors[64]  # 1/sqrt(k): a 16x larger k gives a 4x smaller error
    assert 2.5 < ratio < 6.5, f"rmse ratio {ratio:.2f}, expected about 4"


def test_sketch_reports_a_standard_error_that_covers_the_truth():
    model = _many_class_model()
    x = torch.randn(4, 6, dtype=torch.float64)
    exact = empirical_ntk(model, x, output="trace")
    sketch = sketched_trace_ntk(model, x, num_projections=256, distribution="gaussian", seed=3)
    assert sketch.estimate.shape == sketch.standard_error.shape == (4, 4)
    z = (sketch.estimate - exact) / sketch.standard_error
    assert z.abs().max() < 5


def test_sketch_argument_errors():
    model = _many_class_model()
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="`num_projections` to be an int >= 2"):
        sketched_trace_ntk(model, x, num_projections=1)
    with pytest.raises(ValueError, match="`distribution` to be one of"):
        sketched_trace_ntk(model, x, distribution="uniform")
    with pytest.raises(TypeError, match="does not take `output`"):
        sketched_trace_ntk(model, x, output="full")


def test_class_subset_is_the_matching_slice_of_the_full_kernel():
    model = _many_class_model(12)
    x = torch.randn(4, 6, dtype=torch.float64)
    full = empirical_ntk(model, x)
    logits = model(x)
    classes = probe_classes(logits, labels=torch.tensor([0, 3, 3, 11]), top_k=2)
    assert {0, 3, 11} <= set(classes.tolist())
    sub = class_subset_ntk(model, x, classes=classes)
    torch.testing.assert_close(sub, full[:, :, classes][:, :, :, classes])
    with pytest.raises(ValueError, match="outside"):
        class_subset_ntk(model, x, classes=torch.tensor([12]))


def test_blocks_can_be_kept_on_another_device():
    model = _many_class_model(5)
    x = torch.randn(9, 6, dtype=torch.float64)
    K = empirical_ntk(model, x, output="trace", chunk_size=4, store_on="cpu")
    torch.testing.assert_close(K, empirical_ntk(model, x, output="trace"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_blocks_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _many_class_model(3)
        x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

        K = empirical_ntk(model, x, chunk_size=2, distributed=True)
        parts = empirical_ntk(
            model, x, chunk_size=3, distributed=True, per_layer=True, output="trace"
        )
        out[rank] = (K, parts)
    finally:
        dist.destroy_process_group()


def test_distributed_blocks_equal_the_single_process_kernel():
    world = 2
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_shared_blocks_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    model = _many_class_model(3)
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    single = empirical_ntk(model, x)
    single_parts = empirical_ntk(model, x, per_layer=True, output="trace")
    for rank in range(world):
        K, parts = out[rank]
        torch.testing.assert_close(K, single, rtol=1e-12, atol=1e-12)
        assert list(parts) == list(single_parts)
        for name in parts:
            torch.testing.assert_close(parts[name], single_parts[name], rtol=1e-12, atol=1e-12)
