"""NTKTracker: report fields, exact values, schedule, probe drawing, verdicts, state, errors."""

from __future__ import annotations

import dataclasses
import io
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ntk import NTKReport, NTKTracker, reference_ntk
from lightning_ntk.metrics import kernel_distance, relative_change
from lightning_ntk.monitor._schedule import Schedule
from lightning_ntk.monitor._verdict import Signals, Thresholds, diagnose, logit_slope
from tests._lightning_models import DictDataset, blobs, mlp, one_thread  # noqa: F401

DESIGN_FIELDS = [
    "step",
    "kernel_distance",
    "relative_change",
    "target_alignment",
    "linearization_error",
    "prob_tv",
    "argmax_agreement",
    "logit_norm",
    "logit_growth",
    "param_distance",
    "eig_max",
    "eig_min",
    "effective_rank",
    "condition_number",
    "verdict",
    "causes",
    "predicted_regime",
    "message",
    "logit_gap",
    "logit_optimum",
    "setup",
    "reference_step",
    "restarted",
    "kernel_velocity",
    "local_linearization_error",
    "logit_slope",
    "regime",
    "kernel",
]


def _sgd_steps(model: nn.Module, x, y, steps: int, lr: float = 0.5, smoothing: float = 0.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y, label_smoothing=smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_report_has_exactly_the_design_fields_and_logged_names():
    assert [f.name for f in dataclasses.fields(NTKReport)] == DESIGN_FIELDS
    x, y = blobs(12)
    torch.manual_seed(0)
    model = mlp()
    tracker = NTKTracker(x, y, log_base=2)
    tracker.start(model)
    _sgd_steps(model, x, y, 2)
    report = tracker.update(model, 2)
    scalars = report.scalars()
    numeric = [
        n
        for n in DESIGN_FIELDS
        if n
        not in (
            "verdict",
            "causes",
            "predicted_regime",
            "message",
            "setup",
            "reference_step",
            "restarted",
            "regime",
            "kernel",
        )
    ]
    assert sorted(scalars) == sorted([f"ntk/{n}" for n in numeric] + ["ntk/lazy", "ntk/regime"])
    assert scalars["ntk/lazy"] == {"lazy": 1.0, "drifting": 0.5, "broken": 0.0}[report.verdict]
    assert NTKReport.from_dict(report.to_dict()) == report
    layer_tags = [k for k in tracker.scalars() if k.startswith("ntk/layer/")]
    assert sorted(layer_tags) == [
        "ntk/layer/0/relative_change",
        "ntk/layer/0/share",
        "ntk/layer/2/relative_change",
        "ntk/layer/2/share",
    ]


def test_values_match_the_float64_reference_kernel():
    x, y = blobs(10)
    torch.manual_seed(1)
    model = mlp().double()
    x = x.double()
    tracker = NTKTracker(x, y, output="full", log_base=2)
    K0 = reference_ntk(model, x)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker.start(model)
    _sgd_steps(model, x, y, 3)
    report = tracker.update(model, 3)
    K = reference_ntk(model, x)
    assert report.relative_change == pytest.approx(float(relative_change(K, K0)), rel=1e-9)
    assert report.kernel_distance == pytest.approx(float(kernel_distance(K, K0)), abs=1e-12)
    dist = math.sqrt(sum(((p - theta0[n]) ** 2).sum() for n, p in model.named_parameters()))
    norm0 = math.sqrt(sum((t**2).sum() for t in theta0.values()))
    assert report.param_distance == pytest.approx(dist / norm0, rel=1e-9)
    logits = model.eval()(x)
    centered = logits - logits.mean(dim=1, keepdim=True)
    margin_units = math.sqrt(3 / 2)  # √(C/(C−1)): a one-hot margin m reads m
    expected = margin_units * float(centered.norm(dim=1).mean())
    assert report.logit_norm == pytest.approx(expected, rel=1e-9)
    M = K.permute(0, 2, 1, 3).reshape(10 * 3, 10 * 3)
    eig = torch.linalg.eigvalsh(M)
    assert report.eig_max == pytest.approx(float(eig[-1]), rel=1e-9)
    # per-layer parts sum to the total; shares sum to one
    shares = [v for k, v in tracker.scalars().items() if k.endswith("/share")]
    assert sum(shares) == pytest.approx(1.0, rel=1e-9)
    torch.testing.assert_close(tracker.last_kernel, K, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("output", ["full", "diagonal", "trace"])
def test_layouts_and_methods(output):
    x, y = blobs(8)
    torch.manual_seed(0)
    model = mlp()
    reports = []
    for method in ("jacobian", "ntk_vp"):
        torch.manual_seed(0)
        model = mlp()
        tracker = NTKTracker(x, y, output=output, method=method, log_base=2)
        tracker.start(model)
        _sgd_steps(model, x, y, 2)
        reports.append(tracker.update(model, 2))
        assert tracker.last_kernel.ndim == {"full": 4, "diagonal": 3, "trace": 2}[output]
    assert reports[0].relative_change == pytest.approx(reports[1].relative_change, rel=1e-4)


def test_log_spaced_schedule_and_intervals():
    log = Schedule()  # default base 4
    assert [s for s in range(1, 300) if log.step_due(s)] == [4, 16, 64, 256]
    assert not log.step_due(0)
    doubling = Schedule(log_base=2)
    assert [s for s in range(1, 70) if doubling.step_due(s)] == [2, 4, 8, 16, 32, 64]
    three_halves = Schedule(log_base=1.5)
    assert [s for s in range(1, 20) if three_halves.step_due(s)] == [2, 3, 4, 6, 8, 12, 18]
    tenth = Schedule(every_n_steps=10, log_base=None)
    assert [s for s in range(1, 35) if tenth.step_due(s)] == [10, 20, 30]
    both = Schedule(every_n_steps=10, log_base=2)
    assert [s for s in range(1, 25) if both.step_due(s)] == [2, 4, 8, 10, 16, 20]
    epochs = Schedule(every_n_epochs=2, log_base=None)
    assert [e for e in range(6) if epochs.epoch_due(e)] == [1, 3, 5]
    assert not epochs.step_due(4)
    with pytest.raises(ValueError, match="`every_n_steps` to be a positive int"):
        Schedule(every_n_steps=0)
    with pytest.raises(ValueError, match="`log_base` to be a number > 1"):
        Schedule(log_base=1.0)
    with pytest.raises(ValueError, match="never fires"):
        Schedule(log_base=None)


@pytest.mark.parametrize(
    "schedule",
    [Schedule(), Schedule(log_base=2), Schedule(log_base=1.5), Schedule(log_base=1.01),
     Schedule(log_base=10.0), Schedule(every_n_steps=7, log_base=None),
     Schedule(every_n_steps=10, log_base=3), Schedule(every_n_epochs=1, log_base=None)],
)  # fmt: skip
def test_next_step_is_the_first_due_step_after_any_step(schedule):
    due = [s for s in range(0, 20000) if schedule.step_due(s)]
    for step in range(-2, 1100):
        later = [s for s in due if s > step]
        assert schedule.next_step(step) == (later[0] if later else math.inf), step


def test_tracker_is_due_on_consecutive_repeated_and_skipped_steps():
    x, y = blobs(6)
    tracker = NTKTracker(x, y, every_n_steps=5, log_base=3)
    model = mlp()
    tracker.start(model)
    steps = [*range(0, 40), 39, 39, 40, 12, 3, 100, 2, 81, 81]  # a resume may go back
    assert [s for s in steps if tracker.is_due(s)] == [
        s for s in steps if tracker.schedule.step_due(s)
    ]
    tracker.update(model, 81)
    assert not tracker.is_due(81) and tracker.is_due(85)


def test_tracker_is_due_skips_repeated_steps():
    x, y = blobs(6)
    tracker = NTKTracker(x, y, every_n_steps=3, log_base=None)
    assert not tracker.is_due(3)  # not started
    model = mlp()
    tracker.start(model)
    assert tracker.is_due(3)
    tracker.update(model, 3)
    assert not tracker.is_due(3)


def test_probe_is_stratified_reproducible_and_leaves_rngs_alone():
    x, y = blobs(90, classes=3)
    y = torch.where(torch.arange(90) < 60, torch.zeros_like(y), y)  # class 0 dominates
    data = TensorDataset(x, y)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)  # noqa: NPY002
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())  # noqa: NPY002
    loader = DataLoader(data, batch_size=8, shuffle=True)
    t1 = NTKTracker(n_probe=9, seed=3, log_base=2)
    t1.draw_probe(loader)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])  # noqa: NPY002
    counts = torch.bincount(t1.probe_y, minlength=3)
    assert counts.tolist() == [3, 3, 3]
    t2 = NTKTracker(n_probe=9, seed=3, log_base=2)
    t2.draw_probe(data)
    assert torch.equal(t1.probe_x, t2.probe_x)
    t3 = NTKTracker(n_probe=9, seed=4, log_base=2)
    t3.draw_probe(data)
    assert not torch.equal(t1.probe_x, t3.probe_x)
    # every probe row is a dataset row with its label
    for px, py in zip(t1.probe_x, t1.probe_y):
        row = (x == px).all(dim=1).nonzero().flatten()
        assert len(row) == 1 and y[row[0]] == py


def test_probe_from_dict_items():
    x, y = blobs(20)
    tracker = NTKTracker(n_probe=6, log_base=2)
    tracker.draw_probe(DictDataset(x, y))
    assert tracker.probe_x.shape == (6, 6)
    assert torch.bincount(tracker.probe_y).tolist() == [2, 2, 2]


def test_bad_arguments_raise_clear_errors():
    x, y = blobs(6)
    with pytest.raises(ValueError, match="Expected `n_probe` to be a positive int but got 0"):
        NTKTracker(n_probe=0, log_base=2)
    with pytest.raises(ValueError, match=r"Expected `output` to be one of .* but got 'cube'"):
        NTKTracker(x, y, output="cube", log_base=2)
    with pytest.raises(ValueError, match=r"Expected `method` to be one of .* but got 'magic'"):
        NTKTracker(x, y, method="magic", log_base=2)
    with pytest.raises(ValueError, match=r"non-empty batch .* got shape \(0, 6\)"):
        NTKTracker(torch.empty(0, 6))
    with pytest.raises(ValueError, match=r"`probe_y` to have shape \(6,\)"):
        NTKTracker(x, y[:4], log_base=2)
    with pytest.raises(TypeError, match="`forward_fn` to be callable"):
        NTKTracker(x, forward_fn=3, log_base=2)
    with pytest.raises(ValueError, match="`thresholds` keys among"):
        NTKTracker(x, thresholds={"kernel": (0.1, 0.2)})
    with pytest.raises(ValueError, match="0 < lower <= alarm"):
        NTKTracker(x, thresholds={"relative_change": (0.5, 0.1)})
    with pytest.raises(ValueError, match="`n_probe` to be at most the dataset size 6 but got 7"):
        NTKTracker(n_probe=7, log_base=2).draw_probe(TensorDataset(x, y))
    with pytest.raises(ValueError, match="empty dataset"):
        NTKTracker(n_probe=2, log_base=2).draw_probe(TensorDataset(x[:0], y[:0]))
    with pytest.raises(ValueError, match="No probe set"):
        NTKTracker(log_base=2).start(mlp())
    with pytest.raises(RuntimeError, match="before `update`"):
        NTKTracker(x, log_base=2).update(mlp(), 1)


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return {"logits": self.net(x), "features": x}


def test_model_without_logits_needs_forward_fn_or_output_fn():
    x, y = blobs(6)
    model = DictOut()
    with pytest.raises(TypeError, match="forward_fn"):
        NTKTracker(x, y, log_base=2).start(model)
    for kwargs in (
        {"forward_fn": lambda m, inp: m(inp)["logits"]},
        {"output_fn": lambda out: out["logits"]},
    ):
        tracker = NTKTracker(x, y, **kwargs, log_base=2)
        tracker.start(model)
        assert tracker.update(model, 1).relative_change == 0.0


def test_non_finite_logits_are_reported_not_raised():
    x, y = blobs(6)
    model = mlp()
    tracker = NTKTracker(x, y, log_base=2)
    tracker.start(model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    report = tracker.update(model, 1)
    assert report.verdict == "broken"
    assert report.causes == ["non-finite logits"]
    assert math.isnan(report.relative_change)


def test_tracker_leaves_the_model_and_rng_untouched():
    x, y = blobs(8)
    torch.manual_seed(0)
    model = mlp(bn_dropout=True)
    model.train()
    model(x).sum().backward()  # grads and BN statistics exist
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    tracker = NTKTracker(x, y, log_base=2)
    tracker.start(model)
    tracker.update(model, 1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_state_dict_resume_reports_the_same_values():
    x, y = blobs(12)
    torch.manual_seed(0)
    model = mlp()
    a = NTKTracker(x, y, log_base=2)
    a.start(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, 9):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if a.is_due(step):
            a.update(model, step)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = NTKTracker(log_base=2)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.started and b.last_step == 8
    for step in range(9, 17):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert a.is_due(step) == b.is_due(step)
        if a.is_due(step):
            assert a.update(model, step) == b.update(model, step)
            assert a.scalars() == b.scalars()


def test_logit_slope_reads_growth_per_doubling():
    steps = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    growing = [1.0 + math.log2(s) for s in steps]  # +1 per doubling
    assert logit_slope(steps, growing, octaves=2, min_step=100) == pytest.approx(1.0)
    flat = [5.0] * len(steps)
    assert logit_slope(steps, flat, octaves=2, min_step=100) == pytest.approx(0.0)
    assert math.isnan(logit_slope(steps[:8], growing[:8], octaves=2, min_step=100))


def test_diagnosis_keeps_logit_divergence_and_kernel_movement_apart():
    t = Thresholds()
    diverging = diagnose(
        Signals(relative_change=0.05, linearization_error=0.05, slope=1.5),
        thresholds=t,
        predicted_regime="diverging",
    )
    assert (diverging.regime, diverging.verdict) == ("logits diverging", "broken")
    assert diverging.causes == ["logits diverging"]
    assert "hard one-hot targets" in diverging.message and "weight decay" in diverging.message
    moving = Signals(relative_change=3.0, linearization_error=0.1, kernel_velocity=1.0, slope=0.0)
    for expect, verdict in ((None, "drifting"), ("lazy", "broken")):
        d = diagnose(moving, thresholds=t, predicted_regime="bounded", expect=expect)
        assert (d.regime, d.verdict, d.causes) == ("feature learning", verdict, ["kernel moving"])
        assert "hard one-hot" not in d.message and "Logits bounded (+0.00" in d.message
        assert ("widen the layers" in d.message) == (expect == "lazy")
    lazy = diagnose(
        Signals(relative_change=0.02, linearization_error=0.01),
        thresholds=t,
        predicted_regime="bounded",
    )
    assert (lazy.regime, lazy.verdict, lazy.causes) == ("lazy", "lazy", [])
    drifting = diagnose(
        Signals(relative_change=0.2, linearization_error=0.01, slope=0.1),
        thresholds=t,
        predicted_regime="bounded",
    )
    assert drifting.verdict == "drifting"


def test_hard_labels_diverge_and_label_smoothing_does_not():
    """Separable blobs, full-batch SGD: hard labels make the logits grow ~log t."""
    x, y = blobs(30)
    causes = {}
    for smoothing in (0.0, 0.2):
        torch.manual_seed(0)
        model = mlp(width=32)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
        tracker = NTKTracker(x, y, optimizer=opt, loss=loss_fn, per_layer=False, log_base=2)
        tracker.start(model)
        for step in range(1, 513):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            if tracker.is_due(step):
                report = tracker.update(model, step)
        causes[smoothing] = report.causes
        expected = "diverging" if smoothing == 0 else "bounded"
        assert report.predicted_regime == expected
    assert "logits diverging" in causes[0.0]
    assert "logits diverging" not in causes[0.2]


@pytest.mark.slow
def test_plain_pytorch_loop_example_writes_tensorboard_logs(tmp_path):
    import importlib.util
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(__file__).resolve().parents[1] / "examples" / "plain_pytorch_loop.py"
    spec = importlib.util.spec_from_file_location("plain_pytorch_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trackers = example.main(["--logdir", str(tmp_path)])  # asserts its own verdicts
    assert [r.step for r in trackers[0.0].history][-1] == 512
    acc = EventAccumulator(str(tmp_path / "smoothing_0.0"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"ntk/relative_change", "ntk/lazy", "ntk/logit_norm"} <= set(tags["scalars"])
    assert "ntk/spectrum" in tags["histograms"] and "ntk/kernel" in tags["images"]
    assert "ntk/diagnosis/text_summary" in tags["tensors"]


def test_tracker_imports_no_lightning_and_each_namespace_imports_only_itself():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lightning_ntk import NTKTracker, NTKReport\n"
        "import lightning_ntk.monitor.loggers\n"
        "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules\n"
        "from lightning_ntk.lightning import NTKMonitor\n"
        "assert 'lightning.pytorch' in sys.modules and 'pytorch_lightning' not in sys.modules\n"
        "from lightning_ntk import NTKMonitor as Classic\n"
        "assert 'pytorch_lightning' in sys.modules and Classic is not NTKMonitor\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_linear_model_constant_kernel_but_diverging_logits():
    """A linear model's NTK never moves; with hard labels its logits still diverge.

    The verdict must name the logits alone (no "kernel moving"), and label smoothing
    must make it lazy.
    """
    g = torch.Generator().manual_seed(0)
    y = torch.arange(30) % 3
    x = torch.randn(3, 6, generator=g)[y] + torch.randn(30, 6, generator=g)  # separable
    reports = {}
    for smoothing in (0.0, 0.2):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
        tracker = NTKTracker(x, y, optimizer=opt, loss=loss_fn, log_base=2)
        tracker.start(model)
        for step in range(1, 513):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            if tracker.is_due(step):
                reports[smoothing] = tracker.update(model, step)
    hard, smooth = reports[0.0], reports[0.2]
    assert hard.relative_change == 0.0 and hard.linearization_error < 1e-5
    assert (hard.verdict, hard.causes) == ("broken", ["logits diverging"])
    assert "hard one-hot targets without weight decay" in hard.message
    assert "kernel" not in hard.message.split(":", 1)[1]
    assert (smooth.verdict, smooth.causes) == ("lazy", [])


def test_one_report_builds_one_functional_view_of_the_model(monkeypatch):
    from lightning_ntk.kernel import _functional

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    tracker = NTKTracker(x, y)
    tracker.start(model)
    built = []
    original = _functional.FunctionalModel.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(_functional.FunctionalModel, "__init__", counting_init)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    report = tracker.update(model, step=1)
    assert len(built) == 1
    assert report.relative_change > 0 and report.linearization_error >= 0
