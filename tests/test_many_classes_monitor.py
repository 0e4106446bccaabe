"""The monitor's default layout with many classes: the exact trace above N·C = 1024."""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
from torch import Tensor, nn

from lightning_ntk import NTKTracker, reference_ntk
from lightning_ntk.monitor.settings import FULL_LAYOUT_LIMIT, default_output
from tests._lightning_models import one_thread  # noqa: F401

N = 16


def _setup(classes: int, width: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, classes))
    x, y = torch.randn(N, 6), torch.randint(0, classes, (N,))
    return model, x, y


def _run(
    classes: int, width: int = 8, **settings
) -> tuple[NTKTracker, nn.Module, list[warnings.WarningMessage]]:
    """``start``, one SGD step, two ``update``; the warnings raised on the way."""
    model, x, y = _setup(classes, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = NTKTracker(x, y, optimizer=opt, **settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.start(model)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        tracker.update(model, 4)
        tracker.update(model, 16)
    return tracker, model, list(caught)


def _layout_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "trace layout" in str(w.message)]


def _tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def test_the_rule_switches_above_the_limit():
    assert default_output(N, FULL_LAYOUT_LIMIT // N) == "full"
    assert default_output(N, FULL_LAYOUT_LIMIT // N + 1) == "trace"
    assert default_output(1, 1) == "full"


def test_ten_classes_keep_the_full_layout_and_its_numbers():
    default, _, caught = _run(10)
    explicit, _, _ = _run(10, output="full")
    assert (
        default.layout == "full"
        and default.last_kernel is not None
        and default.last_kernel.ndim == 4
    )
    assert _layout_warnings(caught) == []
    for ours, theirs in zip(default.history, explicit.history, strict=True):
        assert ours.to_dict() == theirs.to_dict()
    torch.testing.assert_close(default.started_state.K0, explicit.started_state.K0)


def test_many_classes_default_to_the_exact_trace_and_warn_once():
    classes = 100  # N·C = 1600 > 1024
    tracker, model, caught = _run(classes)
    assert tracker.output is None and tracker.layout == "trace"
    messages = _layout_warnings(caught)
    assert len(messages) == 1
    assert "N·C = 1600 is above 1024" in messages[0] and "output='full'" in messages[0]
    assert tracker.last_kernel is not None and tracker.last_kernel.shape == (N, N)
    expected = reference_ntk(model, tracker.probe_x, output="trace")
    torch.testing.assert_close(tracker.last_kernel.double(), expected, rtol=1e-4, atol=1e-6)
    report = tracker.history[-1]
    for name in ("relative_change", "eig_max", "effective_rank", "target_alignment"):
        assert torch.isfinite(torch.tensor(getattr(report, name))), name
    assert report.eig_max == pytest.approx(float(torch.linalg.eigvalsh(expected)[-1]), rel=1e-4)
    assert tracker.kernel_matrix().shape == (N, N)
    # a second start (a restart) does not repeat the warning
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        tracker.start(model)
    assert _layout_warnings(list(again)) == []


def test_many_classes_state_holds_no_class_by_class_blocks():
    tracker, _, _ = _run(100)
    state = tracker.state_dict()
    assert all(t.ndim <= 2 for t in _tensors(state)), [t.shape for t in _tensors(state)]
    assert len(pickle.dumps(state)) < 200_000  # the full layout's Θ0 alone is 10 MB


def test_explicit_full_is_kept_for_many_classes():
    tracker, _, caught = _run(100, output="full")
    assert tracker.layout == "full"
    assert tracker.last_kernel is not None and tracker.last_kernel.shape == (N, N, 100, 100)
    assert _layout_warnings(caught) == []


def test_the_chosen_layout_survives_a_checkpoint():
    tracker, model, _ = _run(100)
    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)
    buffer.seek(0)
    resumed = NTKTracker()
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.layout == "trace"
    report = resumed.update(model, 64)
    assert report.relative_change == pytest.approx(tracker.history[-1].relative_change)


def test_a_thousand_classes_at_defaults_are_cheap():
    tracker, _, caught = _run(1000, width=32)
    assert tracker.layout == "trace" and len(_layout_warnings(caught)) == 1
    assert len(pickle.dumps(tracker.state_dict())) < 20 * 2**20
