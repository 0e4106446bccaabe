"""What the optimizer kernels cost next to SGD's NTK, per method.

Times ``empirical_ntk(kernel=...)`` for ``"sgd"``, ``"signgd"``, ``"asymmetric_signgd"``
and ``"adam"`` with each method that computes the kernel, on an MLP (784-256-256-10, a
probe of 64 examples, the full layout, float32). The sign and Adam kernels cannot use the
structured contractions, so ``"auto"`` picks Jacobians or NTK-vector products for them.

Usage::

    python benchmarks/bench_optimizer_kernels.py [--repeats 3] [--probe 64]

Measured (CPU, ``OMP_NUM_THREADS=1``, ``--repeats 3 --probe 32``, a busy shared
machine), seconds: sgd structured 0.013, ntk_vp 0.44, jacobian 1.70, loop 2.29;
signgd jacobian 2.38, loop 2.74; asymmetric_signgd ntk_vp 1.18, jacobian 2.95, loop 3.22;
adam ntk_vp 0.43, jacobian 1.47, loop 1.65. ``"auto"`` chose jacobian for the three
(at ``N2·C = 320`` it does not time NTK-vector products, although they win here).
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _timing import median_seconds

from lightning_ntk import empirical_ntk
from lightning_ntk.kernel import OptimizerKernel, last_call_info
from lightning_ntk.kernel._optimizer import _SUPPORTED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    x = torch.randn(args.probe, 784)
    optimizer = torch.optim.Adam(model.parameters())
    nn.functional.cross_entropy(model(x), torch.randint(0, 10, (args.probe,))).backward()
    optimizer.step()
    print(f"MLP 784-256-256-10, probe {args.probe}, full layout, float32")
    for kind in OptimizerKernel:
        extra = {"kernel": kind.value, "optimizer": optimizer if kind.value == "adam" else None}
        methods = ["auto", *sorted(m.value for m in _SUPPORTED[kind])]
        for method in methods:
            call = partial(empirical_ntk, model, x, method=method, **extra)
            seconds = median_seconds(call, repeats=args.repeats)
            used = last_call_info().method
            print(f"  {kind.value:18s} {method:10s} -> {used:10s} {seconds:8.3f} s")


if __name__ == "__main__":
    main()
