"""The fall-back chain: a method PyTorch cannot run hands over to the next, exactly."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_ntk import empirical_ntk, linearize, reference_ntk
from lightning_ntk.kernel import jacobian as jacobian_module
from lightning_ntk.kernel import last_call_info
from lightning_ntk.kernel._run import FAILED as _FAILED
from lightning_ntk.kernel.loop import loop_jacobians
from lightning_ntk.kernel.ntk_vp import NTKVPMethod

from .cases import CASES_BY_NAME
from .test_kernel import assert_kernel_close


@pytest.fixture(autouse=True)
def fresh_memory():
    """No remembered failures leak between tests."""
    _FAILED.clear()
    yield
    _FAILED.clear()


def _no_batching_rule(*args, **kwargs):
    raise RuntimeError("Batching rule not implemented for aten::injected")


def _no_forward_ad(self, *args, **kwargs):
    raise NotImplementedError("Trying to use forward AD with aten::injected")


def test_failing_jacobian_falls_back_to_ntk_vp_exactly(monkeypatch):
    case = CASES_BY_NAME["mlp"]
    model, x1, x2 = case.model(), case.inputs(5, seed=1), case.inputs(3, seed=2)
    R = reference_ntk(model, x1, x2)
    monkeypatch.setattr(jacobian_module, "jacobians", _no_batching_rule)
    K = empirical_ntk(model, x1, x2, method="jacobian")
    assert_kernel_close(K, R, 1e-10, "jacobian -> ntk_vp")
    info = last_call_info()
    assert info.requested == "jacobian" and info.method == "ntk_vp"
    assert info.fallbacks[0].startswith("jacobian: RuntimeError: Batching rule")


def test_every_vmap_and_forward_mode_method_failing_leaves_the_loop(monkeypatch):
    case = CASES_BY_NAME["text_embedding_layernorm"]
    model, x1 = case.model(), case.inputs(4, seed=1)
    R = reference_ntk(model, x1)
    monkeypatch.setattr(jacobian_module, "jacobians", _no_batching_rule)
    monkeypatch.setattr(NTKVPMethod, "block", _no_forward_ad)
    from lightning_ntk.kernel import structured

    monkeypatch.setattr(structured, "jacobians", _no_batching_rule)
    monkeypatch.setattr(structured.StructuredMethod, "features", _no_batching_rule)
    for method in ("auto", "structured", "jacobian", "ntk_vp", "loop"):
        K = empirical_ntk(model, x1, method=method, output="diagonal")
        assert_kernel_close(K, R.diagonal(dim1=2, dim2=3), 1e-10, method)
        assert last_call_info().method == "loop"


def test_structured_uses_the_loop_for_unstructured_parameters_without_vmap(monkeypatch):
    from lightning_ntk.kernel import structured

    case = CASES_BY_NAME["custom_parameter"]  # log_scale falls back to Jacobians
    model, x1, x2 = case.model(), case.inputs(5, seed=1), case.inputs(3, seed=2)
    R = reference_ntk(model, x1, x2)
    monkeypatch.setattr(structured, "jacobians", _no_batching_rule)
    K = empirical_ntk(model, x1, x2, method="structured")
    assert_kernel_close(K, R, 1e-10, "structured with looped fallback parameters")
    info = last_call_info()
    assert info.method == "structured" and info.per_example == ("log_scale",)
    assert info.fallbacks[0].startswith("structured/jacobian of unstructured parameters")


def test_fallback_false_raises_the_methods_own_error(monkeypatch):
    case = CASES_BY_NAME["mlp"]
    monkeypatch.setattr(jacobian_module, "jacobians", _no_batching_rule)
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        empirical_ntk(case.model(), case.inputs(3), method="jacobian", fallback=False)
    with pytest.raises(TypeError, match="`fallback` to be a bool"):
        empirical_ntk(case.model(), case.inputs(3), fallback="yes")


def test_no_method_can_run_is_a_clear_error(monkeypatch):
    from lightning_ntk.kernel import loop

    case = CASES_BY_NAME["mlp"]
    monkeypatch.setattr(jacobian_module, "jacobians", _no_batching_rule)
    monkeypatch.setattr(NTKVPMethod, "block", _no_forward_ad)
    monkeypatch.setattr(loop.LoopMethod, "features", _no_batching_rule)
    with pytest.raises(RuntimeError, match=r"No exact NTK method could run .*jacobian: .*ntk_vp"):
        empirical_ntk(case.model(), case.inputs(3), method="jacobian")


def test_a_failed_method_is_remembered_and_skipped(monkeypatch):
    case = CASES_BY_NAME["mlp"]
    model, x = case.model(), case.inputs(4)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        _no_batching_rule()

    monkeypatch.setattr(jacobian_module, "jacobians", failing)
    empirical_ntk(model, x, method="jacobian")
    empirical_ntk(model, x + 1.0, method="jacobian")
    assert len(calls) == 1
    assert "failed earlier on this model" in last_call_info().fallbacks[0]


def test_call_info_is_logged_at_debug_level(caplog):
    case = CASES_BY_NAME["custom_parameter"]
    with caplog.at_level(logging.DEBUG, logger="lightning_ntk"):
        empirical_ntk(case.model(), case.inputs(3))
    assert any("empirical_ntk: method=" in r.getMessage() for r in caplog.records)


def test_auto_chooses_by_its_cost_model_the_same_on_every_call():
    case = CASES_BY_NAME["custom_parameter"]  # a parameter outside any supported layer
    model, x = case.model(), case.inputs(4)
    R = reference_ntk(model, x)
    infos = []
    for _ in range(4):
        assert_kernel_close(empirical_ntk(model, x), R, 1e-10, "auto")
        infos.append(last_call_info())
    first = infos[0]
    assert first.choice == "cost model" and first.requested == "auto"
    assert first.method == min(first.estimates, key=first.estimates.__getitem__)
    assert {"jacobian", "ntk_vp"} <= set(first.estimates)
    assert all(info == first for info in infos[1:])  # the same method, the same estimates
    assert "cost model" in first.summary()


def _auto_choice_in_a_fresh_process(name: str) -> str:
    code = (
        "import json, sys; from tests.cases import CASES_BY_NAME; "
        "from lightning_ntk import empirical_ntk; "
        "from lightning_ntk.kernel import last_call_info; "
        f"case = CASES_BY_NAME[{name!r}]; "
        "empirical_ntk(case.model(), case.inputs(6, seed=3), output_fn=case.output_fn); "
        "info = last_call_info(); "
        "print(json.dumps([info.method, info.choice, sorted(info.estimates.items())]))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["transformer_encoder", "custom_parameter"])
def test_auto_chooses_the_same_in_two_fresh_processes(name):
    first, second = (_auto_choice_in_a_fresh_process(name) for _ in range(2))
    assert first == second and '"cost model"' in first


def test_auto_picks_structured_where_jacobians_would_be_large():
    """N²·C·P Jacobian contraction and N·C·P numbers against per-layer factors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))  # fmt: skip
    x = torch.randn(16, 64)
    empirical_ntk(model, x, output="trace")
    info = last_call_info()
    assert info.method == "structured" and info.choice == "cost model"
    assert info.estimates["structured"] * 3 < info.estimates["jacobian"]


def test_auto_does_not_plan_where_structured_cannot_win(monkeypatch):
    from lightning_ntk.kernel import _run

    planned = []
    real = _run.plan_structure
    monkeypatch.setattr(_run, "plan_structure", lambda *a: planned.append(1) or real(*a))
    case = CASES_BY_NAME["bias_free_linear"]  # a few dispatched operations, tiny P
    empirical_ntk(case.model(), case.inputs(4))
    assert not planned and "structured" not in last_call_info().estimates
    assert last_call_info().method in ("jacobian", "ntk_vp")


def test_auto_falls_back_in_the_order_of_its_estimates(monkeypatch):
    case = CASES_BY_NAME["mlp"]
    model, x = case.model(), case.inputs(5, seed=1)
    R = reference_ntk(model, x)
    empirical_ntk(model, x)
    picked = last_call_info()
    ranked = sorted(picked.estimates, key=picked.estimates.__getitem__)
    _FAILED.clear()
    if picked.method == "jacobian":
        monkeypatch.setattr(jacobian_module, "jacobians", _no_batching_rule)
    else:
        monkeypatch.setattr(NTKVPMethod, "block", _no_forward_ad)
    assert_kernel_close(empirical_ntk(model, x), R, 1e-10, "auto after a failure")
    info = last_call_info()
    assert info.method == ranked[1] and info.choice == "cost model"
    assert info.fallbacks[0].startswith(f"{picked.method}: ")
    assert_kernel_close(empirical_ntk(model, x), R, 1e-10, "auto after a known failure")
    later = last_call_info()  # ranked without the method that failed: not tried again
    assert later.method == ranked[1] and picked.method not in later.estimates
    assert later.fallbacks == ()


# ------------------------------------------------------------ never silently wrong
class _SequenceFirst(nn.Module):
    """A Linear over a (T, N, D) sequence-first layout with T == N: rows are not examples."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # x: (N, T=4, 3)
        h = torch.tanh(self.fc(x.transpose(0, 1)))  # (T, N, 5)
        return self.head(h.mean(dim=0))


class _RowsSwapped(nn.Module):
    """Each example's logits come from another example's row of a Linear's output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x: (N, 4, 3); a batch of one is the plain model
        return self.head(torch.tanh(self.fc(x.mean(dim=1))).flip(0))


@pytest.mark.parametrize("model_cls", [_SequenceFirst, _RowsSwapped])
def test_rows_that_are_not_examples_are_never_factorised(model_cls):
    """The summed-gradient check passes on both; the per-example check does not."""
    torch.manual_seed(0)
    model = model_cls().double()
    x1 = torch.randn(4, 4, 3, dtype=torch.float64)
    x2 = torch.randn(4, 4, 3, dtype=torch.float64)
    R = reference_ntk(model, x1, x2)
    # (ntk_vp differentiates the batch as a whole: it assumes, like every batched
    # evaluation, that examples do not interact in eval mode, which _RowsSwapped breaks)
    for method in ("structured", "jacobian", "loop"):
        assert_kernel_close(empirical_ntk(model, x1, x2, method=method), R, 1e-10, method)
    from lightning_ntk.kernel._functional import FunctionalModel
    from lightning_ntk.kernel.structured import plan_structure

    plan = plan_structure(FunctionalModel(model), x1)
    assert "fc.weight" in plan.fallback_names


@pytest.mark.parametrize("name", ["position_buffer", "position_arange", "batch_free_inputs"])
def test_batch_free_inputs_single_example_probe_then_a_batch(name):
    """A plan verified on one example must not be reused wrongly on a batch."""
    case = CASES_BY_NAME[name]
    model = case.model()
    one, batch = case.inputs(1, seed=3), case.inputs(5, seed=4)
    for x in (one, batch):
        K = empirical_ntk(model, x, method="structured")
        assert_kernel_close(K, reference_ntk(model, x), 1e-10, f"{name} N={len(x)}")


# ---------------------------------------------------------------- linearization
def _reference_jv(model, x, tangent):
    """``J(x) v`` from float64 per-example reverse-mode Jacobians."""
    from lightning_ntk.kernel._functional import FunctionalModel

    fm = FunctionalModel(model, dtype=torch.float64)
    J = loop_jacobians(fm, fm.cast_input(x), fm.names)
    return sum(J[n] @ tangent[n].double().reshape(-1) for n in fm.names)


def _tangent(model, scale=1e-2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in model.named_parameters()
    }


def test_linearize_without_forward_ad_uses_a_checked_reverse_mode_route():
    case = CASES_BY_NAME["weight_norm"]  # _weight_norm_interface has no forward-AD rule
    model, x = case.model(), case.inputs(4)
    lin = linearize(model)
    v = _tangent(model)
    Jv = lin.tangent_logits(x, v)
    assert lin.mode == "double_vjp" and lin.fallbacks[0].startswith("jvp: NotImplementedError")
    torch.testing.assert_close(Jv, _reference_jv(model, x, v), rtol=1e-9, atol=1e-12)


def test_linearize_falls_back_to_the_loop_when_double_backward_fails(monkeypatch):
    from lightning_ntk.linearization import model as linearization

    case = CASES_BY_NAME["mlp"]
    model, x = case.model(), case.inputs(4)
    monkeypatch.setattr(linearization, "forward_mode", _no_forward_ad)
    monkeypatch.setattr(linearization, "double_vjp", _no_forward_ad)
    lin = linearize(model)
    v = _tangent(model)
    Jv = lin.tangent_logits(x, v)
    assert lin.mode == "loop"
    torch.testing.assert_close(Jv, _reference_jv(model, x, v), rtol=1e-9, atol=1e-12)


class _DetachingBackward(torch.autograd.Function):
    """``y = 2 x`` whose backward claims ``x`` does not matter (and no forward-AD rule)."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class _Detaching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(_DetachingBackward.apply(torch.tanh(self.fc(x))))


def test_a_backward_that_is_not_the_derivative_is_refused_not_returned():
    torch.manual_seed(0)
    model = _Detaching().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    lin = linearize(model)
    with pytest.raises(RuntimeError, match="finite difference"):
        lin.tangent_logits(x, _tangent(model))


def test_engine_restores_the_users_fast_path_settings():
    case = CASES_BY_NAME["transformer_encoder"]
    model, x = case.model().float(), case.inputs(3)
    assert torch.backends.mha.get_fastpath_enabled()
    empirical_ntk(model, x, method="ntk_vp")
    linearize(model)(x)
    assert torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mkldnn.enabled


def test_auto_counting_pass_leaves_parametrized_modules_untouched():
    """Reading a parametrized weight runs its parametrization (spectral norm's power step)."""
    case = CASES_BY_NAME["spectral_norm"]
    model, x = case.model(), case.inputs(4)
    before = {name: b.clone() for name, b in model.named_buffers()}
    empirical_ntk(model, x)
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
