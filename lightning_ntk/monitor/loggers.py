"""TensorBoard extras for NTK reports: spectrum histogram, kernel image, layout, diagnosis.

Works with any ``torch.utils.tensorboard.SummaryWriter``-like ``writer`` (a Lightning
``TensorBoardLogger.experiment`` in either namespace, or a writer of a plain loop):

* ``ntk/spectrum``: histogram of the kernel matrix's eigenvalues;
* ``ntk/kernel``: heat map of the ``(N, N)`` kernel (mean over classes), probe sorted by
  class, scaled to ``[0, 1]`` by its largest entry;
* ``ntk/diagnosis``: the report's verdict, causes and message as text;
* ``ntk/threshold/<signal>_{drift,break}``: the verdict thresholds as constant scalars,
  which the custom-scalars layout (:func:`write_layout`) draws with the drift curves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from ._verdict import Thresholds

__all__ = ["is_tensorboard_logger", "kernel_image", "write_extras", "write_layout"]


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


def write_layout(writer: Any) -> None:
    """Add a custom-scalars layout that puts each drift curve next to its thresholds.

    The threshold curves ``ntk/threshold/*`` are written by :func:`write_extras`.
    """

    def lines(signal: str) -> list[str]:
        return [f"ntk/{signal}", f"ntk/threshold/{signal}_drift", f"ntk/threshold/{signal}_break"]

    layout = {
        "NTK drift": {
            "kernel relative change": ["Multiline", lines("relative_change")],
            "linearization error": ["Multiline", lines("linearization_error")],
            "kernel distance": ["Multiline", ["ntk/kernel_distance"]],
            "laziness (1 lazy, 0.5 drifting, 0 broken)": ["Multiline", ["ntk/lazy"]],
        },
        "NTK logits": {
            "centered logit norm": ["Multiline", ["ntk/logit_norm", "ntk/logit_growth"]],
            "linearized model": ["Multiline", ["ntk/prob_tv", "ntk/argmax_agreement"]],
            "parameter distance": ["Multiline", ["ntk/param_distance"]],
        },
        "NTK spectrum": {
            "eigenvalues": ["Multiline", ["ntk/eig_max", "ntk/eig_min"]],
            "effective rank": ["Multiline", ["ntk/effective_rank"]],
            "condition number": ["Multiline", ["ntk/condition_number"]],
            "target alignment": ["Multiline", ["ntk/target_alignment"]],
        },
        "NTK layers": {
            "per-layer relative change": ["Multiline", ["ntk/layer/.*/relative_change"]]
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
    thresholds: Optional[Thresholds] = None,
) -> None:
    """Write the histogram, kernel image, diagnosis text and threshold lines of a report.

    Args:
        writer: a ``SummaryWriter``-like object.
        report: an :class:`~lightning_ntk.monitor.tracker.NTKReport`; its ``step`` is the x-axis.
        eigenvalues: eigenvalues of the kernel matrix (``ntk/spectrum``), if known.
        kernel: the ``(N, N)`` kernel matrix (``ntk/kernel``), if known.
        labels: probe labels ``(N,)`` to sort the heat map by class.
        thresholds: the verdict thresholds (``ntk/threshold/*`` scalars).
    """
    step = int(report.step)
    if eigenvalues is not None and eigenvalues.numel() and torch.isfinite(eigenvalues).all():
        writer.add_histogram("ntk/spectrum", eigenvalues.detach().double().cpu(), step)
    if kernel is not None and torch.isfinite(kernel).all():
        writer.add_image("ntk/kernel", kernel_image(kernel, labels), step, dataformats="CHW")
    causes = ", ".join(report.causes) or "none"
    writer.add_text(
        "ntk/diagnosis",
        f"**{report.verdict}** at step {step} (causes: {causes}; predicted regime: "
        f"{report.predicted_regime}). {report.message}",
        step,
    )
    thresholds = thresholds or Thresholds()
    for signal in ("relative_change", "linearization_error"):
        drift, brk = getattr(thresholds, signal)
        writer.add_scalar(f"ntk/threshold/{signal}_drift", drift, step)
        writer.add_scalar(f"ntk/threshold/{signal}_break", brk, step)


def kernel_image(kernel: Tensor, labels: Optional[Tensor] = None) -> Tensor:
    """An RGB heat map ``(3, N, N)`` in ``[0, 1]`` of an ``(N, N)`` kernel.

    Rows and columns are sorted by class when integer ``labels (N,)`` are given; entries
    are scaled by the largest absolute entry and coloured from blue (−1) over white (0)
    to red (+1).
    """
    K = kernel.detach().double().cpu()
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(
            f"Expected `kernel` to be a square (N, N) matrix but got {tuple(K.shape)}."
        )
    if labels is not None and labels.ndim == 1 and not labels.is_floating_point():
        order = torch.argsort(labels.cpu(), stable=True)
        K = K[order][:, order]
    scale = K.abs().max()
    v = (K / scale if scale > 0 else K).clamp(-1, 1)  # (N, N) in [-1, 1]
    pos, neg = v.clamp(min=0), (-v).clamp(min=0)
    red = 1 - neg
    green = 1 - pos - neg
    blue = 1 - pos
    return torch.stack([red, green, blue]).float()  # (3, N, N)
