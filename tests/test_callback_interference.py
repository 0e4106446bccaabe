"""NTKMonitor never disturbs training; a resumed run reports what an uninterrupted one does."""

from __future__ import annotations

import csv
import importlib
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._lightning_models import NAMESPACES, module_class, one_thread, trainer_kwargs  # noqa: F401
from tests.test_callback import monitor_cls


def _final_state(namespace: str, with_monitor: bool, **overrides):
    pl = importlib.import_module(namespace)
    pl.seed_everything(0, verbose=False)
    model = module_class(namespace)(bn_dropout=True, momentum=0.9, lr=0.1)
    callbacks = (
        [monitor_cls(namespace)(n_probe=9, log_base=2, every_n_steps=1)] if with_monitor else []
    )
    trainer = pl.Trainer(
        callbacks=callbacks, deterministic=True, **trainer_kwargs(max_steps=6, **overrides)
    )
    trainer.fit(model)
    if with_monitor:
        assert len(callbacks[0].history) == 6
    return {
        "weights_and_buffers": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "optimizer": trainer.optimizers[0].state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),  # noqa: NPY002
        "training_flags": [m.training for m in model.modules()],
    }


def _assert_identical(a, b):
    for key, value in a["weights_and_buffers"].items():
        assert torch.equal(value, b["weights_and_buffers"][key]), key
    assert "net.1.running_mean" in a["weights_and_buffers"]  # BatchNorm statistics compared
    for ga, gb in zip(a["grads"], b["grads"]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"])
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert a["python_rng"] == b["python_rng"]
    assert np.array_equal(a["numpy_rng"], b["numpy_rng"])
    assert a["training_flags"] == b["training_flags"]


@pytest.mark.slow
@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize(
    "overrides",
    [{}, {"accumulate_grad_batches": 2, "precision": "bf16-mixed"}],
    ids=["fp32", "accumulate2-bf16mixed"],
)
def test_bit_identical_training_with_and_without_the_monitor(namespace, overrides):
    without = _final_state(namespace, False, **overrides)
    with_monitor = _final_state(namespace, True, **overrides)
    _assert_identical(without, with_monitor)


def _resume_run(
    tmp_path: Path, name: str, max_steps: int, ckpt_path=None, save_at=None, **settings
):
    """One run; ``settings`` of the monitor (``n_probe=None``: a run without the monitor)."""
    import pytorch_lightning as pl

    pl.seed_everything(0, verbose=False)
    model = module_class("pytorch_lightning")(batch_size=48, shuffle=False, lr=0.2)
    settings = {"n_probe": 9, "log_base": 2, "every_n_steps": 3, **settings}
    monitor = None
    if settings["n_probe"] is not None:
        monitor = monitor_cls("pytorch_lightning")(**settings)
    logger = pl.loggers.CSVLogger(tmp_path, name=name, version=0)
    trainer = pl.Trainer(
        callbacks=[monitor] if monitor else [],
        **trainer_kwargs(max_steps=max_steps, logger=logger, log_every_n_steps=50),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, ckpt_path=ckpt_path)
    if save_at is not None:
        trainer.save_checkpoint(save_at)
    logger.save()
    metrics = Path(logger.log_dir) / "metrics.csv"
    rows = list(csv.DictReader(open(metrics))) if metrics.exists() else []
    logged = {int(r["step"]): r for r in rows if r.get("ntk/relative_change")}
    restarts = [w for w in caught if "NTKMonitor resumes" in str(w.message)]
    return monitor, logged, restarts


def test_resume_from_checkpoint_reports_the_same_values(tmp_path):
    full, full_logged, _ = _resume_run(tmp_path, "full", 12)
    ckpt = tmp_path / "step6.ckpt"
    _resume_run(tmp_path, "first", 6, save_at=ckpt)
    resumed, resumed_logged, restarts = _resume_run(tmp_path, "resumed", 12, ckpt_path=ckpt)
    assert [r.step for r in full.history] == [2, 3, 4, 6, 8, 9, 12]
    assert [r.step for r in resumed.history] == [2, 3, 4, 6, 8, 9, 12]  # history restored
    assert restarts == []  # the reference of step 0 was restored: nothing to say
    assert all(r.reference_step == 0 and not r.restarted for r in resumed.history)
    assert sorted(resumed_logged) == [8, 9, 12]
    for step in (8, 9, 12):
        expected, got = full_logged[step], resumed_logged[step]
        ntk_keys = [k for k in expected if k.startswith("ntk/") and expected[k]]
        assert len(ntk_keys) >= 16
        for key in ntk_keys:
            assert float(got[key]) == pytest.approx(
                float(expected[key]), rel=1e-6, abs=1e-9, nan_ok=True
            ), key
    assert full.history[-1] == resumed.history[-1]


@pytest.mark.parametrize(
    ("first_settings", "why"),
    [
        ({"n_probe": None}, "holds no state of this NTKMonitor"),
        ({"n_probe": 8}, "holds NTKMonitor state saved with other settings"),
    ],
    ids=["saved-without-the-monitor", "saved-with-another-n_probe"],
)
def test_resume_without_this_monitors_state_says_so_and_marks_the_reports(
    tmp_path, first_settings, why
):
    ckpt = tmp_path / "step6.ckpt"
    _resume_run(tmp_path, "first", 6, save_at=ckpt, **first_settings)
    resumed, logged, restarts = _resume_run(tmp_path, "resumed", 12, ckpt_path=ckpt)
    assert len(restarts) == 1
    message = str(restarts[0].message)
    assert "resumes at step 6" in message and why in message
    assert "takes θ0 and Θ0 at step 6" in message
    assert [r.step for r in resumed.history] == [8, 9, 12]
    assert all(r.reference_step == 6 and r.restarted for r in resumed.history)
    assert sorted(logged) == [8, 9, 12]
