"""TensorBoard extras for NTK reports: spectrum histogram, kernel figure, layout, diagnosis.

Works with any ``torch.utils.tensorboard.SummaryWriter``-like ``writer`` (a Lightning
``TensorBoardLogger.experiment`` in either namespace, or a writer of a plain loop). With
the default ``prefix="ntk/"``:

* ``ntk/spectrum``: histogram of the kernel matrix's eigenvalues;
* ``ntk/kernel``: heat map of the ``(N, N)`` kernel (mean over classes), probe sorted by
  class, class blocks outlined, on a diverging colour map centred at 0 with a colour bar
  (:func:`kernel_image`);
* ``ntk/diagnosis``: the report's verdict, causes and message as text;
* a custom-scalars layout (:func:`write_layout`) grouping the curves; the verdict
  thresholds are written into its chart titles, not as scalar series.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from ._kernel_image import kernel_figure
from ._verdict import Thresholds

__all__ = [
    "is_tensorboard_logger",
    "kernel_image",
    "tensorboard_writers",
    "threshold_title",
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


def threshold_title(name: str, thresholds: tuple[float, float]) -> str:
    """A chart title with the thresholds: ``kernel relative change (drift 0.1, break 0.5)``."""
    drift, brk = thresholds
    return f"{name} (drift {drift:g}, break {brk:g})"


def write_layout(
    writer: Any, thresholds: Optional[Thresholds] = None, *, prefix: str = "ntk/"
) -> None:
    """Add a custom-scalars layout grouping the ``<prefix>*`` curves.

    The drift and break thresholds of the kernel drift and the linearization error
    (:class:`~lightning_ntk.Thresholds`, default values if ``None``) are part of their
    chart titles; no constant threshold series are logged.

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
            threshold_title("kernel relative change", t.relative_change): [
                "Multiline",
                [f"{p}relative_change"],
            ],
            threshold_title("linearization error", t.linearization_error): [
                "Multiline",
                [f"{p}linearization_error"],
            ],
            "kernel distance": ["Multiline", [f"{p}kernel_distance"]],
            "laziness (1 lazy, 0.5 drifting, 0 broken)": ["Multiline", [f"{p}lazy"]],
        },
        f"{name}: logits": {
            threshold_title("centered logit norm, slope per doubling of steps", t.logit_slope): [
                "Multiline",
                [f"{p}logit_norm", f"{p}logit_growth"],
            ],
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


def write_extras(
    writer: Any,
    report: Any,
    *,
    eigenvalues: Optional[Tensor] = None,
    kernel: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    prefix: str = "ntk/",
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
    """
    step = int(report.step)
    if eigenvalues is not None and eigenvalues.numel() and torch.isfinite(eigenvalues).all():
        writer.add_histogram(f"{prefix}spectrum", eigenvalues.detach().double().cpu(), step)
    if kernel is not None and torch.isfinite(kernel).all():
        writer.add_image(f"{prefix}kernel", kernel_image(kernel, labels), step, dataformats="CHW")
    causes = ", ".join(report.causes) or "none"
    writer.add_text(
        f"{prefix}diagnosis",
        f"**{report.verdict}** at step {step} (causes: {causes}; predicted regime: "
        f"{report.predicted_regime}). {report.message}",
        step,
    )


def kernel_image(kernel: Tensor, labels: Optional[Tensor] = None) -> Tensor:
    """The kernel heat-map figure ``(3, H, W)`` in ``[0, 1]`` of an ``(N, N)`` kernel.

    Rows and columns are sorted by class when ``labels`` are given, each entry is an
    upsampled block (the map is at least 288 pixels wide), the colours are a diverging
    map centred at 0 (blue negative, white 0, red positive) on ``[−max|K|, max|K|]``,
    class blocks are outlined and a labelled colour bar is drawn on the right. Needs
    only torch.
    """
    return kernel_figure(kernel, labels)
