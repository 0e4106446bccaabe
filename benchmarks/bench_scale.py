"""Scale: many classes (sketch vs exact trace), large probe sets in blocks, 1 vs 2 processes.

Usage::

    python benchmarks/bench_scale.py                 # all three parts
    python benchmarks/bench_scale.py --part classes  # or probe / processes

* classes: C = 1000, N = 64 MLP: exact trace kernel against the sketched trace
  (k random output projections), time and relative error (with the reported standard
  error) for several k; then the exact kernel on per-example class subsets (each
  example's label and its 4 largest other logits, m = 5), its time, and two checks of
  its entries: against the exact ``"diagonal"`` kernel where both sides of a pair share
  the class, and, for 8 examples, against the full kernel on the union of their classes.
* probe: trace kernel of an MLP for N up to 2048 in blocks of 256; time and peak
  resident memory per N, each in a fresh process.
* processes: the same N = 1024 kernel with its blocks shared between 2 gloo processes
  (one thread each) against 1 process with one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _timing import median_seconds

from lightning_ntk import empirical_ntk
from lightning_ntk.kernel.sketch import class_subset_ntk, probe_classes, sketched_trace_ntk


def mlp(d_in: int, width: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, classes),
    )  # fmt: skip


def part_classes() -> None:
    model = mlp(64, 256, 1000)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    exact_seconds = median_seconds(lambda: empirical_ntk(model, x, output="trace"), 1)
    exact = empirical_ntk(model, x, output="trace")
    print(f"C=1000, N=64: exact trace kernel {exact_seconds:.2f} s")
    print(f"{'k':>5s} {'seconds':>8s} {'speed-up':>8s} {'rel. error':>10s} {'rel. SE':>8s}")
    for k in (8, 32, 128):
        seconds = median_seconds(lambda k=k: sketched_trace_ntk(model, x, num_projections=k), 1)
        sketch = sketched_trace_ntk(model, x, num_projections=k)
        err = ((sketch.estimate - exact).norm() / exact.norm()).item()
        se = (sketch.standard_error.norm() / exact.norm()).item()
        print(f"{k:5d} {seconds:8.2f} {exact_seconds / seconds:7.1f}x {err:10.4f} {se:8.4f}")
    part_class_subsets(model, x, exact_seconds)


def part_class_subsets(model: nn.Module, x: torch.Tensor, exact_seconds: float) -> None:
    """Per-example class subsets (label + 4 largest other logits) against exact kernels."""
    labels = torch.randint(0, 1000, (len(x),), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    rows = probe_classes(logits, labels, top_k=4, per_example=True)  # (64, 5)
    union = probe_classes(logits, labels, top_k=4)
    m = rows.shape[1]
    print(
        f"\nper-example class subsets, m = {m} (label + top 4 other logits); the shared "
        f"union of the same classes holds {len(union)} of 1000"
    )
    seconds = median_seconds(lambda: class_subset_ntk(model, x, classes=rows, output="full"), 1)
    print(f"{'kernel':<40s} {'seconds':>8s} {'speed-up':>8s}")
    print(f"{'exact trace (N, N), C = 1000':<40s} {exact_seconds:8.2f} {1.0:7.1f}x")
    print(
        f"{'per-example subset (N, N, 5, 5)':<40s} {seconds:8.2f} {exact_seconds / seconds:7.1f}x"
    )

    # check 1: K[i, j, r] = Θ(x_i, x_j)[c_ir, c_jr] is an entry of the exact diagonal
    # layout wherever c_ir = c_jr (every i = j, and pairs that share a class at slot r)
    diagonal = class_subset_ntk(model, x, classes=rows, output="diagonal")  # (N, N, m)
    exact_diagonal = empirical_ntk(model, x, output="diagonal")  # (N, N, C)
    shared = rows[:, None, :] == rows[None, :, :]  # (N, N, m)
    expected = exact_diagonal.gather(2, rows[:, None, :].expand(-1, len(x), -1))
    diff = (diagonal - expected)[shared].abs().max() / expected[shared].abs().max()
    print(
        f"check 1: per-example diagonal layout vs the exact diagonal kernel on the "
        f"{int(shared.sum())} entries where both classes agree: max |diff| / max |K| = "
        f"{diff:.1e}"
    )
    # check 2: every entry, cross-class ones included, for 8 examples against the full
    # kernel on the union of their classes (a shared subset, exact)
    few, few_rows = x[:8], rows[:8]
    classes = torch.unique(few_rows)
    position = torch.searchsorted(classes, few_rows)  # (8, m) positions in the union
    full = class_subset_ntk(model, few, classes=classes)  # (8, 8, u, u)
    i, j = torch.arange(8)[:, None, None, None], torch.arange(8)[None, :, None, None]
    expected_full = full[i, j, position[:, None, :, None], position[None, :, None, :]]
    got = class_subset_ntk(model, few, classes=few_rows)  # (8, 8, m, m)
    diff = (got - expected_full).abs().max() / expected_full.abs().max()
    print(
        f"check 2: per-example full layout (8 examples) vs the full kernel on the union of "
        f"their {len(classes)} classes: max |diff| / max |K| = {diff:.1e}"
    )


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def one_probe(n: int) -> dict:
    """Time and peak resident memory above the pre-call level, sampled every millisecond."""
    model = mlp(64, 512, 10)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))
    empirical_ntk(model, x[:8], output="trace")  # warm-up: lazy initialisation
    base, peak, running = _rss_mib(), [0.0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss_mib() - base)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    empirical_ntk(model, x, output="trace", chunk_size=256)
    seconds = time.perf_counter() - start
    running[0] = False
    sampler.join()
    return {"n": n, "seconds": seconds, "peak_mib": peak[0]}


def part_probe() -> None:
    print(f"{'N':>5s} {'seconds':>8s} {'peak MiB':>9s}  (trace layout, blocks of 256)")
    for n in (256, 512, 1024, 2048):
        out = subprocess.run(
            [sys.executable, __file__, "--one-probe", str(n)], capture_output=True, text=True,
            check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['n']:5d} {r['seconds']:8.2f} {r['peak_mib']:9.0f}", flush=True)


def _worker(rank: int, world: int, port: int, n: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = mlp(64, 512, 10)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))
    dist.barrier()
    start = time.perf_counter()
    empirical_ntk(model, x, output="trace", chunk_size=128, distributed=True)
    dist.barrier()
    if rank == 0:
        queue.put(time.perf_counter() - start)
    dist.destroy_process_group()


def part_processes(n: int = 1024) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        mp.spawn(_worker, args=(world, port, n, queue), nprocs=world, join=True)
        print(f"N={n} trace kernel, {world} process(es) x 1 thread: {queue.get():.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["classes", "probe", "processes"], action="append")
    parser.add_argument("--one-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_probe:
        print(json.dumps(one_probe(args.one_probe)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for part in args.part or ["classes", "probe", "processes"]:
        print(f"\n== {part}")
        {"classes": part_classes, "probe": part_probe, "processes": part_processes}[part]()


if __name__ == "__main__":
    main()
