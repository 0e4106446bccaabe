"""Kernel-predicted ensembles against deep ensembles and a Laplace GP classifier on digits.

For an NTK-parameterized ReLU MLP (one hidden layer, ``σ_w = √2``, ``σ_b = 0.1``) at
several widths, and two lazy set-ups,

* ``weight decay``: hard labels, ``(λ/2) ‖θ − θ0‖²`` with ``λ = 0.02``, trained to the
  fixed point (the kernel ensemble solves it exactly);
* ``smoothing``: label smoothing ``ε = 0.1``, no regularisation, ``--steps`` steps (the
  kernel ensemble follows the same gradient-descent flow),

it trains a deep ensemble of ``--members`` networks by full-batch gradient descent and
compares it with the kernel-predicted ensemble (``--draws`` draws from the analytic
NNGP, mapped through the analytic NTK) and a GP classifier with the NNGP kernel
(Laplace approximation, Monte Carlo predictive). Columns:

* accuracy, NLL and ECE (torchmetrics, 10 bins) of the mean predictive probabilities;
* ``TV→deep``: mean total-variation distance to the deep ensemble's mean probabilities;
* ``ρ var``: Spearman correlation of the per-point predictive variance
  ``Σ_a Var[p_a(x)]`` with the deep ensemble's;
* ``member TV`` (deep-ensemble rows): mean TV between each trained network and the
  kernel prediction from *its own* initial logits (no sampling noise; shrinks with width);
* ``paired TV`` and ``paired ρ var`` (deep-ensemble rows): the same two comparisons
  against the kernel predictions from the deep ensemble's own ``--members``
  initialisations, free of the sampling noise of a finite ensemble;
* ``sampling floor``: the first ``--members`` kernel draws scored as if they were the
  deep ensemble (TV to the full kernel mean; ρ of their variance with the other draws'),
  i.e. what a perfect theory would show against an ensemble of that size.

Usage::

    python benchmarks/bench_uncertainty.py                    # the table in docs/uncertainty.md
    python benchmarks/bench_uncertainty.py --widths 64 256 --members 4 --draws 16 --train 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from sklearn.datasets import load_digits
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.classification import multiclass_calibration_error

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_ntk.testing._analytic import NTKMLP, analytic_nngp, analytic_ntk
from lightning_ntk.uncertainty import (
    deep_ensemble,
    gp_laplace_classifier,
    kernel_ensemble,
    kernel_solutions,
)

C, DEPTH, WEIGHT_STD, BIAS_STD = 10, 1, math.sqrt(2.0), 0.1
SETUPS = {
    "weight decay": dict(weight_decay=0.02, label_smoothing=0.0, fixed_point=True),
    "smoothing": dict(weight_decay=0.0, label_smoothing=0.1, fixed_point=False),
}


def digits(num_train: int, num_test: int, seed: int = 0):
    """Standardised digits: a class-balanced training subset and a disjoint test subset."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    per_class = num_train // C
    train = torch.cat([order[y[order] == c][:per_class] for c in range(C)])
    rest = order[~torch.isin(order, train)][:num_test]
    return x[train], y[train], x[rest], y[rest]


def scores(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    probs = probs.double()
    return {
        "acc": float((probs.argmax(-1) == y).double().mean()),
        "nll": float(-probs[torch.arange(len(y)), y].clamp_min(1e-12).log().mean()),
        "ece": float(multiclass_calibration_error(probs.float(), y, num_classes=C, n_bins=10)),
    }


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(0.5 * (p - q).abs().sum(-1).mean())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(spearman_corrcoef(a.float(), b.float()))


def sampling_floor(member_probs: torch.Tensor, members: int) -> tuple:
    """What a perfect prediction would score against a ``members``-network ensemble.

    The kernel ensemble's first ``members`` draws play the deep ensemble: returns the
    mean probabilities of those draws (scored like a predictor), the TV between them and
    the mean of all draws, and the Spearman correlation of their per-point variance with
    that of the remaining draws.
    """
    few, rest = member_probs[:members], member_probs[members:]
    probs = few.mean(0)
    rho = spearman(few.var(0).sum(-1), rest.var(0).sum(-1))
    return probs, rho, tv(probs, member_probs.mean(0))


def run(args: argparse.Namespace) -> list[dict]:
    x, y, x_test, y_test = digits(args.train, args.test)
    net_kwargs = dict(activation="relu", weight_std=WEIGHT_STD, bias_std=BIAS_STD)
    kernel_kwargs = dict(depth=DEPTH, **net_kwargs)
    ntk, ntk_test = analytic_ntk(x, **kernel_kwargs), analytic_ntk(x_test, x, **kernel_kwargs)
    nngp = analytic_nngp(x, **kernel_kwargs)
    nngp_test = analytic_nngp(x_test, x, **kernel_kwargs)
    nngp_diag = analytic_nngp(x_test, **kernel_kwargs).diagonal()
    rows = []
    for setup, cfg in SETUPS.items():
        lam, eps = cfg["weight_decay"], cfg["label_smoothing"]
        steps = args.steps_decay if cfg["fixed_point"] else args.steps
        flow = {} if cfg["fixed_point"] else {"steps": steps, "lr": args.lr}
        t0 = time.perf_counter()
        kernel = kernel_ensemble(
            x,
            y,
            x_test,
            model=NTKMLP(64, 1, DEPTH, C, **net_kwargs),
            weight_decay=lam,
            label_smoothing=eps,
            num_draws=args.draws,
            seed=args.seed,
            **flow,
        )
        t_kernel = time.perf_counter() - t0
        t0 = time.perf_counter()
        gp = gp_laplace_classifier(
            nngp, y, nngp_test, nngp_diag, label_smoothing=eps, num_samples=2000, seed=args.seed
        )
        t_gp = time.perf_counter() - t0
        floor = sampling_floor(kernel.member_probs, args.members)
        for width in args.widths:
            t0 = time.perf_counter()
            deep = deep_ensemble(
                lambda w=width: NTKMLP(64, w, DEPTH, C, **net_kwargs),
                x.float(),
                y,
                x_test.float(),
                steps=steps,
                lr=args.lr,
                num_members=args.members,
                weight_decay=lam,
                label_smoothing=eps,
                seed=args.seed + 1,
            )
            t_deep = time.perf_counter() - t0
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
            paired_probs = torch.softmax(paired.test_logits, -1)  # (members, M, C)
            member_tv = tv(paired_probs, deep.member_probs)
            paired_tv = tv(paired_probs.mean(0), deep.probs)
            paired_rho = spearman(paired_probs.var(0).sum(-1), deep.variance)
            single, n = deep.member_probs[0], args.members
            entries = [
                ("single network", single, None, tv(single, deep.probs), None, t_deep / n),
                ("deep ensemble", deep.probs, deep.variance, 0.0, member_tv, t_deep),
                ("kernel ensemble", kernel.probs, kernel.variance, tv(kernel.probs, deep.probs),
                 None, t_kernel),
                ("GP-Laplace (NNGP)", gp.probs, None, tv(gp.probs, deep.probs), None, t_gp),
            ]  # fmt: skip
            if width == args.widths[0]:
                entries.append(("sampling floor", *floor, None, 0.0))
            for name, probs, variance, to_deep, member, seconds in entries:
                row = {"setup": setup, "width": width, "predictor": name, **scores(probs, y_test)}
                row["tv_to_deep"] = to_deep
                row["spearman_var"] = None
                if name == "sampling floor":
                    row["spearman_var"] = variance
                elif variance is not None and name != "deep ensemble":
                    row["spearman_var"] = spearman(variance, deep.variance)
                row["member_tv"] = member
                row["paired_tv"] = paired_tv if name == "deep ensemble" else None
                row["paired_spearman_var"] = paired_rho if name == "deep ensemble" else None
                row["seconds"] = seconds
                rows.append(row)
            print(f"# {setup} width {width}: deep ensemble {t_deep:.1f}s", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| setup | width | predictor | accuracy | NLL | ECE | TV→deep | ρ var | member TV "
        "| paired TV | paired ρ var |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['width']} | {r['predictor']} | {r['acc']:.3f} | "
            f"{r['nll']:.3f} | {r['ece']:.3f} | {fmt(r['tv_to_deep'], '.3f')} | "
            f"{fmt(r['spearman_var'], '.2f')} | {fmt(r['member_tv'], '.4f')} | "
            f"{fmt(r['paired_tv'], '.4f')} | {fmt(r['paired_spearman_var'], '.3f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--train", type=int, default=150, help="training points (balanced)")
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=250, help="steps, smoothing set-up")
    parser.add_argument("--steps-decay", type=int, default=250, help="steps, weight decay")
    parser.add_argument("--seed", type=int, default=0)
    # one thread: many small steps, where a second thread only adds contention
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run(args)
    print(table(rows))
    print(
        f"\n{args.train} train / {args.test} test digits, depth {DEPTH}, lr {args.lr}, "
        f"{args.members} members, {args.draws} kernel draws; "
        f"total {time.perf_counter() - start:.0f}s on {torch.get_num_threads()} threads"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
