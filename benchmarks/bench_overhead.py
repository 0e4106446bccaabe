"""Wall-time overhead of ``NTKMonitor`` at its default settings on the demo's training.

The demo's wide MLP (``NTKMLP``, width 4096, one hidden layer, NTK parameterization) is
trained with SGD on scikit-learn's digits for ``--steps`` steps, with and without an
``NTKMonitor``, same seed and data order; runs alternate (without-with, then
with-without, ...) so that drifts in machine speed and order effects hit both alike.
For each monitor setting (default: the defaults, ``NTKMonitor()``) it prints the
medians, the median of the paired ratios ``with / without − 1``, the ratio of the
fastest runs of each (noise only ever adds time), and — much less noisy on a shared
machine — the time spent inside the monitor's hooks as a share of the training time
without it (budget: 5 %), with the number of reports and the median time of one.

These runs share one process after a warm-up run, so they measure the steady state.
``--cold`` adds what a fresh process pays once: each run in its own process (imports
done, nothing run yet), with and without the monitor; the difference includes one-time
set-up such as PyTorch's forward-mode AD (used by the linearized model).

Usage::

    python benchmarks/bench_overhead.py [--repeats 9] [--steps 512] [--width 4096]
    python benchmarks/bench_overhead.py --settings '{}' '{"output": "trace"}' --cold
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import warnings

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_ntk import NTKMonitor
from lightning_ntk.cli._demo import DigitsClassifier, load_digits_split
from lightning_ntk.testing import NTKMLP

HOOKS = ("setup", "on_train_start", "on_train_batch_end", "on_train_epoch_end")


def timed_hooks(monitor: NTKMonitor) -> list[tuple[str, float]]:
    """Wrap the monitor's hooks on the instance; the list collects ``(hook, seconds)``."""
    calls: list[tuple[str, float]] = []
    for name in HOOKS:
        hook = getattr(monitor, name)

        def wrapper(*args, _hook=hook, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                calls.append((_name, time.perf_counter() - start))

        setattr(monitor, name, wrapper)
    return calls


def train_once(settings, steps: int, width: int, data) -> tuple[float, list, int]:
    """Seconds of ``trainer.fit``, the monitor's hook calls and its number of reports.

    ``settings`` is ``None`` for no monitor, else the ``NTKMonitor`` keyword arguments.
    """
    x_train, y_train, _, _ = data
    torch.manual_seed(0)
    network = NTKMLP(64, width, 1, 10, weight_std=math.sqrt(2.0), bias_std=0.1)
    module = DigitsClassifier(network, lr=4.0, l2=0.0, label_smoothing=0.0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    callbacks, calls = [], []
    if settings is not None:
        callbacks = [NTKMonitor(**settings)]
        calls = timed_hooks(callbacks[0])
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
        callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    reports = len(callbacks[0].history) if callbacks else 0
    return seconds, calls, reports


def steady_state(settings: dict, args, data) -> dict:
    """Alternating runs without / with the monitor in this (warm) process."""
    without, with_, inside, per_report = [], [], [], []
    reports = 0
    for r in range(args.repeats):
        for arm in ("without", "with") if r % 2 == 0 else ("with", "without"):
            if arm == "without":
                without.append(train_once(None, args.steps, args.width, data)[0])
                continue
            seconds, calls, reports = train_once(settings, args.steps, args.width, data)
            with_.append(seconds)
            inside.append(sum(seconds for _, seconds in calls))
            # the reports are the longest calls of the batch / epoch-end hooks
            ends = sorted(seconds for hook, seconds in calls if hook.endswith("_end"))
            per_report.append(statistics.median(ends[-reports:]) if reports else 0.0)
    return {
        "without": without,
        "with": with_,
        "paired": statistics.median(w / wo - 1 for w, wo in zip(with_, without)),
        "fastest": min(with_) / min(without) - 1,
        "inside": statistics.median(inside),
        "share": statistics.median(inside) / statistics.median(without),
        "reports": reports,
        "per_report": statistics.median(per_report),
    }


def cold_runs(settings: dict, args) -> tuple[list[float], list[float]]:
    """Each run in a fresh process: ``(without, with)`` seconds of ``trainer.fit``."""
    out: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.repeats):
        for arm in ("without", "with"):
            command = [sys.executable, __file__, "--one", arm, "--steps", str(args.steps),
                       "--width", str(args.width), "--settings", json.dumps(settings)]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            out[arm].append(float(result.stdout.strip().splitlines()[-1]))
    return out["without"], out["with"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument(
        "--settings", nargs="*", default=["{}"], help="NTKMonitor keyword arguments, as JSON"
    )
    parser.add_argument("--cold", action="store_true", help="also time runs in fresh processes")
    parser.add_argument("--one", choices=("without", "with"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no per-run banner lines
    data = load_digits_split()
    settings_list = [json.loads(s) for s in args.settings]
    if args.one:
        settings = settings_list[0] if args.one == "with" else None
        print(train_once(settings, args.steps, args.width, data)[0])
        return

    train_once({}, 8, args.width, data)  # warm-up: imports, first kernels
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, "
          f"width {args.width}, {args.repeats} repeats; steady state (one process)")  # fmt: skip
    rows = []
    for settings in settings_list:
        r = steady_state(settings, args, data)
        rows.append((settings, r))
        print(f"\nNTKMonitor(**{settings}):")
        print(f"  without: {statistics.median(r['without']):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in r['without'])})")  # fmt: skip
        print(f"  with:    {statistics.median(r['with']):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in r['with'])})")  # fmt: skip
        print(f"  overhead: median of paired ratios {100 * r['paired']:.1f} %, "
              f"fastest run against fastest run {100 * r['fastest']:.1f} %")  # fmt: skip
        print(f"  inside the monitor's hooks: {r['inside']:.3f} s = {100 * r['share']:.1f} % "
              f"of training without it; {r['reports']} reports of "
              f"{1e3 * r['per_report']:.1f} ms")  # fmt: skip
    print(f"\n{'settings':32s} {'reports':>7s} {'per report':>10s} {'in hooks':>8s} "
          f"{'paired':>7s} {'fastest':>7s}")  # fmt: skip
    for settings, r in rows:
        print(f"{json.dumps(settings):32s} {r['reports']:7d} {1e3 * r['per_report']:8.1f}ms "
              f"{100 * r['share']:7.1f}% {100 * r['paired']:6.1f}% "
              f"{100 * r['fastest']:6.1f}%")  # fmt: skip
    if args.cold:
        without, with_ = cold_runs(settings_list[0], args)
        extra = statistics.median(with_) - statistics.median(without)
        print(f"\nfresh processes, NTKMonitor(**{settings_list[0]}): without "
              f"{statistics.median(without):.2f} s, with {statistics.median(with_):.2f} s: "
              f"+{extra:.2f} s (one-time set-up plus the steady-state cost)")  # fmt: skip


if __name__ == "__main__":
    main()
