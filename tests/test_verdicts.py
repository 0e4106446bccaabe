"""The verdict reads the set-up as training runs it, and the logits against their optimum."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ntk import NTKTracker
from lightning_ntk.monitor._setup import LossObserver, Setup, logit_optimum, resolve_setup
from lightning_ntk.monitor._verdict import (
    LogitContext,
    Signals,
    Thresholds,
    diagnose,
    regime_of,
    velocity,
)
from lightning_ntk.theory import optimal_logits
from tests._lightning_models import one_thread  # noqa: F401


def _batches(n: int, soft: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        logits = 2.0 * torch.randn(32, 10, generator=g)
        if soft:
            y = torch.softmax(torch.randn(32, 10, generator=g), dim=1)
        else:
            y = torch.randint(10, (32,), generator=g)
        yield logits, y


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_smoothing_passed_to_f_cross_entropy_is_inferred_from_the_loss(eps, reduction):
    observer = LossObserver()
    for step, (logits, y) in enumerate(_batches(4), start=1):
        loss = F.cross_entropy(logits, y, label_smoothing=eps, reduction=reduction)
        observer.add(logits, y, float(loss), step)
    assert observer.smoothing == pytest.approx(eps, abs=1e-5)
    setup = resolve_setup(observer=observer, probe_y=torch.arange(10))
    assert setup.label_smoothing == pytest.approx(eps, abs=1e-5)
    assert "inferred from the training loss" in setup.sources["label_smoothing"]


def test_soft_targets_and_mixup_are_told_apart():
    observer = LossObserver()
    for step, (logits, y) in enumerate(_batches(4, soft=True), start=1):
        observer.add(logits, y, float(F.cross_entropy(logits, y)), step)
    setup = resolve_setup(observer=observer)
    assert observer.smoothing == pytest.approx(0.0, abs=1e-5)
    assert setup.non_degenerate and setup.prediction()["regime"] == "bounded"
    # mixup of one-hot labels: soft rows, but most classes at probability 0 (degenerate)
    observer = LossObserver()
    g = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        logits = torch.randn(16, 10, generator=g)
        a, b = torch.randint(10, (2, 16), generator=g)
        y = 0.7 * F.one_hot(a, 10).float() + 0.3 * F.one_hot(b, 10).float()
        observer.add(logits, y, float(F.cross_entropy(logits, y)), step)
    setup = resolve_setup(
        observer=observer, optimizer=torch.optim.SGD([nn.Parameter(torch.ones(2, 2))], lr=1)
    )
    assert setup.non_degenerate is False
    assert setup.prediction()["regime"] == "diverging"


def test_a_loss_that_is_not_the_cross_entropy_of_the_logits_stays_unknown():
    observer = LossObserver()
    g = torch.Generator().manual_seed(0)
    for step, (logits, y) in enumerate(_batches(6), start=1):
        # training saw other logits than the measured ones (as with dropout on)
        noisy = logits * (1 + 0.1 * torch.rand(logits.shape, generator=g))
        observer.add(logits, y, float(F.cross_entropy(noisy, y, label_smoothing=0.1)), step)
    assert observer.smoothing is None and observer.done
    setup = resolve_setup(observer=observer, probe_y=torch.arange(10))
    assert setup.label_smoothing is None
    prediction = setup.prediction()
    assert prediction["regime"] == "unknown"
    assert "if the targets are hard one-hot" in prediction["reason"]
    assert "unknown" in setup.describe()


def test_an_l2_term_in_the_loss_is_not_taken_for_smoothing():
    observer = LossObserver()
    for step, (logits, y) in enumerate(_batches(8), start=1):
        l2 = 1e-4 * (step - 1) ** 2  # (λ/2)‖θ − θ0‖² grows from 0 as training moves θ
        observer.add(logits, y, float(F.cross_entropy(logits, y)) + l2, step)
    assert observer.smoothing is None and observer.done
    assert observer.contradicted
    setup = resolve_setup(observer=observer, loss=nn.CrossEntropyLoss(), weight_decay=1e-3)
    # the module's smoothing 0 is contradicted by training: no reading rests on it
    assert setup.label_smoothing is None and setup.task == "multiclass"
    assert (
        "CrossEntropyLoss says 0, but the training loss is not" in setup.sources["label_smoothing"]
    )
    assert setup.prediction()["regime"] == "bounded"  # from the declared L2 term
    undecayed = resolve_setup(observer=observer, loss=nn.CrossEntropyLoss(), weight_decay=0.0)
    assert undecayed.prediction()["regime"] == "unknown"


def test_declared_beats_observed_beats_read():
    opt = torch.optim.AdamW([nn.Parameter(torch.ones(3, 3))], lr=1e-3, weight_decay=0.05)
    setup = resolve_setup(optimizer=opt, loss=nn.CrossEntropyLoss(label_smoothing=0.2))
    assert (setup.weight_decay, setup.decoupled, setup.label_smoothing) == (0.05, True, 0.2)
    assert setup.equilibrium_step == pytest.approx(1 / (1e-3 * 0.05))
    assert "AdamW" in setup.sources["weight_decay"]
    observer = LossObserver()
    for step, (logits, y) in enumerate(_batches(4), start=1):
        observer.add(logits, y, float(F.cross_entropy(logits, y)), step)
    setup = resolve_setup(loss=nn.CrossEntropyLoss(label_smoothing=0.2), observer=observer)
    assert setup.label_smoothing == pytest.approx(0.0, abs=1e-6)
    assert "training does not use it" in setup.sources["label_smoothing"]
    setup = resolve_setup(label_smoothing=0.05, observer=observer, weight_decay=0.0)
    assert setup.label_smoothing == 0.05 and setup.sources["label_smoothing"] == "declared"
    assert Setup().prediction()["regime"] == "unknown"


def test_the_optimum_of_smoothed_targets():
    f_star = optimal_logits(torch.tensor([0, 7]), label_smoothing=0.1, num_classes=10)
    assert f_star.norm(dim=1) == pytest.approx(
        torch.full((2,), 4.2794, dtype=torch.float64), abs=1e-3
    )
    assert torch.allclose(torch.softmax(f_star, 1)[0, 0], torch.tensor(0.91, dtype=torch.float64))
    assert optimal_logits(torch.tensor([0, 7]), num_classes=10) is None
    setup = Setup(label_smoothing=0.1, min_target=0.0, weight_decay=0.0)
    assert logit_optimum(setup, torch.tensor([1, 2]), 10).shape == (2, 10)
    assert logit_optimum(Setup(label_smoothing=0.0, min_target=0.0), torch.tensor([1]), 10) is None


def _diagnose(slope, predicted, **context):
    return diagnose(
        Signals(relative_change=0.02, linearization_error=0.05, slope=slope),
        thresholds=Thresholds(),
        predicted_regime=predicted,
        context=LogitContext(**context),
    )


def test_logits_short_of_the_optimum_are_converging_whatever_their_slope():
    converging = _diagnose(1.0, "bounded", logit_norm=3.9, optimum_norm=4.28, step=800)
    assert (converging.verdict, converging.causes) == ("lazy", [])
    assert "converging" in converging.message
    overshoot = _diagnose(1.0, "bounded", logit_norm=9.0, optimum_norm=4.28, step=800)
    assert (overshoot.verdict, overshoot.causes) == ("broken", ["logits diverging"])
    assert overshoot.regime == "logits diverging" and "past the optimum" in overshoot.message


def test_hard_targets_diverge_and_an_unknown_set_up_states_the_condition():
    diverging = _diagnose(1.0, "diverging", logit_norm=8.0, step=800)
    assert (diverging.verdict, diverging.causes) == ("broken", ["logits diverging"])
    assert "hard one-hot targets without weight decay predict" in diverging.message
    assert "+1.00 per doubling of steps (alarm at 0.8)" in diverging.message
    unknown = _diagnose(1.0, "unknown", logit_norm=8.0, step=800)
    assert (unknown.verdict, unknown.causes) == ("drifting", ["logits growing"])
    assert "with hard one-hot targets and no weight decay this is" in unknown.message
    assert "alarm" not in unknown.message  # an unknown set-up never raises the alarm
    lazy_unknown = _diagnose(math.nan, "unknown", step=800)
    assert lazy_unknown.verdict == "lazy" and "with hard one-hot" in lazy_unknown.message
    # hints name only settings both NTKTracker and NTKMonitor take
    for message in (unknown.message, lazy_unknown.message):
        assert "`label_smoothing`" in message and "`loss`" not in message


def test_a_steady_growth_under_an_unrecognised_loss_with_hard_targets_is_diverging():
    """Focal loss and other losses written out: hard targets, no weight decay, ε unknown."""
    hard = dict(logit_norm=8.0, step=800, hard_unregularized=True)
    steady = _diagnose(1.1, "unknown", recent_slope=1.05, **hard)
    assert (steady.verdict, steady.causes) == ("broken", ["logits diverging"])
    assert steady.regime == "logits diverging"
    assert "+1.10 per doubling of steps (alarm at 0.8, +1.05 since the previous report)" in (
        steady.message
    )
    assert "rests on the measured growth" in steady.message
    # growth that has stalled since the previous report is not a divergence
    stalled = _diagnose(1.1, "unknown", recent_slope=0.3, **hard)
    assert (stalled.verdict, stalled.causes) == ("drifting", ["logits growing"])
    assert "no cross-entropy the monitor recognises" in stalled.message
    # nor is growth while the set-up is still being read, or with a set-up merely unknown
    reading = _diagnose(1.1, "unknown", recent_slope=1.05, reading=True, **hard)
    assert reading.verdict == "drifting"
    unknown = _diagnose(1.1, "unknown", recent_slope=1.05, logit_norm=8.0, step=800)
    assert (unknown.verdict, unknown.causes) == ("drifting", ["logits growing"])
    bounded = _diagnose(0.1, "unknown", recent_slope=0.1, **hard)
    assert bounded.verdict == "lazy"
    assert bounded.message.endswith(
        "Logits bounded so far (+0.10 per doubling of steps); hard targets and no weight "
        "decay, but the training loss is no cross-entropy the monitor recognises: a steady "
        "growth past 0.8 per doubling of steps will be read as diverging (declare "
        "`label_smoothing` if the loss smooths the targets)."
    )


def test_focal_loss_with_hard_labels_raises_the_diverging_alarm_from_its_growth():
    torch.manual_seed(0)
    x = torch.randn(128, 20)
    y = (x[:, :5].argmax(dim=1) + 5 * (x[:, 5] > 0)).long()
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = NTKTracker(x[:16], y[:16], optimizer=optimizer, log_base=2)
    tracker.start(model)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 257):
        idx = torch.randint(0, 128, (32,), generator=g)
        logits = model(x[idx])
        logp = torch.log_softmax(logits, dim=1).gather(1, y[idx, None])[:, 0]
        loss = -((1 - logp.exp()) ** 2 * logp).mean()  # focal loss, γ = 2
        optimizer.zero_grad()
        loss.backward()
        tracker.observe(model, x[idx], y[idx], loss, step=step, logits=logits)
        optimizer.step()
        if tracker.is_due(step):
            tracker.update(model, step)
    setup = tracker.setup
    assert setup.label_smoothing is None and setup.weight_decay == 0
    assert setup.min_target == 0 and tracker.observer.contradicted
    last = tracker.history[-1]
    assert (last.regime, last.verdict) == ("logits diverging", "broken"), last.message
    assert "rests on the measured growth" in last.message


def test_l2_only_waits_for_the_equilibrium_time():
    early = _diagnose(1.0, "bounded", logit_norm=8.0, equilibrium_step=1000, step=800)
    assert (early.verdict, early.causes) == ("drifting", ["logits growing"])
    assert "1000 steps" in early.message
    late = _diagnose(1.0, "bounded", logit_norm=8.0, equilibrium_step=100, step=800)
    assert (late.verdict, late.causes) == ("broken", ["logits diverging"])


def test_feature_learning_is_information_unless_laziness_was_expected():
    moved = Signals(relative_change=0.48, linearization_error=0.52, kernel_velocity=0.3, slope=0.0)
    told = diagnose(moved, thresholds=Thresholds(), predicted_regime="bounded")
    assert (told.regime, told.verdict) == ("feature learning", "drifting")
    assert told.causes == ["kernel moving", "linearization error"]
    assert "widen" not in told.message and "alarm" not in told.message
    expected = diagnose(moved, thresholds=Thresholds(), predicted_regime="bounded", expect="lazy")
    assert (expected.regime, expected.verdict) == ("feature learning", "broken")
    # one sentence per finding, each value with the levels that read it
    assert "linearization error 0.52 (lazy below 0.2, alarm at 0.5)" in expected.message
    assert "kernel relative change 0.48 (lazy below 0.1, alarm at 0.5)" in expected.message
    assert "widen the layers" in expected.message and "below break" not in expected.message


def test_a_report_too_close_to_the_previous_one_keeps_its_regime_and_its_reference():
    """Reports every 50 steps beside the log grid meet at 500 and 512: 0.03 doublings apart."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = NTKTracker(x[:8], y[:8], optimizer=optimizer, weight_decay=0.0)
    tracker.start(model)
    reports = {}
    for step in range(1, 65):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (16, 17, 32):
            reports[step] = tracker.update(model, step)
    first, close, later = reports[16], reports[17], reports[32]
    assert first.regime in ("feature learning", "locally linear")
    assert math.isnan(close.kernel_velocity) and math.isnan(close.local_linearization_error)
    assert close.regime == first.regime
    assert f"{first.regime.capitalize()}, as at step 16: this report is too close" in (
        close.message
    )
    # the next report's velocity is measured from step 16, the kept reference
    assert math.isfinite(later.kernel_velocity) and "step 16" in later.message
    assert tracker.started_state.previous.step == 32
    signals = Signals(relative_change=2.0, linearization_error=0.9, too_close=True)
    assert regime_of(signals, Thresholds()) == "feature learning"  # nothing to keep
    kept = dataclasses.replace(signals, previous_regime="locally linear")
    assert regime_of(kept, Thresholds()) == "locally linear"


def test_a_settled_kernel_with_a_good_local_linearization_is_locally_linear():
    t = Thresholds()
    settled = Signals(
        relative_change=5.0, linearization_error=0.9, kernel_velocity=0.02,
        local_linearization_error=0.05, previous_step=64,
    )  # fmt: skip
    d = diagnose(settled, thresholds=t, predicted_regime="bounded")
    assert (d.regime, d.verdict) == ("locally linear", "drifting")
    assert "around step 64's parameters" in d.message
    assert regime_of(dataclasses.replace(settled, kernel_velocity=0.5), t) == "feature learning"
    # a settled kernel whose local linearization misses: the message says which signal
    missed = diagnose(
        dataclasses.replace(settled, local_linearization_error=0.32), thresholds=t,
        predicted_regime="bounded",
    )  # fmt: skip
    assert missed.regime == "feature learning"
    assert "the kernel moves only 0.02 per doubling of steps since step 64" in missed.message
    assert "local linearization error 0.32, locally linear below 0.2" in missed.message
    assert regime_of(dataclasses.replace(settled, local_linearization_error=0.5), t) == (
        "feature learning"
    )
    assert regime_of(Signals(relative_change=0.01, linearization_error=0.01), t) == "lazy"
    assert regime_of(Signals(), t) == "unknown"
    assert velocity(1.0, 16, 4) == pytest.approx(0.5) and velocity(1.0, 4, 0) == pytest.approx(0.5)


# ---------------------------------------------------------------------- through the tracker


def _bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def _images(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 6, 6, generator=g) + y[:, None, None, None].float()
    return x, y


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_cnn_at_lr_0_is_lazy_with_zero_drift_at_every_report(momentum):
    from lightning_ntk import NTKTracker

    torch.manual_seed(0)
    model = _bn_cnn()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    x, y = _images()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    trackers = {
        mode: NTKTracker(x[:12], y[:12], optimizer=opt, log_base=2, normalization=mode)
        for mode in ("batch", "running")
    }
    for tracker in trackers.values():
        tracker.start(model)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 33):
        idx = torch.randint(len(x), (16,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])  # running statistics move
        opt.zero_grad()
        loss.backward()
        opt.step()
        for tracker in trackers.values():
            tracker.observe(model, x[idx], y[idx], loss, step=step)
            if tracker.is_due(step):
                tracker.update(model, step)
    reports = trackers["batch"].history
    assert [r.step for r in reports] == [2, 4, 8, 16, 32]
    for r in reports:
        assert r.relative_change <= 1e-6 and r.linearization_error == 0.0, r
        assert r.verdict == "lazy" and r.causes == [], r
    # the deployed function's kernel (running statistics) does move
    assert trackers["running"].history[-1].relative_change > 1e-3
    assert "inferred from the training loss" in reports[-1].setup
    assert reports[-1].predicted_regime == "diverging"  # hard labels, λ = 0: both known


@pytest.mark.slow
def test_smoothing_given_only_to_f_cross_entropy_in_a_lightning_module():
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor
    from tests._lightning_models import module_class, trainer_kwargs

    base = module_class("pytorch_lightning")

    class Functional(base):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y, label_smoothing=0.1)

    pl.seed_everything(0, verbose=False)
    model = Functional(lr=0.5)
    del model.loss_fn  # no loss module anywhere
    monitor = NTKMonitor(n_probe=9, log_base=2)
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=16)).fit(model)
    last = monitor.history[-1]
    assert last.predicted_regime == "bounded", last.setup
    assert "label smoothing 0.1 (inferred from the training loss" in last.setup
    assert math.isfinite(last.logit_optimum) and math.isfinite(last.logit_gap)
    for report in monitor.history:
        assert "hard one-hot targets and no" not in report.message
    assert "Set-up still being read from the training loss." in monitor.history[0].message


def test_non_finite_probe_inputs_are_refused_clearly():
    from lightning_ntk import NTKTracker

    x, y = _images(12)
    x = x.flatten(1)
    x[3, 5] = math.nan
    with pytest.raises(ValueError, match=r"probe inputs hold non-finite values .* rows \[3\]"):
        NTKTracker(x, y).start(nn.Linear(36, 3))


def test_stop_says_why_in_one_line(caplog):
    import logging

    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor
    from tests._lightning_models import module_class, trainer_kwargs

    pl.seed_everything(0, verbose=False)
    monitor = NTKMonitor(
        n_probe=9,
        every_n_steps=1,
        on_breakdown="stop",
        thresholds={"relative_change": (1e-9, 1e-8)},
        expect="lazy",
    )
    with caplog.at_level(logging.INFO):
        trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=20))
        trainer.fit(module_class("pytorch_lightning")())
    assert trainer.global_step == 1
    lines = [r.getMessage() for r in caplog.records if "Stopping training" in r.getMessage()]
    assert len(lines) == 1 and "step 1:" in lines[0] and "kernel relative change" in lines[0]


def test_loss_modules_are_found_inside_containers():
    from lightning_ntk.monitor._setup import find_loss as _find_loss

    class Module(nn.Module):
        def __init__(self, where: str) -> None:
            super().__init__()
            self.net = nn.Linear(3, 2)
            loss = nn.CrossEntropyLoss(label_smoothing=0.2)
            if where == "dict":
                self.losses = {"ce": loss}  # a plain dict: not a registered sub-module
            elif where == "list":
                self.criteria = [nn.MSELoss(), loss]
            else:
                self.heads = nn.ModuleDict({"main": nn.ModuleList([loss])})

    for where in ("dict", "list", "modules"):
        assert _find_loss(Module(where)).label_smoothing == 0.2, where
    assert _find_loss(nn.Linear(2, 2)) is None


def test_observing_batches_the_model_cannot_take_leaves_the_set_up_unknown():
    from lightning_ntk import NTKTracker

    x, y = _images(12)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    tracker = NTKTracker(x, y)
    tracker.start(model)
    tracker.observe(model, torch.zeros(4, 5), y[:4], torch.tensor(1.0), step=1)  # wrong shape
    assert not tracker.wants_observation
    assert "could not be evaluated" in tracker.setup.sources["label_smoothing"]
    assert tracker.update(model, 1).predicted_regime == "unknown"


# ---------------------------------------------------------------------- regimes and alarms


def _digits_like(n: int = 320, seed: int = 0):
    """8×8 single-channel images of 10 classes: a fixed template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 8, 8, generator=g)
    y = torch.arange(n) % 10
    return templates[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=g), y


def _cnn_module():
    import pytorch_lightning as pl

    class CNN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(16 * 16, 32),
                nn.ReLU(),
                nn.Linear(32, 10),
            )

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(*_digits_like())
            g = torch.Generator().manual_seed(0)
            return torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, generator=g)

    return CNN()


def _fit_recording(monitor, make_module, max_steps, caplog):
    """Train; return the monitor's breakdown warnings and its verbose lines."""
    import logging

    import pytorch_lightning as pl

    from lightning_ntk import LinearizationBreakdownWarning
    from tests._lightning_models import trainer_kwargs

    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=max_steps))
        trainer.fit(make_module())
    ours = [w for w in caught if w.category is LinearizationBreakdownWarning]
    assert all(w.filename == __file__ for w in ours), [w.filename for w in ours]  # user code
    alarms = [str(w.message) for w in ours]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NTKMonitor")]
    return alarms, lines


def test_an_ordinary_adamw_cnn_is_feature_learning_without_an_alarm(caplog):
    """A 10k-parameter CNN, AdamW with weight decay: information at every report, no alarm."""
    from lightning_ntk import NTKMonitor

    monitor = NTKMonitor(n_probe=10, verbose=True)
    alarms, lines = _fit_recording(monitor, _cnn_module, 256, caplog)
    reports = monitor.history
    assert [r.step for r in reports] == [4, 16, 64, 256]
    assert alarms == [] and all(r.verdict != "broken" for r in reports), alarms
    assert len(lines) == len(reports)
    assert all(r.predicted_regime == "bounded" for r in reports)  # weight decay, not "lazy"
    assert "feature learning" in {r.regime for r in reports}
    for r in reports:
        assert "widen the layers" not in r.message and "predicts lazy" not in r.message
        assert "`loss`" not in r.message and "`optimizer`" not in r.message
    # the diagnosis strings the regimes together with their steps and figures
    diagnosis = monitor.diagnosis
    first, *rest = diagnosis.split("; ")
    assert first.startswith(f"{reports[0].regime} until step ") or first.startswith(
        f"{reports[0].regime} throughout (steps 4–256)"
    ), diagnosis
    assert re.search(r"feature learning[^;]*kernel velocity \d+\.\d\d", diagnosis), diagnosis
    assert re.search(r"logit", rest[-1] if rest else first), diagnosis


def test_the_previous_report_s_linearization_predicts_the_next_report_s_logits():
    """Standard parameterization, SGD: the kernel moves early, then settles; from then on
    the linearization around the previous report's parameters predicts the logits far
    better than the one around θ0, and its error is the one ``linearize`` gives."""
    from lightning_ntk import NTKTracker, linearize
    from lightning_ntk.linearization import linearization_error

    x, y = _digits_like(200)
    x = x.flatten(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = NTKTracker(x[:16], y[:16], optimizer=opt, label_smoothing=0.1, log_base=2)
    tracker.start(model)
    previous = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for step in range(1, 1025):
        idx = torch.randint(len(x), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1).backward()
        opt.step()
        if tracker.is_due(step):
            report = tracker.update(model, step)
            local = linearize(model, previous)
            with torch.no_grad():
                f = model(x[:16])
                expected = linearization_error(f, local(x[:16]), local.initial_logits(x[:16]))
            assert report.local_linearization_error == pytest.approx(float(expected), rel=1e-3)
            previous = {n: p.detach().clone() for n, p in model.named_parameters()}
    late = [r for r in tracker.history if r.step >= 256]
    for r in late:  # measured: local 0.014-0.025 against 0.19-0.21 around θ0
        assert r.local_linearization_error < 0.2 * r.linearization_error, r
    early, last = tracker.history[1], tracker.history[-1]
    assert last.kernel_velocity < 0.5 * max(r.kernel_velocity for r in tracker.history[:6])
    assert last.regime == "locally linear" and early.regime != "locally linear"
    assert "locally linear from step" in tracker.diagnosis


def test_hard_labels_without_regularization_raise_their_alarm_exactly_once(caplog):
    from lightning_ntk import NTKMonitor
    from tests._lightning_models import module_class

    # the trend from step 32 on, so that a short run measures it
    monitor = NTKMonitor(n_probe=20, log_base=2, thresholds={"min_trend_step": 32}, verbose=True)
    classifier = module_class("pytorch_lightning")
    make = functools.partial(classifier, classes=10, width=32, lr=0.2, n=40, batch_size=40)
    alarms, lines = _fit_recording(monitor, make, 128, caplog)
    reports = monitor.history
    assert reports[-1].predicted_regime == "diverging"
    assert reports[-1].regime == "logits diverging" and reports[-1].verdict == "broken"
    assert len(alarms) == 1, alarms
    first = next(r for r in reports if r.verdict == "broken")
    assert alarms[0].startswith(f"NTKMonitor (ntk/) step {first.step}: ")
    assert "add weight decay or label smoothing" in alarms[0] and "(alarm at 0.8)" in alarms[0]
    assert "diverging" in monitor.diagnosis and f"from step {first.step}" in monitor.diagnosis
    # printed once: the verbose line of the alarm's report leaves its message to the warning
    assert sum(first.message in line for line in lines) == 0
    assert len(lines) == len(reports)


@pytest.mark.parametrize("expect", [None, "lazy"])
def test_leaving_the_lazy_regime_warns_once_only_when_laziness_was_expected(expect, caplog):
    from lightning_ntk import NTKMonitor
    from tests._lightning_models import module_class

    monitor = NTKMonitor(n_probe=12, log_base=2, expect=expect, label_smoothing=0.1)
    classifier = module_class("pytorch_lightning")
    make = functools.partial(classifier, width=64, lr=0.3, label_smoothing=0.1)
    alarms, _ = _fit_recording(monitor, make, 64, caplog)
    reports = monitor.history
    assert reports[0].linearization_error < 0.5 < reports[-1].linearization_error, reports
    if expect is None:
        assert alarms == [] and all(r.verdict != "broken" for r in monitor.history)
        assert not any("widen" in r.message for r in monitor.history)
    else:
        assert len(alarms) == 1, alarms
        assert "Laziness was expected" in alarms[0] and "widen the layers" in alarms[0]
        first = next(r for r in reports if r.verdict == "broken")
        assert alarms[0].startswith(f"NTKMonitor (ntk/) step {first.step}: ")
        assert reports[-1].verdict == "broken"


def test_thresholds_travel_as_json_not_in_chart_titles_and_the_summary_names_the_regime(
    tmp_path,
):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from lightning_ntk.cli._report import load_run, summarize
    from lightning_ntk.monitor.loggers import write_layout

    writer = SummaryWriter(str(tmp_path))
    layout = {}
    writer_add = writer.add_custom_scalars
    writer.add_custom_scalars = lambda value: (layout.update(value), writer_add(value))
    write_layout(writer, Thresholds(logit_slope=(0.4, 0.9)), prefix="ntk/")
    for step, code in ((4, 0.0), (16, 2.0)):
        writer.add_scalar("ntk/regime", code, step)
        writer.add_scalar("ntk/lazy", 0.5, step)
        writer.add_scalar("ntk/relative_change", 0.3, step)
    writer.close()
    titles = [title for charts in layout.values() for title in charts]
    assert not any("0.4" in t or "0.9" in t or "break" in t for t in titles), titles
    run = load_run(tmp_path)
    assert run.thresholds["logit_slope"] == (0.4, 0.9)
    assert run.thresholds["relative_change"] == Thresholds().relative_change
    assert f"{run.label}: drifting at step 16 (feature learning)" in summarize([run])
