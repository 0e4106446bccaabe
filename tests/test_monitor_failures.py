"""The monitor is a guest: a measurement that fails makes its metrics nan, warns once, and
training goes on; only ``on_breakdown="raise"`` lets the error end the run."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch

from lightning_ntk import NTKMeasurementWarning, NTKMonitor, NTKTracker
from lightning_ntk.monitor import _measure
from tests._lightning_models import module_class, one_thread, trainer_kwargs  # noqa: F401

KERNEL_FIELDS = ("relative_change", "kernel_distance", "eig_max", "effective_rank")
LINEAR_FIELDS = ("linearization_error", "prob_tv", "argmax_agreement")


def _fit(monitor, max_steps=8):
    pl.seed_everything(0, verbose=False)
    model = module_class("pytorch_lightning")()
    trainer = pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=max_steps))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    measurement = [w for w in caught if issubclass(w.category, NTKMeasurementWarning)]
    return trainer, measurement


def _fail_after(calls_ok, error):
    """A stand-in that works ``calls_ok`` times, then raises ``error``."""
    calls = {"n": 0}

    def wrap(original):
        def fn(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > calls_ok:
                raise error
            return original(*args, **kwargs)

        return fn

    return wrap


def test_a_kernel_pytorch_cannot_compute_is_nan_with_one_warning(monkeypatch):
    error = RuntimeError("vmap: no batching rule for aten::made_up_op")
    wrap = _fail_after(1, error)  # Θ0 at the start works, every report's kernel fails
    monkeypatch.setattr(_measure, "probe_kernel", wrap(_measure.probe_kernel))
    monitor = NTKMonitor(n_probe=9, log_base=2)
    trainer, caught = _fit(monitor)
    assert trainer.global_step == 8
    assert [r.step for r in monitor.history] == [2, 4, 8]
    for report in monitor.history:
        assert all(math.isnan(getattr(report, f)) for f in KERNEL_FIELDS)
        assert all(math.isfinite(getattr(report, f)) for f in LINEAR_FIELDS)
        assert math.isfinite(report.logit_norm)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "aten::made_up_op" in message and 'method="ntk_vp"' in message
    assert "training goes on" in message
    assert "kernel" in monitor.tracker.failures


def test_a_linearization_pytorch_cannot_compute_is_nan_with_one_warning(monkeypatch):
    def no_forward_ad(fm, theta0, x):  # nor any of the linearized model's fall-backs
        raise NotImplementedError("Trying to use forward AD with aten::_fused_op")

    monkeypatch.setattr(_measure, "_linearized", no_forward_ad)
    monitor = NTKMonitor(n_probe=9, log_base=2)
    trainer, caught = _fit(monitor)
    assert trainer.global_step == 8 and len(monitor.history) == 3
    for report in monitor.history:
        assert all(math.isnan(getattr(report, f)) for f in LINEAR_FIELDS)
        assert all(math.isfinite(getattr(report, f)) for f in KERNEL_FIELDS)
    assert len(caught) == 1 and "aten::_fused_op" in str(caught[0].message)


def test_a_kernel_that_fails_at_the_start_leaves_the_other_metrics(monkeypatch):
    monkeypatch.setattr(
        _measure, "probe_kernel", _fail_after(0, RuntimeError("boom"))(lambda: None)
    )
    x, y = torch.randn(6, 4), torch.arange(6) % 3
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    tracker = NTKTracker(x, y)
    with pytest.warns(NTKMeasurementWarning, match="could not compute the kernel"):
        tracker.start(model)
    report = tracker.update(model, step=1)
    assert math.isnan(report.relative_change)
    assert report.linearization_error == 0.0 and math.isfinite(report.logit_norm)


def test_an_unexpected_failure_stops_the_reports_not_the_training(monkeypatch):
    monkeypatch.setattr(
        NTKTracker, "update", _fail_after(1, KeyError("something internal"))(NTKTracker.update)
    )
    monitor = NTKMonitor(n_probe=9, log_base=2)
    trainer, caught = _fit(monitor)
    assert trainer.global_step == 8
    assert [r.step for r in monitor.history] == [2]  # the report at step 4 failed; no more
    assert len(caught) == 1 and "at step 4" in str(caught[0].message)


def test_an_unexpected_failure_at_the_start_does_not_end_training(monkeypatch):
    monkeypatch.setattr(NTKTracker, "start", _fail_after(0, IndexError("odd"))(NTKTracker.start))
    monitor = NTKMonitor(n_probe=9, log_base=2)
    trainer, caught = _fit(monitor)
    assert trainer.global_step == 8 and monitor.history == []
    assert len(caught) == 1 and "at the start of training" in str(caught[0].message)


def test_on_breakdown_raise_lets_the_error_through(monkeypatch):
    monkeypatch.setattr(NTKTracker, "start", _fail_after(0, IndexError("odd"))(NTKTracker.start))
    with pytest.raises(IndexError, match="odd"):
        _fit(NTKMonitor(n_probe=9, log_base=2, on_breakdown="raise"))
