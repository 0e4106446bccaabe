"""NTKMonitor in set-ups people train with: each test is one reading a user got wrong.

Every test reproduces what a user saw in a short training run (a binary head, a
partially labelled dataset, a batch of three tensors, two optimizers, …) and fails if
the monitor says it again: a message naming the wrong targets, a claim the measurements
do not back, a probe the monitor could not measure, a set-up misread.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ntk import NTKTracker
from lightning_ntk.monitor._observer import LossObserver
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


# ------------------------------------------------------- ignore_index: unlabelled examples


def _partially_labelled(n: int = 96, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.3] = -100  # F.cross_entropy's default ignore_index
    return x, y


def test_the_probe_is_drawn_from_labelled_examples_only():
    """Labels -100 (ignored by the loss) are no class: the drawn probe has none."""
    x, y = _partially_labelled()
    tracker = NTKTracker(n_probe=12)
    tracker.draw_probe(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y)))
    assert tracker.probe_y is not None and bool((tracker.probe_y >= 0).all())
    model = _mlp(4)
    tracker.start(model)  # failed before: one-hot of -100 in the target alignment
    assert math.isfinite(tracker.update(model, 1).target_alignment)


def test_ignored_labels_leave_the_smoothed_cross_entropy_readable():
    """``ignore_index`` rows enter neither CE nor the smoothing term, as in PyTorch."""
    observer = LossObserver()
    model = _mlp(4)
    for step in range(1, 7):
        x, y = _partially_labelled(n=24, seed=step)
        logits = model(x).detach()
        loss = F.cross_entropy(logits, y, label_smoothing=0.1, ignore_index=-100)
        observer.add_batch(logits, y, loss, step, captured=True)
    assert observer.family == "cross_entropy", observer.detail
    assert observer.smoothing == pytest.approx(0.1, abs=1e-4), observer.detail


# ------------------------------------------------------- the monitor in a Trainer


@pytest.fixture
def quiet_trainer():
    pl = pytest.importorskip("pytorch_lightning")

    def make(monitor, steps: int):
        return pl.Trainer(
            max_steps=steps, callbacks=[monitor], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
            devices=1,
        )  # fmt: skip

    return make


def test_a_partially_labelled_dataset_is_monitored(quiet_trainer):
    """``nn.CrossEntropyLoss(ignore_index=-100)`` on partially labelled data is monitored."""
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp(4)
            self.criterion = nn.CrossEntropyLoss(ignore_index=-100)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.criterion(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = _partially_labelled()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    monitor = NTKMonitor(n_probe=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=Warning)
        warnings.filterwarnings("ignore", category=FutureWarning)  # Lightning's own
        warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps).*")
        quiet_trainer(monitor, 16).fit(Classifier(), loader)
    assert [r.step for r in monitor.history] == [4, 16]
    assert "label smoothing 0 (inferred from the training loss" in monitor.history[-1].setup


# ------------------------------------------------------- labels that are not the logits' targets


def test_a_batch_s_second_tensor_that_is_no_target_is_not_read_as_labels():
    """Batches ``(pixels, mask, y)``: the mask ``(N, 64)`` is no target of 10 logits.

    Before, the task was read as multilabel from the mask and the target alignment was
    measured against it; now one warning names `batch_to_xy` and neither is read.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    mask = (torch.rand(32, 8, generator=g) > 0.1).float()  # taken as labels by (x, y, ...)
    tracker = NTKTracker(x[:8], mask[:8])
    model = _mlp(10)
    with pytest.warns(
        Warning, match=r"probe labels of shape \(8, 8\) are no targets .*`batch_to_xy"
    ):
        tracker.start(model)
    report = tracker.update(model, 1)
    assert math.isnan(report.target_alignment)
    assert "multilabel" not in report.setup
    # labels that fit are kept: integer classes, and (N, C) targets
    for fitting in (torch.arange(8) % 10, torch.softmax(torch.randn(8, 10, generator=g), 1)):
        tracker = NTKTracker(x[:8], fitting)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tracker.start(model)
        assert math.isfinite(tracker.update(model, 1).target_alignment)


# ------------------------------------------------------- several optimizers


def test_manual_optimization_with_two_optimizers_reads_the_weight_decay_of_both(quiet_trainer):
    """A decayed head and an undecayed body: λ is 0, not the first optimizer's 1e-3."""
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    class TwoOptimizers(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.body(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.head.parameters(), lr=0.1, weight_decay=1e-3),
                torch.optim.Adam(self.body.parameters(), lr=1e-3),
            ]

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(4, (64,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    monitor = NTKMonitor(n_probe=8)
    quiet_trainer(monitor, 4).fit(TwoOptimizers(), loader)
    setup = monitor.history[-1].setup
    assert "weight decay 0 (read from the optimizers SGD, Adam" in setup, setup
    assert monitor.history[-1].predicted_regime != "bounded"


def test_an_unknown_set_up_asks_to_declare_only_what_could_not_be_read():
    """Weight decay read from the optimizer, smoothing unknown: only `label_smoothing` is named."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 8, generator=g), torch.arange(8) % 4
    model = _mlp(4)
    tracker = NTKTracker(x, y, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    tracker.start(model)  # no training loss observed: the smoothing stays unknown
    report = tracker.update(model, 4)
    assert report.predicted_regime == "unknown", report.setup
    assert "(declare `label_smoothing` to tell)" in report.message
    assert "`weight_decay`" not in report.message
    undecided = NTKTracker(x, y)  # no optimizer either: both are named
    undecided.start(model)
    assert "`label_smoothing` and `weight_decay`" in undecided.update(model, 4).message


# ------------------------------------------------------- per-position logits


def test_per_token_logits_are_refused_with_settings_that_fit_them():
    """A token classifier's (N, L, C) logits: the error shows output_fn forms that work."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 5)

        def forward(self, tokens):
            return self.head(torch.tanh(self.embed(tokens)))  # (N, L, C)

    tokens = torch.randint(20, (6, 7), generator=torch.Generator().manual_seed(0))
    tracker = NTKTracker(tokens)
    with pytest.raises(ValueError, match=r"shape \(N, C\) but got shape \(6, 7, 5\)") as caught:
        tracker.start(Tagger())
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "logits per position" in notes
    suggested = {
        "output_fn=lambda out: out[:, 0]": lambda out: out[:, 0],
        "output_fn=lambda out: out.flatten(1)": lambda out: out.flatten(1),
    }
    model = Tagger()
    for setting, output_fn in suggested.items():
        assert setting in notes
        fitted = NTKTracker(tokens, output_fn=output_fn)
        fitted.start(model)  # what the note suggests runs
        assert fitted.update(model, 1).relative_change == pytest.approx(0.0, abs=1e-6)


def test_a_diverging_sigmoid_output_is_measured_by_its_logit_not_a_centered_norm():
    """A one-logit head's ``logit_norm`` is ``|z|``: the alarm names it so, and 0/1 targets."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).float()  # separable: the hard-target logit grows without bound
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    tracker = NTKTracker(
        x[:8], y[:8], optimizer=torch.optim.SGD(model.parameters(), lr=1.0), log_base=2
    )
    loss_fn = lambda z, t: F.binary_cross_entropy_with_logits(z.squeeze(-1), t)  # noqa: E731
    report = _train(tracker, model, x, y, loss_fn, steps=512)
    assert report.causes == ["logits diverging"], report.message
    assert "the logit norm |z| rises" in report.message
    assert "as hard 0/1 targets without weight decay predict" in report.message
    assert "centered" not in report.message + tracker.diagnosis


def test_a_run_too_short_for_the_logit_trend_says_which_schedule_reads_it(quiet_trainer):
    """Reports at 4, 16, 64, 256 of a 300-step run leave one report from step 100."""
    from lightning_ntk.monitor._schedule import Schedule, trend_wait

    log4 = Schedule(None, None, 4.0)
    done = [4, 16, 64, 256]
    assert trend_wait(log4, done, 100, None) == "it needs two reports from step 100"
    assert trend_wait(log4, done, 100, 5000) == "it needs two reports from step 100"
    hint = trend_wait(log4, done, 100, 300)
    assert hint.endswith(
        "this run ends at step 300 before the second one; every_n_steps=100 reads it"
    )
    # the schedule it names does read the trend within the run
    every = Schedule(100, None, None)
    assert trend_wait(every, [100, 200], 100, 300) == "it needs two reports from step 100"
    assert trend_wait(every, [100], 100, 300) == "it needs two reports from step 100"
    assert trend_wait(log4, [4, 16, 64], 100, 102).endswith("too soon for that")
    assert (
        trend_wait(Schedule(None, 1, 4.0), done, 100, 300) == "it needs two reports from step 100"
    )

    # in a Trainer: the last report and the diagnosis say so
    from lightning_ntk import NTKMonitor
    from tests._lightning_models import module_class

    monitor = NTKMonitor(n_probe=8)
    quiet_trainer(monitor, 20).fit(module_class("pytorch_lightning")())
    assert [r.step for r in monitor.history] == [4, 16]
    assert "this run ends at step 20, too soon for that" in monitor.tracker.diagnosis
    assert "too soon for that" in monitor.history[-1].message


def test_class_indices_stored_as_floats_are_named_as_such():
    """Float labels ``[0., 1., 2.]`` for three outputs: no targets, and the warning says why."""
    from lightning_ntk.monitor._measure import unfit_labels

    floats = torch.tensor([0.0, 1.0, 2.0, 1.0])
    assert "`y.long()`" in unfit_labels(floats, 3)
    assert unfit_labels(floats.long(), 3) == ""
    assert unfit_labels(torch.tensor([0.0, 1.0, 0.3]), 1) == ""  # one output's targets
    tracker = NTKTracker(torch.randn(4, 8), floats)
    with pytest.warns(UserWarning, match="class indices stored as floats"):
        tracker.start(_mlp(3))
