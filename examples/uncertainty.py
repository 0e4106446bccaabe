"""Uncertainty over random initialisation: kernel prediction vs. real ensembles vs. a GP.

Under the lazy conditions (here label smoothing, or L2 regularisation towards the
initialisation) a trained network is an explicit function of its initial logits, so the
randomness of the initialisation induces a distribution over trained predictors. This
script, on a small subset of scikit-learn's bundled digits (offline, a few seconds):

1. trains small deep ensembles of NTK-parameterized MLPs at two widths;
2. predicts the same ensemble from the infinite-width kernels (``kernel_ensemble``:
   NNGP draws of the initial logits pushed through the NTK dynamics);
3. fits a Laplace-approximated GP classifier with the NNGP kernel as a Bayesian reference;

and prints accuracy, NLL, calibration error (ECE) and the distance between each predictor
and the deep ensemble. It checks itself: each trained network is closer to the kernel
prediction from its own initialisation at the larger width. Run::

    python examples/uncertainty.py
"""

from __future__ import annotations

import math

import torch
from sklearn.datasets import load_digits
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_ntk.testing import NTKMLP, analytic_nngp, analytic_ntk
from lightning_ntk.uncertainty import (
    deep_ensemble,
    gp_laplace_classifier,
    kernel_ensemble,
    kernel_solutions,
)

C = 10
NET = dict(depth=1, activation="relu", weight_std=math.sqrt(2.0), bias_std=0.1)
SETUPS = {"weight decay": (0.05, 0.0), "smoothing": (0.0, 0.1)}  # (λ, ε)
STEPS, LR, MEMBERS, DRAWS = 100, 2.0, 4, 32


def digits(num_train: int = 60, num_test: int = 150):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train = torch.cat([order[y[order] == c][: num_train // C] for c in range(C)])
    test = order[~torch.isin(order, train)][:num_test]
    return x[train], y[train], x[test], y[test]


def scores(probs, y):
    return (
        float((probs.argmax(-1) == y).double().mean()),
        float(-probs[torch.arange(len(y)), y].log().mean()),
        float(multiclass_calibration_error(probs.float(), y, num_classes=C, n_bins=10)),
    )


def tv(p, q):
    return float(0.5 * (p - q).abs().sum(-1).mean())


def main() -> None:
    torch.set_num_threads(1)  # many tiny steps: a second thread only adds contention
    x, y, x_test, y_test = digits()
    kernels = {k: v for k, v in NET.items() if k != "depth"}
    ntk, ntk_test = analytic_ntk(x, **NET), analytic_ntk(x_test, x, **NET)
    nngp = analytic_nngp(x, **NET)
    nngp_test, nngp_diag = analytic_nngp(x_test, x, **NET), analytic_nngp(x_test, **NET).diag()
    print(
        f"{'setup':<13}{'width':>6}  {'predictor':<18}{'acc':>6}{'NLL':>7}{'ECE':>7}{'TV→deep':>9}"
    )
    member_tv = {}
    for setup, (lam, eps) in SETUPS.items():
        flow = {} if lam > 0 else {"steps": STEPS, "lr": LR}  # fixed point / same training
        kernel = kernel_ensemble(
            x,
            y,
            x_test,
            model=NTKMLP(64, 1, NET["depth"], C, **kernels),
            weight_decay=lam,
            label_smoothing=eps,
            num_draws=DRAWS,
            **flow,
        )
        gp = gp_laplace_classifier(nngp, y, nngp_test, nngp_diag, label_smoothing=eps)
        for width in (64, 512):
            deep = deep_ensemble(
                lambda w=width: NTKMLP(64, w, NET["depth"], C, **kernels),
                x.float(),
                y,
                x_test.float(),
                steps=STEPS,
                lr=LR,
                num_members=MEMBERS,
                weight_decay=lam,
                label_smoothing=eps,
            )
            paired = kernel_solutions(
                ntk,
                deep.member_train_logits0,
                y,
                weight_decay=lam,
                label_smoothing=eps,
                ntk_test=ntk_test,
                logits0_test=deep.member_logits0,
                **flow,
            )
            member_tv[setup, width] = tv(torch.softmax(paired.test_logits, -1), deep.member_probs)
            rows = [
                ("single network", deep.member_probs[0]),
                ("deep ensemble", deep.probs),
                ("kernel ensemble", kernel.probs),
                ("GP-Laplace (NNGP)", gp.probs),
            ]
            for name, probs in rows:
                acc, nll, ece = scores(probs, y_test)
                print(
                    f"{setup:<13}{width:>6}  {name:<18}{acc:>6.3f}{nll:>7.3f}{ece:>7.3f}"
                    f"{tv(probs, deep.probs):>9.3f}"
                )
    print("\nmean TV between each trained network and the kernel prediction from its own init:")
    for (setup, width), value in member_tv.items():
        print(f"  {setup:<13} width {width:>4}: {value:.4f}")
    for setup in SETUPS:
        assert member_tv[setup, 512] < member_tv[setup, 64], (setup, member_tv)
    print("OK: wider networks follow the kernel prediction more closely.")


if __name__ == "__main__":
    main()
