"""One report's measurement, every evaluation through one functional view of the model.

* kernel drift ``relative_change = ‖Θ_t − Θ0‖_F / ‖Θ0‖_F`` and ``kernel_distance``; per
  layer (module), its own relative change and share of the trace;
* the spectrum of the ``(N·C, N·C)`` kernel matrix and ``target_alignment = A(K, YYᵀ)``;
* the linearized model ``f_lin(x; θ_t) = f(x; θ0) + J0(x)(θ_t − θ0)``:
  ``linearization_error``, ``prob_tv``, ``argmax_agreement``;
* ``logit_norm``, ``logit_growth``, ``param_distance``; with non-degenerate targets
  ``logit_optimum`` and ``logit_gap``, the norm of the finite optimum
  ``log t − mean(log t)`` and the distance from it; and the diagnosis
  (:mod:`lightning_ntk.monitor._verdict`), read against the set-up
  (:mod:`lightning_ntk.monitor._setup`).

The kernel is the one of the ``kernel`` setting (:mod:`lightning_ntk.monitor._kernels`):
the NTK by default, or an optimizer's, Adam's with the preconditioner read once and kept;
the asymmetric SignGD kernel's spectrum and target alignment are those of its symmetric
part ``(Θ + Θᵀ)/2``, the quadratic form of the first-order loss change ``−gᵀΘg``.

A model normalising with batch statistics (``BatchStatisticsModel``) is one function of
the whole probe batch: its kernel is the whole-batch Jacobian's ``J Jᵀ``
(:mod:`lightning_ntk.kernel.batch_statistics`). For every model ``f``, ``f0`` and the
constant part of ``f_lin`` go through the same forward, so unmoved parameters report
exactly zero drift.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, TypeVar, cast

import torch
from torch import Tensor

from .. import metrics
from ..kernel import last_call_info, ntk_of
from ..kernel._forward import module_of
from ..kernel._functional import FunctionalModel, exact_matmuls
from ..kernel._inputs import batch_size
from ..kernel._layout import symmetrize
from ..kernel._optimizer import KernelSpec
from ..kernel._run import rank_and_world
from ..kernel.batch_statistics import BatchStatisticsModel, batch_ntk_of, linearized_logits
from ..linearization import LinearizedModel, argmax_agreement, linearization_error, prob_tv
from ..metrics.functional import softmax_form
from ._kernels import MeasuredKernel, frozen_preconditioner, kernel_spec_of, resolve_kernel
from ._probe import probe_logits
from ._setup import Setup, alignment_targets, logit_optimum
from ._verdict import (
    MIN_SPAN,
    LogitContext,
    Signals,
    Thresholds,
    diagnose,
    doublings,
    logit_slope,
    velocity,
)
from .report import NUMERIC_FIELDS, NTKReport, layer_drift, safe_spectrum, safe_value
from .settings import default_output

if TYPE_CHECKING:
    from .tracker import NTKTracker

__all__ = [
    "REGRESSION_TARGETS",
    "Measurement",
    "ReportPoint",
    "Snapshot",
    "attempt",
    "beyond_probabilities",
    "measure",
    "probe_kernel",
    "read_preconditioner",
    "snapshot",
]

T = TypeVar("T")

# the failure key of probe targets outside [0, 1] (a regression's): no classifier's set-up
REGRESSION_TARGETS = "targets"

# what failed -> how a user may work around it
_WORKAROUNDS = {
    "kernel": 'pass `method="ntk_vp"`, or `params=` to restrict the kernel to layers '
    "PyTorch can differentiate per example",
    "linearized model": "forward-mode AD (`torch.func.jvp`) has no rule for an operation "
    "of this model; the kernel metrics are unaffected",
}


@dataclass
class ReportPoint:
    """Where a report was made: the reference of the next report's velocity and local error.

    Attributes:
        step: the report's step (or ``θ0``'s).
        theta: ``{name: θ}`` there (detached copies).
        kernel: ``Θ`` there (``None`` when it could not be computed).
        target_alignment: ``A(Θ, YYᵀ)`` there (``nan`` without probe labels).
        logits: the probe's logits ``f(X; θ)`` there, ``(N, C)``: the constant part of the
            next report's local linearization (``None``: evaluated again then).
    """

    step: int
    theta: dict[str, Tensor]
    kernel: Optional[Tensor]
    target_alignment: float = math.nan
    logits: Optional[Tensor] = None


@dataclass
class Snapshot:
    """What :meth:`NTKTracker.start` keeps, and the point of the last report.

    Attributes:
        theta0: ``{name: θ0}``, detached copies of the selected parameters.
        logits0: ``f(X; θ0)``, ``(N, C)``.
        num_classes: ``C``.
        method: the kernel method.
        per_layer: whether the kernel is kept per module.
        start_step: the step of ``θ0``.
        K0: ``Θ0`` in the tracker's layout (``None`` when it could not be computed).
        K0_layers: ``{module: its part of Θ0}`` (empty unless ``per_layer``).
        logit_norm0: mean centered logit norm at ``θ0``.
        predicted: the set-up's ``{"regime": ..., "reason": ...}``.
        alignment0: ``A(Θ0, YYᵀ)`` (``nan`` without probe labels).
        previous: the last report's point; ``None`` before the first report (``θ0``).
        restarted: ``θ0`` was taken mid-run because the run's own reference was lost.
        output: the kernel layout every kernel of the run is kept in (``"full"``,
            ``"diagonal"`` or ``"trace"``): the setting, or for ``output=None`` the one
            :func:`~lightning_ntk.monitor.settings.default_output` chose at the start.
        sharded: names of the parameters of a sharded (FSDP2) model that ``theta0`` and
            ``previous.theta`` keep as this rank's shards (gathered whole for a report).
        gathered: the ``sharded`` names of a state saved with ``gather=True``, whose
            ``theta0`` and ``previous.theta`` are kept whole; the next report shards every
            parameter the model then holds as a ``DTensor`` again.
        kernel_kind: the engine's kernel measured (``"sgd"``, ``"signgd"``,
            ``"asymmetric_signgd"``, ``"adam"``), the ``kernel`` setting resolved.
        kernel_source: how it was chosen (see :class:`MeasuredKernel`).
        preconditioner: for ``"adam"``, the frozen ``{name: 1/(√v̂+ε)}`` (flattened,
            float64, CPU); ``None`` until read (``Θ0`` is ``None`` until then).
        preconditioner_step: the step it was read at.
    """

    theta0: dict[str, Tensor]
    logits0: Tensor
    num_classes: int
    method: str
    per_layer: bool
    start_step: int
    K0: Optional[Tensor]
    K0_layers: dict[str, Tensor]
    logit_norm0: float
    predicted: dict[str, str]
    alignment0: float = math.nan
    previous: Optional[ReportPoint] = None
    restarted: bool = False
    output: str = "full"
    sharded: list[str] = field(default_factory=list)
    gathered: list[str] = field(default_factory=list)
    kernel_kind: str = "sgd"
    kernel_source: str = "set"
    preconditioner: Optional[dict[str, Tensor]] = None
    preconditioner_step: Optional[int] = None

    @property
    def measured_kernel(self) -> MeasuredKernel:
        """The kernel measured and how it was chosen."""
        return MeasuredKernel(self.kernel_kind, self.kernel_source)

    @property
    def waiting(self) -> bool:
        """Whether the kernel waits for Adam's preconditioner (no ``Θ0`` until it is read)."""
        return self.kernel_kind == "adam" and self.preconditioner is None

    def spec(self, fm: FunctionalModel) -> KernelSpec:
        """The engine's kernel for ``fm``, Adam's with the frozen preconditioner."""
        return kernel_spec_of(self.kernel_kind, self.preconditioner, fm)

    @property
    def reference(self) -> ReportPoint:
        """The previous report's point, or ``θ0``'s before the first report."""
        if self.previous is not None:
            return self.previous
        return ReportPoint(self.start_step, self.theta0, self.K0, self.alignment0, self.logits0)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (tensors as they are) for checkpoints."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "previous"}
        prev = self.previous
        out["previous"] = (
            None if prev is None else {f.name: getattr(prev, f.name) for f in fields(prev)}
        )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Snapshot:
        """Inverse of :meth:`to_dict`; a checkpoint without the newer keys gets defaults."""
        names = {f.name for f in fields(cls)} - {"previous"}
        snap = cls(**{k: v for k, v in data.items() if k in names})
        prev = data.get("previous")
        snap.previous = None if prev is None else ReportPoint(**prev)
        return snap


class Measurement(NamedTuple):
    """What one report measured: the report, per-layer drift, ``Θ_t`` and its spectrum.

    ``point`` is the report's :class:`ReportPoint`, ``predicted`` the set-up's prediction
    as known at the report; the tracker keeps both.
    """

    report: NTKReport
    layers: dict[str, dict[str, float]]
    kernel: Optional[Tensor]
    eigenvalues: Optional[Tensor]
    failures: dict[str, str]
    point: Optional[ReportPoint]
    predicted: dict[str, str]


def attempt(failures: dict[str, str], what: str, fn: Callable[[], T]) -> Optional[T]:
    """``fn()``, or ``None`` with ``failures[what]`` saying what went wrong and what to try.

    The monitor is a guest in the training run: a measurement PyTorch cannot make for
    this model (no vmap or forward-AD rule, a fused kernel) makes its metrics ``nan``.
    """
    try:
        return fn()
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        failures[what] = (
            f"lightning_ntk could not compute the {what} on the probe set "
            f"({type(err).__name__}: {first_line}); its metrics are nan and training goes "
            f"on. Workaround: {_WORKAROUNDS.get(what, 'none known; please report the model')}."
        )
        return None


def measure(tracker: NTKTracker, fm: FunctionalModel, step: int) -> Measurement:
    """One report of ``tracker`` at ``step``, every evaluation through the one view ``fm``.

    Four parts, each returning its values: the kernel (:func:`_kernel_part`), the
    linearizations around ``θ0`` and the previous report (:func:`_linearization_part`),
    the logits against the set-up (:func:`_logit_part`) and the diagnosis. Metrics that
    cannot be computed are ``nan`` (see :func:`safe_value`; a kernel or a linearization
    PyTorch cannot compute for this model is recorded in ``failures``, see
    :func:`attempt`); the tracker is not modified.
    """
    snap = tracker.started_state
    x, y = tracker.probe_on(fm.module)
    x = fm.cast_input(x)
    logits = probe_forward(fm, x)
    finite = bool(torch.isfinite(logits).all())
    setup = _setup_of(tracker)
    task = setup.metric_task(snap.num_classes)  # how the logit metrics read the outputs
    values: dict[str, float] = dict.fromkeys(NUMERIC_FIELDS, math.nan)
    theta0 = {n: t.to(fm.device) for n, t in snap.theta0.items()}
    values["param_distance"] = safe_value(lambda: metrics.param_distance(fm.params, theta0))
    failures: dict[str, str] = {}
    reference = snap.reference
    # a report too close to the previous one measures no velocity and keeps the reference
    close = snap.previous is not None and doublings(step, reference.step) < MIN_SPAN
    kernel = KernelPart()
    if finite:
        kernel = _kernel_part(tracker, fm, snap, y, task, step, failures, logits, close)
        values.update(kernel.values)
        logits0 = snap.logits0.to(fm.device)
        values.update(
            _linearization_part(
                fm, theta0, logits0, snap.previous, x, logits, task, failures, close
            )
        )
    predicted, logit_values, context = _logit_part(setup, snap, logits, y, task, finite, step)
    observer = tracker.observer
    values.update(logit_values)
    values["logit_slope"] = _slope(tracker, step, values["logit_norm"])
    context = replace(
        context,
        reading=bool(observer.steps) and observer.wants_more,
        hard_unregularized=setup.hard_unregularized and observer.contradicted,
        recent_slope=_slope(tracker, step, values["logit_norm"], recent=True),
        hard_targets="hard 0/1 targets" if setup.sigmoid else "hard one-hot targets",
        to_declare=_to_declare(setup),
        not_classification=REGRESSION_TARGETS in tracker.failures,
        norm_words="logit norm |z|" if setup.sigmoid else "centered logit norm",
        trend_wait=tracker.trend_wait([r.step for r in tracker.history] + [step]),
    )
    signals = Signals(
        relative_change=values["relative_change"],
        linearization_error=values["linearization_error"],
        kernel_velocity=values["kernel_velocity"],
        local_linearization_error=values["local_linearization_error"],
        slope=values["logit_slope"],
        finite=finite,
        data_finite=finite or tracker.training_data_finite,  # read (a host sync) only then
        target_alignment=values["target_alignment"],
        previous_alignment=reference.target_alignment,
        previous_step=reference.step,
        too_close=close,
        previous_regime=tracker.history[-1].regime if close and tracker.history else "",
    )
    diagnosis = diagnose(
        signals,
        thresholds=cast(Thresholds, tracker.thresholds),  # a Thresholds after the settings' checks
        predicted_regime=predicted["regime"],
        expect=tracker.expect,
        context=context,
    )
    report = NTKReport(
        step=step,
        **cast(dict[str, Any], values),  # floats, for the float fields only
        verdict=diagnosis.verdict,
        causes=list(diagnosis.causes),
        predicted_regime=predicted["regime"],
        message=diagnosis.message,
        setup=setup.describe(),
        regime=diagnosis.regime,
        kernel=snap.measured_kernel.describe(snap.preconditioner_step),
    )
    point = None
    if not close:
        point = ReportPoint(
            step,
            {n: p.detach().clone() for n, p in fm.params.items()},
            kernel.kernel,
            values["target_alignment"],
            logits,
        )
    return Measurement(
        report, kernel.layers, kernel.kernel, kernel.eigenvalues, failures, point, predicted
    )


@dataclass
class KernelPart:
    """The kernel's part of a report: its values, per-layer drift, ``Θ_t``, its spectrum."""

    values: dict[str, float] = field(default_factory=dict)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    kernel: Optional[Tensor] = None
    eigenvalues: Optional[Tensor] = None


def _kernel_part(
    tracker: NTKTracker,
    fm: FunctionalModel,
    snap: Snapshot,
    y: Optional[Tensor],
    task: str,
    step: int,
    failures: dict[str, str],
    logits: Optional[Tensor] = None,
    close: bool = False,
) -> KernelPart:
    """``Θ_t``: its drift from ``Θ0``, its velocity since the last report, alignment, spectrum.

    No velocity when the report is ``close`` to the last one (less than ``MIN_SPAN``
    doublings of steps).
    """
    if snap.K0 is None:
        return KernelPart()
    computed = _kernel_of_run(tracker, fm, snap, failures, logits)
    if computed is None:
        return KernelPart()
    K, K_layers = computed
    K_sym = symmetric_part(K, snap)  # what the spectrum and the alignment read
    K0 = snap.K0.to(K.device)
    values = {
        "relative_change": safe_value(lambda: metrics.relative_change(K, K0)),
        "kernel_distance": safe_value(lambda: metrics.kernel_distance(K, K0)),
    }
    reference = snap.reference
    if reference.kernel is not None and not close:
        K_prev = reference.kernel.to(K.device)
        change = safe_value(lambda: metrics.relative_change(K, K_prev))
        values["kernel_velocity"] = velocity(change, step, reference.step)
    if y is not None:
        targets = alignment_targets(y, task)
        values["target_alignment"] = safe_value(
            lambda: metrics.target_alignment(K_sym, targets, num_classes=snap.num_classes)
        )
    spec = safe_spectrum(metrics, K_sym)
    if spec is not None:
        values.update(
            eig_max=spec.eig_max,
            eig_min=spec.eig_min,
            effective_rank=spec.effective_rank,
            condition_number=spec.condition_number,
        )
    layers = layer_drift(metrics, K, K_layers, snap.K0_layers)
    return KernelPart(values, layers, K, None if spec is None else spec.eigenvalues)


def _linearization_part(
    fm: FunctionalModel,
    theta0: dict[str, Tensor],
    logits0: Tensor,
    previous: Optional[ReportPoint],
    x: Any,
    logits: Tensor,
    task: str,
    failures: dict[str, str],
    close: bool = False,
) -> dict[str, float]:
    """The network against its linearization around ``θ0`` and around the last report.

    ``linearization_error``, ``prob_tv``, ``argmax_agreement`` against
    ``f_lin(θ_t) = f(θ0) + J0 (θ_t − θ0)``; ``local_linearization_error`` against
    ``f(θ_prev) + J_prev (θ_t − θ_prev)``, one more ``jvp`` (none before the first report,
    where the two coincide). ``f``, ``f0`` and the constant part of ``f_lin`` go through
    the same forward: unmoved parameters give exactly zero. That forward is not run again:
    ``logits0`` (``f(X; θ0)`` kept at the start) and the previous report's logits are
    its results at ``θ0`` and ``θ_prev``. No local error when the report is ``close``
    to the last one.
    """
    values: dict[str, float] = {}
    linearized = attempt(failures, "linearized model", lambda: _linearized(fm, theta0, x, logits0))
    if linearized is None:
        return values
    logits_lin, logits0 = linearized
    values["linearization_error"] = safe_value(
        lambda: linearization_error(logits, logits_lin, logits0)
    )
    # sigmoid outputs z through their softmax form [0, z]: Bernoulli TV, sign agreement
    probs, probs_lin = softmax_form(logits, task), softmax_form(logits_lin, task)
    values["prob_tv"] = safe_value(lambda: prob_tv(probs, probs_lin))
    values["argmax_agreement"] = safe_value(lambda: argmax_agreement(probs, probs_lin))
    if previous is None:
        values["local_linearization_error"] = values["linearization_error"]
        return values
    if close:
        return values
    theta_prev = {n: t.to(fm.device) for n, t in previous.theta.items()}
    logits_prev = None if previous.logits is None else previous.logits.to(fm.device)
    local = attempt(
        failures, "linearized model", lambda: _linearized(fm, theta_prev, x, logits_prev)
    )
    if local is not None:
        values["local_linearization_error"] = safe_value(
            lambda: linearization_error(logits, local[0], local[1])
        )
    return values


def probe_forward(fm: FunctionalModel, x: Any) -> Tensor:
    """``f(X; θ_t)``, ``(N, C)``: the probe's logits at the current parameters."""
    with exact_matmuls(fm.device), torch.no_grad():
        return fm(fm.params, x)


def _to_declare(setup: Setup) -> str:
    """The settings the set-up could not establish, as a message names them."""
    unknown = [
        name
        for name, missing in (
            ("label_smoothing", setup.non_degenerate is None),
            ("weight_decay", setup.weight_decay is None),
        )
        if missing
    ]
    return " and ".join(f"`{name}`" for name in unknown or ["label_smoothing", "weight_decay"])


def _setup_of(tracker: NTKTracker) -> Setup:
    """The set-up as known now; a report never raises for it."""
    try:
        return tracker.setup
    except (TypeError, ValueError) as err:
        return Setup(sources={"weight_decay": f"unknown: not understood ({err})"})


def _logit_part(
    setup: Setup,
    snap: Snapshot,
    logits: Tensor,
    y: Optional[Tensor],
    task: str,
    finite: bool,
    step: int,
) -> tuple[dict[str, str], dict[str, float], LogitContext]:
    """The logits against what the set-up allows: their norm, growth, optimum and gap.

    Returns the set-up's prediction, the logit values (in the logit norm's margin units
    for the task) and the context the diagnosis reads the logit trend against.
    """
    values: dict[str, float] = {}
    if finite:
        values["logit_norm"] = safe_value(lambda: metrics.logit_norm(logits, task))
        norm0 = float(metrics.logit_norm(snap.logits0.to(logits.device), task))
        values["logit_growth"] = values["logit_norm"] / norm0 if norm0 > 0 else math.nan
    predicted = setup.prediction()  # observations may have added to what start knew
    f_star = logit_optimum(setup, y, snap.num_classes)
    if f_star is not None and finite:  # in the logit norm's margin units
        f_star = f_star.to(logits.device)
        values["logit_gap"] = float(metrics.logit_norm(logits.double() - f_star, task))
        values["logit_optimum"] = float(metrics.logit_norm(f_star, task))
    context = LogitContext(
        logit_norm=values.get("logit_norm", math.nan),
        optimum_norm=values.get("logit_optimum", math.nan),
        equilibrium_step=setup.equilibrium_step,
        step=step,
    )
    return predicted, values, context


def _slope(tracker: NTKTracker, step: int, logit_norm: float, recent: bool = False) -> float:
    """The logit norm's growth per doubling of steps, this report included.

    Over the trend window, or (``recent``) between the previous report and this one.
    """
    thresholds = cast(Thresholds, tracker.thresholds)
    steps = [r.step for r in tracker.history] + [step]
    norms = [r.logit_norm for r in tracker.history] + [logit_norm]
    if recent:
        return logit_slope(steps[-2:], norms[-2:], math.inf, thresholds.min_trend_step)
    return logit_slope(steps, norms, thresholds.trend_octaves, thresholds.min_trend_step)


def _linearized(
    fm: FunctionalModel, theta0: dict, x: Any, f0: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """``(f_lin, f0)`` by one ``jvp``, else the linearized model's exact fall-backs.

    ``f0`` is ``fm(θ0, x)`` when the caller holds it (else evaluated). Where an op has no
    forward-mode rule, :mod:`lightning_ntk.linearization` computes ``J0 (θ − θ0)`` by
    checked reverse-mode routes.
    """
    try:
        return linearized_logits(fm, theta0, fm.params, x, f0)
    except RuntimeError:
        if isinstance(fm, BatchStatisticsModel):
            raise
        with torch.no_grad():
            return LinearizedModel.of(fm, theta0, buffers="current").logits_and_initial(x)


def snapshot(tracker: NTKTracker, fm: FunctionalModel, step: int) -> tuple[Snapshot, dict]:
    """What :meth:`NTKTracker.start` keeps: ``θ0``, ``Θ0``, the initial logits and set-up.

    The probe's logits are validated first (a set-up error raises here, before any
    heavy work); a kernel PyTorch cannot compute leaves ``Θ0`` ``None`` and says why in
    the returned failures (see :func:`attempt`).

    Raises:
        ValueError / TypeError: a model whose output on the probe is not ``(N, C)``
            logits (pass ``forward_fn`` or ``output_fn``).
    """
    logits0 = probe_logits(fm, fm.cast_input(tracker.probe_x))
    failures: dict[str, str] = {}
    regression = beyond_probabilities(tracker.probe_y, int(logits0.shape[1]))
    unfit = regression or unfit_labels(tracker.probe_y, int(logits0.shape[1]))
    if unfit:  # e.g. a mask taken for the labels: neither alignment nor set-up reads them
        tracker.probe_y = None
        failures[REGRESSION_TARGETS if regression else "probe_y"] = unfit
    measured = resolve_kernel(tracker.kernel, tracker.optimizer)  # raises for a wrong optimizer
    d = None
    if measured.kind == "adam":  # already stepped (a warm-up, a fine-tuning): read now
        d = frozen_preconditioner(tracker.optimizer, fm)
    method = tracker.method
    per_layer = tracker.per_layer if tracker.per_layer is not None else method != "ntk_vp"
    num_classes = int(logits0.shape[1])  # one output: a binary classifier (sigmoid)
    output = tracker.output or default_output(int(logits0.shape[0]), num_classes)
    state = Snapshot(
        theta0={n: p.detach().clone() for n, p in fm.params.items()},
        logits0=logits0.clone(),
        num_classes=num_classes,
        method=method,
        per_layer=per_layer,
        start_step=int(step),
        K0=None,
        K0_layers={},
        logit_norm0=float(metrics.logit_norm(logits0)),  # one output reads as binary
        predicted=tracker.predict_regime(num_classes),
        output=output,
        kernel_kind=measured.kind,
        kernel_source=measured.source,
        preconditioner=d,
        preconditioner_step=None if d is None else int(step),
    )
    if not state.waiting:
        _take_reference_kernel(tracker, fm, state, failures, logits0)
    return state, failures


def unfit_labels(probe_y: Optional[Tensor], num_classes: int) -> str:
    """Why the probe labels are no targets of ``C`` logits, or ``""`` when they may be.

    Labels ``(N,)`` must be integer classes below ``max(C, 2)`` (negative ones are ignored
    examples), or float targets of one output; targets ``(N, K)`` need ``K = C`` (float
    targets outside ``[0, 1]`` are :func:`beyond_probabilities`'s to name). Anything
    else (an attention mask, a sample weight taken for the labels) would give a target
    alignment and a task of something else.
    """
    if probe_y is None:
        return ""
    shape = tuple(probe_y.shape)
    if probe_y.ndim == 2 and shape[1] == num_classes:
        return ""
    if probe_y.ndim == 1 and probe_y.is_floating_point():
        if num_classes == 1:  # a binary output's targets in [0, 1]
            return ""
        if bool((probe_y == probe_y.round()).all()):
            return (
                f"The probe labels are class indices stored as floats ({probe_y.dtype}); "
                f"the model's {num_classes} outputs need integer labels (`y.long()`), so "
                "the target alignment and the set-up are read without them."
            )
    elif probe_y.ndim == 1 and int(probe_y.max()) < max(num_classes, 2):
        return ""
    expected = (
        f"labels ({shape[0]},) below {max(num_classes, 2)} or targets ({shape[0]}, {num_classes})"
    )
    return (
        f"The probe labels of shape {shape} are no targets of the model's {num_classes} "
        f"outputs ({expected} expected), so the target alignment and the set-up are read "
        "without them; if the batches are not (inputs, labels, ...), pass "
        "`batch_to_xy=lambda batch: (inputs, labels)`."
    )


def beyond_probabilities(probe_y: Optional[Tensor], num_classes: int) -> str:
    """Why float targets outside ``[0, 1]`` (a regression's) are no classifier's, or ``""``.

    Only float targets shaped like the outputs are read so: ``(N,)`` of one output or
    ``(N, C)`` of ``C``; class indices stored as floats are named by :func:`unfit_labels`.
    """
    if probe_y is None:
        return ""
    one_output = probe_y.ndim == 1 and num_classes == 1
    per_output = probe_y.ndim == 2 and probe_y.shape[1] == num_classes
    if not (probe_y.is_floating_point() and (one_output or per_output)):
        return ""
    finite = probe_y[torch.isfinite(probe_y)]
    if finite.numel() == 0:
        return ""
    low, high = float(finite.min()), float(finite.max())
    if low >= 0.0 and high <= 1.0:
        return ""
    return (
        f"The probe targets take values in [{low:.3g}, {high:.3g}], outside [0, 1]: no "
        "class probabilities of a classifier (a regression?). The kernel, its drift and "
        "the linearization are measured; the target alignment and the classification "
        "set-up (targets, smoothing, the logits' predicted regime) are read without them."
    )


def read_preconditioner(tracker: NTKTracker, fm: FunctionalModel, step: int) -> dict[str, str]:
    """Read Adam's preconditioner once it exists, and take ``Θ0`` with it at ``θ0``.

    Modifies the tracker's snapshot (``preconditioner``, ``preconditioner_step``,
    ``K0``, ``K0_layers``, ``alignment0``) when the optimizer has state for every
    selected parameter; leaves it waiting otherwise. Returns the failures (see
    :func:`attempt`): a parameter the optimizer does not hold, a kernel PyTorch cannot
    compute.
    """
    snap = tracker.started_state
    failures: dict[str, str] = {}
    d = attempt(failures, "kernel", lambda: frozen_preconditioner(tracker.optimizer, fm))
    if d is None:
        return failures
    snap.preconditioner, snap.preconditioner_step = d, int(step)
    at_theta0 = copy.copy(fm)  # the same function and buffers, evaluated at θ0
    at_theta0.params = {n: t.to(device=fm.device, dtype=fm.dtype) for n, t in snap.theta0.items()}
    _take_reference_kernel(tracker, at_theta0, snap, failures)
    return failures


def _kernel_of_run(
    tracker: NTKTracker,
    fm: FunctionalModel,
    snap: Snapshot,
    failures: dict[str, str],
    logits: Optional[Tensor] = None,
) -> Optional[tuple[Tensor, dict[str, Tensor]]]:
    """The probe kernel of ``fm`` as the run measures it (method, layout, kernel), or ``None``.

    ``logits``: the probe's checked logits at ``fm.params`` when the caller holds them.
    """
    return attempt(
        failures,
        "kernel",
        lambda: probe_kernel(
            tracker, fm, snap.method, snap.per_layer, snap.output, snap.spec(fm), logits
        ),
    )


def _take_reference_kernel(
    tracker: NTKTracker,
    fm: FunctionalModel,
    snap: Snapshot,
    failures: dict[str, str],
    logits: Optional[Tensor] = None,
) -> None:
    """``Θ0`` (and its parts, its target alignment) of ``fm`` into ``snap``."""
    computed = _kernel_of_run(tracker, fm, snap, failures, logits)
    if computed is None:
        return
    snap.K0, snap.K0_layers = computed
    if tracker.probe_y is not None:
        K_sym = symmetric_part(snap.K0, snap)
        task = _setup_of(tracker).metric_task(snap.num_classes)
        targets = alignment_targets(tracker.probe_y.to(K_sym.device), task)
        snap.alignment0 = safe_value(
            lambda: metrics.target_alignment(K_sym, targets, num_classes=snap.num_classes)
        )


def symmetric_part(K: Tensor, snap: Snapshot) -> Tensor:
    """``K``, or ``(K + Kᵀ)/2`` for the asymmetric SignGD kernel (spectrum, alignment)."""
    if snap.kernel_kind != "asymmetric_signgd":
        return K
    return symmetrize(K, snap.output)


def probe_kernel(
    tracker: NTKTracker,
    fm: FunctionalModel,
    method: str,
    per_layer: bool,
    output: str,
    spec: Optional[KernelSpec] = None,
    logits: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``Θ(X, X)`` in layout ``output``, and per module when ``per_layer`` is on.

    ``spec`` is the optimizer's kernel (``None``: the NTK, ``"sgd"``); ``logits`` the
    probe's checked logits ``f(X; fm.params)`` when the caller holds them (the engine
    then skips its validating forward pass).
    """
    probe = fm.cast_input(tracker.probe_on(fm.module)[0])
    world = rank_and_world(tracker.distributed)[1]
    if isinstance(fm, BatchStatisticsModel):  # rows coupled: the whole-batch Jacobian
        result = batch_ntk_of(fm, probe, output=output, per_layer=per_layer, spec=spec)
    else:
        result = ntk_of(
            fm,
            probe,
            output=output,
            method=method,
            per_layer=per_layer,
            # two blocks of probe rows per rank: each rank gets its share of the pairs
            chunk_size=None if world == 1 else max(1, math.ceil(batch_size(probe) / (2 * world))),
            distributed=world > 1,
            spec=spec,
            logits=logits,
        )
        tracker.kernel_info = last_call_info()
    if not per_layer:
        assert isinstance(result, Tensor)
        return result, {}
    assert isinstance(result, dict)
    layers: dict[str, Tensor] = {}
    for name, part in result.items():
        module = module_of(name)
        layers[module] = part if module not in layers else layers[module] + part
    total = sum(layers.values())
    assert isinstance(total, Tensor)
    return total, layers
