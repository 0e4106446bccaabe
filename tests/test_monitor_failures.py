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
from tests._lightning_models import (  # noqa: F401
    blobs,
    mlp,
    module_class,
    nan_batch_module,
    one_thread,
    trainer_kwargs,
)

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
    def no_forward_ad(fm, theta0, x, f0=None):  # nor any of the linearized model's fall-backs
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


class _ShapeError(ValueError):
    """A user's exception whose ``__init__`` takes two required arguments."""

    def __init__(self, expected, got):
        super().__init__(f"expected {expected}, got {got}")
        self.expected, self.got = expected, got


def _failing_forward_module(error):
    """A LightningModule whose forward raises ``error`` whenever gradients are off, as
    they are while the monitor measures (training's forward has them on)."""
    base = module_class("pytorch_lightning")

    class Model(base):
        def forward(self, x):
            if not torch.is_grad_enabled():
                raise error
            return super().forward(x)

    return Model


def test_a_value_error_from_the_model_at_the_start_does_not_end_training():
    pl.seed_everything(0, verbose=False)
    model = _failing_forward_module(ValueError("the model refuses this batch"))()
    monitor = NTKMonitor(n_probe=9, log_base=2)
    trainer = pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    measurement = [w for w in caught if issubclass(w.category, NTKMeasurementWarning)]
    assert trainer.global_step == 8 and monitor.history == []
    assert len(measurement) == 1
    message = str(measurement[0].message)
    assert "at the start of training (ValueError: the model refuses this batch)" in message
    assert "training goes on" in message


def test_on_breakdown_raise_gives_the_models_own_exception_with_a_note():
    pl.seed_everything(0, verbose=False)
    model = _failing_forward_module(_ShapeError((16, 6), (16, 5)))()
    monitor = NTKMonitor(n_probe=9, log_base=2, on_breakdown="raise")
    trainer = pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=8))
    with pytest.raises(_ShapeError) as raised:
        trainer.fit(model)
    assert raised.value.expected == (16, 6)  # the user's exception, not a rebuilt one
    assert any("raised by the model's forward" in note for note in raised.value.__notes__)


def test_an_exception_with_required_arguments_keeps_its_type():
    class Strict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            raise _ShapeError("(N, 4)", tuple(x.shape))

    tracker = NTKTracker(torch.randn(6, 4), torch.arange(6) % 3)
    with pytest.raises(_ShapeError, match=r"expected \(N, 4\), got \(6, 4\)") as raised:
        tracker.start(Strict())
    assert raised.value.got == (6, 4) and not tracker.started


def test_the_monitors_own_output_check_keeps_its_type_and_names_the_fix():
    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.linear(x)}

    tracker = NTKTracker(torch.randn(6, 4), torch.arange(6) % 3)
    with pytest.raises(TypeError, match="output_fn") as raised:
        tracker.start(DictOut())
    assert any("pass `forward_fn` or `output_fn`" in note for note in raised.value.__notes__)
    assert type(raised.value) is TypeError


def test_models_on_the_meta_device_or_on_several_devices_are_refused_clearly():
    x, y = torch.randn(6, 4), torch.arange(6) % 3
    meta = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)).to("meta")
    with pytest.raises(
        ValueError, match="model is on the meta device, which holds shapes but no values"
    ):
        NTKTracker(x, y).start(meta)
    split = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    split[1].to("meta")
    with pytest.raises(
        ValueError,
        match=r"on several devices \('0.weight' on cpu, '1.weight' on meta\).*model.to\(device\)",
    ):
        NTKTracker(x, y).start(split)


@pytest.mark.parametrize(
    "nan_row, step", [(20, 2), (40, 3)], ids=["at a report step", "between reports"]
)
def test_nan_in_the_training_data_is_reported_as_a_data_problem_not_divergence(nan_row, step):
    """A NaN in the batch of step 2 (a report step) or of step 3 (between the reports)."""
    pl.seed_everything(0, verbose=False)
    x, y = blobs(9, 6, 3, seed=1)
    monitor = NTKMonitor(probe_x=x, probe_y=y, log_base=2)
    trainer = pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(nan_batch_module(nan_row, functional_loss=True)())
    assert [r.step for r in monitor.history] == [2, 4]
    first, last = monitor.history
    assert (first.causes == ["non-finite training data"]) == (step == 2)
    assert last.verdict == "broken" and last.causes == ["non-finite training data"]
    assert "clean the training data" in last.message
    assert "learning rate" not in last.message
    assert "unknown (unknown" not in last.setup
    assert "; label smoothing unknown (the training loss was not finite);" in last.setup


def test_divergence_with_finite_data_still_reads_as_divergence():
    x, y = blobs(6)
    model = mlp()
    tracker = NTKTracker(x, y, log_base=2)
    tracker.start(model)
    tracker.observe(model, x, y, loss=1.0, step=1)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    report = tracker.update(model, 1)
    assert report.causes == ["non-finite logits"] and "lower the learning rate" in report.message


def test_a_probe_drawn_with_nan_warns_and_training_goes_on():
    pl.seed_everything(0, verbose=False)
    monitor = NTKMonitor(n_probe=48, log_base=2)  # every example: the NaN row among them
    trainer = pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(nan_batch_module(20, functional_loss=True)())
    measurement = [w for w in caught if issubclass(w.category, NTKMeasurementWarning)]
    assert trainer.global_step == 2 and monitor.history == []
    assert len(measurement) == 1
    assert "probe inputs hold non-finite values (NaN or inf) at rows" in str(measurement[0].message)
    assert "Clean the data" in str(measurement[0].message)


def test_a_given_probe_with_nan_is_refused_when_given():
    x, y = blobs(6)
    x[2, 0] = math.nan
    with pytest.raises(ValueError, match=r"probe inputs hold non-finite values .* rows \[2\]"):
        NTKMonitor(probe_x=x, probe_y=y)


def test_the_setup_line_says_why_a_fact_is_unknown():
    from lightning_ntk.monitor._setup import resolve_setup

    line = resolve_setup().describe()
    assert "unknown (unknown" not in line
    assert "label smoothing unknown (not declared (`label_smoothing`)" in line
    assert "weight decay unknown (not declared (`weight_decay`) and no optimizer read)" in line
