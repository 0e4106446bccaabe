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

A model normalising with batch statistics (``BatchStatisticsModel``) is one function of
the whole probe batch: its kernel is the whole-batch Jacobian's ``J Jᵀ``
(:mod:`lightning_ntk.kernel.batch_statistics`). For every model ``f``, ``f0`` and the
constant part of ``f_lin`` go through the same forward, so unmoved parameters report
exactly zero drift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, TypeVar, cast

import torch
from torch import Tensor

from .. import metrics
from ..kernel import last_call_info, ntk_of
from ..kernel._forward import module_of
from ..kernel._functional import FunctionalModel, exact_matmuls
from ..kernel._inputs import batch_size
from ..kernel._run import rank_and_world
from ..kernel.batch_statistics import BatchStatisticsModel, batch_ntk_of, linearized_logits
from ..linearization import LinearizedModel, argmax_agreement, linearization_error, prob_tv
from ..metrics.functional import softmax_form
from ._probe import probe_logits
from ._setup import Setup, alignment_targets, logit_optimum
from ._verdict import LogitContext, Thresholds, diagnose, logit_slope
from .report import NUMERIC_FIELDS, NTKReport, layer_drift, safe_spectrum, safe_value

if TYPE_CHECKING:
    from .tracker import NTKTracker

__all__ = ["Measurement", "attempt", "measure", "probe_kernel", "snapshot"]

T = TypeVar("T")

# what failed -> how a user may work around it
_WORKAROUNDS = {
    "kernel": 'pass `method="ntk_vp"`, or `params=` to restrict the kernel to layers '
    "PyTorch can differentiate per example",
    "linearized model": "forward-mode AD (`torch.func.jvp`) has no rule for an operation "
    "of this model; the kernel metrics are unaffected",
}


class Measurement(NamedTuple):
    """What one report measured: the report, per-layer drift, ``Θ_t`` and its spectrum."""

    report: NTKReport
    layers: dict[str, dict[str, float]]
    kernel: Optional[Tensor]
    eigenvalues: Optional[Tensor]
    failures: dict[str, str]


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

    Metrics that cannot be computed are ``nan`` (see :func:`safe_value`; a kernel or a
    linearization PyTorch cannot compute for this model is recorded in ``failures``, see
    :func:`attempt`); the tracker is not modified.
    """
    state = tracker.started_state
    assert state is not None
    x, y = tracker.probe_on(fm.module)
    x = fm.cast_input(x)
    theta0 = {n: t.to(fm.device) for n, t in state["theta0"].items()}
    with exact_matmuls(fm.device), torch.no_grad():
        logits = fm(fm.params, x)
    finite = bool(torch.isfinite(logits).all())
    try:
        setup = tracker.setup
    except (TypeError, ValueError) as err:  # a report never raises for the set-up
        setup = Setup(sources={"weight_decay": f"unknown: not understood ({err})"})
    task = setup.metric_task(state["num_classes"])  # how the logit metrics read the outputs
    nan = math.nan
    values: dict[str, float] = dict.fromkeys(NUMERIC_FIELDS, nan)
    layers: dict[str, dict[str, float]] = {}
    kernel: Optional[Tensor] = None
    eigenvalues: Optional[Tensor] = None
    values["param_distance"] = safe_value(lambda: metrics.param_distance(fm.params, theta0))
    failures: dict[str, str] = {}
    computed = None
    if finite and state["K0"] is not None:
        computed = attempt(
            failures,
            "kernel",
            lambda: probe_kernel(tracker, fm, state["method"], state["per_layer"]),
        )
    if computed is not None:
        K, K_layers = computed
        K0 = state["K0"].to(K.device)
        values["relative_change"] = safe_value(lambda: metrics.relative_change(K, K0))
        values["kernel_distance"] = safe_value(lambda: metrics.kernel_distance(K, K0))
        if y is not None:
            values["target_alignment"] = safe_value(
                lambda: metrics.target_alignment(
                    K, alignment_targets(y, task), num_classes=state["num_classes"]
                )
            )
        spec = safe_spectrum(metrics, K)
        if spec is not None:
            values.update(
                eig_max=spec.eig_max,
                eig_min=spec.eig_min,
                effective_rank=spec.effective_rank,
                condition_number=spec.condition_number,
            )
        kernel, eigenvalues = K, None if spec is None else spec.eigenvalues
        layers = layer_drift(metrics, K, K_layers, state["K0_layers"])
    if finite:
        # f, f0 and f_lin through the same forward: unmoved parameters, exactly zero drift
        linearized = attempt(failures, "linearized model", lambda: _linearized(fm, theta0, x))
        if linearized is not None:
            logits_lin, logits0 = linearized
            values["linearization_error"] = safe_value(
                lambda: linearization_error(logits, logits_lin, logits0)
            )
            # sigmoid outputs z through their softmax form [0, z]: Bernoulli TV, sign agreement
            probs, probs_lin = softmax_form(logits, task), softmax_form(logits_lin, task)
            values["prob_tv"] = safe_value(lambda: prob_tv(probs, probs_lin))
            values["argmax_agreement"] = safe_value(lambda: argmax_agreement(probs, probs_lin))
        values["logit_norm"] = safe_value(lambda: metrics.logit_norm(logits, task))
        norm0 = float(metrics.logit_norm(state["logits0"].to(logits.device), task))
        values["logit_growth"] = values["logit_norm"] / norm0 if norm0 > 0 else nan
    steps = [r.step for r in tracker.history] + [step]
    norms = [r.logit_norm for r in tracker.history] + [values["logit_norm"]]
    thresholds = cast(Thresholds, tracker.thresholds)  # a Thresholds after NTKSettings' checks
    slope = logit_slope(steps, norms, thresholds.trend_octaves, thresholds.min_trend_step)
    predicted = state["predicted"] = setup.prediction()  # observations may have added
    f_star = logit_optimum(setup, y, state["num_classes"])
    if f_star is not None and finite:  # in the logit norm's margin units
        f_star = f_star.to(logits.device)
        values["logit_gap"] = float(metrics.logit_norm(logits.double() - f_star, task))
        values["logit_optimum"] = float(metrics.logit_norm(f_star, task))
    diagnosis = diagnose(
        relative_change=values["relative_change"],
        linearization_error=values["linearization_error"],
        slope=slope,
        finite=finite,
        data_finite=finite or tracker.training_data_finite,  # read (a host sync) only then
        thresholds=thresholds,
        predicted_regime=predicted["regime"],
        context=LogitContext(
            logit_norm=values["logit_norm"],
            optimum_norm=values["logit_optimum"],
            equilibrium_step=setup.equilibrium_step,
            step=step,
        ),
    )
    report = NTKReport(
        step=step,
        **cast(dict[str, Any], values),  # floats, for the float fields only
        verdict=diagnosis.verdict,
        causes=list(diagnosis.causes),
        predicted_regime=predicted["regime"],
        message=diagnosis.message,
        setup=setup.describe(),
    )
    return Measurement(report, layers, kernel, eigenvalues, failures)


def _linearized(fm: FunctionalModel, theta0: dict, x: Any) -> tuple[Tensor, Tensor]:
    """``(f_lin, f0)`` by one ``jvp``, else the linearized model's exact fall-backs.

    Where an op has no forward-mode rule, :mod:`lightning_ntk.linearization` computes
    ``J0 (θ − θ0)`` by checked reverse-mode routes.
    """
    try:
        return linearized_logits(fm, theta0, fm.params, x)
    except RuntimeError:
        if isinstance(fm, BatchStatisticsModel):
            raise
        with torch.no_grad():
            return LinearizedModel.of(fm, theta0, buffers="current").logits_and_initial(x)


def snapshot(tracker: NTKTracker, fm: FunctionalModel, step: int) -> tuple[dict[str, Any], dict]:
    """What :meth:`NTKTracker.start` keeps: ``θ0``, ``Θ0``, the initial logits and set-up.

    The probe's logits are validated first (a set-up error raises here, before any
    heavy work); a kernel PyTorch cannot compute leaves ``Θ0`` ``None`` and says why in
    the returned failures (see :func:`attempt`).

    Raises:
        ValueError / TypeError: a model whose output on the probe is not ``(N, C)``
            logits (pass ``forward_fn`` or ``output_fn``).
    """
    logits0 = probe_logits(fm, fm.cast_input(tracker.probe_x))
    method = tracker.method
    per_layer = tracker.per_layer if tracker.per_layer is not None else method != "ntk_vp"
    num_classes = int(logits0.shape[1])  # one output: a binary classifier (sigmoid)
    failures: dict[str, str] = {}
    computed = attempt(failures, "kernel", lambda: probe_kernel(tracker, fm, method, per_layer))
    total, layers = computed if computed is not None else (None, {})
    state = {
        "theta0": {n: p.detach().clone() for n, p in fm.params.items()},
        "logits0": logits0.clone(),
        "num_classes": num_classes,
        "method": method,
        "per_layer": per_layer,
        "start_step": int(step),
        "K0": total,
        "K0_layers": layers,
        "logit_norm0": float(metrics.logit_norm(logits0)),  # one output reads as binary
        "predicted": tracker.predict_regime(num_classes),
    }
    return state, failures


def probe_kernel(
    tracker: NTKTracker, fm: FunctionalModel, method: str, per_layer: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """``Θ(X, X)`` in the chosen layout, and per module when ``per_layer`` is on."""
    probe = fm.cast_input(tracker.probe_on(fm.module)[0])
    world = rank_and_world(tracker.distributed)[1]
    if isinstance(fm, BatchStatisticsModel):  # rows coupled: the whole-batch Jacobian
        result = batch_ntk_of(fm, probe, output=tracker.output, per_layer=per_layer)
    else:
        result = ntk_of(
            fm,
            probe,
            output=tracker.output,
            method=method,
            per_layer=per_layer,
            # two blocks of probe rows per rank: each rank gets its share of the pairs
            chunk_size=None if world == 1 else max(1, math.ceil(batch_size(probe) / (2 * world))),
            distributed=world > 1,
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
