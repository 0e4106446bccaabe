"""NTKMonitor in more set-ups people train with: each test is one reading a user got wrong.

Every test reproduces what a user saw in a short training run (a regression head, a
second ``fit`` of the same Trainer, a streamed dataset, …) and fails if the monitor
does it again: training ended by the monitor, a reference thrown away, a setting
asked for that cannot help.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ntk import NTKTracker
from lightning_ntk.exceptions import NTKMeasurementWarning
from tests._lightning_models import one_thread  # noqa: F401


def _mlp(outputs: int, d: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, outputs))


# ------------------------------------------------------- a regression head


def test_a_regression_s_targets_are_measured_without_a_classification_set_up():
    """One output trained with MSE on targets in [-10, 6]: measured, never a crash.

    Before, the start raised ``Expected binary `targets` in [0, 1]`` and ended training;
    now one warning says the targets are no class probabilities, the kernel is measured,
    and no message asks to declare `label_smoothing` for a regression.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = 3.0 * x[:, 0] + x[:, 1]  # real-valued targets, well outside [0, 1]
    model = _mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = NTKTracker(x[:8], y[:8], optimizer=opt)
    with pytest.warns(NTKMeasurementWarning, match=r"outside \[0, 1\].*a regression\?"):
        tracker.start(model)
    for step in range(1, 5):
        opt.zero_grad()
        logits = model(x[:16])
        loss = F.mse_loss(logits.squeeze(-1), y[:16])
        tracker.observe(model, x[:16], y[:16], loss.detach(), step, logits=logits.detach())
        loss.backward()
        opt.step()
    report = tracker.update(model, 4)
    assert report.relative_change > 0 and report.predicted_regime == "unknown"
    assert "No classification set-up: the targets lie outside [0, 1]" in report.message
    assert "`label_smoothing`" not in report.message
    assert "are no class labels or probabilities" in report.setup, report.setup
    for targets in (torch.rand(8), (torch.rand(8) > 0.5).float()):  # a binary's stay targets
        binary = NTKTracker(x[:8], targets)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            binary.start(model)


# ------------------------------------------------------- fit again on the same Trainer


def _trainer(monitor, steps: int, **kwargs):
    pl = pytest.importorskip("pytorch_lightning")
    return pl.Trainer(
        max_steps=steps, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=1, **kwargs,
    )  # fmt: skip


def test_fit_again_on_the_same_trainer_continues_the_run_the_monitor_measures():
    """``max_steps`` raised and ``fit`` called again: same θ0, probe and history, no warning.

    Before, the second ``fit`` drew a new probe, took θ0 anew at step 20 and warned that
    "no reference of this monitor was restored (no checkpoint was given)" while the
    reference was in memory.
    """
    from lightning_ntk import NTKMonitor
    from tests._lightning_models import module_class

    model = module_class("pytorch_lightning")()
    monitor = NTKMonitor(n_probe=8)
    trainer = _trainer(monitor, 20)
    trainer.fit(model)
    probe, first = monitor.tracker.probe_x.clone(), list(monitor.history)
    trainer.fit_loop.epoch_loop.max_steps = 70
    with warnings.catch_warnings():
        warnings.simplefilter("error", NTKMeasurementWarning)
        trainer.fit(model)
    assert torch.equal(monitor.tracker.probe_x, probe)
    assert [r.step for r in monitor.history] == [4, 16, 64]
    assert monitor.history[:2] == first
    assert not monitor.history[-1].restarted and monitor.history[-1].reference_step == 0
    # a new Trainer starts a new run at step 0: θ0 anew, its own history
    fresh = _trainer(monitor, 4)
    fresh.fit(model)
    assert [r.step for r in monitor.history] == [4]
    assert not monitor.history[-1].restarted
