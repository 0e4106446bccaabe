"""Where a report's scalars go in a Lightning run, and the lines the callback prints.

:func:`publish` writes the scalars into the trainer's metric dicts (what
``EarlyStopping`` and ``ModelCheckpoint`` read) directly, since ``pl_module.log`` costs
about half a millisecond per key; :func:`rank_zero_info` prints one line on rank 0 as
Lightning's own callbacks do.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import torch

from .report import NTKReport

__all__ = [
    "PROGRESS_BAR_KEYS",
    "publish",
    "rank_zero_info",
    "rank_zero_warn",
    "verbose_line",
    "with_prefix",
]

PROGRESS_BAR_KEYS = ("ntk/relative_change", "ntk/lazy")


def publish(
    trainer: Any,
    pl_module: Any,
    scalars: Mapping[str, float],
    epoch_end: bool,
    prog_bar: bool,
    prog_bar_keys: Collection[str] = PROGRESS_BAR_KEYS,
) -> None:
    """Put the scalars where other callbacks and the progress bar read them.

    Falls back to ``pl_module.log`` (``logger=False``) if the trainer does not expose
    the two metric dicts as plain dicts.
    """
    callback_metrics = getattr(trainer, "callback_metrics", None)
    progress_bar_metrics = getattr(trainer, "progress_bar_metrics", None)
    if isinstance(callback_metrics, dict) and isinstance(progress_bar_metrics, dict):
        dtype = torch.get_default_dtype()
        for name, value in scalars.items():
            callback_metrics[name] = torch.tensor(value, dtype=dtype)
            if prog_bar and name in prog_bar_keys:
                progress_bar_metrics[name] = value
        return
    for name, value in scalars.items():
        pl_module.log(
            name,
            value,
            on_step=not epoch_end,
            on_epoch=epoch_end,
            prog_bar=prog_bar and name in prog_bar_keys,
            logger=False,
            batch_size=1,
        )


def with_prefix(name: str, prefix: str) -> str:
    """``ntk/<key>`` as ``<prefix><key>``."""
    return prefix + name.removeprefix("ntk/")


def verbose_line(report: NTKReport, prefix: str, message: bool = True) -> str:
    """One line per report for ``verbose=True``; ``message=False`` leaves the message out."""
    line = (
        f"NTKMonitor ({prefix}) step {report.step}: {report.regime or 'unknown'}, verdict "
        f"{report.verdict} (relative_change {report.relative_change:.3g}, kernel_velocity "
        f"{report.kernel_velocity:.3g}, linearization_error {report.linearization_error:.3g}, "
        f"logit_growth {report.logit_growth:.3g})."
    )
    return f"{line} {report.message}" if message else line


def rank_zero_info(namespace: str, message: str) -> None:
    """One line on rank 0 through the namespace's logger, as ``EarlyStopping`` does."""
    try:
        rank_zero = importlib.import_module(f"{namespace}.utilities.rank_zero")
        rank_zero.rank_zero_info(message)
    except (ImportError, AttributeError):
        print(message)


def rank_zero_warn(namespace: str, message: str, category: type[Warning]) -> None:
    """One warning on rank 0 through the namespace's ``rank_zero_warn``, as its callbacks do.

    Lightning attributes it to the user's code; without Lightning it points at the caller.
    """
    try:
        rank_zero = importlib.import_module(f"{namespace}.utilities.rank_zero")
        rank_zero.rank_zero_warn(message, category=category)
    except (ImportError, AttributeError):
        warnings.warn(message, category, stacklevel=3)
