"""TensorBoard extras for NTK reports: spectrum histogram, kernel figure, layout, diagnosis.

Works with any ``torch.utils.tensorboard.SummaryWriter``-like ``writer`` (a Lightning
``TensorBoardLogger.experiment`` in either namespace, or a writer of a plain loop). With
the default ``prefix="ntk/"``:

* ``ntk/spectrum``: histogram of the kernel matrix's eigenvalues;
* ``ntk/kernel``: heat map of the ``(N, N)`` kernel (mean over classes), probe sorted by
  class, class blocks outlined, on a diverging colour map centred at 0 with a colour bar
  (:func:`kernel_image`);
* ``ntk/diagnosis``: the report's regime, verdict, causes and message, and the run's
  diagnosis so far, as text;
* a custom-scalars layout (:func:`write_layout`) grouping the curves, and the thresholds
  as one JSON text (``ntk/thresholds``, read back by ``lightning-ntk report``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from ._kernel_image import kernel_figure
from ._verdict import Thresholds

__all__ = [
    "is_tensorboard_logger",
    "kernel_image",
    "read_thresholds",
    "tensorboard_writers",
    "write_extras",
    "write_layout",
]


def is_tensorboard_logger(logger: Any) -> bool:
    """Whether ``logger`` is a Lightning ``TensorBoardLogger`` (of either namespace)."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def tensorboard_writers(loggers: Iterable[Any]) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger in ``loggers``."""
    writers = []
    for logger in loggers:
        if is_tensorboard_logger(logger):
            writer = logger.experiment
            if hasattr(writer, "add_histogram") and hasattr(writer, "add_image"):
                writers.append(writer)
    return writers


def write_layout(
    writer: Any, thresholds: Optional[Thresholds] = None, *, prefix: str = "ntk/"
) -> None:
    """Add a custom-scalars layout grouping the ``<prefix>*`` curves, and the thresholds.

    The thresholds (:class:`~lightning_ntk.Thresholds`, default values if ``None``) go
    into one text summary ``<prefix>thresholds`` holding their JSON (see
    :func:`read_thresholds`); no constant threshold series are logged.

    Args:
        writer: a ``SummaryWriter``-like object.
        thresholds: the monitor's verdict thresholds.
        prefix: the prefix of the logged scalar names (``NTKMonitor(prefix=...)``); it
            also names the layout's categories, so several monitors keep theirs apart.
    """
    t = thresholds or Thresholds()
    p = prefix
    name = prefix.rstrip("/") or "ntk"
    layout = {
        f"{name}: drift": {
            "kernel relative change": ["Multiline", [f"{p}relative_change"]],
            "kernel velocity (relative change per doubling of steps)": [
                "Multiline",
                [f"{p}kernel_velocity"],
            ],
            "linearization error (around θ0, around the previous report)": [
                "Multiline",
                [f"{p}linearization_error", f"{p}local_linearization_error"],
            ],
            "kernel distance": ["Multiline", [f"{p}kernel_distance"]],
            "regime (0 lazy, 1 locally linear, 2 feature learning, 3 logits diverging)": [
                "Multiline",
                [f"{p}regime"],
            ],
            "verdict (1 lazy, 0.5 drifting, 0 alarm)": ["Multiline", [f"{p}lazy"]],
        },
        f"{name}: logits": {
            "centered logit norm": ["Multiline", [f"{p}logit_norm", f"{p}logit_growth"]],
            "logit norm slope per doubling of steps": ["Multiline", [f"{p}logit_slope"]],
            "linearized model": ["Multiline", [f"{p}prob_tv", f"{p}argmax_agreement"]],
            "parameter distance": ["Multiline", [f"{p}param_distance"]],
        },
        f"{name}: spectrum": {
            "eigenvalues": ["Multiline", [f"{p}eig_max", f"{p}eig_min"]],
            "effective rank": ["Multiline", [f"{p}effective_rank"]],
            "condition number": ["Multiline", [f"{p}condition_number"]],
            "target alignment": ["Multiline", [f"{p}target_alignment"]],
        },
        f"{name}: layers": {
            "per-layer relative change": ["Multiline", [f"{p}layer/.*/relative_change"]],
            "per-layer share of the kernel's trace": ["Multiline", [f"{p}layer/.*/share"]],
        },
    }
    writer.add_custom_scalars(layout)
    writer.add_text(f"{prefix}thresholds", json.dumps(dataclasses.asdict(t)), 0)


def read_thresholds(text: str) -> dict[str, tuple[float, float]]:
    """``{signal: (lower, alarm)}`` from the JSON text :func:`write_layout` wrote.

    Returns the pairs ``relative_change``, ``linearization_error`` and ``logit_slope``
    found in it; empty when the text is not such JSON.
    """
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, Mapping):
        return {}
    out = {}
    for signal in ("relative_change", "linearization_error", "logit_slope"):
        pair = data.get(signal)
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            out[signal] = (float(pair[0]), float(pair[1]))
    return out


def write_extras(
    writer: Any,
    report: Any,
    *,
    eigenvalues: Optional[Tensor] = None,
    kernel: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    prefix: str = "ntk/",
    diagnosis: Optional[str] = None,
) -> None:
    """Write the histogram, kernel figure and diagnosis text of a report.

    Args:
        writer: a ``SummaryWriter``-like object.
        report: an :class:`~lightning_ntk.NTKReport`; its ``step`` is the x-axis.
        eigenvalues: eigenvalues of the kernel matrix (``<prefix>spectrum``), if known.
        kernel: the ``(N, N)`` kernel matrix (``<prefix>kernel``), if known.
        labels: probe labels ``(N,)`` (or soft targets ``(N, C)``) to sort the heat map
            by class and outline the class blocks.
        prefix: the prefix of the tags.
        diagnosis: the run so far (:attr:`NTKTracker.diagnosis
            <lightning_ntk.NTKTracker.diagnosis>`), appended to the report's text.
    """
    step = int(report.step)
    if eigenvalues is not None and eigenvalues.numel() and torch.isfinite(eigenvalues).all():
        writer.add_histogram(f"{prefix}spectrum", eigenvalues.detach().double().cpu(), step)
    if kernel is not None and torch.isfinite(kernel).all():
        writer.add_image(f"{prefix}kernel", kernel_image(kernel, labels), step, dataformats="CHW")
    causes = ", ".join(report.causes) or "none"
    regime = getattr(report, "regime", "") or "unknown"
    text = (
        f"**{regime}**, verdict **{report.verdict}** at step {step} (causes: {causes}; "
        f"predicted logits: {report.predicted_regime}). {report.message}"
    )
    measured = getattr(report, "kernel", "")  # which kernel: NTKReport.kernel
    if measured:
        text += f"\n\nKernel measured: {measured}."
    if diagnosis:
        text += f"\n\nRun so far: {diagnosis}."
    writer.add_text(f"{prefix}diagnosis", text, step)


def kernel_image(kernel: Tensor, labels: Optional[Tensor] = None) -> Tensor:
    """The kernel heat-map figure ``(3, H, W)`` in ``[0, 1]`` of an ``(N, N)`` kernel.

    Rows and columns are sorted by class when ``labels`` are given, each entry is an
    upsampled block (the map is at least 288 pixels wide), the colours are a diverging
    map centred at 0 (blue negative, white 0, red positive) on ``[−max|K|, max|K|]``,
    class blocks are outlined and a labelled colour bar is drawn on the right. Needs
    only torch.
    """
    return kernel_figure(kernel, labels)
