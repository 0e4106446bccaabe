"""``lightning-ntk report``: the drift figure and a summary from TensorBoard logs.

Reads every run below a log directory (each directory holding
``events.out.tfevents.*`` files with ``ntk/`` scalars, as written by
:class:`~lightning_ntk.NTKMonitor` or a plain loop logging :meth:`NTKTracker.scalars
<lightning_ntk.NTKTracker.scalars>`) with TensorBoard's own ``EventAccumulator``, and
plots against the step, one line per run:

* kernel drift ``relative_change = ‖Θ_t − Θ0‖_F / ‖Θ0‖_F``;
* ``linearization_error = ‖f − f_lin‖_F / ‖f − f0‖_F``;
* the mean centered logit norm ``logit_norm``;

with the verdict thresholds drawn (read from the ``ntk/thresholds`` text the monitor
writes, or from the layout's chart titles / ``ntk/threshold/*`` scalars of logs from
earlier versions, else the :class:`~lightning_ntk.Thresholds` defaults; for the logits a
line rising by the alarm slope per doubling of steps). The summary names each run's last
verdict and regime (``ntk/regime``).

The text summary needs only the core dependencies; the figure needs matplotlib (the
``plot`` extra).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["NoNTKDataError", "Run", "load_run", "load_runs", "plot_runs", "summarize"]

EVENT_PREFIX = "events.out.tfevents."
DIAGNOSIS_TAG = "ntk/diagnosis"
LAYOUT_TAG = "custom_scalars__config__"
# chart titles of the layout in logs of earlier versions
_TITLE = re.compile(
    r"^(?P<name>kernel relative change|linearization error) "
    r"\(drift (?P<drift>[-+.\de]+), break (?P<brk>[-+.\de]+)\)$"
)
_SIGNAL_OF_TITLE = {
    "kernel relative change": "relative_change",
    "linearization error": "linearization_error",
}
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
    ("ntk/logit_norm", "centered logit norm", "logit_slope"),
)


class NoNTKDataError(ValueError):
    """A log directory without any ``ntk/`` scalars."""


@dataclass
class Run:
    """The ``ntk/`` data of one TensorBoard run.

    Attributes:
        label: name shown in the figure and the summary.
        path: the run's directory.
        scalars: ``{tag: (steps, values)}`` for every ``ntk/`` scalar tag.
        diagnosis: ``(step, text)`` of the last ``ntk/diagnosis`` text, if logged.
        thresholds: ``{signal: (drift, break)}`` read from the run's custom-scalars layout.
    """

    label: str
    path: Path
    scalars: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    diagnosis: Optional[tuple[int, str]] = None
    thresholds: dict[str, tuple[float, float]] = field(default_factory=dict)

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

    Args:
        logdir: a TensorBoard log directory.
        prefix: the prefix of the monitor's scalars (``NTKMonitor(prefix=...)``); the
            runs' scalars are keyed ``ntk/<name>`` whatever it is.

    Raises:
        NoNTKDataError: no event files, or none with ``ntk/`` scalars.
    """
    logdir = Path(logdir)
    dirs = sorted(
        {
            Path(root)
            for root, _, files in os.walk(logdir)
            for f in files
            if f.startswith(EVENT_PREFIX)
        }
    )
    if not dirs:
        raise NoNTKDataError(
            f"Expected TensorBoard event files ({EVENT_PREFIX}*) below '{logdir}' but found none."
        )
    runs = []
    for d in dirs:
        label = d.relative_to(logdir).as_posix() if d != logdir else d.name
        run = load_run(d, label=label, strict=False, prefix=prefix)
        if run.scalars:
            runs.append(run)
    if not runs:
        raise NoNTKDataError(
            f"Found {len(dirs)} TensorBoard run(s) below '{logdir}' but none with {prefix} "
            "scalars: log them with NTKMonitor (or NTKTracker.scalars() in a plain loop)."
        )
    return runs


def load_run(
    path: Union[str, Path],
    *,
    label: Optional[str] = None,
    strict: bool = True,
    prefix: str = "ntk/",
) -> Run:
    """The ``<prefix>`` scalars and last diagnosis of the run whose event files are in ``path``.

    The scalars are keyed ``ntk/<name>`` whatever the prefix.

    Raises:
        NoNTKDataError: with ``strict``, when the run has no ``ntk/`` scalars.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(path)
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    run = Run(label=label or path.name, path=path)
    for tag in tags.get("scalars", []):
        if tag.startswith(prefix):
            by_step = {e.step: e.value for e in accumulator.Scalars(tag)}  # last write wins
            steps = sorted(by_step)
            run.scalars["ntk/" + tag[len(prefix) :]] = (steps, [by_step[s] for s in steps])
    for tag in tags.get("tensors", []):
        if tag == LAYOUT_TAG:
            for event in accumulator.Tensors(tag):
                run.thresholds.update(_layout_thresholds(event.tensor_proto, prefix))
        if tag.startswith(f"{prefix}thresholds"):
            from ..monitor.loggers import read_thresholds

            for event in accumulator.Tensors(tag):
                run.thresholds.update(read_thresholds(_text_of(event.tensor_proto)))
        if tag.startswith(f"{prefix}diagnosis"):
            events = accumulator.Tensors(tag)
            if events:
                last = max(events, key=lambda e: e.step)
                run.diagnosis = (last.step, _text_of(last.tensor_proto))
    if strict and not run.scalars:
        raise NoNTKDataError(f"Expected {prefix} scalars in the run '{path}' but found none.")
    return run


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

    The logs hold them in the layout's chart titles (or, written by earlier versions, as
    ``ntk/threshold/*`` scalars).
    """
    from ..monitor._verdict import Thresholds

    defaults = Thresholds()
    out = {
        "relative_change": defaults.relative_change,
        "linearization_error": defaults.linearization_error,
        "logit_slope": defaults.logit_slope,
    }
    for signal in ("relative_change", "linearization_error", "logit_slope"):
        logged = [
            run.thresholds.get(signal)
            or (
                run.last(f"ntk/threshold/{signal}_drift"),
                run.last(f"ntk/threshold/{signal}_break"),
            )
            for run in runs
        ]
        logged = [pair for pair in logged if all(math.isfinite(v) for v in pair)]
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
        return [
            ax.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{name} {value:g}")
            for value, color, name in ((drift, "tab:orange", "drift"), (brk, "tab:red", "break"))
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
    for slope, color, name in ((drift, "tab:orange", "drift"), (brk, "tab:red", "break")):
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


def _layout_thresholds(tensor_proto: object, prefix: str) -> dict[str, tuple[float, float]]:
    """``{signal: (drift, break)}`` from the chart titles of a custom-scalars layout."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    try:
        layout.ParseFromString(_bytes_of(tensor_proto))
    except Exception:  # not a layout this version can read: fall back to the defaults
        return {}
    found = {}
    name = prefix.rstrip("/") or "ntk"
    for category in layout.category:
        if not category.title.startswith(f"{name}:"):
            continue
        for chart in category.chart:
            match = _TITLE.match(chart.title)
            if match:
                signal = _SIGNAL_OF_TITLE[match["name"]]
                found[signal] = (float(match["drift"]), float(match["brk"]))
    return found


def _bytes_of(tensor_proto: object) -> bytes:
    """The bytes held by a string tensor's first element."""
    from tensorboard.util import tensor_util

    value = tensor_util.make_ndarray(tensor_proto)
    item = value.reshape(-1)[0] if value.size else b""
    return item if isinstance(item, bytes) else str(item).encode()


def _text_of(tensor_proto: object) -> str:
    """The string held by a TensorBoard text summary's tensor."""
    from tensorboard.util import tensor_util

    value = tensor_util.make_ndarray(tensor_proto)
    item = value.reshape(-1)[0] if value.size else b""
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
