"""A report of the tracker, and the measurements behind its fields that never raise.

:class:`NTKReport` holds one measurement of the kernel and the model on the probe set.
The helpers compute the report's parts so that a value that cannot be computed (a failed
eigen-decomposition, a zero norm) is ``nan`` rather than an exception: a monitored run
goes on, and the verdict says what could not be measured.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._verdict import LAZY_SCORE, REGIME_CODE

__all__ = ["NTKReport"]

TEXT_FIELDS = ("verdict", "causes", "predicted_regime", "message", "setup", "regime", "kernel")
REFERENCE_FIELDS = ("reference_step", "restarted")  # where θ0 comes from: not logged


@dataclass
class NTKReport:
    """One measurement of the kernel and the model on the probe set.

    Attributes:
        step: optimizer step of the measurement.
        kernel_distance: ``1 − ⟨Θ_t, Θ0⟩_F / (‖Θ_t‖_F ‖Θ0‖_F)`` in ``[0, 1]``.
        relative_change: ``‖Θ_t − Θ0‖_F / ‖Θ0‖_F``.
        target_alignment: centered alignment of the kernel with ``YYᵀ`` (``nan``
            without probe labels).
        linearization_error: ``‖f − f_lin‖_F / max(‖f − f0‖_F, eps)``.
        prob_tv: mean total-variation distance of ``softmax(f)`` and ``softmax(f_lin)``.
        argmax_agreement: fraction of probe points where ``argmax f == argmax f_lin``.
        logit_norm: mean over the probe of ``‖f(x) − mean_a f_a(x)‖_2``.
        logit_growth: ``logit_norm / logit_norm`` at ``θ0``.
        param_distance: ``‖θ_t − θ0‖_2 / ‖θ0‖_2``.
        eig_max: largest eigenvalue of the kernel matrix.
        eig_min: smallest eigenvalue of the kernel matrix.
        effective_rank: ``exp`` of the entropy of the normalised positive eigenvalues.
        condition_number: ``eig_max / max(eig_min, eps)``.
        verdict: ``"lazy"`` (the lazy regime), ``"drifting"`` (not lazy, no alarm: feature
            learning, locally linear, logits growing) or ``"broken"`` (an alarm: logits
            diverging, or leaving the lazy regime with ``expect="lazy"``).
        causes: short names of the signals that crossed a threshold.
        predicted_regime: ``"bounded"``, ``"diverging"`` or ``"unknown"``: the logits the
            theory predicts for the set-up (the paper's dichotomy; laziness is measured).
        message: one sentence per finding, with the figures and the level that set it.
        logit_gap: mean over the probe of ``‖f_c(x) − f*(x)‖_2``, the distance of the
            centered logits from the optimum ``f* = log t − mean(log t)`` their targets
            allow (``nan`` when the targets have no finite optimum or are unknown).
        logit_optimum: mean over the probe of ``‖f*(x)‖_2`` (``nan`` likewise); logits far
            below it are still converging, not diverging.
        setup: what is known of the set-up (label smoothing, targets, weight decay) and
            where each fact comes from: declared, inferred from the training loss, read.
        reference_step: the step ``θ0`` and ``Θ0`` were taken at (``0`` when the
            monitor watched the run from its start).
        restarted: ``True`` when the reference was taken mid-run because the run's own
            was lost (a resume from a checkpoint without this monitor's state): drifts
            are measured from ``reference_step``, not from initialisation.
        kernel_velocity: ``‖Θ_t − Θ_prev‖_F / ‖Θ_prev‖_F / log2(t / t_prev)``, the kernel's
            relative change since the previous report (or ``θ0``, step 0 counted as 1) per
            doubling of steps.
        local_linearization_error: ``‖f − f_lin,prev‖_F / max(‖f − f_prev‖_F, eps)``: how
            well the linearization around the previous report's parameters predicts the
            logits now.
        logit_slope: growth of ``logit_norm`` per doubling of steps over the last
            ``trend_octaves`` doublings (``nan`` until two reports from ``min_trend_step``).
        regime: ``"lazy"``, ``"feature learning"``, ``"locally linear"``,
            ``"logits diverging"`` or ``"unknown"`` (logged as ``ntk/regime`` 0, 2, 1, 3,
            ``nan``).

        kernel: which kernel is measured and how it was chosen (the ``kernel`` setting):
            e.g. ``"sgd (set)"``, or ``"adam (the kernel of the optimizer, AdamW); Adam's
            preconditioner frozen at step 4"``. The thresholds were calibrated on ``sgd``.
    """

    step: int
    kernel_distance: float
    relative_change: float
    target_alignment: float
    linearization_error: float
    prob_tv: float
    argmax_agreement: float
    logit_norm: float
    logit_growth: float
    param_distance: float
    eig_max: float
    eig_min: float
    effective_rank: float
    condition_number: float
    verdict: str
    causes: list[str]
    predicted_regime: str
    message: str
    logit_gap: float = math.nan
    logit_optimum: float = math.nan
    setup: str = ""
    reference_step: int = 0
    restarted: bool = False
    kernel_velocity: float = math.nan
    local_linearization_error: float = math.nan
    logit_slope: float = math.nan
    regime: str = ""
    kernel: str = "sgd (set)"

    def scalars(self) -> dict[str, float]:
        """``{"ntk/<field>": value}`` for every numeric field, ``ntk/lazy`` and ``ntk/regime``.

        ``ntk/lazy`` is 1.0 for ``"lazy"``, 0.5 for ``"drifting"``, 0.0 for ``"broken"``
        (an alarm); ``ntk/regime`` is 0 lazy, 1 locally linear, 2 feature learning, 3 logits
        diverging (``nan`` unknown).
        """
        out = {
            f"ntk/{f.name}": float(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in (*TEXT_FIELDS, *REFERENCE_FIELDS)
        }
        out["ntk/lazy"] = LAZY_SCORE[self.verdict]
        out["ntk/regime"] = REGIME_CODE.get(self.regime, math.nan)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the fields (for checkpoints and JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NTKReport:
        """Inverse of :meth:`to_dict`."""
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        # one NaN object, as the tracker uses: equal reports compare equal after a round trip
        kwargs: dict[str, Any] = {k: math.nan if _is_nan(v) else v for k, v in values.items()}
        return cls(**kwargs)


NUMERIC_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(NTKReport)
    if f.name not in ("step", *TEXT_FIELDS, *REFERENCE_FIELDS)
)


def layer_drift(
    metrics: Any, K: Tensor, K_layers: Mapping[str, Tensor], K0_layers: Mapping[str, Tensor]
) -> dict[str, dict[str, float]]:
    """``{module: {"relative_change": ‖K_l − K0_l‖/‖K0_l‖, "share": tr K_l / tr K}}``."""
    total_trace = float(kernel_trace(K))
    out = {}
    for name, K_l in K_layers.items():
        K0_l = K0_layers.get(name)
        if K0_l is None:
            continue
        K0_l = K0_l.to(K_l.device)
        rc = safe_value(functools.partial(metrics.relative_change, K_l, K0_l))
        share = float(kernel_trace(K_l)) / total_trace if total_trace != 0 else math.nan
        out[name] = {"relative_change": rc, "share": share}
    return out


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def kernel_trace(K: Tensor) -> Tensor:
    """Trace of the kernel matrix ``Σ_i Σ_a K[i, i, a, a]`` in any layout."""
    diag = K.diagonal(dim1=0, dim2=1)  # (..., N)
    if K.ndim == 4:
        return diag.diagonal(dim1=0, dim2=1).sum()
    return diag.sum()


def safe_value(fn: Callable[[], Any]) -> float:
    """``float(fn())``, or ``nan`` when it raises what a degenerate kernel can cause."""
    try:
        value = fn()
    except (RuntimeError, ValueError, ZeroDivisionError):
        return math.nan
    return float(value)


def safe_spectrum(metrics: Any, K: Tensor) -> Any:
    """Spectrum of the kernel matrix, ``None`` if the eigen-decomposition fails.

    On the CPU the ``(N·C)²`` eigen-decomposition runs on one thread: for matrices of
    this size threading only adds synchronisation, and on an oversubscribed machine it
    made ``eigvalsh`` of a 300 × 300 matrix take seconds instead of ~20 ms.
    """
    threads = torch.get_num_threads()
    try:
        if K.device.type == "cpu":
            torch.set_num_threads(1)
        return metrics.spectrum(K)
    except (RuntimeError, ValueError):
        return None
    finally:
        torch.set_num_threads(threads)


def finite_or(value: float, default: float = -math.inf) -> float:
    """``value``, or ``default`` when it is not finite (so that ``nan`` sorts last)."""
    return value if math.isfinite(value) else default
