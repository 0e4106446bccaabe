"""Errors that tell the user what to change: tuple outputs, probes of the wrong shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ntk import NTKTracker, empirical_ntk


class _TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x):
        return self.linear(x), x


class _DictOutput(_TupleOutput):
    def forward(self, x):
        return {"logits": self.linear(x)}


def test_tuple_output_hint_indexes_the_tuple():
    with pytest.raises(TypeError, match=r"returned a tuple.*output_fn=lambda out: out\[0\]"):
        empirical_ntk(_TupleOutput(), torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"keys \['logits'\].*out\['logits'\]"):
        empirical_ntk(_DictOutput(), torch.randn(2, 3))


def test_wrong_probe_shape_names_the_probe_the_shape_and_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
    tracker = NTKTracker(torch.randn(5, 60), torch.arange(5) % 3)
    with pytest.raises(ValueError) as info:
        tracker.start(model)
    message = str(info.value)
    assert "`probe_x` of shape (5, 60)" in message
    assert "per-example shape (60,)" in message
    assert "Linear(in_features=64" in message and "expects inputs (..., 64)" in message


def test_wrong_channel_count_names_the_convolution():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ValueError, match=r"layer `0` \(Conv2d.*expects \(N, 3, H, W\)"):
        empirical_ntk(model, torch.randn(2, 1, 8, 8))


def test_the_model_is_left_without_hooks():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 3))
    with pytest.raises(ValueError):
        empirical_ntk(model, torch.randn(2, 5))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
