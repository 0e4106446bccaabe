"""The fine-tuning kernel benchmark: its quick run, its solvers and its reference recipe."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, jacrev

from lightning_ntk import empirical_ntk

# PyTorch's forward-mode decompositions warn as the recipe's torch.func.jvp loads them
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: avoid oversubscribing a shared CPU
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_finetune_kernels", BENCHMARKS / "bench_finetune_kernels.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_finetune_kernels", None)
        sys.path.remove(str(BENCHMARKS))
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(bench):
    """A small random classifier, 4 training and 5 held-out sequences with labels."""
    torch.manual_seed(0)
    model = bench.Classifier(width=8).eval()
    generator = torch.Generator().manual_seed(3)
    x, y = bench.make_data(4, "least", generator)
    x_test, _ = bench.make_data(5, "least", generator)
    return model, x, y, x_test


def test_quick_run_follows_small_step_sgd(bench):
    """With a small learning rate the SGD kernel's flow predicts the SGD run's logit change."""
    result = bench.validation(bench.QUICK)
    (by_lr,) = result["lazy"]
    lazy, step = by_lr[bench.QUICK.lr[0]], bench.QUICK.steps
    assert lazy[step]["logit_change"] > 0.05  # the run moved the held-out logits
    assert lazy[step]["relative_error"] < 0.25
    assert lazy[step]["agreement"] >= 0.9
    # one step: the linearization's error falls with the learning rate
    one_step = [by_lr[lr][1]["relative_error"] for lr in sorted(by_lr)]
    assert one_step[0] < one_step[-1] and one_step[0] < 0.01
    for values in [*result["accuracy"].values(), *result["agreement"].values()]:
        assert all(0.0 <= v <= 1.0 for v in values)
    table = bench.validation_table(result)
    assert "| asymmetric_signgd | ce |" in table and "| sgd | regression |" in table


def test_lazy_regime_moves_the_logits_as_much_with_a_far_smaller_error(bench):
    """The lazy scaling keeps each run's logit change and shrinks both lazy checks' errors."""
    rich = replace(bench.QUICK, lr=(0.03, 1e-3))
    lazy = bench.lazy(rich, steps=rich.steps)
    assert lazy.alpha > 1 and lazy.lr == (0.03 / lazy.alpha**2, 1e-3 / lazy.alpha)
    step = rich.steps
    checks = {}
    for name, settings in (("rich", rich), ("lazy", lazy)):
        result = bench.validation(settings)
        checks[name] = {
            "sgd": result["lazy"][0][settings.lr[0]][step],
            "adam": result["adam_lazy"][0][step],
        }
    for optimizer in ("sgd", "adam"):
        before, after = checks["rich"][optimizer], checks["lazy"][optimizer]
        assert 0.5 < after["logit_change"] / before["logit_change"] < 2, optimizer
        assert before["relative_error"] > 0.1, optimizer  # the rich run is not lazy ...
        assert after["relative_error"] < before["relative_error"] / 10, optimizer  # ... this is


def test_lazy_scaling_keeps_the_logits_and_scales_the_kernels(bench, tiny):
    """``f_α(θ0) = f(θ0)``; the SGD kernel ``α²`` times, the asymmetric SignGD kernel ``α``."""
    model, x, _, x_test = tiny
    scaled = bench.LazyScaled(model, 10.0)
    torch.testing.assert_close(scaled(x_test), model(x_test))
    assert [n for n, _ in scaled.named_parameters()] == [
        f"model.{n}" for n, _ in model.named_parameters()
    ]
    for kind, factor in (("sgd", 100.0), ("asymmetric_signgd", 10.0)):
        K = empirical_ntk(model, x_test, x, kernel=kind, dtype=torch.float64)
        K_scaled = empirical_ntk(scaled, x_test, x, kernel=kind, dtype=torch.float64)
        torch.testing.assert_close(K_scaled, factor * K, rtol=1e-4, atol=1e-6)


def test_sgd_on_the_linearized_model_is_the_kernel_flow(bench, tiny):
    """The linearized-model runs of the Adam check, with SGD: exactly the SGD kernel's flow."""
    model, x, y, x_test = tiny
    lr, record = 0.05, (1, 5)
    linear = bench.finetune_linearized(model, x, y, "sgd", lr, 5, x_test, record)
    _, flows = bench.lazy_check(model, x, y, x_test, {lr: linear})
    for step in record:
        torch.testing.assert_close(linear[step], flows[lr][step], rtol=1e-4, atol=1e-5)


def _jacobian(model, x):
    """``J(x)`` as ``(N·C, P)``, sample-major, float64, from ``jacrev``."""
    model = model.double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    rows = x.shape[0] * J["head.bias"].shape[1]
    return torch.cat([j.reshape(rows, -1) for j in J.values()], dim=1)


@pytest.mark.parametrize("kind", ["sgd", "asymmetric_signgd"])
def test_regression_solver_matches_the_jacobian_form(bench, tiny, kind):
    """``f0(x) + J(x) R(X)ᵀ (J(X) R(X)ᵀ)⁻¹ (Y − f0(X))`` from Jacobians; ``R = J`` or ``sign J``."""
    model, x, y, x_test = tiny
    predicted = bench.kernel_predictions(model, x, y, x_test, kind)["regression"]
    model64 = bench.Classifier(width=8)
    model64.load_state_dict(model.state_dict())
    J, J_test = _jacobian(model64, x), _jacobian(model64, x_test)
    # the sign with entries within round-off of zero as zero (attention key biases)
    R = (
        J
        if kind == "sgd"
        else torch.where(J.abs() > 1e-12 * J.abs().amax(1, keepdim=True), J.sign(), 0.0)
    )
    residual = (torch.nn.functional.one_hot(y, 3).double() - model64(x).detach()).reshape(-1)
    expected = model64(x_test).detach() + (
        J_test @ R.T @ torch.linalg.solve(J @ R.T, residual)
    ).reshape(-1, 3)
    torch.testing.assert_close(predicted, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["sgd", "signgd", "asymmetric_signgd"])
def test_reference_recipe_gives_the_package_kernel(bench, tiny, kind):
    model, x, _, x_test = tiny
    K = empirical_ntk(model, x_test, x, kernel=kind)
    recipe = bench.recipe_ntk(model, x_test, x, kind, round_off_zero=True)
    assert recipe.shape == K.shape == (5, 4, 3, 3)
    assert bench.relative_difference(K, recipe) < 1e-5
