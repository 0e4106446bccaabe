"""What the engine meets outside plain dense models on one device.

Sparse gradients, autograd switched off by the caller, the per-backend precision API,
models on the wrong device(s), sharded (DTensor) parameters in one process (two
processes: ``test_fsdp2.py``), and the list of methods the monitor accepts. Every
kernel method on the registry's sparse, ``EmbeddingBag`` and data-dependent models is
checked in ``test_kernel.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ntk import NTKMonitor, NTKTracker, empirical_ntk, linearize, reference_ntk
from lightning_ntk.kernel import NTKMethod
from lightning_ntk.kernel._functional import FunctionalModel
from lightning_ntk.kernel.loop import loop_jacobians
from lightning_ntk.monitor.settings import METHODS

from .cases import CASES_BY_NAME
from .test_kernel import assert_kernel_close

ALL_METHODS = ["structured", "jacobian", "ntk_vp", "loop", "auto"]


def _bag_of_words() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.EmbeddingBag(10, 4), nn.Linear(4, 3)).double()


# ------------------------------------------------------------------ autograd off
def test_linearized_embedding_bag_under_no_grad():
    """``_embedding_bag`` has no forward-mode rule nor double backward: only the loop runs."""
    model = _bag_of_words()
    x = torch.randint(0, 10, (5, 3))
    theta = {n: p.detach() + 0.01 for n, p in model.named_parameters()}
    lin = linearize(model)
    with torch.no_grad():
        f_lin = lin(x, theta)
    assert lin.mode == "loop", lin.fallbacks
    fm = FunctionalModel(model)
    J = loop_jacobians(fm, x, fm.names)
    f0 = model(x).detach()
    expected = f0 + sum(J[n] @ (theta[n] - fm.params[n]).reshape(-1) for n in fm.names)
    torch.testing.assert_close(f_lin, expected, rtol=1e-9, atol=1e-12)


def test_loop_method_under_no_grad():
    case = CASES_BY_NAME["mlp"]
    model, x = case.model(), case.inputs(4)
    with torch.no_grad():
        K = empirical_ntk(model, x, method="loop", fallback=False)
    assert_kernel_close(K, reference_ntk(model, x), 1e-10, "loop under no_grad")


class _NoDerivative(torch.autograd.Function):
    """An op with neither a forward-mode rule nor a usable backward."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this op has no backward")


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return _NoDerivative.apply(self.fc(x))


def test_linearization_error_names_the_real_cause():
    model = _Opaque().double()
    lin = linearize(model)
    tangent = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="no route could run") as info:
        lin.tangent_logits(torch.randn(3, 3, dtype=torch.float64), tangent)
    assert "finite difference" not in str(info.value)
    assert "this op has no backward" in str(info.value)


# ------------------------------------------------------------------ precision flags
_SCOPES = [
    ("generic", "all"),
    *((backend, op) for backend in ("cuda", "mkldnn") for op in ("all", "matmul", "conv", "rnn")),
]


@pytest.fixture
def precision_flags():
    """The process's precision flags, restored after the test (through the new API)."""
    get = torch._C._get_fp32_precision_getter
    saved = [(scope, get(*scope)) for scope in _SCOPES]
    yield lambda: [get(*scope) for scope in _SCOPES]
    for scope, value in saved:
        torch._C._set_fp32_precision_setter(*scope, value)


def _set_tf32(api: str) -> None:
    if api == "legacy":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    else:  # states the legacy views cannot express (reading them raises)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"


@pytest.mark.skipif(
    not hasattr(torch._C, "_get_fp32_precision_getter"), reason="no per-backend precision API"
)
@pytest.mark.parametrize("api", ["legacy", "new"])
@pytest.mark.parametrize("name", ["mlp", "cnn_batchnorm", "lstm"])
def test_tf32_allowed_by_either_api(precision_flags, api, name):
    case = CASES_BY_NAME[name]
    model = case.model().float()
    x = case.inputs(4, seed=1)
    x = x.float() if x.is_floating_point() else x
    R = reference_ntk(model, x)
    _set_tf32(api)
    before = precision_flags()
    if api == "legacy":
        legacy = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    for method in ALL_METHODS:
        K = empirical_ntk(model, x, method=method)
        assert_kernel_close(K, R, 1e-5, f"{name}/{method} with TF32 allowed ({api} API)")
        assert precision_flags() == before, method
    linearize(model).tangent_logits(x, dict(model.named_parameters()))
    assert precision_flags() == before
    if api == "legacy":  # the legacy views still read as the user set them
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == legacy


# ------------------------------------------------------------------ devices
def _entry_points(model, x):
    probe_y = torch.arange(x.shape[0]) % 2
    return {
        "empirical_ntk": lambda: empirical_ntk(model, x),
        "linearize": lambda: linearize(model),
        # the tracker takes its probe on the CPU and moves it to the model itself
        "tracker.start": lambda: NTKTracker(torch.randn(x.shape), probe_y).start(model),
    }


@pytest.mark.parametrize("entry", ["empirical_ntk", "linearize", "tracker.start"])
def test_model_on_the_meta_device_is_refused(entry):
    model = nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match="meta device, which holds shapes but no values"):
        _entry_points(model, torch.randn(4, 3, device="meta"))[entry]()


@pytest.mark.parametrize("entry", ["empirical_ntk", "linearize", "tracker.start"])
def test_model_split_over_devices_is_refused(entry):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2, device="meta"))
    with pytest.raises(
        ValueError, match=r"several devices \('0.weight' on cpu, '1.weight' on meta"
    ):
        _entry_points(model, torch.randn(4, 3))[entry]()


def test_inputs_on_another_device_are_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="`x1` is on meta but the model is on cpu"):
        empirical_ntk(model, torch.randn(4, 3, device="meta"))
    with pytest.raises(ValueError, match="`x2` is on meta but the model is on cpu"):
        empirical_ntk(model, torch.randn(4, 3), torch.randn(2, 3, device="meta"))


def test_tracker_moves_the_probe_to_the_model_itself():
    model = nn.Linear(3, 2)
    tracker = NTKTracker(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    tracker.start(model)
    assert tracker.probe_x.device == next(model.parameters()).device


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dim", [0, 1])
def test_sharded_parameters_give_the_unsharded_kernel(one_process_group, dim):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model.load_state_dict(reference.state_dict())
    mesh = init_device_mesh("cpu", (1,))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(dim)]))
    x = torch.randn(5, 3)
    torch.testing.assert_close(empirical_ntk(model, x), empirical_ntk(reference, x))
    torch.testing.assert_close(linearize(model)(x), reference(x).detach())
    assert type(model[0].weight).__name__ == "DTensor"  # left sharded


def _unsupported_sharding(kind):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    model = nn.Linear(3, 2)
    weight = model.weight.detach()
    if kind == "2-D mesh":
        mesh = init_device_mesh("cpu", (1, 1))
        model.weight = nn.Parameter(distribute_tensor(weight, mesh, [Replicate(), Shard(0)]))
    elif kind == "partial":
        mesh = init_device_mesh("cpu", (1,))
        model.weight = nn.Parameter(DTensor.from_local(weight, mesh, [Partial()]))
    else:
        mesh = init_device_mesh("cpu", (1,))
        model.register_buffer("scale", distribute_tensor(torch.ones(2), mesh, [Shard(0)]))
    return model


@pytest.mark.parametrize("entry", ["empirical_ntk", "linearize", "tracker.start"])
@pytest.mark.parametrize(
    "kind, match",
    [
        ("2-D mesh", r"'weight' is sharded on a 2-D device mesh .*only 1-D meshes"),
        ("partial", r"'weight' has placement P\(sum\) .*a Partial one is a pending sum"),
        ("buffer", r"buffer 'scale' is a DTensor: sharded buffers are not supported"),
    ],
)
def test_unsupported_shardings_are_refused(one_process_group, entry, kind, match):
    model = _unsupported_sharding(kind)
    with pytest.raises(ValueError, match=match):
        _entry_points(model, torch.randn(4, 3))[entry]()


def test_dtensor_inputs_are_refused(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    x = distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])
    with pytest.raises(ValueError, match="`x1` holds a DTensor: inputs must be plain tensors"):
        empirical_ntk(nn.Linear(3, 2), x)


# ------------------------------------------------------------------ methods
def test_the_monitor_takes_the_engines_methods():
    assert METHODS == tuple(m.value for m in NTKMethod)
    assert NTKMonitor(method="loop").method == "loop"
    assert NTKMonitor(method=NTKMethod.NTK_VP).method == "ntk_vp"
    with pytest.raises(ValueError, match=r"`method` to be one of \('auto', .*'loop'\)"):
        NTKMonitor(method="fast")


def test_forward_mode_leaks_no_pytorch_deprecation_warnings():
    """PyTorch scripts its forward-mode decompositions on first use, warning per script."""
    import subprocess
    import sys

    script = """
import warnings
import torch
from torch import nn
from lightning_ntk import empirical_ntk, linearize
warnings.simplefilter("error", DeprecationWarning)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
x = torch.randn(5, 4)
empirical_ntk(model, x, method="ntk_vp")
lin = linearize(model)
lin(x)
print("clean")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and "clean" in run.stdout, run.stderr[-2000:]


def test_non_finite_logits_name_what_holds_nan_the_inputs_or_the_parameters():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(3, 4)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\].*`x1` itself holds NaN"):
        empirical_ntk(model, x)
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"the parameter `2\.weight` holds NaN / inf"):
        empirical_ntk(model, torch.randn(3, 4))
