"""Wall-time overhead of ``NTKMonitor`` at its default settings on the demo's training.

The demo's wide MLP (``NTKMLP``, width 4096, one hidden layer, NTK parameterization) is
trained with SGD on scikit-learn's digits for ``--steps`` steps, with and without a
default ``NTKMonitor()``, same seed and data order; runs alternate (without, with,
without, ...) so that drifts in machine speed hit both alike. Prints the median of
each and the overhead ``with / without − 1`` (budget: 5 %).

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


def train_once(monitor: bool, steps: int, width: int, data) -> float:
    x_train, y_train, _, _ = data
    torch.manual_seed(0)
    network = NTKMLP(64, width, 1, 10, weight_std=math.sqrt(2.0), bias_std=0.1)
    module = DigitsClassifier(network, lr=4.0, l2=0.0, label_smoothing=0.0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
        callbacks=[NTKMonitor()] if monitor else [],
    )  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return time.perf_counter() - start


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
    for _ in range(args.repeats):
        for monitor in (False, True):
            times[monitor].append(train_once(monitor, args.steps, args.width, data))
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, "
          f"width {args.width}, {args.repeats} repeats")  # fmt: skip
    print(
        f"without NTKMonitor: {without:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times[False])})"
    )
    print(f"with NTKMonitor():  {with_:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times[True])})")
    print(f"overhead: {100 * (with_ / without - 1):.1f} %")


if __name__ == "__main__":
    main()
