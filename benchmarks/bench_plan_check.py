"""What the per-call check of the structured plan costs: structured kernels with and without it.

Every chunk of every structured call pushes one more random direction back (to the
layers' outputs and their parameters) and compares it with the factors
(``kernel._plan.check_call``). This times ``empirical_ntk(method="structured")`` on an
MLP, a small CNN and an embedding text model, with the check as shipped and with the
check switched off (the extra backward and the comparison skipped), in interleaved
rounds (the fastest round counts).

Usage::

    python benchmarks/bench_plan_check.py [--repeats 5]

Measured (CPU, ``OMP_NUM_THREADS=1``, ``--repeats 9``, a shared machine): MLP 0.051 s
checked against 0.052 s unchecked (within noise), CNN 0.060 s against 0.053 s (+13 %:
the check unfolds the convolution inputs once more), text model 0.111 s against
0.107 s (+4 %).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_ntk import empirical_ntk
from lightning_ntk.kernel import _recording, structured


@contextmanager
def check_off():
    """The structured method as it was before the per-call check."""
    record, check = structured.record, structured.check_call

    def record_without_probe(*args, **kwargs):
        kwargs["probe"] = False
        return _recording.record(*args, **kwargs)

    structured.record = record_without_probe
    structured.check_call = lambda *args: None
    try:
        yield
    finally:
        structured.record, structured.check_call = record, check


class _Text(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.norm = nn.LayerNorm(64)
        self.mix = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.norm(self.embed(tokens)))).mean(1))


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(100, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                        nn.Linear(512, 10))  # fmt: skip
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2),
                        nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))  # fmt: skip
    cnn(torch.randn(2, 3, 16, 16))
    yield "MLP 100-512-512-10", mlp, torch.randn(64, 100)
    yield "CNN 16x16, 2 conv", cnn, torch.randn(32, 3, 16, 16)
    yield "text, T=16", _Text(), torch.randint(0, 1000, (64, 16))


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'model':22s} {'N':>4s} {'checked':>9s} {'unchecked':>10s} {'overhead':>9s}")
    for name, model, x in models():
        run = partial(empirical_ntk, model, x, method="structured")
        run()  # plan verified and cached
        checked, unchecked = float("inf"), float("inf")
        for _ in range(args.repeats):
            checked = min(checked, seconds(run))
            with check_off():
                unchecked = min(unchecked, seconds(run))
        overhead = checked / unchecked - 1
        print(f"{name:22s} {len(x):4d} {checked:8.4f}s {unchecked:9.4f}s {overhead:8.1%}")


if __name__ == "__main__":
    main()
