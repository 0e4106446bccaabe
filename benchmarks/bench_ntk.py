"""Time and peak memory of every kernel method against the PyTorch tutorial's recipe.

The recipe is the Jacobian contraction of the PyTorch "Neural Tangent Kernels"
tutorial (``vmap(jacrev)`` per example, one ``einsum`` per parameter, summed),
reimplemented below. Every measurement runs in its own subprocess so that its peak
resident memory is its own; all of them run in one invocation, on the same inputs, so
the ratios are side by side.

Usage::

    python benchmarks/bench_ntk.py              # all cases, median of 3 repeats
    python benchmarks/bench_ntk.py --repeats 5 --cases mlp cnn
    python benchmarks/bench_ntk.py --json results.json

Also reports the achieved GFLOP/s of the structured MLP path against a large
``torch.mm`` measured in the same run. ``--profile`` prints where the structured path's
time goes (``torch.profiler``, self CPU time by op, grouped into matrix products,
convolutions, elementwise/reduction work and the rest), for the MLP and the CNN.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_ntk import empirical_ntk

# case -> (builder, input shape, N, chunk_size, methods)
CASES = {
    "mlp": ("mlp", (784,), 32, None, ["recipe", "jacobian", "ntk_vp", "structured", "auto"]),
    "cnn": ("cnn", (3, 32, 32), 16, None, ["recipe", "jacobian", "ntk_vp", "structured", "auto"]),
    "mlp_n256": ("mlp", (784,), 256, 64, ["auto"]),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64 * 14 * 14, 10),
    )  # fmt: skip


def recipe_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The tutorial's Jacobian contraction, full layout ``(N1, N2, C, C)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(params, x):
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2)])
    return result.sum(0)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_one(case: str, method: str, repeats: int) -> dict:
    """Run in a fresh process: median time and peak RSS above the post-setup baseline."""
    builder, shape, n, chunk, _ = CASES[case]
    model = build(builder)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x[:2])
    baseline = max_rss_mib()

    def run():
        if method == "recipe":
            return recipe_ntk(model, x, x)
        return empirical_ntk(model, x, method=method, chunk_size=chunk)

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        K = run()
        times.append(time.perf_counter() - start)
    checksum = float(K.double().abs().sum())
    return {
        "case": case, "method": method, "n": n, "seconds": statistics.median(times),
        "peak_mib": max_rss_mib() - baseline, "checksum": checksum,
    }  # fmt: skip


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def structured_mlp_flops(n: int, widths=(784, 1024, 1024, 10)) -> float:
    """Floating-point operations of the structured full-layout MLP kernel.

    Forward ``2·N·P``; batched backward of the ``C`` cotangents through the activations
    ``2·C·N·P``; per layer the input Gram ``2·N²·d_in``, the cotangent Gram
    ``2·(N·C)²·d_out`` and the Hadamard product ``(N·C)²``.
    """
    C = widths[-1]
    P = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    flops = 2 * n * P + 2 * C * n * P
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        flops += 2 * n * n * d_in + 2 * (n * C) ** 2 * d_out + (n * C) ** 2
    return flops


# op-name fragments -> group, first match wins (aten names; "mm" also covers addmm / bmm)
_GROUPS = (
    ("matrix products", ("mm", "matmul", "linear", "einsum", "dot")),
    ("convolutions", ("conv", "im2col", "col2im", "unfold")),
    ("copies / layout", ("copy", "clone", "contiguous", "cat", "stack", "index", "fill", "zero")),
    ("elementwise / reductions", ("mul", "add", "sub", "div", "sum", "mean", "relu", "threshold",
                                  "pool", "where", "neg", "sqrt", "pow")),
)  # fmt: skip


def profile_structured(case: str, repeats: int) -> None:
    """Self CPU time of the structured kernel's ops, grouped, for one case."""
    from torch.profiler import ProfilerActivity, profile

    builder, shape, n, chunk, _ = CASES[case]
    model = build(builder)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))

    def run():
        return empirical_ntk(model, x, method="structured", chunk_size=chunk)

    run()  # warm-up, plan cached
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    wall = (time.perf_counter() - start) / repeats  # without the profiler's own overhead
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / repeats / 1e6
    groups: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        group = next((g for g, keys in _GROUPS if any(k in name for k in keys)), "other ops")
        groups[group] = groups.get(group, 0.0) + e.self_cpu_time_total / repeats / 1e6
    print(f"\nprofile of structured {case} (N={n}), per call: {wall * 1e3:.1f} ms wall, "
          f"{total * 1e3:.1f} ms inside aten ops (under the profiler)")  # fmt: skip
    for group, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:26s} {seconds * 1e3:8.2f} ms  {100 * seconds / wall:5.1f} %")
    outside = max(0.0, wall - total)
    print(f"  {'outside ops (Python)':26s} {outside * 1e3:8.2f} ms  "
          f"{100 * outside / wall:5.1f} %")  # fmt: skip
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    print("  top ops: " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / repeats / 1e3:.2f} ms" for e in top
    ))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--profile", action="store_true", help="profile the structured path")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, repeats=args.repeats)))
        return
    if args.profile:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"torch.mm 2048x2048: {matmul_gflops():.1f} GFLOP/s")
        for case in ("mlp", "cnn"):
            profile_structured(case, args.repeats)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for case in args.cases:
        for method in CASES[case][4]:
            out = subprocess.run(
                [sys.executable, __file__, "--one", case, method, "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  measured {case:9s} {method:10s} {r['seconds']:8.3f} s", flush=True)

    print(f"\n{'case':10s} {'N':>4s} {'method':10s} {'time (s)':>9s} {'vs recipe':>10s}", end="")
    print(f" {'peak MiB':>9s}")
    for case in args.cases:
        case_rows = [r for r in rows if r["case"] == case]
        recipe = next((r for r in case_rows if r["method"] == "recipe"), None)
        for r in case_rows:
            ratio = f"{recipe['seconds'] / r['seconds']:9.1f}x" if recipe else f"{'-':>10s}"
            row = f"{case:10s} {r['n']:4d} {r['method']:10s} {r['seconds']:9.3f} {ratio}"
            print(f"{row} {r['peak_mib']:9.0f}")
        if recipe:
            worst = max(
                abs(r["checksum"] - recipe["checksum"]) / recipe["checksum"] for r in case_rows
            )
            print(f"{'':10s} max relative checksum difference vs recipe: {worst:.1e}")

    peak = matmul_gflops()
    for r in rows:
        if r["case"] == "mlp" and r["method"] == "structured":
            achieved = structured_mlp_flops(r["n"]) / r["seconds"] / 1e9
            print(
                f"\nstructured MLP (N={r['n']}): {achieved:.1f} GFLOP/s achieved; "
                f"torch.mm 2048x2048: {peak:.1f} GFLOP/s ({100 * achieved / peak:.0f}% of it)"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "matmul_gflops": peak}, fh, indent=1)


if __name__ == "__main__":
    main()
