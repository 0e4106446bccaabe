"""Layers written as calls (``F.linear``, ``F.conv*``, ``@``) get structured kernels, exactly.

What the recorder sees of a forward pass, that the scale and operands are read on every
call (never from the cached plan), that a call whose operands change falls back for that
call, and that models made only of modules record as before (no function mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ntk import empirical_ntk, reference_ntk
from lightning_ntk.kernel import last_call_info
from lightning_ntk.kernel._calls import CallRecorder, CallSpec, discover

from .test_kernel import assert_kernel_close
from .test_plan_checks import fresh_memory  # noqa: F401  (autouse: no plan leaks between tests)


def _specs(forward, params):
    return {name: specs for name, specs in discover(forward, params).items()}


def test_recorder_sees_scaled_and_transposed_weights():
    w, b, v = torch.randn(3, 4), torch.randn(3), torch.randn(4, 3)
    gain = torch.tensor(0.5)
    x = torch.randn(2, 4)

    def forward(p):
        F.linear(x, p["w"] * 2.0, 0.1 * p["b"])
        x @ (p["v"] / 4.0)  # a Linear of weight vᵀ
        x @ (gain * p["w"]).T
        return None

    calls = _specs(forward, {"w": w, "b": b, "v": v})
    assert calls["w"] == [
        CallSpec("linear", "w", "b", 2.0, 0.1),
        CallSpec("matmul", "w", None, 0.5, transposed=False),
    ]
    assert calls["v"] == [CallSpec("matmul", "v", None, 0.25, transposed=True)]


def test_recorder_reads_convolution_settings():
    w2, w1 = torch.randn(4, 2, 3, 3), torch.randn(3, 2, 5)

    def forward(p):
        F.conv2d(torch.randn(1, 4, 8, 8), p["w2"], stride=(2, 1), padding=1, groups=2)
        F.conv1d(torch.randn(1, 2, 9), p["w1"] / 3, padding="same", dilation=2)

    calls = _specs(forward, {"w2": w2, "w1": w1})
    assert calls["w2"] == [
        CallSpec("conv2d", "w2", None, 1.0, 1.0, (3, 3), (2, 1), (1, 1), (1, 1), groups=2)
    ]
    assert calls["w1"] == [CallSpec("conv1d", "w1", None, 1 / 3, 1.0, (5,), (1,), "same", (2,))]


def test_recorder_ignores_what_is_not_a_constant_multiple():
    w = torch.randn(3, 4)
    learned = torch.tensor(0.5, requires_grad=True)
    rows = torch.rand(3, 1)
    x = torch.randn(2, 4)

    def forward(p):
        F.linear(x, p["w"] * learned)  # a scale that needs a gradient
        F.linear(x, p["w"] * rows)  # a per-row scale
        F.linear(x, p["w"] + 1.0)
        F.linear(x, p["w"][:2])  # a slice of the weight

    assert _specs(forward, {"w": w}) == {}


class _NTKMLP(nn.Module):
    """``F.linear(h, w · c, b · c_b)`` layers whose scales and bias a dict sets."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
        self.b1_other = nn.Parameter(torch.randn(6))
        self.w2, self.b2 = nn.Parameter(torch.randn(3, 6)), nn.Parameter(torch.randn(3))
        self.options = {"c": 0.5, "bias": "b1", "product": False}

    def forward(self, x):
        bias = getattr(self, self.options["bias"])
        h = torch.tanh(F.linear(x, self.w1 * self.options["c"], 0.3 * bias))
        if self.options["product"]:
            return h @ (self.w2 / 6**0.5).T + self.b2
        return F.linear(h, self.w2 / 6**0.5, self.b2)


def test_scales_are_read_on_every_call():
    """A scale changed where no fingerprint looks is still exact (and still structured)."""
    torch.manual_seed(0)
    model = _NTKMLP().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    for c in (0.5, 2.0):
        model.options["c"] = c
        K = empirical_ntk(model, x, method="structured")
        assert_kernel_close(K, reference_ntk(model, x), 1e-10, f"scale {c}")
        info = last_call_info()
        assert info.method == "structured" and set(info.per_example) == {"b1_other"}


def test_a_call_on_another_bias_falls_back_for_that_call():
    torch.manual_seed(0)
    model = _NTKMLP().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    empirical_ntk(model, x, method="structured")  # plans w1 with b1
    model.options["bias"] = "b1_other"
    K = empirical_ntk(model, x, method="structured")
    assert_kernel_close(K, reference_ntk(model, x), 1e-10, "another bias")
    info = last_call_info()
    assert {"w1", "b1"} <= set(info.per_example)
    assert any("structured/F.linear(w1):" in f and "another bias" in f for f in info.fallbacks), (
        info.fallbacks
    )


def test_a_weight_used_by_another_operation_falls_back_for_that_call():
    torch.manual_seed(0)
    model = _NTKMLP().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    empirical_ntk(model, x, method="structured")  # plans w2 as F.linear with b2
    model.options["product"] = True
    K = empirical_ntk(model, x, method="structured")
    assert_kernel_close(K, reference_ntk(model, x), 1e-10, "a product")
    info = last_call_info()
    assert {"w2", "b2"} <= set(info.per_example)
    assert any("was called as matmul where it was verified as linear" in f for f in info.fallbacks)


def test_per_layer_parts_of_scaled_biases():
    """The bias kernel ``c_b² Σ G·G`` shares the weight's Gram; its part is its own."""
    torch.manual_seed(0)
    model = _NTKMLP().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    parts = empirical_ntk(model, x, method="structured", per_layer=True)
    for name in ("b1", "b2", "w1"):
        alone = reference_ntk(model, x, params=[name])
        assert_kernel_close(parts[name], alone, 1e-10, name)


def test_module_layers_record_without_a_function_mode():
    """Models of modules only keep their fast path: no mode sees their forward."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.overrides._get_current_function_mode_stack())
            return x

    model = nn.Sequential(nn.Linear(4, 5), Probe(), nn.Tanh(), nn.Linear(5, 3)).double()
    empirical_ntk(model, torch.randn(3, 4, dtype=torch.float64), method="structured")
    assert seen and all(not any(isinstance(mode, CallRecorder) for mode in stack) for stack in seen)
    assert last_call_info().per_example == ()
