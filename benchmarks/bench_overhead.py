"""Wall-time overhead of ``NTKMonitor`` at its default settings, and what each part costs.

Two training runs: the demo's wide MLP (``--model mlp``: ``NTKMLP``, width 4096, one
hidden layer, NTK parameterization, SGD at lr 4, hard labels) and a small BatchNorm CNN
(``--model cnn_bn``: two 3×3 convolutions of 32 channels with ``BatchNorm2d``,
average-pooled to 2×2, a linear head — the CNN of ``benchmarks/bench_batchnorm.py`` —
SGD at lr 0.1 with label smoothing 0.1), both on scikit-learn's digits (1×8×8 images for
the CNN), batch 64, for ``--steps`` steps with and without an ``NTKMonitor``, same seed
and data order; runs alternate (without-with, then with-without, ...) so that drifts in
machine speed and order effects hit both alike. For each monitor setting (default: the defaults,
``NTKMonitor()``) it prints the medians, the median of the paired ratios
``with / without − 1``, the ratio of the fastest runs of each (noise only ever adds
time), and — much less noisy on a shared machine — the time spent inside the monitor's
hooks as a share of the training time without it, with the number of reports and the
median time of one. Where the machine's load changes from run to run, the figure to
read is the last: each monitored run's time inside the hooks against the same run's
time outside them (the training the monitor watched), median over runs.

The breakdown times the parts of the monitor's work with ``time.perf_counter`` (or, with
``--clock cpu``, the process's CPU time ``time.process_time``: on a machine shared with
other jobs the wall time of a run varies by factors, its CPU time much less), by
wrapping the library's functions from here (nothing in the library is changed):

* ``start``: ``on_train_start`` (the probe, ``θ0``, ``Θ0``); its kernel is counted
  under ``kernel`` too;
* per report: ``kernel`` (``Θ_t``, ``probe_kernel``), ``linearization θ0`` and
  ``linearization previous`` (the ``jvp`` around ``θ0`` and around the previous
  report), ``logits`` (the probe's forward at ``θ_t`` and the logit metrics),
  ``spectrum`` (the eigen-decomposition and its metrics), the ``rest`` of the report
  (drift and alignment metrics, the diagnosis, the copy of the parameters) and
  ``logging`` (the trainer's metric dicts, the loggers, TensorBoard extras);
* ``set-up observation``: the first batches' logits and the loss fit (the re-evaluated
  logits at ``on_train_batch_start``, the forward hook inside the training step and the
  fit at ``on_train_batch_end``);
* ``per batch``: what the batch hooks cost on every other step (splitting the batch,
  the finiteness flag, the schedule);
* ``state key``: ``NTKMonitor.state_key``, which Lightning reads around every hook
  call (outside the monitor's hooks, so not part of the in-hook share).

``--check`` compares the reports of the monitored run with those of a reference file
written by ``--save-reports`` (same seed): every numeric field must agree to float
round-off (``rtol=1e-5``), the verdicts exactly. It guards optimisations of the report
against changing what the monitor reports.

These runs share one process after a warm-up run, so they measure the steady state.
``--cold`` adds what a fresh process pays once: each run in its own process (imports
done, nothing run yet), with and without the monitor; the difference includes one-time
set-up such as PyTorch's forward-mode AD (used by the linearized model).

Usage::

    python benchmarks/bench_overhead.py --steps 600 --repeats 7
    python benchmarks/bench_overhead.py --model cnn_bn --steps 600 --repeats 7
    python benchmarks/bench_overhead.py --settings '{}' '{"output": "trace"}' --cold
    python benchmarks/bench_overhead.py --logger csv  # logging to a CSVLogger, both arms
    python benchmarks/bench_overhead.py --clock cpu  # CPU time: steadier on a loaded machine
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from torch import nn

from lightning_ntk import NTKMonitor
from lightning_ntk.cli._demo import DigitsClassifier, load_digits_split
from lightning_ntk.monitor import _measure, _observer, tracker
from lightning_ntk.monitor import callback as monitor_callback
from lightning_ntk.testing import NTKMLP

HOOKS = ("setup", "on_train_start", "on_train_batch_start", "on_train_batch_end",
         "on_train_epoch_end")  # fmt: skip
# the parts of a report, in the order they are printed
REPORT_PARTS = ("kernel", "linearization θ0", "linearization previous", "logits", "spectrum",
                "rest", "logging")  # fmt: skip

PARTS: collections.defaultdict[str, float] = collections.defaultdict(float)  # seconds per part
CLOCK = time.perf_counter  # or time.process_time with --clock cpu
COUNTS: collections.Counter[str] = collections.Counter()


def _timed(name, fn):
    """``fn`` adding its wall time to ``PARTS[name]`` (``name`` may be a callable of the call)."""

    def wrapper(*args, **kwargs):
        start = CLOCK()
        try:
            return fn(*args, **kwargs)
        finally:
            part = name() if callable(name) else name
            PARTS[part] += CLOCK() - start
            COUNTS[part] += 1

    return wrapper


def instrument() -> None:
    """Wrap the library's parts (module attributes, class attributes) with timers."""
    linearizations = {"calls": 0}
    measure = _measure.measure

    def measure_counting(*args, **kwargs):
        linearizations["calls"] = 0
        return measure(*args, **kwargs)

    def linearization_name():
        linearizations["calls"] += 1
        return "linearization θ0" if linearizations["calls"] == 1 else "linearization previous"

    starting = {"now": False}
    snapshot = tracker.snapshot

    def snapshot_marking(*args, **kwargs):
        starting["now"] = True
        try:
            return snapshot(*args, **kwargs)
        finally:
            starting["now"] = False

    tracker.snapshot = snapshot_marking
    tracker.measure = _timed("measure", measure_counting)
    _measure.probe_kernel = _timed(
        lambda: "start kernel" if starting["now"] else "kernel", _measure.probe_kernel
    )
    _measure._linearized = _timed(linearization_name, _measure._linearized)
    _measure.safe_spectrum = _timed("spectrum", _measure.safe_spectrum)
    _measure._logit_part = _timed("logit metrics", _measure._logit_part)
    _measure.probe_forward = _timed("probe forward", _measure.probe_forward)
    tracker.NTKTracker.update = _timed("update", tracker.NTKTracker.update)
    base = monitor_callback.NTKMonitorBase
    base._report = _timed("report", base._report)
    base._observe = _timed("observation fit", base._observe)
    tracker.NTKTracker.training_logits = _timed(
        "observation logits", tracker.NTKTracker.training_logits
    )
    capture = _observer.OutputCapture
    capture._keep_own = _timed("observation hook", capture._keep_own)
    capture._keep_child = _timed("observation hook", capture._keep_child)
    base.state_key = property(_timed("state key", base.state_key.fget))


def breakdown(parts: dict[str, float], hooks: dict[str, float]) -> dict[str, float]:
    """The monitored run's seconds per part (exclusive: they add up to the in-hook time).

    ``parts`` are the timers of :func:`instrument`, ``hooks`` the seconds per hook.
    """
    measured = parts.get("update", 0.0)
    logits = parts.get("logit metrics", 0.0) + parts.get("probe forward", 0.0)
    out = {
        "start": hooks.get("on_train_start", 0.0),
        "kernel": parts.get("kernel", 0.0),  # the start's kernel is in "start kernel"
        "linearization θ0": parts.get("linearization θ0", 0.0),
        "linearization previous": parts.get("linearization previous", 0.0),
        "logits": logits,
        "spectrum": parts.get("spectrum", 0.0),
    }
    out["rest"] = measured - sum(out[k] for k in REPORT_PARTS[:5])
    out["logging"] = parts.get("report", 0.0) - measured  # the report's hook but the update
    # the hook inside the training step is not in the monitor's hooks: counted apart
    out["set-up observation"] = parts.get("observation logits", 0.0) + parts.get(
        "observation fit", 0.0
    )
    in_hooks = sum(hooks.values())
    out["per batch"] = in_hooks - sum(out.values())
    out["observation hook (in training_step)"] = parts.get("observation hook", 0.0)
    out["state key (around every hook)"] = parts.get("state key", 0.0)
    return out


def timed_hooks(monitor: NTKMonitor) -> list[tuple[str, float]]:
    """Wrap the monitor's hooks on the instance; the list collects ``(hook, seconds)``."""
    calls: list[tuple[str, float]] = []
    for name in HOOKS:
        hook = getattr(monitor, name)

        def wrapper(*args, _hook=hook, _name=name, **kwargs):
            start = CLOCK()
            try:
                return _hook(*args, **kwargs)
            finally:
                calls.append((_name, CLOCK() - start))

        setattr(monitor, name, wrapper)
    return calls


class Run:
    """One training run: its seconds, the monitor's hook calls, reports and parts."""

    def __init__(self, seconds, calls, reports, parts, history):
        self.seconds, self.calls, self.reports = seconds, calls, reports
        self.parts, self.history = parts, history


def make_model(name: str, width: int, channels: int):
    """``(LightningModule, DataLoader)`` of ``--model``, same seed every time."""
    torch.manual_seed(0)
    x_train, y_train, _, _ = load_digits_split()
    if name == "mlp":
        network = NTKMLP(64, width, 1, 10, weight_std=math.sqrt(2.0), bias_std=0.1)
        module = DigitsClassifier(network, lr=4.0, l2=0.0, label_smoothing=0.0)
    else:  # cnn_bn: the digits as 1×8×8 images
        x_train = x_train.reshape(-1, 1, 8, 8)
        network = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, 10),
        )  # fmt: skip
        module = DigitsClassifier(network, lr=0.1, l2=0.0, label_smoothing=0.1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    return module, loader


def train_once(settings, args, steps=None) -> Run:
    """One ``trainer.fit`` of ``--model``; ``settings`` is ``None`` for no monitor."""
    module, loader = make_model(args.model, args.width, args.channels)
    callbacks, calls = [], []
    if settings is not None:
        callbacks = [NTKMonitor(**settings)]
        calls = timed_hooks(callbacks[0])
    PARTS.clear()
    logger = False
    if args.logger == "csv":
        logger = pl.loggers.CSVLogger(tempfile.mkdtemp(prefix="bench_overhead_"))
    elif args.logger == "tensorboard":
        logger = pl.loggers.TensorBoardLogger(tempfile.mkdtemp(prefix="bench_overhead_"))
    trainer = pl.Trainer(
        max_steps=steps or args.steps, accelerator="cpu", logger=logger,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    start = CLOCK()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    seconds = CLOCK() - start
    history = list(callbacks[0].history) if callbacks else []
    return Run(seconds, calls, len(history), dict(PARTS), history)


def steady_state(settings: dict, args) -> dict:
    """Alternating runs without / with the monitor in this (warm) process."""
    without, with_, inside, per_report, parts, own = [], [], [], [], [], []
    reports, history = 0, []
    for r in range(args.repeats):
        for arm in ("without", "with") if r % 2 == 0 else ("with", "without"):
            if arm == "without":
                without.append(train_once(None, args).seconds)
                continue
            run = train_once(settings, args)
            reports, history = run.reports, run.history
            with_.append(run.seconds)
            inside.append(sum(seconds for _, seconds in run.calls))
            own.append(inside[-1] / (run.seconds - inside[-1]))
            hooks: dict[str, float] = collections.defaultdict(float)
            for hook, seconds in run.calls:
                hooks[hook] += seconds
            parts.append(breakdown(run.parts, hooks))
            # the reports are the longest calls of the batch / epoch-end hooks
            ends = sorted(seconds for hook, seconds in run.calls if hook.endswith("_end"))
            per_report.append(statistics.median(ends[-reports:]) if reports else 0.0)
    return {
        "without": without,
        "with": with_,
        "paired": statistics.median(w / wo - 1 for w, wo in zip(with_, without)),
        "fastest": min(with_) / min(without) - 1,
        "inside": statistics.median(inside),
        "share": statistics.median(inside) / statistics.median(without),
        "own": statistics.median(own),
        "reports": reports,
        "per_report": statistics.median(per_report),
        "parts": {k: statistics.median(p[k] for p in parts) for k in parts[0]},
        "history": history,
    }


def check_reports(history, path: str) -> None:
    """Every numeric field equal to the saved reports' to float round-off; verdicts exactly."""
    saved = json.load(open(path))
    assert len(saved) == len(history), f"{len(history)} reports, {len(saved)} saved"
    worst = 0.0
    for old, report in zip(saved, history):
        new = report.to_dict()
        assert new["verdict"] == old["verdict"] and new["regime"] == old["regime"], (old, new)
        assert new["message"] == old["message"], (old["message"], new["message"])
        for key, value in old.items():
            if isinstance(value, float) and not (math.isnan(value) and math.isnan(new[key])):
                scale = max(abs(value), 1e-12)
                worst = max(worst, abs(new[key] - value) / scale)
                assert math.isclose(new[key], value, rel_tol=1e-5, abs_tol=1e-9), (
                    f"step {old['step']}: {key} {new[key]!r} != saved {value!r}"
                )
    print(f"reports match {path}: {len(saved)} reports, largest relative difference {worst:.1e}")


def cold_runs(settings: dict, args) -> tuple[list[float], list[float]]:
    """Each run in a fresh process: ``(without, with)`` seconds of ``trainer.fit``."""
    out: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.repeats):
        for arm in ("without", "with"):
            command = [sys.executable, __file__, "--one", arm, "--steps", str(args.steps),
                       "--width", str(args.width), "--model", args.model,
                       "--channels", str(args.channels), "--clock", args.clock,
                       "--settings", json.dumps(settings)]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            out[arm].append(float(result.stdout.strip().splitlines()[-1]))
    return out["without"], out["with"]


def print_parts(r: dict, without: float) -> None:
    """The breakdown: seconds per part in the run and its share of training without it."""
    reports = max(r["reports"], 1)
    print("  breakdown (median run; per report: over its reports):")
    for name, seconds in r["parts"].items():
        each = f"{1e3 * seconds / reports:7.2f} ms/report" if name in REPORT_PARTS else " " * 17
        print(f"    {name:38s} {1e3 * seconds:8.1f} ms {each} {100 * seconds / without:6.2f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("mlp", "cnn_bn"), default="mlp")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--width", type=int, default=4096, help="the MLP's width")
    parser.add_argument("--channels", type=int, default=32, help="the CNN's channels")
    parser.add_argument("--logger", choices=("none", "csv", "tensorboard"), default="none")
    parser.add_argument(
        "--settings", nargs="*", default=["{}"], help="NTKMonitor keyword arguments, as JSON"
    )
    parser.add_argument("--cold", action="store_true", help="also time runs in fresh processes")
    parser.add_argument("--save-reports", metavar="PATH", help="write the first setting's reports")
    parser.add_argument("--check", metavar="PATH", help="compare the reports with a saved file")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall time, or the process's CPU time (all its threads; steadier on a loaded "
        "machine, as other processes' work is not counted)",
    )  # fmt: skip
    parser.add_argument("--one", choices=("without", "with"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no per-run banner lines
    settings_list = [json.loads(s) for s in args.settings]
    if args.one:
        settings = settings_list[0] if args.one == "with" else None
        print(train_once(settings, args).seconds)
        return

    instrument()
    train_once({}, args, steps=8)  # warm-up: imports, first kernels
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, "
          f"{args.steps} steps, {args.repeats} repeats, logger {args.logger}, {args.clock} "
          "clock; steady state (one process)")  # fmt: skip
    rows = []
    for settings in settings_list:
        r = steady_state(settings, args)
        rows.append((settings, r))
        without = statistics.median(r["without"])
        print(f"\nNTKMonitor(**{settings}):")
        print(f"  without: {without:.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in r['without'])})")  # fmt: skip
        print(f"  with:    {statistics.median(r['with']):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in r['with'])})")  # fmt: skip
        print(f"  overhead: median of paired ratios {100 * r['paired']:.1f} %, "
              f"fastest run against fastest run {100 * r['fastest']:.1f} %")  # fmt: skip
        print(f"  inside the monitor's hooks: {r['inside']:.3f} s = {100 * r['share']:.2f} % "
              f"of training without it; {r['reports']} reports of "
              f"{1e3 * r['per_report']:.1f} ms")  # fmt: skip
        print(f"  inside the hooks against the same run's time outside them (median over runs, "
              f"immune to load changes between runs): {100 * r['own']:.2f} %")  # fmt: skip
        print_parts(r, without)
    print(f"\n{'settings':32s} {'reports':>7s} {'per report':>10s} {'in hooks':>8s} "
          f"{'own run':>7s} {'paired':>7s} {'fastest':>7s}")  # fmt: skip
    for settings, r in rows:
        print(f"{json.dumps(settings):32s} {r['reports']:7d} {1e3 * r['per_report']:8.1f}ms "
              f"{100 * r['share']:7.2f}% {100 * r['own']:6.2f}% {100 * r['paired']:6.1f}% "
              f"{100 * r['fastest']:6.1f}%")  # fmt: skip
    history = rows[0][1]["history"]
    if args.save_reports:
        with open(args.save_reports, "w") as f:
            json.dump([report.to_dict() for report in history], f)
    if args.check:
        check_reports(history, args.check)
    if args.cold:
        without, with_ = cold_runs(settings_list[0], args)
        extra = statistics.median(with_) - statistics.median(without)
        print(f"\nfresh processes, NTKMonitor(**{settings_list[0]}): without "
              f"{statistics.median(without):.2f} s, with {statistics.median(with_):.2f} s: "
              f"+{extra:.2f} s (one-time set-up plus the steady-state cost)")  # fmt: skip


if __name__ == "__main__":
    main()
