"""Kernel, logit and linearization metrics: plain functions and ``torchmetrics`` classes.

Functions (:mod:`.functional`):

* kernel drift: :func:`relative_change`, :func:`kernel_distance`
* alignment: :func:`kernel_alignment`, :func:`target_alignment`
* spectrum: :func:`kernel_matrix`, :func:`spectrum` → :class:`Spectrum`
* logits and parameters: :func:`logit_norm`, :func:`param_distance`
* linearized model: :func:`linearization_error`, :func:`prob_tv`, :func:`argmax_agreement`

Classes (:mod:`.classes`, ``torchmetrics.Metric``): :class:`TargetAlignment`,
:class:`LinearizationError`, :class:`ProbTV`, :class:`ArgmaxAgreement`, :class:`LogitNorm`.
"""

from .classes import ArgmaxAgreement, LinearizationError, LogitNorm, ProbTV, TargetAlignment
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
