"""The set-up as people train: the loss each set-up really computes is identified, or unknown.

Each set-up is a few synthetic batches: the logits training saw, the batch's targets and
the loss the training step returned. The set-up must be read correctly (the paper's
bounded / diverging logits) or stay ``unknown`` — never a confident wrong reading.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ntk.metrics import logit_norm
from lightning_ntk.monitor._observer import class_weights
from lightning_ntk.monitor._setup import LossObserver, resolve_setup
from lightning_ntk.theory import optimal_logits, predict_regime
from tests._lightning_models import one_thread  # noqa: F401

SGD0 = torch.optim.SGD([nn.Parameter(torch.ones(2, 2))], lr=0.1)  # λ = 0, read


def _net(d: int = 12, outputs: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, outputs))


def _observe(step_loss, *, outputs=5, n=8, labels="int", task=None, seed=0, class_weight=None):
    """Observe ``n`` batches; ``step_loss(logits, y, x, g) -> (loss, logits training saw)``."""
    net = _net(outputs=outputs, seed=seed)
    g = torch.Generator().manual_seed(seed)
    observer = LossObserver()
    for step in range(1, n + 1):
        x = 2 * torch.randn(24, 12, generator=g)
        if labels == "int":
            y = torch.randint(outputs, (24,), generator=g)
        elif labels == "binary":
            y = (torch.rand(24, generator=g) < 0.4).float()
        else:  # multi-hot
            y = (torch.rand(24, outputs, generator=g) < 0.3).float()
        loss, seen = step_loss(net, x, y, g)
        observer.add_batch(
            seen.detach(), y, loss.detach(), step, captured=True, task=task,
            class_weight=class_weight,
        )  # fmt: skip
    return observer


def _ce(net, x, y, g, **kwargs):
    logits = net(x)
    return F.cross_entropy(logits, y, **kwargs), logits


# ---------------------------------------------------------------- item 1: contradicted readings


def _distillation(net, x, y, g):
    logits = net(x)
    teacher = torch.softmax(3 * torch.randn(logits.shape, generator=g), dim=1)
    kl = F.kl_div(F.log_softmax(logits, dim=1), teacher, reduction="batchmean")
    return 0.5 * kl + 0.5 * nn.CrossEntropyLoss()(logits, y), logits


def _l2_in_the_loss(net, x, y, g):
    logits = net(x)
    l2 = 5e-3 * sum((p**2).sum() for p in net.parameters()) * torch.rand((), generator=g)
    return nn.CrossEntropyLoss()(logits, y) + l2, logits


@pytest.mark.parametrize("step_loss", [_distillation, _l2_in_the_loss])
def test_a_loss_module_that_training_contradicts_decides_nothing(step_loss):
    observer = _observe(step_loss)
    assert observer.contradicted and observer.smoothing is None
    setup = resolve_setup(
        observer=observer, loss=nn.CrossEntropyLoss(), optimizer=SGD0, probe_y=torch.arange(5)
    )
    assert setup.label_smoothing is None, setup.sources
    assert (
        "CrossEntropyLoss says 0, but the training loss is not"
        in (setup.sources["label_smoothing"])
    )
    prediction = setup.prediction()
    assert prediction["regime"] == "unknown"
    assert "must diverge" not in prediction["reason"]


# ---------------------------------------------------------------- item 4: set-ups as trained


def _mixup(net, x, y, g):
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    order = torch.randperm(len(x), generator=g)
    logits = net(lam * x + (1 - lam) * x[order])
    loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[order])
    return loss, logits


def _focal(net, x, y, g):
    logits = net(x)
    logp = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    return (-((1 - logp.exp()) ** 2) * logp).mean(), logits


def _class_weighted(net, x, y, g):
    logits = net(x)
    return F.cross_entropy(logits, y, weight=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])), logits


def _kl_only(net, x, y, g):
    logits = net(x)
    teacher = torch.softmax(2 * torch.randn(logits.shape, generator=g), dim=1)
    return F.kl_div(F.log_softmax(logits, dim=1), teacher, reduction="batchmean"), logits


@pytest.mark.parametrize("step_loss", [_mixup, _focal, _class_weighted, _kl_only])
def test_set_ups_the_batches_do_not_describe_stay_unknown(step_loss):
    observer = _observe(step_loss)
    setup = resolve_setup(
        observer=observer, loss=nn.CrossEntropyLoss(), optimizer=SGD0, probe_y=torch.arange(5)
    )
    assert setup.prediction()["regime"] == "unknown", setup.describe()


def test_accumulation_scaled_losses_smoothing_and_label_noise_are_read_exactly():
    # gradient accumulation divides the loss by the number of micro-batches: any scale
    accumulated = _observe(lambda n, x, y, g: (lambda loss, f: (loss / 4, f))(*_ce(n, x, y, g)))
    assert accumulated.smoothing == 0.0
    # warm-up + cosine schedules change the learning rate, never the loss: ε is read
    smoothed = _observe(lambda n, x, y, g: _ce(n, x, y, g, label_smoothing=0.1))
    assert smoothed.smoothing == pytest.approx(0.1, abs=1e-5)
    assert resolve_setup(observer=smoothed, optimizer=SGD0).prediction()["regime"] == "bounded"

    # 20 % label noise: the labels are still hard, the logits still diverge in the long run
    def noisy(net, x, y, g):
        flip = torch.rand(len(y), generator=g) < 0.2
        y.copy_(torch.where(flip, torch.randint(5, y.shape, generator=g), y))
        return _ce(net, x, y, g)

    setup = resolve_setup(observer=_observe(noisy), optimizer=SGD0)
    assert setup.prediction()["regime"] == "diverging", setup.describe()


# ---------------------------------------------------------------- item 2: precision, dropout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hard_labels_under_autocast_are_identified(dtype):
    def autocast_step(net, x, y, g):
        with torch.autocast("cpu", dtype=dtype):
            logits = net(x)
            loss = F.cross_entropy(logits, y)
        return loss, logits

    observer = _observe(autocast_step)
    assert observer.family == "cross_entropy" and observer.smoothing == 0.0, observer.detail
    setup = resolve_setup(observer=observer, optimizer=SGD0)
    assert setup.prediction()["regime"] == "diverging"


def test_a_16_bit_loss_widens_the_allowed_residual_but_never_guesses_epsilon():
    def bf16_loss(net, x, y, g):  # the whole loss in bfloat16: ~3 significant digits
        logits = net(x).bfloat16()
        return F.cross_entropy(logits, y, label_smoothing=0.2), logits

    observer = _observe(bf16_loss)
    assert observer.family == "cross_entropy", observer.detail
    assert observer.tolerance > 1e-3
    if observer.smoothing is not None:  # read, or left unknown: never wrong
        assert observer.smoothing == pytest.approx(0.2, abs=0.05)


def test_the_tracker_reevaluates_under_the_autocast_in_effect():
    from lightning_ntk import NTKTracker

    net = _net()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 12, generator=g), torch.randint(5, (16,), generator=g)
    tracker = NTKTracker(x, y, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    tracker.start(net)
    for step in range(1, 9):
        xb, yb = torch.randn(24, 12, generator=g), torch.randint(5, (24,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(xb), yb)
            tracker.observe(net, xb, yb, loss, step)
    assert tracker.setup.label_smoothing == 0.0, tracker.setup.describe()
    assert tracker.predict_regime()["regime"] == "diverging"


def test_dropout_masks_are_those_of_the_training_step_when_its_logits_are_passed():
    from lightning_ntk import NTKTracker

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 12, generator=g), torch.randint(5, (16,), generator=g)
    own, reevaluated = NTKTracker(x, y), NTKTracker(x, y)
    own.start(net)
    reevaluated.start(net)
    net.train()
    for step in range(1, 9):
        xb, yb = torch.randn(24, 12, generator=g), torch.randint(5, (24,), generator=g)
        logits = net(xb)
        loss = F.cross_entropy(logits, yb, label_smoothing=0.1)
        own.observe(net, xb, yb, loss, step, logits=logits)
        reevaluated.observe(net, xb, yb, loss, step)
    assert own.setup.label_smoothing == pytest.approx(0.1, abs=1e-5)
    assert reevaluated.setup.label_smoothing is None
    assert "dropout is active in training (2)" in reevaluated.setup.sources["label_smoothing"]


# ---------------------------------------------------------------- item 3: binary, multilabel


def _bce(net, x, y, g, eps=0.0, **kwargs):
    logits = net(x)
    z = logits.squeeze(1) if logits.shape[1] == 1 else logits
    return F.binary_cross_entropy_with_logits(z, y * (1 - eps) + eps / 2, **kwargs), logits


@pytest.mark.parametrize(("eps", "pos_weight"), [(0.0, None), (0.1, None), (0.0, 3.0), (0.2, 2.0)])
def test_binary_cross_entropy_is_recognised_with_smoothing_and_pos_weight(eps, pos_weight):
    kwargs = {} if pos_weight is None else {"pos_weight": torch.tensor(pos_weight)}
    observer = _observe(
        lambda n, x, y, g: _bce(n, x, y, g, eps, **kwargs), outputs=1, labels="binary"
    )
    assert observer.family == "binary_cross_entropy", observer.detail
    assert observer.smoothing == pytest.approx(eps, abs=1e-5)
    assert observer.pos_weight == pytest.approx(pos_weight or 1.0, rel=1e-4)
    setup = resolve_setup(
        observer=observer, optimizer=SGD0, probe_y=torch.tensor([0.0, 1.0]), num_outputs=1
    )
    assert setup.task == "binary"
    assert setup.prediction()["regime"] == ("diverging" if eps == 0 else "bounded")
    assert "integer probe labels" not in setup.describe()
    assert "float 0/1 probe labels" in setup.describe()


def test_multi_hot_targets_are_multilabel_hard_targets_never_soft():
    observer = _observe(_bce, labels="multihot")
    assert observer.family == "binary_cross_entropy" and observer.smoothing == 0.0
    probe_y = (torch.rand(10, 5, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    setup = resolve_setup(observer=observer, optimizer=SGD0, probe_y=probe_y, num_outputs=5)
    assert setup.task == "multilabel" and setup.min_target == 0.0
    assert "soft" not in setup.describe()
    assert setup.prediction()["regime"] == "diverging"
    read = resolve_setup(loss=nn.BCEWithLogitsLoss(), probe_y=probe_y, num_outputs=5)
    assert read.task == "multilabel" and read.non_degenerate is False
    assert predict_regime(targets=probe_y).regime == "diverging"
    assert predict_regime(targets=probe_y).task == "multilabel"


def test_binary_theory_is_cross_entropy_on_zero_and_z():
    # BCE on z is CE on [0, z]; smoothed optimum log(t / (1 − t))
    z = torch.randn(7, dtype=torch.float64)
    t = torch.rand(7, dtype=torch.float64)
    two_class = torch.stack([torch.zeros_like(z), z], dim=1)
    ce = F.cross_entropy(two_class, torch.stack([1 - t, t], dim=1))
    torch.testing.assert_close(F.binary_cross_entropy_with_logits(z, t), ce)
    z_star = optimal_logits(torch.tensor([1.0, 0.0]), label_smoothing=0.1, task="binary")
    torch.testing.assert_close(
        z_star.flatten(), torch.tensor([math.log(19), -math.log(19)]).double()
    )
    assert optimal_logits(torch.tensor([1.0, 0.0]), task="binary") is None
    hard = predict_regime(targets=torch.tensor([1.0, 0.0]), task="binary")
    smooth = predict_regime(targets=torch.tensor([1.0, 0.0]), task="binary", label_smoothing=0.1)
    assert (hard.regime, smooth.regime) == ("diverging", "bounded")
    assert smooth.min_target_prob == pytest.approx(0.05)


def test_logit_norm_reads_binary_and_multiclass_margins_alike():
    m = 3.0
    for C in (2, 3, 10, 100):
        one_hot_margin = torch.zeros(4, C)
        one_hot_margin[:, 0] = m
        assert float(logit_norm(one_hot_margin)) == pytest.approx(m)
    assert float(logit_norm(torch.full((4, 1), -m))) == pytest.approx(m)  # binary |z|
    assert float(logit_norm(torch.full((4, 6), m), task="multilabel")) == pytest.approx(m)
    with pytest.raises(ValueError, match="task='multilabel'"):
        logit_norm(torch.zeros(4, 3), task="binary")


def test_a_one_logit_head_is_a_binary_classifier_without_output_fn():
    from lightning_ntk import NTKTracker

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=g)
    y = (x[:, 0] > 0).float()
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = NTKTracker(x, y, optimizer=opt, log_base=2)
    tracker.start(model)
    assert tracker.started_state.K0.shape == (12, 12, 1, 1)
    data = torch.randn(96, 6, generator=g)
    for step in range(1, 9):
        xb = data[torch.randperm(96, generator=g)[:24]]
        yb = (xb[:, 0] > 0).float()
        loss = F.binary_cross_entropy_with_logits(model(xb).squeeze(1), yb)
        tracker.observe(model, xb, yb, loss, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = tracker.update(model, 8)
    with torch.no_grad():
        z = model(x)
    assert report.logit_norm == pytest.approx(float(z.abs().mean()), rel=1e-5)
    assert report.predicted_regime == "diverging", report.setup
    assert "task binary (" in report.setup and "float 0/1 probe labels" in report.setup
    assert 0.0 <= report.argmax_agreement <= 1.0 and math.isfinite(report.prob_tv)
    assert math.isfinite(report.target_alignment)


# ---------------------------------------------------------------- item 5: arguments that exist


def test_predict_regime_reads_its_number_of_outputs():
    from lightning_ntk import NTKTracker

    tracker = NTKTracker(torch.randn(4, 3), torch.tensor([0.0, 1.0, 1.0, 0.0]), weight_decay=0.0)
    tracker.observer.add(torch.zeros(4, 1), torch.tensor([0.0, 1.0, 1.0, 0.0]), 0.69, 1)
    one_output = tracker.resolve_setup(1)
    assert one_output.task == "binary" and "single output" in one_output.sources["task"]
    assert tracker.predict_regime(1)["regime"] == "unknown"  # ε not yet established
    unknown = resolve_setup().prediction()["reason"]
    assert "`loss`" not in unknown and "`optimizer`" not in unknown


def test_the_probe_of_float_binary_labels_holds_both_classes():
    from torch.utils.data import TensorDataset

    from lightning_ntk.monitor._probe import draw_probe

    y = torch.zeros(200)
    y[::20] = 1.0  # 5 % positives, stored as floats for BCE
    _, probe_y = draw_probe(TensorDataset(torch.randn(200, 3), y), 8, torch.Generator())
    assert probe_y is not None and int(probe_y.sum()) == 4


# ---------------------------------------------------------------- class-weighted cross-entropy

WEIGHTS = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])


@pytest.mark.parametrize(
    ("eps", "reduction", "module"),
    [(0.0, "mean", nn.CrossEntropyLoss), (0.1, "mean", nn.CrossEntropyLoss),
     (0.0, "sum", nn.CrossEntropyLoss), (0.0, "mean", nn.NLLLoss)],
)  # fmt: skip
def test_a_class_weighted_loss_module_is_fitted_with_its_weights(eps, reduction, module):
    if module is nn.NLLLoss:
        loss_module: nn.Module = nn.NLLLoss(weight=WEIGHTS, reduction=reduction)

        def step(net, x, y, g):
            logits = net(x)
            return loss_module(F.log_softmax(logits, dim=1), y), logits
    else:
        loss_module = nn.CrossEntropyLoss(weight=WEIGHTS, label_smoothing=eps, reduction=reduction)

        def step(net, x, y, g):
            logits = net(x)
            return loss_module(logits, y), logits

    observer = _observe(step, class_weight=class_weights(loss_module))
    assert observer.smoothing == pytest.approx(eps, abs=1e-4), observer.detail
    assert "class weights" in observer.detail
    setup = resolve_setup(
        observer=observer, loss=loss_module, optimizer=SGD0, probe_y=torch.arange(5)
    )
    expected = "diverging" if eps == 0 else "bounded"
    assert setup.prediction()["regime"] == expected, setup.describe()


def test_class_weights_are_read_only_from_a_reducing_cross_entropy_module():
    assert class_weights(nn.CrossEntropyLoss()) is None
    assert class_weights(nn.CrossEntropyLoss(weight=WEIGHTS, reduction="none")) is None
    assert class_weights(nn.MSELoss()) is None
    weight, reduction = class_weights(nn.NLLLoss(weight=WEIGHTS))
    assert torch.equal(weight, WEIGHTS) and reduction == "mean"


@pytest.mark.parametrize("step_loss", [_l2_in_the_loss, _ce])
def test_class_weights_the_training_step_does_not_use_decide_nothing(step_loss):
    loss_module = nn.CrossEntropyLoss(weight=WEIGHTS)
    observer = _observe(step_loss, class_weight=class_weights(loss_module))
    assert observer.smoothing is None and observer.contradicted, observer.detail
    setup = resolve_setup(
        observer=observer, loss=loss_module, optimizer=SGD0, probe_y=torch.arange(5)
    )
    assert setup.prediction()["regime"] == "unknown", setup.describe()


def test_the_tracker_fits_the_class_weights_of_its_loss_module():
    from lightning_ntk import NTKTracker

    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    loss_module = nn.CrossEntropyLoss(weight=WEIGHTS)
    g = torch.Generator().manual_seed(0)
    probe_x = torch.randn(10, 12, generator=g)
    tracker = NTKTracker(probe_x, torch.arange(10) % 5, optimizer=optimizer, loss=loss_module)
    tracker.start(net)
    for step in range(1, 9):
        x, y = torch.randn(24, 12, generator=g), torch.randint(5, (24,), generator=g)
        logits = net(x)
        tracker.observe(net, x, y, loss_module(logits, y), step, logits=logits)
    assert tracker.observer.smoothing == 0.0, tracker.observer.detail
    setup = tracker.resolve_setup(5)
    assert "class weights" in setup.sources["label_smoothing"], setup.describe()
    assert setup.prediction()["regime"] == "diverging", setup.describe()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("soft", [False, True])
def test_weighted_features_are_the_weighted_cross_entropy_pytorch_computes(reduction, soft):
    from lightning_ntk.monitor._observer import _features

    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.softmax(torch.randn(6, 5, generator=g), 1).double() if soft else torch.arange(6) % 5
    w = WEIGHTS.double()
    (H, U), _, _ = _features(z, y, None, (w, reduction))["cross_entropy"]
    for eps in (0.0, 0.3):
        module = nn.CrossEntropyLoss(weight=w, label_smoothing=eps, reduction=reduction)
        scale = 6 if reduction == "sum" else 1  # the features are per example (N = 6)
        assert float(module(z, y)) == pytest.approx(scale * ((1 - eps) * H + eps * U), rel=1e-12)
