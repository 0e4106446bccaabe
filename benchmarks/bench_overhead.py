"""Wall-time overhead of ``NTKMonitor`` at its default settings on the demo's training.

The demo's wide MLP (``NTKMLP``, width 4096, one hidden layer, NTK parameterization) is
trained with SGD on scikit-learn's digits for ``--steps`` steps, with and without a
default ``NTKMonitor()``, same seed and data order; runs alternate (without, with,
without, ...) so that drifts in machine speed hit both alike. Prints the medians, the
median of the paired ratios ``with / without − 1``, and — much less noisy on a shared
machine — the time spent inside the monitor's hooks as a share of the training time
without it (budget: 5 %).

Usage::

    python benchmarks/bench_overhead.py [--repeats 5] [--steps 512] [--width 4096]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
import warnings

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_ntk import NTKMonitor
from lightning_ntk._demo import DigitsClassifier, load_digits_split
from lightning_ntk.testing import NTKMLP

HOOKS = ("setup", "on_train_start", "on_train_batch_end", "on_train_epoch_end")


def timed_hooks(monitor: NTKMonitor) -> list[float]:
    """Wrap the monitor's hooks on the instance; the returned cell accumulates their time."""
    spent = [0.0]
    for name in HOOKS:
        hook = getattr(monitor, name)

        def wrapper(*args, _hook=hook, **kwargs):
            start = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(monitor, name, wrapper)
    return spent


def train_once(monitor: bool, steps: int, width: int, data) -> tuple[float, float]:
    x_train, y_train, _, _ = data
    torch.manual_seed(0)
    network = NTKMLP(64, width, 1, 10, weight_std=math.sqrt(2.0), bias_std=0.1)
    module = DigitsClassifier(network, lr=4.0, l2=0.0, label_smoothing=0.0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    callbacks, spent = [], [0.0]
    if monitor:
        callbacks = [NTKMonitor()]
        spent = timed_hooks(callbacks[0])
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
        callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return time.perf_counter() - start, spent[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--width", type=int, default=4096)
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no per-run banner lines
    data = load_digits_split()
    train_once(True, 8, args.width, data)  # warm-up: imports, first kernels
    times: dict[bool, list[float]] = {False: [], True: []}
    inside: list[float] = []
    for _ in range(args.repeats):
        for monitor in (False, True):
            seconds, spent = train_once(monitor, args.steps, args.width, data)
            times[monitor].append(seconds)
            if monitor:
                inside.append(spent)
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    paired = statistics.median(w / wo for w, wo in zip(times[True], times[False]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, "
          f"width {args.width}, {args.repeats} repeats")  # fmt: skip
    print(
        f"without NTKMonitor: {without:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times[False])})"
    )
    print(f"with NTKMonitor():  {with_:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times[True])})")
    print(f"overhead, median of paired ratios: {100 * (paired - 1):.1f} %")
    share = statistics.median(inside) / without
    print(f"time inside the monitor's hooks: {statistics.median(inside):.3f} s = "
          f"{100 * share:.1f} % of training without it")  # fmt: skip


if __name__ == "__main__":
    main()
