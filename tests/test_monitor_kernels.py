"""The monitor's ``kernel`` setting: the kernel of the optimizer training uses."""

from __future__ import annotations

import copy
import importlib
import math
import warnings

import pytest
import torch
from torch import nn

from lightning_ntk import NTKTracker, empirical_ntk
from lightning_ntk.kernel.batch_statistics import BatchStatisticsModel, batch_jacobian
from lightning_ntk.metrics import relative_change
from lightning_ntk.monitor.report import NUMERIC_FIELDS
from tests._lightning_models import NAMESPACES, blobs, mlp, module_class, one_thread, trainer_kwargs  # noqa: F401


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, steps: int) -> None:
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _kernel_at(model: nn.Module, theta: dict, fn):
    """``fn()`` with ``model``'s parameters set to ``theta`` in place (restored after)."""
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta[n])
        try:
            return fn()
        finally:
            for n, p in model.named_parameters():
                p.copy_(current[n])


def _frozen_copy(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """An optimizer over the same parameters holding a copy of ``optimizer``'s state now."""
    frozen = type(optimizer)(model.parameters())
    frozen.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # else it shares the tensors
    return frozen


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _close(actual, expected, rtol=1e-4):
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def test_signgd_tracker_stores_the_signgd_theta0_and_kernels():
    x, y = blobs(8)
    torch.manual_seed(0)
    model = mlp()
    tracker = NTKTracker(x, y, kernel="signgd")
    tracker.start(model)
    _close(tracker.started_state.K0, empirical_ntk(model, x, kernel="signgd"))
    sgd = empirical_ntk(model, x)
    assert not torch.allclose(tracker.started_state.K0, sgd)  # not the NTK
    _steps(model, torch.optim.SGD(model.parameters(), lr=0.5), x, y, 3)
    report = tracker.update(model, 3)
    _close(tracker.last_kernel, empirical_ntk(model, x, kernel="signgd"))
    assert report.kernel == "signgd (set)"
    assert math.isfinite(report.relative_change) and math.isfinite(report.eig_max)


def test_optimizer_kernel_with_sgd_is_the_default_bit_for_bit():
    x, y = blobs(8)
    runs = []
    for kernel in ("sgd", "optimizer"):
        torch.manual_seed(0)
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        tracker = NTKTracker(x, y, optimizer=optimizer, kernel=kernel)
        tracker.start(model)
        for step in (2, 4):
            _steps(model, optimizer, x, y, 2)
            tracker.update(model, step)
        runs.append(tracker)
    default, chosen = runs
    assert torch.equal(default.started_state.K0, chosen.started_state.K0)
    assert torch.equal(default.last_kernel, chosen.last_kernel)
    for ours, theirs in zip(default.history, chosen.history, strict=True):
        for name in NUMERIC_FIELDS:
            assert _same(getattr(ours, name), getattr(theirs, name)), name
        assert ours.message == theirs.message
    assert default.history[-1].kernel == "sgd (set)"
    assert chosen.history[-1].kernel == "sgd (the kernel of the optimizer, SGD)"


@pytest.mark.parametrize("output", ["full", "trace"])
def test_adamw_freezes_the_preconditioner_of_the_first_report_with_state(output):
    x, y = blobs(8)
    torch.manual_seed(0)
    model = mlp()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    tracker = NTKTracker(x, y, optimizer=optimizer, kernel="optimizer", output=output)
    tracker.start(model)
    state = tracker.started_state
    assert state.kernel_kind == "adam" and state.K0 is None  # Adam has no state at θ0

    _steps(model, optimizer, x, y, 2)
    frozen = _frozen_copy(optimizer, model)  # the preconditioner of the report at step 2
    first = tracker.update(model, 2)
    expected0 = _kernel_at(
        model,
        theta0,
        lambda: empirical_ntk(model, x, output=output, kernel="adam", optimizer=frozen),
    )
    _close(state.K0, expected0)  # Θ0 at θ0, with the preconditioner read at step 2
    expected2 = empirical_ntk(model, x, output=output, kernel="adam", optimizer=optimizer)
    _close(tracker.last_kernel, expected2)
    assert first.relative_change == pytest.approx(
        float(relative_change(expected2, expected0)), rel=1e-3
    )
    assert "adam" in first.kernel and "AdamW" in first.kernel and "step 2" in first.kernel

    _steps(model, optimizer, x, y, 6)
    later = tracker.update(model, 8)
    with_frozen = empirical_ntk(model, x, output=output, kernel="adam", optimizer=frozen)
    with_current = empirical_ntk(model, x, output=output, kernel="adam", optimizer=optimizer)
    _close(tracker.last_kernel, with_frozen)
    assert not torch.allclose(with_frozen, with_current, rtol=1e-2)  # the state moved on
    assert later.relative_change == pytest.approx(
        float(relative_change(with_frozen, expected0)), rel=1e-3
    )

    restored = NTKTracker(x, y, optimizer=optimizer, kernel="optimizer", output=output)
    restored.load_state_dict(tracker.state_dict())
    torch.testing.assert_close(
        restored.started_state.preconditioner, tracker.started_state.preconditioner
    )
    assert restored.started_state.preconditioner_step == 2


def test_a_report_before_adams_first_step_has_no_kernel_values():
    x, y = blobs(8)
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters())
    tracker = NTKTracker(x, y, optimizer=optimizer, kernel="adam")
    tracker.start(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = tracker.update(model, 0)
    assert math.isnan(report.relative_change) and math.isnan(report.eig_max)
    assert math.isfinite(report.logit_norm)  # the rest of the report is measured
    assert "not read yet" in report.kernel


def test_adam_started_after_a_warm_up_reads_the_preconditioner_at_start():
    x, y = blobs(8)
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _steps(model, optimizer, x, y, 3)
    tracker = NTKTracker(x, y, optimizer=optimizer, kernel="adam")
    tracker.start(model, step=3)
    _close(tracker.started_state.K0, empirical_ntk(model, x, kernel="adam", optimizer=optimizer))
    report = tracker.update(model, 3)  # nothing moved: exactly no drift
    assert report.relative_change == 0.0
    assert "frozen at step 3" in report.kernel


def test_adam_kernel_of_a_model_normalising_with_batch_statistics():
    x, y = blobs(8)
    torch.manual_seed(0)
    model = mlp(bn_dropout=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _steps(model, optimizer, x, y, 1)
    tracker = NTKTracker(x, y, optimizer=optimizer, kernel="adam", dtype=torch.float64)
    tracker.start(model, step=1)
    fm = BatchStatisticsModel(model, dtype=torch.float64)
    J = batch_jacobian(fm, x.double())  # {name: (N, C, P_l)}
    state = optimizer.state
    parameters = dict(model.named_parameters())
    left = []
    for name in fm.names:
        group = optimizer.param_groups[0]
        step = float(state[parameters[name]]["step"])
        v_hat = state[parameters[name]]["exp_avg_sq"].double() / (1 - group["betas"][1] ** step)
        d = 1.0 / (v_hat.sqrt() + group["eps"])
        left.append(J[name] * d.reshape(-1))
    J_all = torch.cat([J[name] for name in fm.names], dim=-1).reshape(8 * 3, -1)
    JD = torch.cat(left, dim=-1).reshape(8 * 3, -1)
    expected = (JD @ J_all.T).reshape(8, 3, 8, 3).permute(0, 2, 1, 3)
    _close(tracker.started_state.K0, expected, rtol=1e-8)


class SignSGD(torch.optim.Optimizer):
    """``θ ← θ − lr · sign(g)``."""

    def __init__(self, params, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


@pytest.mark.parametrize(
    ("make", "kind", "words"),
    [
        (lambda p: SignSGD(p), "asymmetric_signgd", "SignSGD, a sign optimizer"),
        (lambda p: torch.optim.Adagrad(p), "sgd", "Adagrad has no kernel of its own"),
        (lambda p: None, "sgd", "without an optimizer"),
    ],
)
def test_optimizer_kernel_of_other_optimizers_says_which_and_why(make, kind, words):
    x, y = blobs(8)
    torch.manual_seed(0)
    model = mlp()
    tracker = NTKTracker(x, y, optimizer=make(model.parameters()), kernel="optimizer")
    tracker.start(model)
    _steps(model, torch.optim.SGD(model.parameters(), lr=0.5), x, y, 2)
    report = tracker.update(model, 2)
    assert tracker.started_state.kernel_kind == kind
    assert report.kernel.startswith(kind) and words in report.kernel
    _close(tracker.last_kernel, empirical_ntk(model, x, kernel=kind))
    assert math.isfinite(report.eig_max) and math.isfinite(report.target_alignment)


def test_asymmetric_kernel_spectrum_is_that_of_its_symmetric_part():
    from lightning_ntk.metrics import spectrum

    x, y = blobs(8)
    torch.manual_seed(0)
    model = mlp()
    tracker = NTKTracker(x, y, kernel="asymmetric_signgd")
    tracker.start(model)
    report = tracker.update(model, 0)
    K = empirical_ntk(model, x, kernel="asymmetric_signgd")
    assert not torch.allclose(K, K.permute(1, 0, 3, 2))
    expected = spectrum(0.5 * (K + K.permute(1, 0, 3, 2)))
    assert report.eig_max == pytest.approx(expected.eig_max, rel=1e-4)


def test_invalid_kernel_settings_raise_clear_errors():
    x, y = blobs(8)
    model = mlp()
    with pytest.raises(ValueError, match="`kernel` to be one of"):
        NTKTracker(x, y, kernel="lion")
    with pytest.raises(ValueError, match="kernel='adam' reads the preconditioner"):
        NTKTracker(x, y, kernel="adam").start(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        TypeError, match=r"torch\.optim\.Adam or AdamW for kernel='adam' but got SGD"
    ):
        NTKTracker(x, y, kernel="adam", optimizer=sgd).start(model)
    other = torch.optim.Adam(mlp().parameters())  # another model's parameters
    with pytest.raises(ValueError, match="not among the parameters of `optimizer`"):
        NTKTracker(x, y, kernel="adam", optimizer=other).start(model)


def test_state_keys_differ_by_kernel_and_the_default_key_is_unchanged():
    from lightning_ntk import NTKMonitor

    default, optimizer = NTKMonitor(), NTKMonitor(kernel="optimizer")
    assert default.state_key != optimizer.state_key
    assert "kernel" not in default.state_key and "optimizer" in optimizer.state_key


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_lightning_run_with_adamw_and_the_optimizer_kernel(namespace):
    pl = importlib.import_module(namespace)
    if namespace == "pytorch_lightning":
        from lightning_ntk import NTKMonitor
    else:
        from lightning_ntk.lightning import NTKMonitor

    class AdamWClassifier(module_class(namespace)):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)

    torch.manual_seed(0)
    monitor = NTKMonitor(n_probe=9, kernel="optimizer", every_n_steps=2, log_base=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=6)).fit(AdamWClassifier())
    ours = [w for w in caught if "lightning_ntk" in str(w.filename) or "NTK" in str(w.message)]
    assert ours == [], [str(w.message) for w in ours]
    assert [r.step for r in monitor.history] == [2, 4, 6]
    for report in monitor.history:
        assert "adam" in report.kernel and "AdamW" in report.kernel
        assert "frozen at step 2" in report.kernel
        for name in ("relative_change", "kernel_distance", "eig_max", "linearization_error"):
            assert math.isfinite(getattr(report, name)), name
    assert monitor.history[0].relative_change > 0


def test_tensorboard_diagnosis_names_the_kernel():
    from lightning_ntk.monitor.loggers import write_extras

    x, y = blobs(8)
    torch.manual_seed(0)
    model = mlp()
    tracker = NTKTracker(x, y, kernel="signgd")
    tracker.start(model)
    report = tracker.update(model, 1)
    texts = []

    class Writer:
        def add_text(self, tag, text, step):
            texts.append((tag, text))

        def add_histogram(self, *args):
            pass

        def add_image(self, *args, **kwargs):
            pass

    write_extras(Writer(), report)
    assert texts and "Kernel measured: signgd (set)." in texts[0][1]
