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

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
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


__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_CLASSES, ".classes"))


if TYPE_CHECKING:  # pragma: no cover
    from .classes import ArgmaxAgreement, LinearizationError, LogitNorm, ProbTV, TargetAlignment
