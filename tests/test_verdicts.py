"""The verdict reads the set-up as training runs it, and the logits against their optimum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ntk.monitor._setup import LossObserver, Setup, logit_optimum, resolve_setup
from lightning_ntk.monitor._verdict import LogitContext, Thresholds, diagnose
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
        relative_change=0.02,
        linearization_error=0.05,
        slope=slope,
        finite=True,
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
    assert "past the optimum" in overshoot.message


def test_hard_targets_diverge_and_an_unknown_set_up_states_the_condition():
    diverging = _diagnose(1.0, "diverging", logit_norm=8.0, step=800)
    assert (diverging.verdict, diverging.causes) == ("broken", ["logits diverging"])
    assert "hard one-hot targets and no weight decay" in diverging.message
    unknown = _diagnose(1.0, "unknown", logit_norm=8.0, step=800)
    assert (unknown.verdict, unknown.causes) == ("drifting", ["logits growing"])
    assert "if the targets are hard one-hot" in unknown.message
    assert "hard one-hot targets and no" not in unknown.message
    lazy_unknown = _diagnose(math.nan, "unknown", step=800)
    assert lazy_unknown.verdict == "lazy" and "if the targets are hard" in lazy_unknown.message


def test_l2_only_waits_for_the_equilibrium_time():
    early = _diagnose(1.0, "bounded", logit_norm=8.0, equilibrium_step=1000, step=800)
    assert (early.verdict, early.causes) == ("drifting", ["logits growing"])
    assert "1000 steps" in early.message
    late = _diagnose(1.0, "bounded", logit_norm=8.0, equilibrium_step=100, step=800)
    assert (late.verdict, late.causes) == ("broken", ["logits diverging"])


def test_message_names_the_signal_that_set_the_verdict():
    d = diagnose(
        relative_change=0.48,
        linearization_error=0.52,
        slope=0.0,
        finite=True,
        thresholds=Thresholds(),
        predicted_regime="bounded",
    )
    assert d.verdict == "broken" and d.causes == ["kernel moving", "linearization error"]
    head = d.message.split(";")[0]
    assert "linearization error (0.52 ≥ break threshold 0.5)" in head
    assert "relative change 0.48 ≥ drift threshold 0.1, below break 0.5" in d.message


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
    )
    with caplog.at_level(logging.INFO):
        trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=20))
        trainer.fit(module_class("pytorch_lightning")())
    assert trainer.global_step == 1
    lines = [r.getMessage() for r in caplog.records if "NTKMonitor: stopping" in r.getMessage()]
    assert len(lines) == 1 and "step 1" in lines[0] and "kernel moving" in lines[0]


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
