"""The monitor's savings keep its results: each shortcut against the work it replaces."""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch

from lightning_ntk import NTKMonitor, reference_ntk
from lightning_ntk.kernel import _plan, ntk_of
from lightning_ntk.kernel._functional import FunctionalModel
from tests._lightning_models import blobs, mlp, module_class, trainer_kwargs


def test_the_kernel_with_the_callers_checked_logits_skips_only_the_validating_forward(
    monkeypatch,
):
    x, _ = blobs(6)
    model = mlp().double()
    fm = FunctionalModel(model)
    x = x.double()
    logits = fm.checked_logits(x)
    checks = []
    checked_logits = FunctionalModel.checked_logits
    monkeypatch.setattr(
        FunctionalModel,
        "checked_logits",
        lambda self, *a, **k: checks.append(1) or checked_logits(self, *a, **k),
    )
    given = ntk_of(fm, x, method="structured", logits=logits)
    assert checks == []
    own = ntk_of(fm, x, method="structured")
    assert checks == [1]
    torch.testing.assert_close(given, own, rtol=0, atol=0)
    torch.testing.assert_close(given, reference_ntk(model, x), rtol=1e-10, atol=1e-12)


def test_a_plan_is_verified_once_per_training_run(monkeypatch):
    verified = []
    original = _plan._verified
    monkeypatch.setattr(_plan, "_verified", lambda *a: verified.append(1) or original(*a))
    pl.seed_everything(0, verbose=False)
    x, y = blobs(9, 6, 3, seed=1)
    monitor = NTKMonitor(probe_x=x, probe_y=y, log_base=2, method="structured")
    trainer = pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module_class("pytorch_lightning")())
    assert [r.step for r in monitor.history] == [2, 4, 8]
    assert verified == [1]  # at the start: the hooks' names do not change the model
