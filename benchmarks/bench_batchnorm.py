"""Cost of the whole-batch kernel of a BatchNorm CNN against the running-statistics kernel.

The BatchNorm CNN of the verdict benchmark (two 3×3 convolutions with ``BatchNorm2d``,
average-pooled to 2×2, a linear head; scikit-learn digits as 1×8×8 images, ``C = 10``) at
two widths (74,546 and 298,224 parameters by default), probe of ``N = 16``:

1. **report**: one ``NTKTracker.update`` with ``normalization="batch"`` (the default: the
   whole-batch kernel from layer factors) and with ``"running"`` (eval-mode statistics,
   the per-example structured method), measured side by side in one process (runs
   alternate, medians and the ratio of medians);
2. **kernel**: the kernel call alone — the layer factors (``batch_ntk``), the whole
   ``N·C × P`` Jacobian it replaces, and ``empirical_ntk`` with running statistics;
3. **memory** (``--memory``): peak resident memory the kernel adds, each path in its own
   subprocess (the peak reset just before the call), at each width.

Usage::

    python benchmarks/bench_batchnorm.py [--widths 88 179] [--repeats 5] [--memory]
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
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _timing import status_kib

from lightning_ntk import NTKTracker, empirical_ntk
from lightning_ntk.kernel.batch_statistics import (
    BatchStatisticsModel,
    _contract,
    batch_jacobian,
    batch_ntk,
)

C = 10
N_PROBE = 16


def bn_cnn(width: int) -> nn.Module:
    """Two conv + BatchNorm2d blocks and a linear head (``9w² + 55w + 10`` parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, C),
    )


def probe() -> tuple[Tensor, Tensor]:
    """The first ``N_PROBE`` standardised digits as ``(N, 1, 8, 8)`` images, and labels."""
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    x = torch.as_tensor(x_all, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x[:N_PROBE].reshape(-1, 1, 8, 8), torch.as_tensor(y_all[:N_PROBE])


def whole_jacobian_kernel(model: nn.Module, x: Tensor) -> Tensor:
    """The kernel through the whole ``N·C × P`` Jacobian (the route the factors replace)."""
    fm = BatchStatisticsModel(model)
    J = batch_jacobian(fm, x)
    return sum(_contract(J[name], "full") for name in fm.names)  # type: ignore[return-value]


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timings(width: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = bn_cnn(width)
    x, y = probe()
    trackers = {}
    for normalization in ("batch", "running"):
        trackers[normalization] = NTKTracker(x, y, normalization=normalization)
        trackers[normalization].start(model)
    kernels = {
        "factors": lambda: batch_ntk(model, x),
        "whole_jacobian": lambda: whole_jacobian_kernel(model, x),
        "running": lambda: empirical_ntk(model, x),
    }
    times: dict[str, list[float]] = {f"report_{k}": [] for k in trackers}
    times.update({f"kernel_{k}": [] for k in kernels})
    for r in range(repeats):
        order = list(trackers) if r % 2 == 0 else list(reversed(trackers))
        for normalization in order:
            tracker = trackers[normalization]
            times[f"report_{normalization}"].append(
                seconds(lambda: tracker.update(model, r + 1))  # noqa: B023
            )
        names = list(kernels) if r % 2 == 0 else list(reversed(kernels))
        for name in names:
            times[f"kernel_{name}"].append(seconds(kernels[name]))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "width": width,
        "params": sum(p.numel() for p in model.parameters()),
        **{k: round(v, 4) for k, v in medians.items()},
        "report_ratio": round(medians["report_batch"] / medians["report_running"], 2),
        "kernel_ratio": round(medians["kernel_factors"] / medians["kernel_running"], 2),
    }


def peak_memory(width: int, path: str) -> int:
    """Bytes of peak resident memory one kernel call adds (run in this process).

    The peak (``VmHWM``) is reset to the current resident size just before the call
    (``/proc/self/clear_refs``, Linux), so imports and set-up do not mask it; elsewhere the
    process-wide peak of ``resource.getrusage`` is used instead.
    """
    torch.manual_seed(0)
    model = bn_cnn(width)
    x, _ = probe()
    with torch.no_grad():
        model(x)
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = status_kib("VmRSS")
        peak = lambda: status_kib("VmHWM")  # noqa: E731
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    if path == "factors":
        batch_ntk(model, x)
    elif path == "whole_jacobian":
        whole_jacobian_kernel(model, x)
    else:
        empirical_ntk(model, x)
    return (peak() - before) * 1024  # KiB on Linux


def memory_table(widths: list[int]) -> list[dict]:
    rows = []
    for width in widths:
        row: dict = {"width": width, "params": sum(p.numel() for p in bn_cnn(width).parameters())}
        for path in ("factors", "whole_jacobian", "running"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", path, str(width)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            row[f"{path}_MiB"] = round(int(out.stdout.strip()) / 2**20, 1)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[88, 179])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="peak memory per path")
    parser.add_argument("--no-timing", action="store_true", help="skip the timings")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(peak_memory(int(args.child[1]), args.child[0]))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={N_PROBE}, C={C}")
    for width in [] if args.no_timing else args.widths:
        print(json.dumps(timings(width, args.repeats)), flush=True)
    if args.memory:
        for row in memory_table(args.widths):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
