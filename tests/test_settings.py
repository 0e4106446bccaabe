"""The monitor's settings are defined once (NTKSettings) and reach the tracker unchanged."""

import dataclasses
import inspect

import pytest
import torch

from lightning_ntk import NTKMonitor, NTKTracker
from lightning_ntk.lightning import NTKMonitor as LNTKMonitor
from lightning_ntk.monitor import NTKSettings

FIELDS = [f.name for f in dataclasses.fields(NTKSettings)]

NON_DEFAULTS = {
    "n_probe": 7,
    "output": "trace",
    "method": "jacobian",
    "kernel": "signgd",
    "params": ["0.weight"],
    "output_fn": lambda out: out,
    "forward_fn": lambda model, x: model(x),
    "per_layer": False,
    "top_layers": 2,
    "dtype": torch.float64,
    "normalization": "running",
    "every_n_steps": 3,
    "every_n_epochs": 2,
    "log_base": None,
    "thresholds": {"relative_change": [0.2, 0.9]},
    "weight_decay": 0.01,
    "label_smoothing": 0.1,
    "task": "binary",
    "expect": "lazy",
    "seed": 5,
    "batch_to_xy": lambda batch: batch,
}


def test_every_setting_is_covered_here():
    assert set(NON_DEFAULTS) == set(FIELDS)


@pytest.mark.parametrize("cls", [NTKMonitor, LNTKMonitor, NTKTracker])
def test_both_classes_take_every_setting_as_a_keyword(cls):
    parameters = inspect.signature(cls).parameters
    for name in FIELDS:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert parameters[name].default == getattr(NTKSettings(), name) or name == "thresholds"


@pytest.mark.parametrize("cls", [NTKMonitor, LNTKMonitor])
def test_the_monitor_hands_every_setting_to_its_tracker(cls):
    monitor = cls(**NON_DEFAULTS)
    tracker = monitor.tracker
    for name, value in NON_DEFAULTS.items():
        if name == "thresholds":
            assert tracker.thresholds.relative_change == (0.2, 0.9)
        else:
            assert getattr(tracker, name) is value or getattr(tracker, name) == value, name
    assert tracker.schedule.every_n_steps == 3 and tracker.schedule.log_base is None


@pytest.mark.parametrize("cls", [NTKMonitor, NTKTracker])
@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("n_probe", 0, ValueError, "`n_probe` to be a positive int but got 0"),
        ("output", "dense", ValueError, "`output` to be one of"),
        ("method", "fast", ValueError, "`method` to be one of"),
        ("kernel", "lion", ValueError, "`kernel` to be one of"),
        ("normalization", "eval", ValueError, "`normalization` to be one of"),
        ("output_fn", 3, TypeError, "`output_fn` to be callable"),
        ("weight_decay", -1.0, ValueError, "`weight_decay` to be a non-negative number"),
        ("thresholds", {"nope": 1}, ValueError, "`thresholds` keys among"),
    ],
)
def test_settings_are_validated_once_for_both(cls, name, value, error, match):
    with pytest.raises(error, match=match):
        cls(**{name: value})
