"""A cached structured plan is checked on every call: no cache outlives a change of the model.

The plan of a model is verified once and cached under its structure; every chunk of every
call then re-checks what the plan assumes (one call per layer, one row per example, rows
that reach only their own example's logits, parameters used only inside their layer).
Failures of methods are remembered under what they depend on, so a changed module
setting runs them again.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ntk import empirical_ntk, reference_ntk
from lightning_ntk.kernel import _plan, last_call_info
from lightning_ntk.kernel._functional import FunctionalModel
from lightning_ntk.kernel._plan import fingerprint
from lightning_ntk.kernel._run import FAILED

from .test_kernel import assert_kernel_close


@pytest.fixture(autouse=True)
def fresh_memory():
    """No remembered failures or plans leak between tests."""
    FAILED.clear()
    _plan._PLANS.clear()
    yield
    FAILED.clear()
    _plan._PLANS.clear()


class _RunTwiceOnSome(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        more = x[:, 0] > 0
        if bool(more.any()):
            h = torch.where(more[:, None], torch.tanh(self.fc(h)), h)
        return self.head(h)


def test_layer_run_twice_only_on_later_probes_is_exact():
    """The plan is verified on the first four examples, where ``fc`` runs once."""
    torch.manual_seed(0)
    model = _RunTwiceOnSome()
    x = torch.randn(6, 4)
    x[:4, 0], x[4:, 0] = -1.0, 1.0
    K = empirical_ntk(model, x, method="structured")
    info = last_call_info()
    assert_kernel_close(K, reference_ntk(model, x), 1e-5, "fc run twice on two probes")
    assert info.method == "structured"
    assert {"fc.weight", "fc.bias"} <= set(info.per_example)
    assert any("structured/fc:" in f and "called 2 times" in f for f in info.fallbacks)
    shallow = x[:4]  # the same model on probes that do not trigger it: structured again
    K = empirical_ntk(model, shallow, method="structured")
    assert_kernel_close(K, reference_ntk(model, shallow), 1e-5, "")
    assert last_call_info().per_example == ()


class _Configurable(nn.Module):
    """One forward whose computation a setting in a dict changes (invisible to a fingerprint).

    ``x`` is ``(N, T, 3)``; modes: ``"plain"``; ``"twice"`` (``fc`` applied twice);
    ``"outside"`` (``fc.weight`` also used outside ``fc``); ``"sequence_first"`` (``fc``
    applied to ``(T, N, 3)``: its rows are positions, each holding every example).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(3, 3), nn.Linear(3, 2)
        self.options = {"mode": "plain"}

    def forward(self, x):
        mode = self.options["mode"]
        if mode == "sequence_first":
            h = torch.tanh(self.fc(x.transpose(0, 1))).transpose(0, 1)
        else:
            h = torch.tanh(self.fc(x))
        if mode == "twice":
            h = torch.tanh(self.fc(h))
        if mode == "outside":
            h = h + x @ self.fc.weight.T
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("twice", "was called 2 times"),
        ("outside", "has its parameter 'fc.weight' used outside its call"),
        ("sequence_first", "mixes examples"),
    ],
)
def test_cached_plan_is_rechecked_when_the_computation_changes(monkeypatch, mode, reason):
    verifications = []
    verified = _plan._verified
    monkeypatch.setattr(_plan, "_verified", lambda *a: verifications.append(1) or verified(*a))
    torch.manual_seed(0)
    model = _Configurable().double()
    x = torch.randn(4, 4, 3, dtype=torch.float64)  # T = N: the row counts cannot tell
    plain = empirical_ntk(model, x, method="structured")
    assert_kernel_close(plain, reference_ntk(model, x), 1e-10, "plain")
    model.options["mode"] = mode
    K = empirical_ntk(model, x, method="structured")
    assert len(verifications) == 1  # the cached plan was used, and checked on the call
    info = last_call_info()
    assert_kernel_close(K, reference_ntk(model, x), 1e-10, mode)
    assert any(f.startswith("structured/fc:") and reason in f for f in info.fallbacks), (
        info.fallbacks
    )
    assert "fc.weight" in info.per_example and "head.weight" not in info.per_example


class _SwitchedItem(nn.Module):
    """``.item()`` (which ``vmap`` refuses) only while ``use_item`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.use_item = True

    def forward(self, x):
        scale = 1.0 + 0.0 * x.sum().item() if self.use_item else 1.0
        return self.fc(x) * scale


def test_remembered_failures_are_keyed_on_the_module_settings():
    model = _SwitchedItem().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    empirical_ntk(model, x, method="jacobian")
    assert last_call_info().method != "jacobian"  # vmap refused .item()
    empirical_ntk(model, x, method="jacobian")
    assert "failed earlier" in last_call_info().fallbacks[0]
    model.use_item = False  # a changed setting: the method runs again
    K = empirical_ntk(model, x, method="jacobian")
    assert last_call_info().method == "jacobian" and last_call_info().fallbacks == ()
    assert_kernel_close(K, reference_ntk(model, x), 1e-10, "after the switch")


def test_sparse_flag_switched_off_after_a_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 3))
    x = torch.randint(0, 10, (5, 3))
    for method in ("loop", "jacobian", "auto"):
        assert_kernel_close(
            empirical_ntk(model, x, method=method), reference_ntk(model, x), 1e-5, method
        )
    model[0].sparse = False
    for method in ("loop", "jacobian", "auto"):
        assert_kernel_close(
            empirical_ntk(model, x, method=method), reference_ntk(model, x), 1e-5, method
        )
    assert model[0].sparse is False


def test_the_last_method_of_the_chain_always_runs():
    """A remembered failure skips a method only while a later one is left to try."""
    model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    fm = FunctionalModel(model)
    FAILED[((fingerprint(fm, x), "cpu"), "loop")] = "RuntimeError: once, long ago"
    K = empirical_ntk(model, x, method="loop")
    assert last_call_info().method == "loop"
    assert_kernel_close(K, reference_ntk(model, x), 1e-10, "loop")
