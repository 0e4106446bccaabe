"""The framework-free core used as a newcomer would: metrics, theory, testing, uncertainty.

Each test reproduces a wrong number or an unclear error met while using the public API
from a plain PyTorch script, and pins the behaviour the documentation promises.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ntk.metrics import (
    ArgmaxAgreement,
    ProbTV,
    kernel_distance,
    logit_norm,
    prob_tv,
    spectrum,
    target_alignment,
)
from lightning_ntk.metrics.functional import softmax_form
from lightning_ntk.testing import (
    NTKMLP,
    assert_breaks_down,
    fit_loglog_slope,
    make_classification_data,
    width_sweep,
)
from lightning_ntk.theory import kernel_flow, kernel_solution, predict_regime
from lightning_ntk.theory._targets import infer_task
from lightning_ntk.uncertainty import deep_ensemble, gp_laplace_classifier, kernel_ensemble

pytest_plugins = ["pytester"]

# ---------------------------------------------------------------------- metrics


def _bernoulli_tv(z: torch.Tensor, z_lin: torch.Tensor) -> torch.Tensor:
    """Mean ``|sigmoid(z) − sigmoid(z_lin)|`` over every output: the sigmoid models' TV."""
    return (torch.sigmoid(z.double()) - torch.sigmoid(z_lin.double())).abs().mean()


def test_prob_tv_class_of_a_one_logit_model_is_the_bernoulli_distance():
    # softmax over a single column is 1 whatever the logit: the class read 0 before
    z = torch.tensor([[2.0], [-1.0], [0.5], [3.0]])
    z_lin = torch.tensor([[-2.0], [-1.5], [0.5], [1.0]])
    metric = ProbTV()
    metric.update(z[:2], z_lin[:2])
    metric.update(z[2:], z_lin[2:])
    expected = _bernoulli_tv(z, z_lin)
    assert float(expected) > 0.1
    torch.testing.assert_close(metric.compute(), expected)
    # and the same through the softmax form the monitor uses
    torch.testing.assert_close(metric.compute(), prob_tv(softmax_form(z), softmax_form(z_lin)))


def test_argmax_agreement_class_of_a_one_logit_model_compares_the_signs():
    z = torch.tensor([[2.0], [-1.0], [0.5], [3.0]])
    z_lin = torch.tensor([[-2.0], [-1.5], [-0.5], [1.0]])  # two signs flipped
    metric = ArgmaxAgreement()
    metric.update(z, z_lin)
    assert float(metric.compute()) == 0.5
    binary = ArgmaxAgreement(task="binary")
    binary.update(z[:, 0], z_lin[:, 0])  # (N,) logits of one output
    assert float(binary.compute()) == 0.5


def test_multilabel_prob_tv_class_averages_the_outputs_bernoulli_distances():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=generator)
    z_lin = z + torch.randn(6, 4, generator=generator)
    metric = ProbTV(task="multilabel")
    metric.update(z, z_lin)
    torch.testing.assert_close(metric.compute(), _bernoulli_tv(z, z_lin))
    multiclass = ProbTV()  # several outputs default to a softmax over them
    multiclass.update(z, z_lin)
    torch.testing.assert_close(multiclass.compute(), prob_tv(z, z_lin).double())


def test_prob_tv_class_checks_its_arguments():
    with pytest.raises(ValueError, match="`task`"):
        ProbTV(task="sigmoid")
    with pytest.raises(ValueError, match="`logits_lin` to have the shape of `logits`"):
        ProbTV().update(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(TypeError, match=r"`logits_lin` to be a torch\.Tensor"):
        ArgmaxAgreement().update(torch.zeros(4, 3), [0.0] * 4)


def test_kernel_distance_of_proportional_kernels_is_never_negative():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        A = torch.randn(12, 12, generator=generator)
        K = A @ A.T
        for scale in (1.0, 2.0, 0.3, 7.0):
            distance = kernel_distance(scale * K, K)
            assert 0.0 <= float(distance) < 1e-6, (scale, float(distance))


def test_spectrum_of_a_kernel_with_nan_says_so():
    K = torch.eye(4)
    K[1, 2] = K[2, 1] = float("nan")
    with pytest.raises(ValueError, match="2 of its 16 entries are NaN or inf"):
        spectrum(K)


def test_logit_norm_of_integer_logits_names_the_dtype():
    with pytest.raises(TypeError, match=r"`logits` to be a floating tensor.*torch\.int64"):
        logit_norm(torch.tensor([[1, 2, 3]]))


def test_target_alignment_with_float_binary_targets_says_how_to_pass_them():
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=generator)
    K = A @ A.T
    t = torch.tensor([0.0, 1.0, 1.0, 0.0])
    with pytest.raises(
        ValueError, match=r"one\s+sigmoid output as a column \(`targets\[:, None\]`\)"
    ):
        target_alignment(K, t)
    torch.testing.assert_close(target_alignment(K, t[:, None]), target_alignment(K, t.long()))


# ---------------------------------------------------------------------- theory


def test_soft_sigmoid_targets_are_not_called_multi_hot():
    soft = torch.tensor([[0.2, 0.7, 0.4], [0.9, 0.1, 0.3]])
    task, why = infer_task(soft, 3)
    assert task == "multilabel"
    assert "0/1" not in why and "multi-hot" not in why, why
    task, why = infer_task(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]), 3)
    assert (task, "multi-hot" in why) == ("multilabel", True)


def test_a_diverging_prediction_names_the_defaults_it_assumed():
    reason = predict_regime().reason
    assert "assumed, as none was given" in reason
    for given in ("`weight_decay` or `optimizer`", "`label_smoothing` or `loss`", "`targets`"):
        assert given in reason
    labels = torch.tensor([0, 1, 2])
    told = predict_regime(weight_decay=0.0, label_smoothing=0.0, targets=labels)
    assert told.regime == "diverging" and "assumed" not in told.reason
    partly = predict_regime(optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(2, 2))], lr=1.0))
    assert "`targets`" in partly.reason and "`weight_decay`" not in partly.reason


def _problem(C: int):
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    ntk = (A @ A.T)[:, :, None, None] * torch.eye(C, dtype=torch.float64)  # (6, 6, C, C)
    logits0 = torch.randn(6, C, generator=generator, dtype=torch.float64)
    return ntk, logits0


def test_kernel_solution_of_a_one_logit_model_says_it_needs_softmax_logits():
    ntk, logits0 = _problem(1)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    for targets in (labels, labels.double()):
        with pytest.raises(ValueError, match=r"C >= 2 softmax logits in `logits0`.*one-logit"):
            kernel_solution(ntk, logits0, targets, weight_decay=0.1)
        with pytest.raises(ValueError, match=r"C >= 2 softmax logits in `logits0`"):
            kernel_flow(ntk, logits0, targets, lr=0.1, steps=2)


def test_kernel_solution_names_the_logits_a_label_does_not_fit():
    ntk, logits0 = _problem(3)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\) for the 3 logits of `logits0`"):
        kernel_solution(ntk, logits0, torch.tensor([0, 1, 2, 4, 0, 1]), weight_decay=0.1)
    with pytest.raises(ValueError, match="soft `targets` with one column per logit"):
        kernel_solution(ntk, logits0, torch.full((6, 4), 0.25), weight_decay=0.1)


# ---------------------------------------------------------------------- uncertainty


def test_ensembles_refuse_labels_the_model_has_no_logit_for_before_training():
    x, x_test = torch.randn(10, 4), torch.randn(3, 4)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"in \[0, 3\) for the 3 logits of the output of `mo"):
        deep_ensemble(lambda: NTKMLP(4, 16, 1, 3), x, labels, x_test, steps=1, lr=0.1)
    with pytest.raises(ValueError, match=r"in \[0, 3\) for the 3 logits of the output of `mo"):
        kernel_ensemble(x, labels, x_test, model=NTKMLP(4, 16, 1, 3), weight_decay=0.1)
    binary = (labels > 2).long()
    with pytest.raises(ValueError, match="one-logit"):
        deep_ensemble(lambda: NTKMLP(4, 16, 1, 1), x, binary, x_test, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="one-logit"):
        kernel_ensemble(x, binary, x_test, model=NTKMLP(4, 16, 1, 1), weight_decay=0.1)


def test_gp_classifier_refuses_an_empty_training_set():
    with pytest.raises(ValueError, match=r"`kernel` to be of shape \(N, N\) with N >= 1"):
        gp_laplace_classifier(
            torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(2, 0), torch.ones(2)
        )


# ---------------------------------------------------------------------- testing


def test_width_sweep_with_data_and_widths_swapped_says_the_order():
    data = make_classification_data(8, 4, 3)
    with pytest.raises(TypeError, match=r"takes \(model_factory, widths, data\)"):
        width_sweep(lambda w: NTKMLP(4, w, 1, 3), data, (16, 32), steps=1, lr=0.1)
    # data that is simply wrong gets no word about the order
    with pytest.raises(TypeError, match=r"pair of int and int\.$"):
        width_sweep(lambda w: NTKMLP(4, w, 1, 3), (16, 32), (1, 2), steps=1, lr=0.1)


def test_breaks_down_fails_for_a_set_up_whose_logits_stay_bounded():
    # 40 steps of label smoothing 0.2: the logits still grow towards the finite optimum,
    # fast enough to pass the default slope check; the assertion passed before
    data = make_classification_data(16, 8, 4)
    with pytest.raises(AssertionError, match=r"\[FAILED\] degenerate set-up: label_smoothing=0.2"):
        assert_breaks_down(
            lambda w: NTKMLP(8, w, 1, 4), data, width=64, steps=40, lr=1.0,
            label_smoothing=0.2, seeds=(0,),
        )  # fmt: skip
    x, y = data
    soft = torch.nn.functional.one_hot(y, 4).double() * 0.8 + 0.05
    with pytest.raises(AssertionError, match=r"soft targets \(every class at probability"):
        assert_breaks_down(
            lambda w: NTKMLP(8, w, 1, 4), (x, soft), width=16, steps=2, lr=1.0, seeds=(0,),
            min_logit_slope=-100.0,
        )  # fmt: skip


def test_width_sweep_names_the_labels_the_model_has_no_logit_for():
    data = make_classification_data(8, 4, 3)  # labels 0, 1, 2
    with pytest.raises(ValueError, match=r"labels of `data` in \[0, 2\).*`model_factory\(8\)`"):
        width_sweep(lambda w: NTKMLP(4, w, 1, 2), (8,), data, steps=1, lr=0.1, seeds=(0,))


def test_a_slope_of_one_seed_says_it_has_no_interval():
    fit = fit_loglog_slope([16, 64, 256], [[1.0, 0.5, 0.25]])
    assert fit.describe() == "-0.500 (1 seed, no confidence interval)"
    assert "nan" not in fit.describe()


def test_a_bad_ini_value_stops_the_run_once_at_the_start(pytester):
    pytester.makeini("[pytest]\nntk_seeds = a\n")
    pytester.makepyfile(
        test_user="def test_a(ntk_seeds):\n    pass\n\n\ndef test_b(ntk_widths):\n    pass\n"
    )
    # -q: no report header, which used to be the only place the value was checked early
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # not one error per test at setup
    result.stderr.fnmatch_lines(["*ini option ntk_seeds*comma-separated list of ints*'a'*"])


# ---------------------------------------------------------------------- command line


def test_report_with_another_prefix_names_the_prefix_the_logs_hold(tmp_path):
    from lightning_ntk.cli._report import NoNTKDataError, load_runs

    run = tmp_path / "run" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(
        "step,cheap/relative_change,cheap/layer/fc/relative_change,train/loss\n"
        "4,0.1,0.2,\n16,0.2,0.3,\n16,,,1.5\n",
        encoding="utf-8",
    )
    with pytest.raises(NoNTKDataError, match="under cheap/: pass --prefix cheap/"):
        load_runs(tmp_path)
    assert [r.last("ntk/relative_change") for r in load_runs(tmp_path, prefix="cheap/")] == [0.2]
    (run / "metrics.csv").write_text("step,train/loss\n4,1.5\n", encoding="utf-8")
    with pytest.raises(NoNTKDataError, match="log them with NTKMonitor"):
        load_runs(tmp_path)


def test_report_figure_labels_the_thresholds_as_the_verdict_reads_them(tmp_path):
    # kernel drift past 0.5 is an alarm only with expect="lazy": a line labelled "break"
    # beside a run reported as drifting contradicted the summary
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from lightning_ntk.cli._report import PANELS, Run, _draw_thresholds, _thresholds

    run = Run(label="a", path=tmp_path)
    run.scalars["ntk/logit_norm"] = ([128, 256, 512], [1.0, 2.0, 3.0])
    thresholds = _thresholds([run])
    labels = {}
    for tag, _, signal in PANELS:
        figure, ax = plt.subplots()
        labels[signal] = [
            h.get_label() for h in _draw_thresholds(ax, signal, thresholds, [run], tag)
        ]
        plt.close(figure)
    assert labels["relative_change"] == ["lazy below 0.1", "alarm with expect='lazy' 0.5"]
    assert labels["linearization_error"] == ["lazy below 0.2", "alarm with expect='lazy' 0.5"]
    assert labels["logit_slope"] == [
        "growing: +0.5 per doubling of steps",
        "alarm, logits diverging: +0.8 per doubling of steps",
    ]
    assert [ylabel for _, ylabel, _ in PANELS][-1] == "logit norm (margin units)"


def test_linearization_distances_read_one_logit_as_a_sigmoid_output():
    """``prob_tv`` / ``argmax_agreement`` of ``(N, 1)`` logits: 0 and 1 whatever they were."""
    from lightning_ntk.linearization import argmax_agreement, prob_tv

    z = torch.tensor([[2.0], [-1.0], [0.5]])
    z_lin = torch.tensor([[-2.0], [1.0], [0.7]])
    expected = (torch.sigmoid(z.double()) - torch.sigmoid(z_lin.double())).abs().mean()
    torch.testing.assert_close(prob_tv(z, z_lin), expected)
    torch.testing.assert_close(argmax_agreement(z, z_lin), torch.tensor(1 / 3))
    # several sigmoid outputs: per output; multiclass logits: unchanged
    torch.testing.assert_close(
        prob_tv(z.repeat(1, 2), z_lin.repeat(1, 2), task="multilabel"), expected
    )
    f, f_lin = torch.randn(4, 3), torch.randn(4, 3)
    p, q = torch.softmax(f.double(), -1), torch.softmax(f_lin.double(), -1)
    torch.testing.assert_close(prob_tv(f, f_lin), 0.5 * (p - q).abs().sum(-1).mean())
