"""Kernel, logit and linearization metrics: plain functions and ``torchmetrics`` classes.

Functions (:mod:`.functional`):

* kernel drift: :func:`relative_change`, :func:`kernel_distance`
* alignment: :func:`kernel_alignment`, :func:`target_alignment`
* spectrum: :func:`kernel_matrix`, :func:`spectrum` → :class:`Spectrum`
* logits and parameters: :func:`logit_norm`, :func:`param_distance`
* linearized model: :func:`linearization_error`, :func:`prob_tv`, :func:`argmax_agreement`

Classes (:mod:`.classes`, ``torchmetrics.Metric``): :class:`TargetAlignment`,
:class:`LinearizationError`, :class:`ProbTV`, :class:`ArgmaxAgreement`, :class:`LogitNorm`.
They are imported lazily (PEP 562): the functions alone do not import torchmetrics.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .functional import (
    Spectrum,
    argmax_agreement,
    kernel_alignment,
    kernel_distance,
    kernel_matrix,
    linearization_error,
    logit_norm,
    param_distance,
    prob_tv,
    relative_change,
    spectrum,
    target_alignment,
)

__all__ = [
    "ArgmaxAgreement",
    "LinearizationError",
    "LogitNorm",
    "ProbTV",
    "Spectrum",
    "TargetAlignment",
    "argmax_agreement",
    "kernel_alignment",
    "kernel_distance",
    "kernel_matrix",
    "linearization_error",
    "logit_norm",
    "param_distance",
    "prob_tv",
    "relative_change",
    "spectrum",
    "target_alignment",
]

_CLASSES = {"ArgmaxAgreement", "LinearizationError", "LogitNorm", "ProbTV", "TargetAlignment"}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        value = getattr(importlib.import_module(".classes", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    dunders = {name for name in globals() if name.startswith("__")}
    submodules = {
        name
        for name, value in globals().items()
        if isinstance(value, ModuleType) and value.__name__.startswith(f"{__name__}.")
    }
    return sorted(dunders | set(__all__) | submodules)


if TYPE_CHECKING:  # pragma: no cover
    from .classes import ArgmaxAgreement, LinearizationError, LogitNorm, ProbTV, TargetAlignment
