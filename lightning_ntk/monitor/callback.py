"""NTKMonitor: a Lightning callback that watches the empirical NTK while a classifier trains.

A thin adapter over :class:`~lightning_ntk.monitor.tracker.NTKTracker`: it draws the probe set
from the training data (or takes the one given), starts the tracker when training
starts, asks it for a report on its schedule, logs the report and acts on the verdict.

One implementation serves both Lightning namespaces: :func:`monitor_class` builds the
callback class for ``"pytorch_lightning"`` (``lightning_ntk.NTKMonitor``, defined here)
or ``"lightning.pytorch"`` (``lightning_ntk.lightning.NTKMonitor``). The namespace is
imported only when the class is first used.

Logging. Every report is logged under ``prefix`` (default ``"ntk/"``; the keys below
use the default)

* into ``trainer.callback_metrics`` (as tensors), so ``EarlyStopping`` and
  ``ModelCheckpoint`` can monitor ``ntk/*``, and ``ntk/relative_change`` and ``ntk/lazy``
  into ``trainer.progress_bar_metrics``. These are the dicts ``pl_module.log`` fills; the
  monitor writes them directly because ``log`` costs about half a millisecond per key,
  a third of a report's time on a small model;
* straight to every attached logger with ``logger.log_metrics(..., step=global_step)``,
  so no report is dropped by the Trainer's ``log_every_n_steps``;
* with TensorBoard extras (:mod:`lightning_ntk.monitor.loggers`) when a ``TensorBoardLogger`` of
  either namespace is attached.

Distributed. Under DDP every rank computes the same report (same probe, same synced
parameters) and takes part in one broadcast per report, so the verdict, the logged
values and the actions are rank 0's on every rank; ``"stop"`` stops all ranks at the
same step. Under ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in ``configure_model``,
``tensor_parallel_size=1``) every rank measures the whole model (its parameters gathered for
each report) and the checkpointed state holds ``θ0`` whole, as rank 0 alone saves callback
states; FSDP1, DeepSpeed and tensor parallelism are refused at ``setup``.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Union, cast

import torch
from torch import Tensor

from ..exceptions import (
    LinearizationBreakdownError,
    LinearizationBreakdownWarning,
    NTKMeasurementWarning,
)
from ._observer import OutputCapture, active_dropout
from ._probe import (
    check_finite_probe,
    default_batch_to_xy,
    first_dataloader,
    map_style,
    probe_from_batch,
    raised_by_model,
)
from ._publish import (
    PROGRESS_BAR_KEYS,
    publish,
    rank_zero_info,
    rank_zero_warn,
    verbose_line,
    with_prefix,
)
from ._setup import find_loss
from ._strategies import strategy_refusal
from ._verdict import Thresholds
from .loggers import tensorboard_writers, write_extras, write_layout
from .settings import NTKSettings, settings_of
from .tracker import NTKReport, NTKTracker

__all__ = ["NTKMonitor", "NTKMonitorBase", "monitor_class"]  # NTKMonitor: built on first use

ACTIONS = ("warn", "stop", "raise")
# the autocast dtype of the Trainer's mixed precisions
_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}
_MODULES = {
    "pytorch_lightning": "lightning_ntk.monitor.callback",
    "lightning.pytorch": "lightning_ntk.lightning",
}


@dataclass(eq=False, repr=False)
class NTKMonitorBase(NTKSettings):
    """Watch the empirical NTK of the trained classifier and flag when it leaves the kernel regime.

    At the start of training the monitor draws ``n_probe`` examples from the training
    dataset (stratified by class, with its own generator: the data order and the global
    RNG are untouched) unless ``probe_x`` is given — from a stream (an ``IterableDataset``)
    or with a ``batch_to_xy`` of combined loaders' batches, the first ``n_probe`` labelled
    examples of the first training batch, before any step on it — snapshots ``θ0`` and
    ``Θ0``, then on its schedule (default: steps 4, 16, 64, 256, …) logs every field of an
    :class:`~lightning_ntk.monitor.tracker.NTKReport` as ``ntk/<field>``, plus ``ntk/lazy``
    and the per-layer drift ``ntk/layer/<module>/relative_change``.

    The model is never written to: every evaluation is functional (``torch.func``), with
    autocast off, of the function training differentiates (``normalization="batch"``:
    BatchNorm with the probe's own batch statistics, running buffers untouched, dropout
    off) or of the deployed eval-mode function (``normalization="running"``).

    The set-up the verdict is read against (task, label smoothing, soft or hard targets,
    weight decay) is taken from the ``task`` / ``weight_decay`` / ``label_smoothing``
    settings if given, else inferred from training itself: for the first few batches the
    monitor keeps the batch's logits — the training step's own, through a forward hook on
    the module when ``training_step`` calls it once, or on the one direct child that
    returns the logits when the step calls a wrapped model (dropout masks and mixed
    precision included), else one functional forward at ``on_train_batch_start`` under the
    Trainer's autocast — and compares them with the loss ``training_step`` returned, which
    identifies the loss and its label smoothing however it is written
    (``nn.CrossEntropyLoss``, ``F.cross_entropy(..., label_smoothing=ε)``, smoothed soft
    targets, ``nn.BCEWithLogitsLoss`` with or without ``pos_weight``); the weight decay
    is read from the optimizers (the smallest on weight matrices, where manual
    optimization steps several), and a loss module found in the module is the
    fallback, dropped when the training loss contradicts it. Each report's ``setup``
    says what was found and how.

    Args:
        probe_x: probe inputs ``(N, ...)``; ``None`` draws them from the training data.
        probe_y: probe labels ``(N,)`` or soft targets ``(N, C)``.
        on_breakdown: what to do when the verdict turns ``"broken"`` — an alarm: logits
            diverging (always), or leaving the lazy regime with ``expect="lazy"``. Acted on
            once per transition into the alarm: ``"warn"`` (a
            :class:`~lightning_ntk.LinearizationBreakdownWarning` on rank 0, pointing at
            the code that called ``trainer.fit``), ``"stop"`` (stop training on every
            rank), ``"raise"`` (:class:`~lightning_ntk.LinearizationBreakdownError`), or a
            callable receiving the report.
        prog_bar: show ``<prefix>relative_change`` and ``<prefix>lazy`` in the progress
            bar (on by default, unlike ``self.log``: the verdict is what the monitor is for).
        tensorboard_extras: write the spectrum histogram, kernel image, diagnosis text and
            custom-scalars layout to attached TensorBoard loggers.
        prefix: the start of every logged key (``"ntk/"``: ``ntk/relative_change``, …);
            monitors with different prefixes log side by side on one ``Trainer``.
        verbose: print each report's regime, verdict and message (on rank 0), like
            Lightning's ``EarlyStopping(verbose=True)``; a message the alarm's warning
            carries is not printed twice.
        **settings: what is measured and when: every field of
            :class:`~lightning_ntk.monitor.settings.NTKSettings` (``n_probe``, ``output``,
            ``method``, ``kernel``, ``params``, ``every_n_steps``, ``log_base``,
            ``thresholds``, ``expect``, ``weight_decay``, ``label_smoothing``, ``forward_fn``,
            ``output_fn``, …), as keywords. ``weight_decay`` and ``label_smoothing``
            override what is read from the optimizers and the module's loss;
            ``forward_fn(pl_module, x)`` replaces ``pl_module(x)``; ``kernel="optimizer"``
            measures the kernel of the first optimizer.
    """

    _namespace: ClassVar[str] = ""

    _: KW_ONLY
    probe_x: Optional[Tensor] = None
    probe_y: Optional[Tensor] = None
    on_breakdown: Union[str, Callable[[NTKReport], Any]] = "warn"
    prog_bar: bool = True
    tensorboard_extras: bool = True
    prefix: str = "ntk/"
    verbose: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.on_breakdown in ACTIONS or callable(self.on_breakdown)):
            raise ValueError(
                f"Expected `on_breakdown` to be one of {ACTIONS} or a callable taking the "
                f"report but got {self.on_breakdown!r}."
            )
        if not isinstance(self.prefix, str) or not self.prefix:
            raise TypeError(f"Expected `prefix` to be a non-empty str but got {self.prefix!r}.")
        for name in ("prog_bar", "tensorboard_extras", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Expected `{name}` to be a bool but got {getattr(self, name)!r}.")
        self.tracker = NTKTracker(self.probe_x, self.probe_y, **settings_of(self))
        self._probe_given = self.probe_x is not None
        self._restored = False
        self._failed = False  # an unexpected failure ended this run's reports
        self._last_verdict: Optional[str] = None
        self._pending: Optional[tuple[Optional[Tensor], Any]] = None  # re-evaluated logits, y
        self._capture = OutputCapture()  # the training step's own outputs
        # re-evaluate each observed batch's logits: until the step's own were captured
        self._reevaluate = True
        self._evaluation_error = ""
        self._state_key: Optional[tuple[tuple[Any, ...], str]] = None
        self._other_state_keys: list[str] = []  # other monitors' states in the checkpoint
        self._module_id: Optional[int] = None  # the module θ0 was taken of
        self._from_batch = False  # the probe comes from the first training batch (a stream)

    # ------------------------------------------------------------------ Lightning hooks

    @property
    def state_key(self) -> str:
        """Checkpoint key; monitors with other probes, layouts, kernels or schedules coexist."""
        tracker = self.tracker
        schedule = tracker.schedule
        # Lightning reads the key around every hook call of every step: build it once
        # per distinct settings, compared as a plain tuple
        values = (
            tracker.n_probe, tracker.output, tracker.method, tracker.params, tracker.seed,
            schedule.every_n_steps, schedule.every_n_epochs, schedule.log_base, self.prefix,
            tracker.kernel,
        )  # fmt: skip
        cached = self._state_key
        if cached is None or cached[0] != values:
            params = tracker.params
            settings = dict(
                n_probe=tracker.n_probe,
                output=tracker.output,
                method=tracker.method,
                params=params if isinstance(params, (str, list)) else None,
                seed=tracker.seed,
                every_n_steps=schedule.every_n_steps,
                every_n_epochs=schedule.every_n_epochs,
                log_base=schedule.log_base,
                prefix=self.prefix,
            )
            if tracker.kernel != "sgd":  # the default's key is the one it had before the setting
                settings["kernel"] = tracker.kernel
            key = self._generate_state_key(**settings)  # type: ignore[attr-defined]
            cached = self._state_key = (values, key)
        return cached[1]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the strategy; share the kernel's blocks among the ranks of a distributed run.

        DDP and ``ModelParallelStrategy`` with FSDP2 alone (``tensor_parallel_size=1``,
        ``fully_shard`` in ``configure_model``) are supported; the other sharded strategies
        are refused (see :func:`strategy_refusal`).
        """
        refusal = strategy_refusal(trainer.strategy)
        if refusal:
            raise ValueError(refusal)
        # every rank takes part in every report: the probe kernel's blocks are shared
        self.tracker.distributed = trainer.world_size > 1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Draw the probe (if needed), read the set-up and snapshot ``θ0``, ``Θ0``.

        The monitor's own checks (probe, devices, ``forward_fn`` / ``output_fn``) raise;
        anything the model raises on the probe, or a probe drawn with NaN / inf, is a
        measurement failure: one warning, no reports, training goes on (see
        ``on_breakdown``). A resume that finds no state of this monitor warns once and
        takes ``θ0`` at the resume step (reports then carry ``restarted=True``).
        """
        tracker = self.tracker
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        # its learning rate sets the L2 time scale; a declared `weight_decay` still wins
        tracker.optimizer = optimizers[0] if optimizers else None
        tracker.planned_steps = _planned_steps(trainer)
        tracker.other_optimizers = optimizers[1:]  # their weight decay is read too
        if tracker.label_smoothing is None:
            tracker.loss = find_loss(pl_module)
        if self._restored and tracker.started:
            self._restored = False
            return
        step = trainer.global_step
        if self._continues(pl_module, step):  # `fit` again on the same Trainer: one run
            return
        self._from_batch = False
        if not self._probe_given:
            loaders = trainer.train_dataloader
            loader = first_dataloader(loaders)
            # `batch_to_xy` of several loaders' batches splits no single loader's items
            combined = tracker.batch_to_xy is not default_batch_to_xy and loader is not loaders
            if combined or not map_style(loader):  # the probe is taken from the first batch
                self._from_batch = True
                return
            tracker.draw_probe(loader)
        self._start(trainer, pl_module, step)

    def _start(self, trainer: Any, pl_module: Any, step: int) -> None:
        """Snapshot ``θ0`` and ``Θ0`` at ``step`` on the probe drawn or given."""
        tracker = self.tracker
        resumed = step > 0  # the run's own θ0 (step 0) is lost: say so, mark the reports
        self._failed = False
        self._reevaluate = True
        try:
            if not self._probe_given:  # drawn from the training data: NaN is a data problem
                check_finite_probe(tracker.probe_x)
        except ValueError as err:
            self._give_up(err, "at the start of training")
            return
        try:
            tracker.start(pl_module, step=step, restarted=resumed)
        except Exception as err:
            if isinstance(err, (TypeError, ValueError)) and not raised_by_model(err):
                raise  # the monitor's own arguments are wrong (probe, forward_fn, ...)
            self._give_up(err, "at the start of training")
            return
        if resumed:
            self._warn_restarted(trainer, step)
        self._module_id = id(pl_module)
        self._restored = False
        self._last_verdict = None
        if self.tensorboard_extras and trainer.is_global_zero:
            for writer in tensorboard_writers(trainer.loggers):
                write_layout(writer, cast(Thresholds, tracker.thresholds), prefix=self.prefix)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Keep the batch's logits while the set-up is unknown.

        The logits serve to infer the label smoothing (see the class). Whether the batch
        is finite is noted at its end (:meth:`on_train_batch_end`).
        """
        self._pending = None
        self._capture.release()
        tracker = self.tracker
        if self._from_batch:  # a stream's first batch: the probe, before any step on it
            self._from_batch = False
            self._start_on_batch(trainer, pl_module, batch)
        # (the sanity check runs no training batch); most steps stop here
        if self._failed or not tracker.started or not tracker.wants_observation:
            return
        try:
            to_xy = cast(Callable[[Any], Any], tracker.batch_to_xy)  # the tracker sets a default
            x, y = to_xy(batch)
        except Exception as err:  # the monitor never ends training for it
            tracker.observer.stop(f"the training batches could not be evaluated ({err})")
            return
        self._pending = (None, y)
        if not self._reevaluate:  # the step's own logits served: no second forward
            tracker.observer.dropout = active_dropout(pl_module)
        else:
            try:
                autocast = _MIXED.get(str(getattr(trainer, "precision", "")))
                self._pending = (tracker.training_logits(pl_module, x, autocast=autocast), y)
            except Exception as err:  # the training step's own logits may still come
                self._evaluation_error = f"{type(err).__name__}: {err}"
        if tracker.forward_fn is None:  # after the monitor's own forward: the step's calls only
            self._capture.attach(pl_module, children=True)

    def _start_on_batch(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        """Take the probe from the first training batch of a stream and start on it."""
        tracker = self.tracker
        try:
            to_xy = cast(Callable[[Any], Any], tracker.batch_to_xy)
            x, y = to_xy(batch)
            x, y = probe_from_batch(x, y, tracker.n_probe)
            tracker.set_probe(x, y)
        except (TypeError, ValueError) as err:
            self._give_up(err, "at the start of training (from the first training batch)")
            return
        self._start(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Note whether the batch was finite; report when the schedule says so.

        The note is taken here, right after the step's own computations, where it costs
        least (the sanity check runs no training batch).
        """
        pending, self._pending = self._pending, None
        captured = self._capture.release()
        tracker = self.tracker
        if self._failed or not tracker.started:
            return
        try:
            to_xy = cast(Callable[[Any], Any], tracker.batch_to_xy)
            tracker.note_training_batch(*to_xy(batch))  # NaN data is not divergence
        except Exception:  # the monitor never ends training for it (nor for a batch it
            pass  # cannot split: the observation of the set-up, if on, says so)
        if pending is not None:
            self._observe(pending, captured, outputs, trainer.global_step)
        step = trainer.global_step
        if not self._failed and tracker.is_due(step):
            self._report(trainer, pl_module, step, epoch_end=False)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Report at the end of every ``every_n_epochs``-th epoch."""
        step = trainer.global_step
        if not self._failed and self.tracker.is_epoch_due(trainer.current_epoch, step):
            self._report(trainer, pl_module, step, epoch_end=True)

    def _continues(self, pl_module: Any, step: int) -> bool:
        """Whether this ``fit`` goes on with the run the monitor measures (keep its state).

        ``trainer.fit`` called again on the same Trainer and module (a raised
        ``max_steps`` / ``max_epochs``) starts at the step the last one ended at: ``θ0``,
        ``Θ0``, the probe and the history in memory are the run's own. A new Trainer
        (step 0) or another module starts a new run.
        """
        tracker = self.tracker
        if self._failed or not tracker.started or step == 0 or self._module_id != id(pl_module):
            return False
        last = tracker.last_step
        reached = tracker.started_state.start_step if last is None else last
        return step >= reached

    def _warn_restarted(self, trainer: Any, step: int) -> None:
        """Say once that the reference is taken at ``step``, not at the start of training."""
        ckpt_path = getattr(trainer, "ckpt_path", None)
        if ckpt_path is None:
            why = "no reference of this monitor was restored (no checkpoint was given)"
        elif self._restored:
            why = f"its state in the checkpoint {ckpt_path} holds no θ0 (it was never taken)"
        elif self._other_state_keys:
            why = (
                f"the checkpoint {ckpt_path} holds NTKMonitor state saved with other settings "
                "(the state key depends on n_probe, output, method, kernel, params, seed, "
                "the schedule and prefix)"
            )
        else:
            why = f"the checkpoint {ckpt_path} holds no state of this NTKMonitor"
        warnings.warn(
            f"NTKMonitor resumes at step {step} but {why}: it takes θ0 and Θ0 at step {step}, "
            "so drift and logit growth are measured from there, not from the start of "
            "training, and every report carries restarted=True.",
            NTKMeasurementWarning,
            stacklevel=2,
        )

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Note other NTKMonitor states in the checkpoint, to name them if ours is missing."""
        own = self.state_key
        states = checkpoint.get("callbacks") or {}
        self._other_state_keys = [
            key for key in states if str(key).startswith("NTKMonitor") and key != own
        ]

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state (probe, ``θ0``, ``Θ0``, history) and the last verdict.

        A sharded model's ``θ0`` is saved whole (gathered: every rank saves together, as
        Lightning's checkpointing does), since rank 0's copy alone is written and every
        rank loads it.
        """
        tracker = self.tracker.state_dict(gather=True)
        return {"tracker": tracker, "last_verdict": self._last_verdict}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; training resumes without a new ``θ0``."""
        self.tracker.load_state_dict(state_dict["tracker"])
        self._last_verdict = state_dict.get("last_verdict")
        self._restored = True
        self._probe_given = self.tracker.probe_x is not None

    def _observe(
        self, pending: tuple[Optional[Tensor], Any], captured: list[Any], outputs: Any, step: int
    ) -> None:
        """Hand the batch to the loss observation: the step's own logits when unambiguous."""
        tracker = self.tracker
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is None:  # manual optimization: training_step returns no loss
            tracker.observer.stop("training_step returned no loss to compare with")
            return
        logits, y = pending
        if len(captured) == 1:  # the module was called once: its output is the loss's input
            try:
                own = tracker.logits_of_output(captured[0])
                if isinstance(y, Tensor) and own.shape[0] == y.shape[0]:
                    tracker.add_observation(own, y, loss, step=step, captured=True)
                    self._reevaluate = False
                    return
            except Exception:  # fall back on the re-evaluated logits
                pass
        if not captured and isinstance(y, Tensor):  # the step called a wrapped model
            child = self._capture.child_logits(y.shape[0], tracker.num_classes)
            if child is not None:
                tracker.add_observation(child, y, loss, step=step, captured=True)
                self._reevaluate = False
                return
        if logits is None and not self._reevaluate:  # not re-evaluated: the next batch is
            self._reevaluate = True
            return
        if logits is None:
            tracker.observer.stop(
                f"the training batches could not be evaluated ({self._evaluation_error})"
            )
            return
        tracker.add_observation(logits, y, loss, step=step)

    # ------------------------------------------------------------------ reports

    @property
    def history(self) -> list[NTKReport]:
        """Every report of this run, oldest first."""
        return self.tracker.history

    def _give_up(self, err: BaseException, when: str) -> None:
        """Stop reporting for this run after an unexpected failure, unless asked to raise."""
        if self.on_breakdown == "raise":
            raise err
        self._failed = True
        warnings.warn(
            f"NTKMonitor could not measure the model {when} ({type(err).__name__}: {err}); "
            "it makes no further reports in this run and training goes on. Pass "
            '`on_breakdown="raise"` to see the full traceback.',
            NTKMeasurementWarning,
            stacklevel=3,
        )

    def _report(self, trainer: Any, pl_module: Any, step: int, epoch_end: bool) -> None:
        tracker = self.tracker
        try:
            tracker.update(pl_module, step)
        except Exception as err:
            self._give_up(err, f"at step {step}")
            return
        local = (tracker.history[-1], tracker.scalars())
        report, scalars = trainer.strategy.broadcast(local, src=0)  # same on every rank
        tracker.history[-1] = report
        scalars = {with_prefix(name, self.prefix): value for name, value in scalars.items()}
        bar = {with_prefix(name, self.prefix) for name in PROGRESS_BAR_KEYS}
        publish(trainer, pl_module, scalars, epoch_end, self.prog_bar, bar)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        if self.tensorboard_extras and trainer.is_global_zero:
            for writer in tensorboard_writers(trainer.loggers):
                write_extras(
                    writer,
                    report,
                    eigenvalues=tracker.eigenvalues,
                    kernel=tracker.kernel_matrix() if tracker.last_kernel is not None else None,
                    labels=tracker.probe_y,
                    prefix=self.prefix,
                    diagnosis=tracker.diagnosis,
                )
        alarm = self._is_alarm(report)
        if self.verbose and trainer.is_global_zero:
            # an alarm's message goes out once, in the warning / the stop line
            told = alarm and self.on_breakdown in ("warn", "stop")
            rank_zero_info(self._namespace, verbose_line(report, self.prefix, message=not told))
        self._act(trainer, report)

    @property
    def diagnosis(self) -> str:
        """The run so far in one line (each regime with its steps and figures, then the logits)."""
        return self.tracker.diagnosis

    def _is_alarm(self, report: NTKReport) -> bool:
        """Whether ``report`` enters an alarm state (``"broken"`` after a report that was not)."""
        return report.verdict == "broken" and self._last_verdict != "broken"

    def _act(self, trainer: Any, report: NTKReport) -> None:
        """Act once per transition into an alarm (verdict ``"broken"``)."""
        transition = self._is_alarm(report)
        self._last_verdict = report.verdict
        if not transition:
            return
        action = self.on_breakdown
        text = f"NTKMonitor ({self.prefix}) step {report.step}: {report.message}"
        if action == "stop":
            rank_zero_info(self._namespace, f"{text} Stopping training.")
            trainer.should_stop = True
        elif action == "raise":
            raise LinearizationBreakdownError(text)
        elif action == "warn":
            rank_zero_warn(self._namespace, text, LinearizationBreakdownWarning)
        elif callable(action):
            action(report)


def monitor_class(namespace: str) -> type:
    """The NTKMonitor callback class for a Lightning namespace.

    Args:
        namespace: ``"pytorch_lightning"`` or ``"lightning.pytorch"``.
    """
    if namespace not in _MODULES:
        raise ValueError(
            f"Expected `namespace` to be one of {tuple(_MODULES)} but got {namespace!r}."
        )
    callback_base = importlib.import_module(namespace).Callback
    return type(
        "NTKMonitor",
        (NTKMonitorBase, callback_base),
        {
            "__module__": _MODULES[namespace],
            "__doc__": NTKMonitorBase.__doc__,
            "_namespace": namespace,
        },
    )


if TYPE_CHECKING:  # pragma: no cover - what type checkers see of the lazy class below
    import pytorch_lightning

    class NTKMonitor(NTKMonitorBase, pytorch_lightning.Callback):  # noqa: D101
        ...


def __getattr__(name: str) -> Any:
    if name == "NTKMonitor":
        cls = monitor_class("pytorch_lightning")
        globals()["NTKMonitor"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _planned_steps(trainer: Any) -> Optional[int]:
    """The step the Trainer will stop at (``max_steps``, or its epochs' steps), if known."""
    try:
        steps = float(trainer.estimated_stepping_batches)
    except Exception:  # no sized data loader, or a Trainer without the property
        steps = float(getattr(trainer, "max_steps", -1) or -1)
    return int(steps) if math.isfinite(steps) and steps > 0 else None
