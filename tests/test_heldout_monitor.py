"""NTKMonitor in set-ups people train with: each test is one reading a user got wrong.

Every test reproduces what a user saw in a short training run (a binary head, a
partially labelled dataset, a batch of three tensors, two optimizers, …) and fails if
the monitor says it again: a message naming the wrong targets, a claim the measurements
do not back, a probe the monitor could not measure, a set-up misread.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ntk import NTKTracker
from lightning_ntk.monitor._timeline import timeline
from lightning_ntk.monitor._verdict import Thresholds
from lightning_ntk.monitor.report import NTKReport
from tests._lightning_models import one_thread  # noqa: F401


def _mlp(outputs: int, d: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, outputs))


def _train(tracker: NTKTracker, model: nn.Module, x, y, loss_fn, steps: int, lr: float = 0.1):
    opt = tracker.optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    tracker.start(model)
    for step in range(1, steps + 1):
        batch = torch.randperm(len(x), generator=g)[:16]
        opt.zero_grad()
        logits = model(x[batch])
        loss = loss_fn(logits, y[batch])
        tracker.observe(model, x[batch], y[batch], loss.detach(), step, logits=logits.detach())
        loss.backward()
        opt.step()
        if tracker.is_due(step):
            tracker.update(model, step)
    return tracker.history[-1]


# ------------------------------------------------------- messages: the task's own targets


@pytest.mark.parametrize(
    ("outputs", "targets"),
    [(1, "binary"), (3, "multilabel")],
)
def test_sigmoid_outputs_are_told_of_hard_0_1_targets_not_one_hot(outputs, targets):
    """A binary (one logit) or multi-label BCE run is told of hard 0/1 targets, not one-hot."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    if targets == "binary":
        y = (x[:, 0] > 0).float()
        loss_fn = lambda z, t: F.binary_cross_entropy_with_logits(z.squeeze(-1), t)  # noqa: E731
    else:
        y = (x[:, :3] > 0).float()
        loss_fn = F.binary_cross_entropy_with_logits
    model = _mlp(outputs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NTKTracker(x[:8], y[:8], optimizer=opt)
    report = _train(tracker, model, x, y, loss_fn, steps=16)
    assert report.predicted_regime == "diverging", report.setup
    assert "hard 0/1 targets without weight decay" in report.message
    assert "one-hot" not in report.message


def test_a_logit_trend_not_yet_measured_is_not_called_bounded():
    """Before two reports from step 100 the message says the trend is not measured yet."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = _mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = NTKTracker(x[:8], y[:8], optimizer=opt)
    report = _train(tracker, model, x, y, F.cross_entropy, steps=16)
    assert report.predicted_regime == "diverging" and math.isnan(report.logit_slope)
    assert "bounded" not in report.message
    assert "Logit trend not measured yet (it needs two reports from step 100)" in report.message
    assert "hard one-hot targets without weight decay predict diverging logits" in report.message


def _report(step: int, logit_norm: float, slope: float, optimum: float) -> NTKReport:
    return NTKReport(
        step=step, kernel_distance=0.1, relative_change=1.0, target_alignment=0.8,
        linearization_error=0.5, prob_tv=0.1, argmax_agreement=1.0, logit_norm=logit_norm,
        logit_growth=10.0, param_distance=0.1, eig_max=1.0, eig_min=0.1, effective_rank=2.0,
        condition_number=10.0, verdict="drifting", causes=["kernel moving"],
        predicted_regime="bounded", message="", logit_slope=slope, logit_optimum=optimum,
        regime="feature learning", kernel_velocity=0.5,
    )  # fmt: skip


def test_the_timeline_does_not_call_logits_rising_towards_their_optimum_bounded():
    """Smoothed logits rising +2.4 per doubling below 1.5× their optimum: converging."""
    thresholds = Thresholds()
    rising = [_report(128, 3.6, math.nan, 4.51), _report(256, 6.0, 2.39, 4.51)]
    line = timeline(rising, thresholds)
    assert "logits bounded" not in line
    assert "logits converging on the optimum the targets allow" in line
    assert "6.00 against 4.51, +2.39 per doubling of steps" in line
    flat = [_report(128, 4.4, math.nan, 4.51), _report(256, 4.5, 0.1, 4.51)]
    assert timeline(flat, thresholds).endswith("logits bounded (+0.10 per doubling of steps)")
