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
        max_steps=steps, callbacks=[] if monitor is None else [monitor], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, **kwargs,
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


# ------------------------------------------------------- data that cannot be indexed


class _Stream(torch.utils.data.IterableDataset):
    """Blobs streamed in a fixed order: no ``__len__``, no indexing."""

    def __iter__(self):
        from tests._lightning_models import blobs

        x, y = blobs(48)
        yield from zip(x, y)


def _streamed_fit(monitor, steps: int = 16):
    from tests._lightning_models import module_class

    class Streamed(module_class("pytorch_lightning")):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(_Stream(), batch_size=16)

    torch.manual_seed(0)
    model = Streamed()
    _trainer(monitor, steps).fit(model)
    return model


def test_an_iterable_dataset_gives_the_probe_from_its_first_batch():
    """An ``IterableDataset`` (no ``len``): the probe is the first batch's head.

    Before, the start raised ``Cannot draw a probe from a _Stream`` and ended training.
    Training ends with the weights it has without the monitor.
    """
    from lightning_ntk import NTKMonitor
    from tests._lightning_models import blobs

    monitor = NTKMonitor(n_probe=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NTKMeasurementWarning)
        watched = _streamed_fit(monitor)
    x, y = blobs(48)
    assert torch.equal(monitor.tracker.probe_x, x[:8]) and torch.equal(
        monitor.tracker.probe_y, y[:8]
    )
    assert [r.step for r in monitor.history] == [4, 16]
    assert "inferred from the training loss" in monitor.history[-1].setup
    plain = _streamed_fit(None)
    for a, b in zip(watched.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    # more probe examples than the first batch holds: all it has
    small = NTKMonitor(n_probe=40)
    _streamed_fit(small, steps=4)
    assert small.tracker.probe_x.shape[0] == 16 and [r.step for r in small.history] == [4]


def test_batch_to_xy_of_combined_loaders_splits_the_training_batch_for_the_probe():
    """Labelled and unlabelled loaders combined: ``batch_to_xy`` reads the combined batch.

    Before, the probe was drawn from the first loader's items, which the user's
    ``batch_to_xy=lambda b: b["labelled"]`` cannot split: a TypeError ended training.
    """
    pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.utilities import CombinedLoader

    from lightning_ntk import NTKMonitor
    from tests._lightning_models import blobs, module_class

    class SemiSupervised(module_class("pytorch_lightning")):
        def train_dataloader(self):
            x, y = blobs(48)
            unlabelled = blobs(48, seed=1)[0]
            loaders = {
                "labelled": torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(x, y), batch_size=16
                ),
                "unlabelled": torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(unlabelled), batch_size=16
                ),
            }
            return CombinedLoader(loaders, "max_size_cycle")

        def training_step(self, batch, batch_idx):
            x, y = batch["labelled"]
            return self.loss_fn(self(x), y)

    monitor = NTKMonitor(n_probe=8, batch_to_xy=lambda batch: batch["labelled"])
    _trainer(monitor, 4).fit(SemiSupervised())
    assert [r.step for r in monitor.history] == [4]
    assert "label smoothing 0 (inferred from the training loss" in monitor.history[-1].setup


def _draw_in_spawned_process(tracker, queue):
    """In a spawned process: draw from the probe generator of the tracker it was sent."""
    queue.put(torch.randint(0, 1000, (5,), generator=tracker.generator).tolist())


def test_the_tracker_travels_to_a_spawned_process():
    """``strategy="ddp_spawn"`` sends the callbacks to new processes (tensors by shared memory)."""
    import torch.multiprocessing as mp

    from lightning_ntk import NTKTracker

    tracker = NTKTracker(seed=3)
    torch.randint(0, 1000, (2,), generator=tracker.generator)  # a state moved on from the seed
    expected = torch.randint(0, 1000, (5,), generator=tracker.generator.clone_state()).tolist()
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_draw_in_spawned_process, args=(tracker, queue))
    process.start()
    drawn = queue.get(timeout=120)
    process.join(timeout=60)
    assert process.exitcode == 0
    assert drawn == expected
