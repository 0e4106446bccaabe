"""NTKSettings: what the monitor measures and when, defined once.

:class:`~lightning_ntk.NTKTracker` and the Lightning callback
:class:`~lightning_ntk.NTKMonitor` are both dataclasses built on :class:`NTKSettings`, so
each setting is declared, defaulted, documented and validated here alone; both classes
take them as keyword arguments, and LightningCLI / YAML configs read them from the
callback's signature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..kernel._methods import NTKMethod
from ..kernel._optimizer import OptimizerKernel
from ..theory._targets import TASKS
from ._verdict import EXPECTATIONS, Thresholds

__all__ = [
    "FULL_LAYOUT_LIMIT",
    "KERNELS",
    "METHODS",
    "OUTPUTS",
    "NTKSettings",
    "default_output",
    "settings_of",
]

OUTPUTS = ("full", "diagonal", "trace")
# the default layout is "full" while the kernel matrix has at most this many rows (N·C)
FULL_LAYOUT_LIMIT = 1024
METHODS = tuple(method.value for method in NTKMethod)  # the engine's list, not a copy
NORMALIZATIONS = ("batch", "running")
# the engine's kernels, and "optimizer": the one of the optimizer training uses
KERNELS = (*(kind.value for kind in OptimizerKernel), "optimizer")


@dataclass(kw_only=True, eq=False, repr=False)
class NTKSettings:
    """The settings shared by :class:`~lightning_ntk.NTKTracker` and the callback.

    Args:
        n_probe: examples drawn for the probe set (stratified by class) when no probe is
            given.
        output: kernel layout ``"full"`` (``(N, N, C, C)``), ``"diagonal"`` or ``"trace"``
            (``(N, N)``, the mean over classes). ``None`` (default): ``"full"`` while
            ``N·C ≤ 1024`` (at most a ``1024 × 1024`` kernel matrix), else the exact
            ``"trace"`` layout, whose cost grows linearly in ``C``, with one warning
            (see :func:`default_output`); an explicit ``"full"`` is always kept.
        method: kernel method, one of :class:`~lightning_ntk.kernel.NTKMethod`:
            ``"auto"``, ``"structured"``, ``"jacobian"``, ``"ntk_vp"`` or ``"loop"``.
        params: parameters spanning the kernel (``None``: all trainable; a name, names or
            a predicate ``(name, parameter) -> bool``, as in
            :func:`lightning_ntk.empirical_ntk`).
        output_fn: maps the model's raw output to ``(N, C)`` logits (e.g.
            ``lambda out: out["logits"]``).
        forward_fn: ``forward_fn(model, x) -> output`` for models whose forward is not
            ``model(x)``; evaluated functionally like the model itself.
        kernel: which kernel is measured (:mod:`lightning_ntk.monitor._kernels`):
            ``"sgd"`` (default, the NTK ``J Jᵀ``), ``"signgd"``, ``"asymmetric_signgd"``,
            ``"adam"`` (as in :func:`lightning_ntk.empirical_ntk`), or ``"optimizer"``:
            the kernel of the optimizer training uses (SGD → ``"sgd"``, Adam / AdamW →
            ``"adam"``, SignSGD / Signum / Lion → ``"asymmetric_signgd"``, any other →
            ``"sgd"``, each report's ``kernel`` saying why). ``"adam"`` reads the
            preconditioner ``1/(√v̂+ε)`` from the optimizer once, at the first report at
            which it has state (or at :meth:`~lightning_ntk.NTKTracker.start` if it already
            has), and keeps it: ``Θ0`` (at ``θ0``) and every ``Θ_t`` use that frozen
            preconditioner, so the drift measures the Jacobian's motion in Adam's
            geometry. The verdict thresholds were calibrated on the SGD kernel.
        per_layer: report each layer's drift; ``None`` (default) turns it on unless
            ``method="ntk_vp"`` (where it would multiply the cost; the other methods
            compute per-layer parts at no extra cost).
        top_layers: how many of the most-moving layers are reported.
        dtype: compute dtype (default: the parameters'; float32 for half / bf16).
        normalization: which function is measured. ``"batch"`` (default): the one
            training differentiates — BatchNorm layers normalise with the probe's own
            batch statistics (running buffers neither read nor written), dropout off;
            frozen parameters then mean zero drift whatever the buffers do. ``"running"``:
            the deployed (eval-mode) function with the running statistics, whose updates
            show up as drift. Identical for models without BatchNorm.
        every_n_steps: also report every ``n`` optimizer steps.
        every_n_epochs: also report at the end of every ``n``-th epoch.
        log_base: report at steps ``⌈b^k⌉``, ``k ≥ 1`` (default 4: 4, 16, 64, …); ``None``
            disables.
        thresholds: verdict thresholds, a :class:`~lightning_ntk.Thresholds` or a dict of
            its fields (e.g. ``{"relative_change": [0.1, 0.5]}``).
        expect: ``"lazy"`` when training is meant to stay in the kernel regime (NTK
            experiments, wide-limit tests): leaving it is then an alarm (verdict
            ``"broken"``). ``None`` (default): no expectation — feature learning is
            reported as information and only diverging logits raise an alarm.
        weight_decay: the optimizer's weight decay, if known (overrides what is read from
            the optimizer).
        label_smoothing: the loss's label smoothing, if known (overrides what is read
            from the loss).
        task: ``"multiclass"`` (softmax, cross-entropy), ``"binary"`` (one sigmoid
            output, binary cross-entropy) or ``"multilabel"`` (several sigmoid outputs),
            as in torchmetrics; ``None`` (default) infers it from the training loss, a
            loss module, the model's number of outputs and the targets where unambiguous.
        seed: seed of the probe-drawing generator.
        batch_to_xy: ``batch -> (inputs, labels)`` for batches that are not ``(x, y)``, a
            tensor, a dict with ``x`` / ``y``-like keys, or a Hugging Face style dict
            (every field but the labels is passed to the model by name).
    """

    n_probe: int = 16
    output: Optional[str] = None
    method: str = "auto"
    kernel: str = "sgd"
    params: Optional[Union[str, list[str], Callable[..., bool]]] = None
    output_fn: Optional[Callable[[Any], Tensor]] = None
    forward_fn: Optional[Callable[[Any, Any], Any]] = None
    per_layer: Optional[bool] = None
    top_layers: int = 5
    dtype: Optional[torch.dtype] = None
    normalization: str = "batch"
    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None
    log_base: Optional[float] = 4.0
    thresholds: Union[Thresholds, dict[str, Any], None] = None
    expect: Optional[str] = None
    weight_decay: Optional[float] = None
    label_smoothing: Optional[float] = None
    task: Optional[str] = None
    seed: int = 0
    batch_to_xy: Optional[Callable[[Any], Any]] = None

    def __post_init__(self) -> None:
        _check_positive_int("n_probe", self.n_probe)
        _check_positive_int("top_layers", self.top_layers)
        if self.output is not None and self.output not in OUTPUTS:
            raise ValueError(
                f"Expected `output` to be one of {OUTPUTS} or None but got {self.output!r}."
            )
        try:
            self.method = NTKMethod(self.method).value
        except ValueError:
            raise ValueError(
                f"Expected `method` to be one of {METHODS} but got {self.method!r}."
            ) from None
        if not isinstance(self.kernel, str) or self.kernel not in KERNELS:
            raise ValueError(f"Expected `kernel` to be one of {KERNELS} but got {self.kernel!r}.")
        for name in ("output_fn", "forward_fn", "batch_to_xy"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"Expected `{name}` to be callable or None but got {fn!r}.")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"Expected `task` to be one of {TASKS} or None but got {self.task!r}.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Expected `normalization` to be one of {NORMALIZATIONS} but got "
                f"{self.normalization!r}."
            )
        if self.per_layer is not None and not isinstance(self.per_layer, bool):
            raise TypeError(
                f"Expected `per_layer` to be a bool or None but got {self.per_layer!r}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"Expected `seed` to be an int but got {self.seed!r}.")
        for name in ("weight_decay", "label_smoothing"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            ):
                raise ValueError(
                    f"Expected `{name}` to be a non-negative number or None but got {value!r}."
                )
        if self.expect not in EXPECTATIONS:
            raise ValueError(
                f"Expected `expect` to be one of {EXPECTATIONS} but got {self.expect!r}."
            )
        self.thresholds = _as_thresholds(self.thresholds)


def default_output(num_examples: int, num_classes: int) -> str:
    """The layout of ``output=None`` for ``N`` probe examples and ``C`` classes.

    ``"full"`` while the ``(N·C, N·C)`` kernel matrix has ``N·C ≤ FULL_LAYOUT_LIMIT``
    (1024) rows, else ``"trace"``: the full layout's ``N²·C²`` entries and ``(N·C)³``
    eigen-decomposition grow with ``C²`` and ``C³``; the trace ``(N, N)`` layout's cost
    grows linearly in ``C`` (one Jacobian row per logit).
    """
    return "full" if num_examples * num_classes <= FULL_LAYOUT_LIMIT else "trace"


def settings_of(obj: NTKSettings) -> dict[str, Any]:
    """The :class:`NTKSettings` fields of ``obj`` as keyword arguments."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(NTKSettings)}


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int but got {value!r}.")


def _as_thresholds(value: Union[Thresholds, Mapping[str, Any], None]) -> Thresholds:
    if value is None:
        return Thresholds()
    if isinstance(value, Thresholds):
        return value
    if isinstance(value, Mapping):
        fields = {f.name for f in dataclasses.fields(Thresholds)}
        unknown = set(value) - fields
        if unknown:
            raise ValueError(
                f"Expected `thresholds` keys among {sorted(fields)} but got {sorted(unknown)}."
            )
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in value.items()
        }
        return Thresholds(**kwargs)
    raise TypeError(f"Expected `thresholds` to be a Thresholds, a dict or None but got {value!r}.")
