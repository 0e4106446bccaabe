"""NTKTracker: the framework-free state behind the monitor, and the NTKReport it produces.

The tracker holds a fixed probe set ``X = (x_1..x_N)`` (labels ``y`` optional), and at
:meth:`NTKTracker.start` snapshots ``θ0``, the kernel ``Θ0 = Θ(X, X; θ0)``, the initial
logits ``f(X; θ0)`` and their mean centered norm. Each :meth:`NTKTracker.update`
computes ``Θ_t`` and every :class:`NTKReport` field (:mod:`lightning_ntk.monitor._measure`)
and the verdict (:mod:`lightning_ntk.monitor._verdict`), read against the set-up
(:mod:`lightning_ntk.monitor._setup`: declared, inferred from the training loss through
:meth:`NTKTracker.observe`, or read from the optimizer and loss; ``unknown`` otherwise).

The measured function is the one training differentiates (``normalization="batch"``):
BatchNorm layers normalise with the probe's own batch statistics, through the
whole-batch kernel of :mod:`lightning_ntk.kernel.batch_statistics`; ``"running"``
measures the eval-mode function.

Nothing here imports Lightning; the callback is a thin adapter over this class.

Cost and defaults. One report costs one kernel on the probe (``N²·C²`` entries in the
``"full"`` layout, computed exactly by :func:`lightning_ntk.empirical_ntk`), two ``jvp``
(the linearizations around ``θ0`` and around the previous report) and an ``(N·C)²``
eigen-decomposition. Above ``N·C = 1024`` the default layout is the exact ``"trace"``
``(N, N)`` (:func:`~lightning_ntk.monitor.settings.default_output`, one warning), whose
kernel, spectrum and saved state grow at most linearly in ``C``. The defaults —
``n_probe=16`` and log-spaced steps 4, 16, 64, 256, … — keep a run of ``T`` steps at
``⌊log4(T)⌋`` reports and the monitor's share of a 512-step run of the demo's network
under 5 % (``benchmarks/bench_overhead.py``, ``docs/verdicts.md``); the logit trend then
needs two reports at steps ≥ 100 within a factor 4 (from step 1024 on), so short runs
that want it set ``log_base=2`` or ``every_n_steps``. Memory: two copies of the selected
parameters (``θ0`` and the previous report's) and ``N²·C²`` numbers per kernel snapshot
in the full layout, ``N²`` in the trace layout (per layer when ``per_layer`` is on).

Sharded models (FSDP2's ``fully_shard``) are measured whole: every rank calls
:meth:`NTKTracker.start` and :meth:`NTKTracker.update` together (the parameters are
all-gathered, the kernel's blocks shared and summed), every rank gets the same report,
and ``θ0`` and the previous report's parameters are kept, and saved by
:meth:`NTKTracker.state_dict`, as this rank's shards, gathered whole for each report
(``state_dict(gather=True)`` saves them whole, for any rank to load;
``docs/distributed.md``).

Verdict thresholds and the measurements behind them: :mod:`lightning_ntk.monitor._verdict`
and ``docs/verdicts.md``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any, Optional, cast

import torch
from torch import Tensor, nn

from ..exceptions import NTKMeasurementWarning
from ..kernel import _inputs
from ..kernel._forward import ForwardModule, selector_on_wrapper
from ..kernel._functional import FunctionalModel, check_placement, exact_matmuls, unwrap_module
from ..kernel._sharded import Layout, layouts_of, to_shards, whole
from ..kernel.batch_statistics import measured_model
from ._measure import Snapshot, measure, read_preconditioner, snapshot
from ._observer import active_dropout, class_weights
from ._probe import (
    check_finite_probe,
    checked_probe,
    default_batch_to_xy,
    draw_probe,
    nonfinite_marker,
    preserved_rng,
)
from ._schedule import Schedule, trend_wait
from ._setup import LossObserver, Setup, resolve_setup
from ._timeline import timeline
from ._verdict import Thresholds
from .report import NTKReport, finite_or
from .settings import FULL_LAYOUT_LIMIT, NTKSettings

__all__ = ["NTKReport", "NTKTracker", "Thresholds"]


@dataclass(eq=False, repr=False)
class NTKTracker(NTKSettings):
    """Empirical NTK of a classifier on a fixed probe set, with a verdict on laziness.

    Typical use in a plain loop::

        tracker = NTKTracker(probe_x, probe_y, optimizer=opt)
        tracker.start(model)
        for step in range(1, steps + 1):
            ...  # one optimizer step
            if tracker.is_due(step):
                report = tracker.update(model, step)

    Args:
        probe_x: probe inputs ``(N, ...)``; or ``None`` to draw them later with
            :meth:`draw_probe`.
        probe_y: probe labels ``(N,)`` (int) or soft targets ``(N, C)``; optional.
        optimizer: the optimizer (its weight decay and decoupling are read from it; with
            ``kernel="optimizer"`` or ``"adam"``, its kernel and Adam's state).
        loss: the loss module (its label smoothing, and the class weights the observation
            of the training loss fits with, are read from it).
        distributed: share the probe kernel's blocks among the ranks of the initialised
            ``torch.distributed`` process group (each rank computes its share, one
            all-reduce assembles the kernel). Every rank must then call :meth:`start` and
            :meth:`update` together; ``NTKMonitor`` turns this on under multi-process
            strategies. A sharded (FSDP2) model's kernel is shared among the ranks in
            any case (one block per call when this is off).
        planned_steps: the step training will end at, when known (``NTKMonitor`` reads
            the Trainer's ``max_steps``): a report whose logit trend cannot be read yet
            then says whether the run ends before it can be, and which schedule reads it.
        **settings: what is measured and when: every field of
            :class:`~lightning_ntk.monitor.settings.NTKSettings` (``n_probe``, ``output``,
            ``method``, ``kernel``, ``params``, ``output_fn``, ``forward_fn``, ``per_layer``,
            ``top_layers``, ``dtype``, ``normalization``, ``every_n_steps``, ``every_n_epochs``,
            ``log_base``, ``thresholds``, ``expect``, ``weight_decay``, ``label_smoothing``,
            ``task``, ``seed``, ``batch_to_xy``), as keywords.
    """

    probe_x: Optional[Tensor] = None
    probe_y: Optional[Tensor] = None
    _: KW_ONLY
    optimizer: Optional[torch.optim.Optimizer] = None
    loss: Optional[nn.Module] = None
    distributed: bool = False
    planned_steps: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.distributed, bool):
            raise TypeError(f"Expected `distributed` to be a bool but got {self.distributed!r}.")
        self.schedule = Schedule(self.every_n_steps, self.every_n_epochs, self.log_base)
        self.batch_to_xy = self.batch_to_xy or default_batch_to_xy
        self.generator = torch.Generator().manual_seed(self.seed)
        probe_x, probe_y = self.probe_x, self.probe_y
        self.probe_x = self.probe_y = None
        if probe_x is not None:
            self.set_probe(probe_x, probe_y)
        elif probe_y is not None:
            raise ValueError("`probe_y` was given without `probe_x`.")

        self._state: Optional[Snapshot] = None  # filled by start / load_state_dict
        self.history: list[NTKReport] = []
        # what could not be measured for this model ("kernel", "linearized model") -> why
        self.failures: dict[str, str] = {}
        # how the last probe kernel was computed (method, fall-backs): an NTKCallInfo
        self.kernel_info: Any = None
        self.layer_history: list[dict[str, dict[str, float]]] = []
        self.last_kernel: Optional[Tensor] = None  # Θ_t of the last report
        self.eigenvalues: Optional[Tensor] = None  # its spectrum, descending
        self.observer = LossObserver()  # infers the label smoothing from the training loss
        # further optimizers training steps (manual optimization): their weight decay counts
        self.other_optimizers: list[torch.optim.Optimizer] = []
        # 0·Σ(training batches): NaN once a batch held NaN / inf (see nonfinite_marker)
        self._data_marker: Optional[Tensor] = None
        self._layout_noted = False  # the default's switch to the trace layout was announced
        # the schedule's steps known not to be due: (schedule, first, end), see is_due
        self._quiet_steps: tuple[Optional[Schedule], float, float] = (None, 0, 0)
        # how the parameters of a sharded model whose shards the state keeps are placed
        self._layouts: dict[str, Layout] = {}

    # ------------------------------------------------------------------ probe set

    def __getstate__(self) -> dict[str, Any]:
        """The tracker's attributes, its probe generator as the bytes of its state.

        A ``torch.Generator`` pickles its state as a tensor, which ``torch.multiprocessing``
        sends to a spawned process through shared memory (``strategy="ddp_spawn"``); plain
        bytes travel with the rest.
        """
        state = self.__dict__.copy()
        state["generator"] = bytes(self.generator.get_state().tolist())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.tensor(list(state["generator"]), dtype=torch.uint8))
        self.__dict__.update({**state, "generator": generator})

    def set_probe(self, probe_x: Any, probe_y: Optional[Tensor] = None) -> None:
        """Use the given probe inputs ``(N, ...)`` and labels ``(N,)`` / ``(N, C)``.

        The inputs are a tensor, or a mapping / tuple of tensors sharing the batch
        dimension (e.g. ``input_ids`` and ``attention_mask``), given whole to the model.

        Raises:
            TypeError: a probe that is not a tensor or a mapping / tuple of tensors.
            ValueError: an empty probe, or labels whose length differs from the inputs'.
        """
        probe_x, probe_y = checked_probe(probe_x, probe_y)
        check_finite_probe(probe_x)
        self.probe_x, self.probe_y = probe_x, probe_y

    def draw_probe(self, source: Any) -> None:
        """Draw ``n_probe`` examples from a map-style dataset or a ``DataLoader``'s dataset.

        Stratified by class when the items carry integer labels; drawn with the
        tracker's own generator. No data-loader iterator is created and the global
        RNGs are restored, so the training data order is unchanged. Examples holding
        NaN / inf are kept: :meth:`start` refuses them, naming the data as the cause.
        """
        dataset, collate = source, None
        if isinstance(source, torch.utils.data.DataLoader):
            dataset, collate = source.dataset, source.collate_fn
        x, y = draw_probe(
            dataset,
            self.n_probe,
            self.generator,
            collate_fn=collate,
            batch_to_xy=self.batch_to_xy,
        )
        self.probe_x, self.probe_y = checked_probe(x, y)

    # ------------------------------------------------------------------ schedule

    @property
    def started(self) -> bool:
        """Whether ``θ0`` and ``Θ0`` have been taken (by :meth:`start` or a checkpoint)."""
        return self._state is not None

    @property
    def started_state(self) -> Snapshot:
        """The snapshot of :meth:`start` (``θ0``, ``Θ0``, logits, set-up) and the last report."""
        if self._state is None:
            raise RuntimeError("Call `start(model)` (or `load_state_dict`) first.")
        return self._state

    @property
    def last_step(self) -> Optional[int]:
        """Step of the last report, or ``None``."""
        return self.history[-1].step if self.history else None

    def is_due(self, step: int) -> bool:
        """Whether a report is due after optimizer step ``step`` (and not yet made)."""
        quiet = self._quiet_steps  # (schedule, first, end): no step in [first, end) is due
        if quiet[0] is self.schedule and quiet[1] <= step < quiet[2]:  # most steps: no work
            return False
        if not self.schedule.step_due(step):
            self._quiet_steps = (self.schedule, step, self.schedule.next_step(step))
            return False
        return self.started and step != self.last_step

    def is_epoch_due(self, epoch: int, step: int) -> bool:
        """Whether a report is due at the end of epoch ``epoch`` (at step ``step``)."""
        return self.started and step != self.last_step and self.schedule.epoch_due(epoch)

    # ------------------------------------------------------------------ measurements

    def start(self, model: nn.Module, step: int = 0, *, restarted: bool = False) -> None:
        """Snapshot ``θ0``, ``Θ0``, the initial logits and their norm; clear the history.

        Args:
            model: the classifier, its parameters on one device.
            step: the optimizer step ``θ0`` is taken at; every report's ``reference_step``.
            restarted: ``θ0`` is taken mid-run because the reference of the run's start
                was lost (a resume from a checkpoint without this tracker's state); every
                report's ``restarted``.

        Raises:
            ValueError / TypeError: no probe set, probe inputs holding NaN / inf, a model
                on the ``meta`` device or on several devices, a sharding the engine does
                not compute (see :func:`lightning_ntk.empirical_ntk`), or a model whose
                output on the probe is not ``(N, C)`` logits (pass ``forward_fn`` or
                ``output_fn``).
            Exception: whatever the model's forward raises on the probe, unchanged, with
                a note saying so.
        """
        if self.probe_x is None:
            raise ValueError(
                "No probe set: pass `probe_x` (and `probe_y`) or call `draw_probe` first."
            )
        device = check_placement(unwrap_module(model))  # one device, not meta; a sharding
        # the engine computes exactly (FSDP2 `DTensor`s on one 1-D mesh), else refused
        wrapper = self._wrap(model)
        self.probe_x = _inputs.map_tensors(self.probe_x, lambda t: t.to(device))  # kept there
        if self.probe_y is not None:
            self.probe_y = self.probe_y.to(device)
        check_finite_probe(self.probe_x)
        with preserved_rng(device):
            fm = self._functional(wrapper)
            state, failures = snapshot(self, fm, step)
        # a sharded model: keep this rank's shards of θ0 only, as the parameters are now
        self._layouts = {n: v for n, v in layouts_of(wrapper).items() if n in state.theta0}
        state.theta0 = to_shards(state.theta0, self._layouts)
        state.sharded = list(self._layouts)
        state.restarted = bool(restarted)
        self._state = state  # only a complete snapshot marks the tracker as started
        self._warn_failures(failures)
        self._note_layout(state)
        self.history = []
        self.layer_history = []
        self.last_kernel = state.K0
        self.eigenvalues = None

    def update(self, model: nn.Module, step: int) -> NTKReport:
        """Measure ``Θ_t`` and the model at ``step``; append and return the report.

        Metrics that cannot be computed (non-finite logits, a failed eigen-decomposition)
        are ``nan`` and the verdict says so; no exception escapes for them.
        """
        if not self.started:
            raise RuntimeError("Call `start(model)` (or `load_state_dict`) before `update`.")
        wrapper = self._wrap(model)
        state = self.started_state
        with preserved_rng(_device_of(wrapper)):
            fm = self._functional(wrapper)
            layouts = self._layouts_now(wrapper, state)
            gathered = _whole(state, layouts)  # a sharded model's θ0 etc. gathered
            self._state = gathered
            try:
                if state.waiting:  # Adam's preconditioner, read once it exists, and Θ0 with it
                    self._warn_failures(read_preconditioner(self, fm, int(step)))
                    for name in _REFERENCE_KERNEL_FIELDS:  # onto the kept (sharded) state
                        setattr(state, name, getattr(gathered, name))
                    self.last_kernel = state.K0
                measured = measure(self, fm, int(step))
            finally:
                self._state = state
        report, layers = measured.report, measured.layers
        report.reference_step = int(state.start_step)
        report.restarted = state.restarted
        self._warn_failures(measured.failures)
        point = measured.point
        if state.gathered:  # loaded whole (a state saved with `gather=True`): shards again
            layouts = {n: v for n, v in layouts_of(wrapper).items() if n in state.theta0}
            self._layouts.update(layouts)
            state.theta0 = to_shards(state.theta0, layouts)
            if state.previous is not None:
                theta = to_shards(state.previous.theta, layouts)
                state.previous = dataclasses.replace(state.previous, theta=theta)
            state.sharded, state.gathered = list(layouts), []
        if point is not None:  # None: too close to the previous report to replace it
            if state.sharded:
                point = dataclasses.replace(point, theta=to_shards(point.theta, layouts))
            state.previous = point  # the next report's velocity and local error
        state.predicted = measured.predicted
        if measured.kernel is not None:
            self.last_kernel, self.eigenvalues = measured.kernel, measured.eigenvalues
        self.history.append(report)
        self.layer_history.append(layers)
        return report

    def scalars(self, report: Optional[NTKReport] = None) -> dict[str, float]:
        """Logged scalars of a report (default: the last one).

        ``ntk/<field>`` for every numeric field, ``ntk/lazy``, and for the ``top_layers``
        layers that moved most ``ntk/layer/<module>/relative_change`` and
        ``ntk/layer/<module>/share`` (its fraction of the kernel's trace).
        """
        if report is None:
            if not self.history:
                raise RuntimeError("No report yet: call `update` first.")
            report = self.history[-1]
        index = next(
            (i for i in reversed(range(len(self.history))) if self.history[i] is report), None
        )
        out = report.scalars()
        layers = self.layer_history[index] if index is not None else {}
        ranked = sorted(layers.items(), key=lambda kv: -finite_or(kv[1]["relative_change"]))
        for name, values in ranked[: self.top_layers]:
            out[f"ntk/layer/{name}/relative_change"] = values["relative_change"]
            out[f"ntk/layer/{name}/share"] = values["share"]
        return out

    @property
    def diagnosis(self) -> str:
        """The run so far in one line (each regime with its steps and figures, then the logits).

        E.g. ``"lazy until step 16; feature learning 16–256, kernel velocity 0.90 → 0.12
        per doubling of steps, kernel aligning with the labels (target alignment 0.21 →
        0.48); locally linear from step 256; logits bounded (+0.05 per doubling of steps)"``.
        """
        alignment0 = self._state.alignment0 if self._state is not None else float("nan")
        wait = self.trend_wait([r.step for r in self.history])
        return timeline(self.history, self.thresholds, alignment0, wait)  # type: ignore[arg-type]

    def trend_wait(self, steps: list[int]) -> str:
        """When the logit trend is read, in words, after reports at ``steps`` (oldest first).

        E.g. ``"it needs two reports from step 100"``, completed when ``planned_steps``
        is known and the schedule's next reports would come after it.
        """
        thresholds = cast(Thresholds, self.thresholds)
        return trend_wait(self.schedule, steps, thresholds.min_trend_step, self.planned_steps)

    @property
    def predicted(self) -> dict[str, str]:
        """``{"regime": ..., "reason": ...}``: the paper's prediction for the set-up."""
        if self._state is None:
            return self.predict_regime(None)
        return dict(self._state.predicted)

    @property
    def layout(self) -> Optional[str]:
        """The kernel layout in use, ``output`` or the one its default chose at :meth:`start`.

        ``None`` before :meth:`start` when ``output`` was left at its default.
        """
        return self.output if self._state is None else self._state.output

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes ``C`` (known after :meth:`start`)."""
        return None if self._state is None else self._state.num_classes

    def kernel_matrix(self) -> Tensor:
        """The last kernel as an ``(N, N)`` matrix (mean over classes), for heat maps."""
        if self.last_kernel is None:
            raise RuntimeError("No kernel yet: call `start` first.")
        K = self.last_kernel
        if K.ndim == 4:
            return K.diagonal(dim1=2, dim2=3).mean(dim=-1)
        return K.mean(dim=-1) if K.ndim == 3 else K

    # ------------------------------------------------------------------ state

    def state_dict(self, *, gather: bool = False) -> dict[str, Any]:
        """Everything needed to resume: probe, ``θ0``, ``Θ0``, initial logits, history.

        Tensors are moved to the CPU; the result can be saved with ``torch.save``.

        Args:
            gather: keep a sharded model's ``θ0`` and last report's parameters whole (an
                all-gather each: every rank calls together) instead of this rank's shards,
                so that any rank can load the result (for checkpoints that keep one rank's
                copy); the loaded tracker keeps shards again from its next report.
        """
        state = None
        if self._state is not None:
            snapshot = self._state
            if gather and snapshot.sharded:
                whole_state = _whole(snapshot, self._kept_layouts())
                snapshot = dataclasses.replace(
                    whole_state, sharded=[], gathered=list(snapshot.sharded)
                )
            state = _to_cpu(snapshot.to_dict())
        return {
            "probe_x": _to_cpu(self.probe_x),
            "probe_y": _to_cpu(self.probe_y),
            "generator": self.generator.get_state(),
            "state": state,
            "history": [r.to_dict() for r in self.history],
            "layer_history": [dict(layers) for layers in self.layer_history],
            "kernel": _to_cpu(self.last_kernel),
            "eigenvalues": _to_cpu(self.eigenvalues),
            "observer": self.observer.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; tensors move to the model's device on use."""
        missing = {"probe_x", "probe_y", "state", "history"} - set(state_dict)
        if missing:
            raise ValueError(
                f"Expected an NTKTracker state dict with keys {sorted(missing)}; got "
                f"{sorted(state_dict)}."
            )
        self.probe_x = state_dict["probe_x"]
        self.probe_y = state_dict["probe_y"]
        if "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])
        state = state_dict["state"]
        self._state = None if state is None else Snapshot.from_dict(state)
        self._layouts = {}  # a sharded model's: read from the model at the next report
        self.history = [NTKReport.from_dict(r) for r in state_dict["history"]]
        self.layer_history = [dict(x) for x in state_dict.get("layer_history", [])]
        self.last_kernel = state_dict.get("kernel")
        self.eigenvalues = state_dict.get("eigenvalues")
        self.observer = LossObserver()
        self.observer.load_state_dict(state_dict.get("observer", {}))

    # ------------------------------------------------------------------ internals

    def _wrap(self, model: nn.Module) -> ForwardModule:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected `model` to be a torch.nn.Module but got {type(model).__name__}."
            )
        return ForwardModule(model, self.forward_fn)

    def _layouts_now(self, wrapper: nn.Module, state: Snapshot) -> dict[str, Layout]:
        """How the kept shards are placed: as at :meth:`start`, else as the model is now.

        A tracker restored from a state dict reads the layouts from the model's
        parameters (FSDP2 may leave some unsharded between a forward and its backward).
        """
        if not state.sharded:
            return {}
        live = layouts_of(wrapper)
        known = {n: self._layouts.get(n) or live.get(n) for n in state.sharded}
        layouts = {n: layout for n, layout in known.items() if layout is not None}
        self._layouts.update(layouts)
        return layouts

    def _kept_layouts(self) -> dict[str, Layout]:
        """How the kept shards are placed, as read at :meth:`start` or the last report."""
        state = self.started_state
        missing = [n for n in state.sharded if n not in self._layouts]
        if missing:
            raise RuntimeError(
                f"The tracker keeps shards of {missing[0]!r} loaded from a state dict but has "
                "not seen the model since: call `update(model, step)` before "
                "`state_dict(gather=True)`."
            )
        return {n: self._layouts[n] for n in state.sharded}

    def _selector(self) -> Any:
        return selector_on_wrapper(self.params)

    def _functional(self, wrapper: nn.Module) -> FunctionalModel:
        """The measured function: batch statistics (training's) or eval mode; see settings."""
        return measured_model(
            wrapper,
            self.normalization,
            params=self._selector(),
            output_fn=self.output_fn,
            dtype=self.dtype,
        )

    def _note_layout(self, state: Snapshot) -> None:
        """One warning when ``output=None`` chose the trace layout for many outputs."""
        if self.output is not None or state.output == "full" or self._layout_noted:
            return
        assert self.probe_x is not None
        rows = _inputs.batch_size(self.probe_x) * state.num_classes
        warnings.warn(
            f"lightning_ntk keeps the probe kernel in the exact trace layout (N, N), the "
            f"mean over classes, because N·C = {rows} is above {FULL_LAYOUT_LIMIT} and the "
            f"full (N, N, C, C) layout would hold {rows}² entries; pass `output='full'` to "
            f"keep the full layout.",
            UserWarning,
            stacklevel=3,
        )
        self._layout_noted = True

    def _warn_failures(self, failures: Mapping[str, str]) -> None:
        """One :class:`~lightning_ntk.NTKMeasurementWarning` per measurement that failed."""
        for what, message in failures.items():
            if what not in self.failures:
                warnings.warn(message, NTKMeasurementWarning, stacklevel=3)
            self.failures[what] = message

    def probe_on(self, wrapper: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
        """The probe inputs and labels on the model's device."""
        assert self.probe_x is not None
        device = _device_of(wrapper)
        y = None if self.probe_y is None else self.probe_y.to(device)
        return _inputs.map_tensors(self.probe_x, lambda t: t.to(device)), y

    def predict_regime(self, num_classes: Optional[int] = None) -> dict[str, str]:
        """The theory's bounded / diverging logits for the set-up as known now.

        Args:
            num_classes: the model's number of outputs ``C`` (one output is a binary
                classifier); default: the one found by :meth:`start`.

        Returns:
            ``{"regime": "bounded" | "diverging" | "unknown", "reason": ...}``.
        """
        try:
            return self.resolve_setup(num_classes).prediction()
        except (TypeError, ValueError) as err:
            return {"regime": "unknown", "reason": f"set-up not understood: {err}"}

    # ------------------------------------------------------------------ set-up

    @property
    def setup(self) -> Setup:
        """The training set-up as declared, inferred from the training loss, or read.

        Raises:
            TypeError / ValueError: an optimizer without ``param_groups`` or a negative
                weight decay.
        """
        return self.resolve_setup(self.num_classes)

    def resolve_setup(self, num_outputs: Optional[int]) -> Setup:
        """:attr:`setup` for a model with ``num_outputs`` outputs (one output: binary)."""
        return resolve_setup(
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            optimizer=[self.optimizer, *self.other_optimizers]
            if self.optimizer is not None and self.other_optimizers
            else self.optimizer,
            loss=self.loss,
            probe_y=self.probe_y,
            observer=self.observer,
            task=self.task,
            num_outputs=num_outputs,
        )

    @property
    def wants_observation(self) -> bool:
        """Whether a training batch would still help to infer the label smoothing.

        False once ``ε`` is established (or cannot be), when it was declared, and before
        :meth:`start`.
        """
        return self.started and self.label_smoothing is None and self.observer.wants_more

    def training_logits(
        self, model: nn.Module, x: Any, autocast: Optional[torch.dtype] = None
    ) -> Tensor:
        """Logits of a training batch ``x`` as training computes them (batch statistics).

        Evaluated functionally at the model's current parameters, without gradients, with
        the RNG streams restored and no buffer read or written: call it before the
        optimizer step of that batch. Dropout is off (its masks are not reproduced);
        ``autocast`` (e.g. ``torch.bfloat16``) evaluates under the mixed precision
        training runs in.
        """
        wrapper = self._wrap(model)
        self.observer.dropout = active_dropout(model)
        with preserved_rng(_device_of(wrapper)):
            fm = measured_model(
                wrapper, "batch", params=self._selector(), output_fn=self.output_fn,
                dtype=None if autocast is not None else self.dtype,
            )  # fmt: skip
            numerics = (
                exact_matmuls(fm.device)
                if autocast is None
                else torch.autocast(fm.device.type, dtype=autocast)
            )
            with numerics, torch.no_grad():
                return fm(fm.params, fm.cast_input(x)).detach()

    def note_training_batch(self, x: Any, y: Any = None) -> None:
        """Remember whether a training batch's inputs and targets are finite (no host sync).

        A report whose logits are not finite then says whether the data (NaN / inf in a
        batch) or training itself (divergence) made them so.
        """
        labels = isinstance(y, Tensor) and y.is_floating_point()  # integer labels are finite
        self._data_marker = nonfinite_marker([x, y] if labels else x, self._data_marker)

    @property
    def training_data_finite(self) -> bool:
        """Whether every training batch given to :meth:`note_training_batch` was finite."""
        return self._data_marker is None or bool(torch.isfinite(self._data_marker))

    def add_observation(
        self, logits: Tensor, y: Any, loss: Any, step: int, captured: bool = False
    ) -> None:
        """Compare the loss training computed on a batch with that batch's ``logits``.

        Args:
            logits: the batch's logits: those the training step computed
                (``captured=True``), or :meth:`training_logits` of the batch.
            y: its targets (labels, soft targets, or sigmoid targets in ``[0, 1]``).
            loss: the loss training computed on it (a scalar tensor or number).
            step: the step, for the report's account of the set-up.
            captured: ``logits`` are the training step's own (dropout masks, mixed
                precision and all).
        """
        self.observer.add_batch(
            logits, y, loss, step, captured=captured, task=self.task,
            class_weight=class_weights(self.loss),
        )  # fmt: skip

    def observe(
        self,
        model: nn.Module,
        x: Any,
        y: Any,
        loss: Any,
        step: int = 0,
        logits: Optional[Tensor] = None,
    ) -> None:
        """Let the tracker infer the loss and its smoothing from a training batch (plain loops).

        Call it with the batch, its targets and the loss training computed on it, before
        the optimizer step; it notes whether the batch is finite (see
        :meth:`note_training_batch`) and evaluates it only while :attr:`wants_observation`.
        Pass the ``logits`` the loss was computed from when you have them: with dropout or
        mixed precision only those reproduce the loss exactly. Without them the batch
        is re-evaluated, under the autocast in effect at the call.
        """
        self.note_training_batch(x, y)
        if not self.wants_observation:
            return
        if logits is not None:
            self.add_observation(self.logits_of_output(logits), y, loss, step, captured=True)
            return
        try:
            device = _device_of(model)
            autocast = (
                torch.get_autocast_dtype(device.type)
                if torch.is_autocast_enabled(device.type)
                else None
            )
            logits = self.training_logits(model, x, autocast=autocast)
        except Exception as err:  # never ends training: the set-up just stays unknown
            self.observer.stop(f"the training batches could not be evaluated ({err})")
            return
        self.add_observation(logits, y, loss, step)

    def logits_of_output(self, output: Any) -> Tensor:
        """Detached logits ``(N, C)`` of a model output, through ``output_fn`` if given.

        Raises:
            TypeError: an output that ``output_fn`` does not turn into a tensor.
        """
        logits = self.output_fn(output) if self.output_fn is not None else output
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"Expected the model output to give logits as a tensor but got "
                f"{type(logits).__name__}; pass `output_fn`."
            )
        logits = logits.detach()
        return logits[:, None] if logits.ndim == 1 else logits


# what reading Adam's preconditioner sets in the snapshot
_REFERENCE_KERNEL_FIELDS = (
    "preconditioner",
    "preconditioner_step",
    "K0",
    "K0_layers",
    "alignment0",
)


def _whole(state: Snapshot, layouts: Mapping[str, Layout]) -> Snapshot:
    """``state`` with the shards it keeps of a sharded model gathered whole (collective)."""
    if not state.sharded:
        return state
    previous = state.previous
    if previous is not None:
        theta = whole(previous.theta, state.sharded, layouts)
        previous = dataclasses.replace(previous, theta=theta)
    theta0 = whole(state.theta0, state.sharded, layouts)
    return dataclasses.replace(state, theta0=theta0, previous=previous)


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
