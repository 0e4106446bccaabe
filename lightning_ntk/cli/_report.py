"""``lightning-ntk report``: the drift figure and a summary from TensorBoard or CSV logs.

Reads every run below a log directory: a directory holding ``events.out.tfevents.*``
files with ``ntk/`` scalars (``TensorBoardLogger``, or a plain loop logging
:meth:`NTKTracker.scalars <lightning_ntk.NTKTracker.scalars>` with a ``SummaryWriter``),
read with TensorBoard's own ``EventAccumulator``, or a ``metrics.csv`` with ``ntk/``
columns (``CSVLogger``). A run resumed from a checkpoint into a new logger version
(``<name>/version_1`` after ``<name>/version_0``, its reports following on from the
earlier version's last step) is joined to the run it continues: one curve, one summary.
It plots against the step, one line per run:

* kernel drift ``relative_change = ‖Θ_t − Θ0‖_F / ‖Θ0‖_F``;
* ``linearization_error = ‖f − f_lin‖_F / ‖f − f0‖_F``;
* the mean logit norm ``logit_norm`` (centered, in margin units);

with the verdict thresholds drawn (read from the ``ntk/thresholds`` text the monitor
writes, else the :class:`~lightning_ntk.Thresholds` defaults; for the logits a line rising by the
alarm slope per doubling of steps). The summary names each run's last verdict and regime
(``ntk/regime``).

The text summary needs only the core dependencies; the figure needs matplotlib (the
``plot`` extra).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = [
    "NoNTKDataError",
    "Run",
    "join_resumed",
    "load_run",
    "load_runs",
    "plot_runs",
    "summarize",
]

EVENT_PREFIX = "events.out.tfevents."
CSV_METRICS = "metrics.csv"  # CSVLogger's file
_VERSION = re.compile(r"^version_(?P<number>\d+)$")  # Lightning's logger versions
DIAGNOSIS_TAG = "ntk/diagnosis"
VERDICT_OF_SCORE = {1.0: "lazy", 0.5: "drifting", 0.0: "broken"}
REGIME_OF_CODE = {  # ntk/regime (lightning_ntk.monitor._verdict.REGIME_CODE)
    0.0: "lazy",
    1.0: "locally linear",
    2.0: "feature learning",
    3.0: "logits diverging",
}
PANELS = (
    ("ntk/relative_change", "kernel drift ‖Θt − Θ0‖ / ‖Θ0‖", "relative_change"),
    (
        "ntk/linearization_error",
        "linearization error ‖f − f_lin‖ / ‖f − f0‖",
        "linearization_error",
    ),
    ("ntk/logit_norm", "logit norm (margin units)", "logit_slope"),
)


class NoNTKDataError(ValueError):
    """A log directory without any ``ntk/`` scalars."""


@dataclass
class Run:
    """The ``ntk/`` data of one run (TensorBoard events or a CSVLogger ``metrics.csv``).

    Attributes:
        label: name shown in the figure and the summary.
        path: the run's directory (the first one, for a run resumed in later versions).
        scalars: ``{tag: (steps, values)}`` for every ``ntk/`` scalar tag.
        diagnosis: ``(step, text)`` of the last ``ntk/diagnosis`` text, if logged
            (TensorBoard only).
        thresholds: ``{signal: (drift, break)}`` read from the run's custom-scalars layout.
        segments: ``(directory label, first step, last step)`` of each logger version
            the run was written in, in order; one entry unless it was resumed.
    """

    label: str
    path: Path
    scalars: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    diagnosis: Optional[tuple[int, str]] = None
    thresholds: dict[str, tuple[float, float]] = field(default_factory=dict)
    segments: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        """Every step with an ``ntk/`` scalar, sorted."""
        return sorted({step for steps, _ in self.scalars.values() for step in steps})

    def last(self, tag: str) -> float:
        """The last logged value of ``tag`` (``nan`` if never logged)."""
        values = self.scalars.get(tag, ([], []))[1]
        return values[-1] if values else math.nan

    @property
    def verdict(self) -> str:
        """The last verdict, from ``ntk/lazy`` (1 lazy, 0.5 drifting, 0 broken)."""
        score = self.last("ntk/lazy")
        return VERDICT_OF_SCORE.get(score, "unknown")

    @property
    def regime(self) -> str:
        """The last regime, from ``ntk/regime`` (``"unknown"`` in logs without it)."""
        return REGIME_OF_CODE.get(self.last("ntk/regime"), "unknown")


def load_runs(logdir: Union[str, Path], *, prefix: str = "ntk/") -> list[Run]:
    """Every run below ``logdir`` with ``ntk/`` scalars, labelled by its relative path.

    Resumed runs are joined (:func:`join_resumed`).

    Args:
        logdir: a TensorBoard or CSVLogger log directory.
        prefix: the prefix of the monitor's scalars (``NTKMonitor(prefix=...)``); the
            runs' scalars are keyed ``ntk/<name>`` whatever it is.

    Raises:
        NoNTKDataError: no event or ``metrics.csv`` files, or none with ``ntk/`` scalars.
    """
    logdir = Path(logdir)
    dirs = sorted(
        {
            Path(root)
            for root, _, files in os.walk(logdir)
            for f in files
            if f.startswith(EVENT_PREFIX) or f == CSV_METRICS
        }
    )
    if not dirs:
        raise NoNTKDataError(
            f"Expected TensorBoard event files ({EVENT_PREFIX}*) or CSVLogger "
            f"{CSV_METRICS} files below '{logdir}' but found none."
        )
    runs = []
    for d in dirs:
        label = d.relative_to(logdir).as_posix() if d != logdir else d.name
        run = load_run(d, label=label, strict=False, prefix=prefix)
        if run.scalars:
            runs.append(run)
    if not runs:
        found = sorted(set().union(*(_monitor_prefixes(d) for d in dirs)))
        hint = (
            f"; they hold the monitor's scalars under {', '.join(found)}: pass --prefix {found[0]}"
            if found
            else ": log them with NTKMonitor (or NTKTracker.scalars() in a plain loop)"
        )
        raise NoNTKDataError(
            f"Found {len(dirs)} run(s) below '{logdir}' but none with {prefix} scalars{hint}."
        )
    return join_resumed(runs)


def _monitor_prefixes(path: Path) -> set[str]:
    """The prefixes of the monitor's scalars in one run: those of its ``relative_change``."""
    run = load_run(path, strict=False, prefix="")
    suffix = "relative_change"
    return {
        tag[len("ntk/") : -len(suffix)]
        for tag in run.scalars
        if tag.endswith(suffix) and "layer/" not in tag and len(tag) > len("ntk/" + suffix)
    }


def load_run(
    path: Union[str, Path],
    *,
    label: Optional[str] = None,
    strict: bool = True,
    prefix: str = "ntk/",
) -> Run:
    """The ``<prefix>`` scalars and last diagnosis of the run whose logs are in ``path``.

    Reads the TensorBoard event files in ``path``, or, when they hold no ``<prefix>``
    scalars, its CSVLogger ``metrics.csv``. The scalars are keyed ``ntk/<name>``
    whatever the prefix.

    Raises:
        NoNTKDataError: with ``strict``, when the run has no ``ntk/`` scalars.
    """
    path = Path(path)
    run = Run(label=label or path.name, path=path)
    if any(f.name.startswith(EVENT_PREFIX) for f in path.iterdir()):
        _read_events(run, path, prefix)
    if not run.scalars and (path / CSV_METRICS).is_file():
        _read_csv(run, path / CSV_METRICS, prefix)
    if strict and not run.scalars:
        raise NoNTKDataError(f"Expected {prefix} scalars in the run '{path}' but found none.")
    if run.scalars:
        steps = run.steps
        run.segments = [(run.label, steps[0], steps[-1])]
    return run


def join_resumed(runs: Sequence[Run]) -> list[Run]:
    """Join each run to the earlier logger versions it continues.

    Lightning resuming from a checkpoint into a new logger version writes
    ``<name>/version_{k+1}`` beside ``<name>/version_k``; the monitor's reports there
    continue at the checkpoint's step. A run in ``version_{k+1}`` whose first step is
    at or after the last step of the run in ``version_k`` (the same ``<name>``) is
    joined to it (at a step both logged, the later version wins); a version that starts
    again from an earlier step is a new run of its own.

    Returns:
        The runs, joined runs labelled ``<name>/version_0+version_1``, in input order.
    """
    joined: list[Run] = []
    previous: dict[Path, Run] = {}  # directory of the versions -> the run its last one continues
    for run in sorted(runs, key=_version_order):
        match = _VERSION.match(run.path.name)
        earlier = previous.get(run.path.parent) if match else None
        if earlier is not None and run.scalars and run.steps[0] >= earlier.steps[-1]:
            _append(earlier, run)
            continue
        joined.append(run)
        if match:
            previous[run.path.parent] = run
    order = {id(run): i for i, run in enumerate(runs)}
    return sorted(joined, key=lambda run: order[id(run)])


def summarize(runs: Sequence[Run]) -> str:
    """One block per run: last step, verdict, drift signals and the last diagnosis."""
    lines = []
    for run in runs:
        steps = run.scalars.get("ntk/relative_change", ([], []))[0]
        step = steps[-1] if steps else "?"
        lines.append(
            f"{run.label}: {run.verdict} at step {step} ({run.regime}) — relative_change "
            f"{run.last('ntk/relative_change'):.3f}, linearization_error "
            f"{run.last('ntk/linearization_error'):.3f}, logit_norm "
            f"{run.last('ntk/logit_norm'):.2f} (growth {run.last('ntk/logit_growth'):.2f})"
        )
        if len(run.segments) > 1:
            parts = ", then ".join(
                f"{label.rpartition('/')[2]} (steps {first}–{last})"
                for label, first, last in run.segments
            )
            lines.append(f"    one run, resumed: {parts}")
        if run.diagnosis is not None:
            lines.append(f"    {run.diagnosis[1]}")
    return "\n".join(lines)


def plot_runs(runs: Sequence[Run], out: Union[str, Path], *, title: Optional[str] = None) -> Path:
    """Plot drift, linearization error and logit norm of ``runs`` against step; save to ``out``.

    Returns:
        The path of the written image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = _thresholds(runs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    run_handles: dict[str, Any] = {}
    for ax, (tag, ylabel, signal) in zip(axes, PANELS):
        for i, run in enumerate(runs):
            steps, values = run.scalars.get(tag, ([], []))
            points = [(s, v) for s, v in zip(steps, values) if s > 0 and math.isfinite(v)]
            if points:
                label = f"{run.label} → {run.verdict}"
                (line,) = ax.plot(
                    *zip(*points), marker="o", markersize=3, color=colors[i % len(colors)]
                )
                run_handles.setdefault(label, line)
        threshold_handles = _draw_thresholds(ax, signal, thresholds, runs, tag)
        if threshold_handles:
            ax.legend(handles=threshold_handles, fontsize=7, loc="upper left")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if signal != "logit_slope":
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    labels = list(run_handles)
    fig.legend(list(run_handles.values()), labels, loc="lower center", ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    rows = max(1, math.ceil(len(labels) / 2))
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------- helpers


def _thresholds(runs: Sequence[Run]) -> dict[str, tuple[float, float]]:
    """``{signal: (drift, break)}`` shared by all runs, from their logs, else the defaults.

    TensorBoard logs hold them as the ``thresholds`` text the monitor writes.
    """
    from ..monitor._verdict import Thresholds

    defaults = Thresholds()
    out = {
        "relative_change": defaults.relative_change,
        "linearization_error": defaults.linearization_error,
        "logit_slope": defaults.logit_slope,
    }
    for signal in ("relative_change", "linearization_error", "logit_slope"):
        logged = [run.thresholds[signal] for run in runs if signal in run.thresholds]
        if logged and all(pair == logged[0] for pair in logged):
            out[signal] = logged[0]
    return out


def _draw_thresholds(
    ax: Any,
    signal: str,
    thresholds: dict[str, tuple[float, float]],
    runs: Sequence[Run],
    tag: str,
) -> list[Any]:
    """Draw the drift / break thresholds of ``signal`` on ``ax``; return their line handles."""
    drift, brk = thresholds[signal]
    if signal != "logit_slope":
        # below the first the run is lazy; the second is an alarm only with expect="lazy"
        names = ((drift, "tab:orange", "lazy below"), (brk, "tab:red", "alarm with expect='lazy'"))
        return [
            ax.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{name} {value:g}")
            for value, color, name in names
        ]
    # The logit signal is a slope per doubling of steps: draw lines rising at those slopes
    # from the runs' mean logit norm at the first step where the slope is read.
    from ..monitor._verdict import Thresholds

    start = Thresholds().min_trend_step
    anchors, last_step = [], 0
    for run in runs:
        steps, values = run.scalars.get(tag, ([], []))
        later = [(s, v) for s, v in zip(steps, values) if s >= start and math.isfinite(v)]
        if later:
            anchors.append(later[0])
            last_step = max(last_step, steps[-1])
    if not anchors or last_step <= start:
        return []
    s0 = min(s for s, _ in anchors)
    v0 = sum(v for _, v in anchors) / len(anchors)
    xs = [s0, last_step]
    octaves = math.log2(last_step / s0)
    handles = []
    names = ((drift, "tab:orange", "growing"), (brk, "tab:red", "alarm, logits diverging"))
    for slope, color, name in names:
        (line,) = ax.plot(
            xs,
            [v0, v0 + slope * octaves],
            color=color,
            linestyle="--",
            linewidth=1,
            label=f"{name}: +{slope:g} per doubling of steps",
        )
        handles.append(line)
    return handles


def _read_events(run: Run, path: Path, prefix: str) -> None:
    """Fill ``run`` from the TensorBoard event files in ``path``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    for tag in tags.get("scalars", []):
        if tag.startswith(prefix):
            by_step = {e.step: e.value for e in accumulator.Scalars(tag)}  # last write wins
            steps = sorted(by_step)
            run.scalars["ntk/" + tag[len(prefix) :]] = (steps, [by_step[s] for s in steps])
    for tag in tags.get("tensors", []):
        if tag.startswith(f"{prefix}thresholds"):
            from ..monitor.loggers import read_thresholds

            for event in accumulator.Tensors(tag):
                run.thresholds.update(read_thresholds(_text_of(event.tensor_proto)))
        if tag.startswith(f"{prefix}diagnosis"):
            events = accumulator.Tensors(tag)
            if events:
                last = max(events, key=lambda e: e.step)
                run.diagnosis = (last.step, _text_of(last.tensor_proto))


def _read_csv(run: Run, path: Path, prefix: str) -> None:
    """Fill ``run`` from a CSVLogger ``metrics.csv`` (a ``step`` column, one per metric).

    CSVLogger writes one row per ``log_metrics`` call, empty cells for the metrics that
    call did not log; a row without a step is skipped.
    """
    by_tag: dict[str, dict[int, float]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            step_text = (row.get("step") or "").strip()
            try:
                step = int(float(step_text))
            except ValueError:
                continue
            for column, text in row.items():
                if column and column.startswith(prefix) and text not in (None, ""):
                    try:
                        value = float(text)
                    except ValueError:
                        continue
                    by_tag.setdefault("ntk/" + column[len(prefix) :], {})[step] = value
    for tag, by_step in by_tag.items():
        steps = sorted(by_step)  # last write wins
        run.scalars[tag] = (steps, [by_step[s] for s in steps])


def _version_order(run: Run) -> tuple[str, int, str]:
    """Sort key: runs grouped by directory, logger versions in numeric order."""
    match = _VERSION.match(run.path.name)
    number = int(match["number"]) if match else -1
    return (run.path.parent.as_posix(), number, run.path.name)


def _append(run: Run, later: Run) -> None:
    """Extend ``run`` with ``later``, the same run resumed in the next logger version."""
    for tag, (steps, values) in later.scalars.items():
        by_step = dict(zip(*run.scalars.get(tag, ([], []))))
        by_step.update(zip(steps, values))
        ordered = sorted(by_step)
        run.scalars[tag] = (ordered, [by_step[s] for s in ordered])
    if later.diagnosis is not None and (
        run.diagnosis is None or later.diagnosis[0] >= run.diagnosis[0]
    ):
        run.diagnosis = later.diagnosis
    run.thresholds.update(later.thresholds)
    run.segments.extend(later.segments)
    run.label = f"{run.label}+{later.path.name}"


def _text_of(tensor_proto: object) -> str:
    """The string held by a TensorBoard text summary's tensor."""
    from tensorboard.util import tensor_util

    value = tensor_util.make_ndarray(tensor_proto)
    item = value.reshape(-1)[0] if value.size else b""
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
