"""Layers written as calls against the same layers as modules: structured kernel times.

An NTK-parameterized MLP (two hidden layers of width 1024, ReLU, ``σ_w = √2``,
``σ_b = 0.1``) written two ways with the same function and parameters:

* **module**: ``nn.Linear`` followed by a module scaling its output;
* **call**: ``F.linear(h, w * σ_w/√K, b * σ_b)`` in a custom layer.

Both are timed side by side in interleaved rounds (the fastest round counts), with
``empirical_ntk(method="structured")`` and ``method="auto"`` (full layout, ``N = 16``
probe points, ``C = 10`` classes), and the call version also with ``method="jacobian"``
(what it used before layer calls were recorded). The call version's kernels are checked
against its Jacobian kernel (the module version has the same function but its bias is
another parameter, ``b σ_b / c``, so its kernel differs in the bias part).

Usage::

    python benchmarks/bench_functional_layers.py [--repeats 5] [--width 1024] [--threads 1]

Measured (CPU, ``--repeats 5 --threads 1``, a shared machine): call 0.046 s and module
0.045 s with ``structured`` (1.02x), 0.049 / 0.050 s with ``auto`` (it picks
``structured`` for both); the call version with ``jacobian``: 4.38 s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_ntk import empirical_ntk
from lightning_ntk.kernel import last_call_info

SIGMA_W, SIGMA_B = math.sqrt(2.0), 0.1


class Scale(nn.Module):
    """Multiplies a layer's output by the NTK weight scale (bias re-scaled to match)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.c = SIGMA_W / math.sqrt(linear.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) * self.c


class NTKLinear(nn.Module):
    """``F.linear(x, w · σ_w/√K, b · σ_b)``."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, features))
        self.bias = nn.Parameter(torch.randn(out))

    def forward(self, x: Tensor) -> Tensor:
        c = SIGMA_W / math.sqrt(self.weight.shape[1])
        return F.linear(x, self.weight * c, self.bias * SIGMA_B)


def models(features: int, width: int, classes: int) -> tuple[nn.Module, nn.Module]:
    """The call MLP and the module MLP computing the same function."""
    torch.manual_seed(0)
    sizes = [features, width, width, classes]
    calls = [NTKLinear(a, b) for a, b in zip(sizes, sizes[1:])]
    modules = []
    for layer in calls:
        linear = nn.Linear(layer.weight.shape[1], layer.weight.shape[0])
        c = SIGMA_W / math.sqrt(layer.weight.shape[1])
        with torch.no_grad():  # module: (W h + b') c with b' = b σ_b / c
            linear.weight.copy_(layer.weight)
            linear.bias.copy_(layer.bias * SIGMA_B / c)
        modules.append(Scale(linear))

    def stack(layers: list[nn.Module]) -> nn.Module:
        parts: list[nn.Module] = []
        for k, layer in enumerate(layers):
            parts += [layer] if k == len(layers) - 1 else [layer, nn.ReLU()]
        return nn.Sequential(*parts)

    return stack(calls), stack(modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    call_mlp, module_mlp = models(args.features, args.width, args.classes)
    x = torch.randn(args.probes, args.features, generator=torch.Generator().manual_seed(1))
    runs = {
        "call / structured": (call_mlp, "structured"),
        "module / structured": (module_mlp, "structured"),
        "call / auto": (call_mlp, "auto"),
        "module / auto": (module_mlp, "auto"),
        "call / jacobian": (call_mlp, "jacobian"),
    }
    kernels, picks = {}, {}
    for label, (model, method) in runs.items():  # warm-up: plans, auto's measurement
        kernels[label] = empirical_ntk(model, x, method=method)
        info = last_call_info()
        picks[label] = f"{info.method}, {len(info.per_example)} params on Jacobians"
    for label, K in kernels.items():
        truth = kernels["call / jacobian" if label.startswith("call") else "module / structured"]
        err = float((K - truth).norm() / truth.norm())
        assert err < 1e-5, f"{label}: relative difference {err:.2e} from the exact kernel"
    best = {label: math.inf for label in runs}
    for _ in range(args.repeats):
        for label, (model, method) in runs.items():
            start = time.perf_counter()
            empirical_ntk(model, x, method=method)
            best[label] = min(best[label], time.perf_counter() - start)
    print(
        f"NTK MLP {args.features}-{args.width}-{args.width}-{args.classes}, N={args.probes}, "
        f"full layout, fastest of {args.repeats} rounds, {torch.get_num_threads()} threads"
    )
    for label in runs:
        print(f"  {label:22s} {best[label]:8.3f} s   ({picks[label]})")
    ratio = best["call / structured"] / best["module / structured"]
    print(f"  call / module, structured: {ratio:.2f}x")


if __name__ == "__main__":
    main()
