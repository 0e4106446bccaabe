"""Does a kernel describe an ordinary run from some step on? The local linearization, measured.

A standard-parameterization MLP (plain ``nn.Linear``, 64 → width → 10, ReLU) is trained
with SGD (batch 32, label smoothing 0.1) on scikit-learn's digits (standardised), with an
``NTKTracker`` on 16 probe examples reporting at steps 2, 4, 8, … (``log_base=2``). Per
report it prints the regime, the kernel velocity (relative change since the previous
report per doubling of steps), the linearization error around ``θ0`` and around the
previous report's parameters (``local_linearization_error``), and the run's diagnosis.

Usage::

    python benchmarks/bench_local_linearization.py [--width 256] [--lr 0.05] [--steps 2048]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_ntk import NTKTracker
from lightning_ntk.cli._demo import load_digits_split


def main() -> None:
    """Train once and print one row per report, then the diagnosis."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x, y, _, _ = load_digits_split()
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    tracker = NTKTracker(n_probe=16, optimizer=opt, loss=loss_fn, log_base=2, seed=args.seed)
    tracker.draw_probe(torch.utils.data.TensorDataset(x, y))
    tracker.start(model)
    batches = torch.Generator().manual_seed(args.seed)
    print("step | regime | kernel velocity | linearization error (θ0) | local (previous report)")
    print("---|---|---|---|---")
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x), (32,), generator=batches)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        if tracker.is_due(step):
            r = tracker.update(model, step)
            print(
                f"{r.step} | {r.regime} | {r.kernel_velocity:.3f} | "
                f"{r.linearization_error:.3f} | {r.local_linearization_error:.3f}"
            )
    print(f"\n{tracker.diagnosis}")


if __name__ == "__main__":
    main()
