"""Assertions, slope fits and width sweeps of `lightning_ntk.testing`."""

import math

import pytest
import torch
from torch import nn

from lightning_ntk.testing import (
    NTKMLP,
    assert_breaks_down,
    assert_converges_to_analytic,
    assert_lazy_scaling,
    assert_lazy_training,
    assert_ntk_close,
    fit_loglog_slope,
    make_classification_data,
    width_sweep,
)

WIDTHS = (32, 128, 512)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These networks are tiny: one thread avoids oversubscribing a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return make_classification_data(16, 8, 4, seed=0)


def mlp(width, depth=1, activation="relu"):
    return NTKMLP(8, width, depth, 4, activation=activation, weight_std=math.sqrt(2), bias_std=0.1)


# ------------------------------------------------------------------ assert_ntk_close


def test_assert_ntk_close_passes_within_tolerance():
    K = torch.rand(4, 4, dtype=torch.float64) + 1
    result = assert_ntk_close(K * (1 + 1e-7), K, rtol=1e-6)
    assert result.passed and result.num_failed == 0 and result.num_entries == 16
    assert result.relative_error == pytest.approx(1e-7, rel=1e-3)


def test_assert_ntk_close_reports_the_worst_entries():
    K_ref = torch.ones(4, 4, dtype=torch.float64)
    K = K_ref.clone()
    K[1, 2] = 1.5
    K[3, 0] = 0.9
    with pytest.raises(AssertionError) as info:
        assert_ntk_close(K, K_ref, rtol=0.01, atol=0.0)
    report = str(info.value)
    assert "2 of 16 entries" in report
    assert "rtol=0.01, atol=0" in report
    lines = report.splitlines()
    worst = next(i for i, line in enumerate(lines) if line.startswith("worst entries"))
    assert lines[worst + 2].split()[:6] == ["(1,", "2)", "1.5", "1", "1.5000", "0.5"]
    assert lines[worst + 3].split()[:2] == ["(3,", "0)"]


def test_assert_ntk_close_fails_on_nan_and_shape():
    K = torch.ones(2, 3, 4, 4)
    bad = K.clone()
    bad[0, 1, 2, 3] = math.nan
    with pytest.raises(AssertionError, match=r"1 of 96 entries"):
        assert_ntk_close(bad, K)
    with pytest.raises(AssertionError, match=r"shapes differ.*\(2, 3\)"):
        assert_ntk_close(K[:, :, 0, 0], K[:, :2, 0, 0])


def test_assert_ntk_close_rejects_bad_arguments():
    K = torch.ones(2, 2)
    with pytest.raises(TypeError, match="`K_ref`"):
        assert_ntk_close(K, [[1, 1], [1, 1]])
    with pytest.raises(ValueError, match="`rtol`"):
        assert_ntk_close(K, K, rtol=-1)


# ------------------------------------------------------------------ slopes and data


def test_fit_loglog_slope_recovers_power_laws():
    x = [10, 100, 1000]
    rows = [[3 * v**-0.5 for v in x], [2 * v**-0.5 for v in x], [5 * v**-0.5 for v in x]]
    fit = fit_loglog_slope(x, rows)
    assert fit.slope == pytest.approx(-0.5)
    assert fit.seed_slopes == pytest.approx((-0.5, -0.5, -0.5))
    assert fit.ci_low == pytest.approx(-0.5) and fit.ci_high == pytest.approx(-0.5)
    spread = fit_loglog_slope(x, [[v**-0.4 for v in x], [v**-0.6 for v in x]])
    # mean -0.5, sd 0.1414, two seeds: t_{0.975,1} = 12.706, half width 12.706 * 0.1
    assert spread.seed_mean == pytest.approx(-0.5)
    assert spread.ci_high - spread.ci_low == pytest.approx(2 * 12.706 * 0.1, rel=1e-4)
    assert "95% CI" in spread.describe()
    assert math.isnan(fit_loglog_slope([5], [[1.0]]).slope)
    assert math.isnan(fit_loglog_slope(x, [[1.0, 0.0, 1.0]]).slope)
    with pytest.raises(ValueError, match="`values_per_seed`"):
        fit_loglog_slope(x, [[1.0, 2.0]])


def test_make_classification_data_is_seeded_and_balanced():
    state = torch.random.get_rng_state()
    x, y = make_classification_data(12, 5, 3, seed=4, dtype=torch.float64)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert x.shape == (12, 5) and x.dtype == torch.float64 and y.shape == (12,)
    assert torch.bincount(y).tolist() == [4, 4, 4]
    x2, y2 = make_classification_data(12, 5, 3, seed=4, dtype=torch.float64)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="`num_examples`"):
        make_classification_data(2, 5, 3)
    with pytest.raises(ValueError, match="`num_classes`"):
        make_classification_data(8, 5, 1)


# ------------------------------------------------------------------ convergence to the limit


def test_assert_converges_to_analytic_passes_for_ntk_mlp():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    result = assert_converges_to_analytic(lambda w: mlp(w), [64, 256, 1024], x, seeds=(0, 1, 2))
    assert result.passed and len(result.errors) == 3 and len(result.errors[0]) == 3
    assert result.mean_errors[2] < result.mean_errors[0]
    assert "fitted slope" in result.report()


def test_assert_converges_to_analytic_fails_against_a_wrong_limit():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    wrong = 1.3 * mlp(1).analytic_ntk(x)  # the error plateaus at 30%: slope ≈ 0
    with pytest.raises(AssertionError) as info:
        assert_converges_to_analytic(lambda w: mlp(w), [64, 256], x, wrong, seeds=(0, 1))
    report = str(info.value)
    assert "outside -0.500 ± 0.250" in report
    assert "fitted slope of log(error) vs log(width)" in report
    assert "    64" in report and "   256" in report


def test_assert_converges_to_analytic_needs_a_limit_for_other_models():
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="`K_inf`"):
        assert_converges_to_analytic(lambda w: nn.Linear(8, 2), [4, 8], x)
    with pytest.raises(ValueError, match="`widths`"):
        assert_converges_to_analytic(lambda w: mlp(w), [64, 64], x)


# ------------------------------------------------------------------ width sweeps


def test_linear_network_has_a_constant_kernel_and_no_linearization_error(data):
    # A network linear in its parameters (depth 0) has a parameter-independent kernel.
    result = width_sweep(
        lambda w: mlp(w, depth=0), [8], data, steps=20, lr=1.0, seeds=(0,), kernel_output="full"
    )
    assert result.values["relative_change"] == ((0.0,),)
    assert result.values["linearization_error"][0][0] < 1e-5
    assert abs(result.mean["logit_growth"][0] - 1) > 0.01  # the function did move


def test_width_sweep_result_layout_and_determinism(data):
    state = torch.random.get_rng_state()
    kw = {"steps": 12, "lr": 1.0, "seeds": (3, 4), "num_checkpoints": 4}
    result = width_sweep(lambda w: mlp(w), [16, 64], data, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert result.widths == (16, 64) and result.seeds == (3, 4)
    assert result.checkpoints == (1, 2, 5, 12)
    assert len(result.logit_norms) == 2 and len(result.logit_norms[0][1]) == 4
    for metric in ("relative_change", "linearization_error", "logit_growth"):
        assert len(result.values[metric]) == 2 and len(result.values[metric][0]) == 2
        assert result.mean[metric][0] == pytest.approx(sum(result.values[metric][0]) / 2)
        assert math.isfinite(result.slopes[metric].slope)
    again = width_sweep(lambda w: mlp(w), [16, 64], data, **kw)
    assert again.values == result.values and again.logit_norms == result.logit_norms
    assert "width sweep (steps=12" in result.report()


def test_width_sweep_other_losses_targets_and_batches(data):
    x, _ = data
    soft = torch.softmax(torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    for kw in (
        {"loss": "mse", "lr": 0.1},
        {"batch_size": 4},
        {"decay_to": "init", "weight_decay": 0.05},
        {"label_smoothing": 0.1, "loss": "mse", "lr": 0.1},
    ):
        kw = {"lr": 1.0, **kw}
        result = width_sweep(lambda w: mlp(w), [32], (x, soft), steps=8, seeds=(0,), **kw)
        assert math.isfinite(result.mean["relative_change"][0]), kw
        assert result.final_loss[0][0] > 0


def test_width_sweep_learning_rate_per_width(data):
    # Standard parameterization: the kernel grows like the width, so lr ∝ 1/width.
    def standard(width):
        return NTKMLP(8, width, 1, 4, parameterization="standard", weight_std=math.sqrt(2))

    result = width_sweep(standard, [32, 512], data, steps=30, lr=lambda w: 32.0 / w, seeds=(0,))
    assert "lr=lr(width)" in result.report()
    assert result.mean["relative_change"][1] < result.mean["relative_change"][0]
    with pytest.raises(ValueError, match=r"`lr\(width\)`.*width 32"):
        width_sweep(standard, [32], data, steps=2, lr=lambda w: -1.0, seeds=(0,))


def test_width_sweep_reports_divergence(data):
    result = width_sweep(lambda w: mlp(w), [32], data, steps=30, lr=50.0, loss="mse", seeds=(0,))
    assert result.diverged_at[0][0] is not None
    assert math.isnan(result.mean["relative_change"][0])
    assert f"diverged at step {result.diverged_at[0][0]}" in result.report()
    with pytest.raises(AssertionError, match="diverged at step"):
        assert_lazy_training(
            lambda w: mlp(w), data, width=32, steps=30, lr=50.0, loss="mse", seeds=(0,)
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps": 0}, ValueError, "`steps`"),
        ({"lr": -1.0}, ValueError, "`lr`"),
        ({"loss": "hinge"}, ValueError, "`loss`"),
        ({"label_smoothing": 1.0}, ValueError, "`label_smoothing`"),
        ({"decay_to": "one"}, ValueError, "`decay_to`"),
        ({"weight_decay": -0.1}, ValueError, "`weight_decay`"),
        ({"batch_size": 0}, ValueError, "`batch_size`"),
        ({"seeds": ()}, ValueError, "`seeds`"),
        ({"probe": torch.zeros(3, 5)}, ValueError, "`probe`"),
        ({"num_checkpoints": 1}, ValueError, "`num_checkpoints`"),
        ({"kernel_output": "dense"}, ValueError, "`output`"),
    ],
)
def test_width_sweep_rejects_bad_arguments(data, kwargs, error, match):
    kw = {"steps": 5, "lr": 1.0, **kwargs}
    with pytest.raises(error, match=match):
        width_sweep(lambda w: mlp(w), [8], data, **kw)


def test_width_sweep_rejects_bad_models_and_data(data):
    x, y = data
    with pytest.raises(ValueError, match="`widths`"):
        width_sweep(lambda w: mlp(w), [0], data, steps=1, lr=1.0)
    with pytest.raises(ValueError, match="`data`"):
        width_sweep(lambda w: mlp(w), [8], (x, y[:3]), steps=1, lr=1.0)
    with pytest.raises(TypeError, match="`data`"):
        width_sweep(lambda w: mlp(w), [8], x, steps=1, lr=1.0)
    with pytest.raises(TypeError, match="`model_factory`"):
        width_sweep(lambda w: "not a model", [8], data, steps=1, lr=1.0)


# ------------------------------------------------------------------ the regimes (paper)


def test_label_smoothing_is_lazy_and_scales_with_width(data):
    # Non-degenerate targets: the logits settle and the kernel drift shrinks with width
    # (measured slope about -0.55 here; the kernel regime predicts -1/2).
    result = assert_lazy_scaling(
        lambda w: mlp(w), data, widths=WIDTHS, steps=50, lr=2.0, label_smoothing=0.2,
        seeds=(0, 1), max_slope=-0.25,
    )  # fmt: skip
    assert all(abs(s) < 0.25 for s in result.mean_logit_step_slope)
    lazy = assert_lazy_training(
        lambda w: mlp(w), data, width=512, steps=50, lr=2.0, label_smoothing=0.2, seeds=(0,),
        max_relative_change=0.1, max_linearization_error=0.2,
    )  # fmt: skip
    assert lazy.passed and lazy.mean["relative_change"][0] < 0.1


def test_lazy_training_fails_at_small_width_with_a_report(data):
    with pytest.raises(AssertionError) as info:
        assert_lazy_training(
            lambda w: mlp(w), data, width=32, steps=50, lr=2.0, seeds=(0,),
            max_relative_change=0.05,
        )  # fmt: skip
    report = str(info.value)
    assert "[FAILED] width 32: relative_change =" in report and "<= 0.05" in report
    assert "rel. change" in report


def test_lazy_scaling_fails_when_the_kernel_does_not_settle(data):
    # Plain weight decay towards 0 shrinks the unit-variance NTK-parameterized weights at
    # every width: the kernel moves as much at width 512 as at width 32.
    with pytest.raises(AssertionError, match=r"\[FAILED\] slope of relative_change vs width"):
        assert_lazy_scaling(
            lambda w: mlp(w), data, widths=(32, 512), steps=50, lr=2.0, weight_decay=0.01,
            seeds=(0,),
        )  # fmt: skip


def test_hard_labels_without_regularization_break_down(data):
    # Hard one-hot targets, λ = 0: centered logits grow like log(step) at every width
    # (measured slope ≈ 1 here); with label smoothing the slope is ≈ 0.
    result = assert_breaks_down(
        lambda w: mlp(w), data, width=[32, 512], steps=50, lr=2.0, seeds=(0, 1),
        min_logit_slope=0.5, min_logit_growth=1.2,
    )  # fmt: skip
    assert all(s > 0.5 for s in result.mean_logit_step_slope)
    with pytest.raises(AssertionError) as info:
        assert_breaks_down(
            lambda w: mlp(w), data, width=128, steps=50, lr=2.0, label_smoothing=0.2,
            seeds=(0,), min_logit_slope=0.5,
        )  # fmt: skip
    assert "[FAILED] width 128: d logit_norm / d ln(step) =" in str(info.value)


def test_decay_towards_init_keeps_the_logits_bounded(data):
    result = width_sweep(
        lambda w: mlp(w), [128], data, steps=50, lr=2.0, weight_decay=0.05, decay_to="init",
        seeds=(0,),
    )  # fmt: skip
    assert abs(result.mean_logit_step_slope[0]) < 0.25
    assert result.mean["relative_change"][0] < 0.1
