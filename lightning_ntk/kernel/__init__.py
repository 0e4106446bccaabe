"""The empirical NTK engine: one exact kernel, several ways to compute it.

Methods (all exact; they differ only in cost), in the order of the fall-back chain:

* ``"structured"`` (:mod:`.structured`): per-layer contractions from layer inputs and
  output cotangents; never forms a per-example gradient where the layer's structure
  makes it unnecessary. Unsupported parameters use per-example Jacobians.
* ``"jacobian"`` (:mod:`.jacobian`): ``vmap(jacrev)`` per-example Jacobians, contracted.
* ``"ntk_vp"`` (:mod:`.ntk_vp`): NTK-vector products (vjp then jvp), memory-light.
* ``"loop"`` (:mod:`.loop`): one reverse-mode gradient per example and class, no
  ``vmap`` and no forward mode: runs on any model that can be trained.
* ``"auto"``: the cheapest of the above (see :func:`choose_method`).

**Fall-back.** When PyTorch cannot run a method on a model (an op without a batching or
forward-mode rule, data-dependent control flow such as ``.item()``, a fused kernel), the
call moves on to the next method of the chain; every method is exact, so the kernel is
the same. :func:`last_call_info` tells which method produced the last kernel, which
failed and why; the same is logged at DEBUG level on the ``"lightning_ntk"`` logger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import _inputs
from ._functional import FunctionalModel, OutputFn, ParamSelector, check_inputs, exact_matmuls
from ._layout import check_output, symmetrize, transpose_kernel
from .jacobian import JacobianMethod
from .loop import LoopMethod
from .ntk_vp import NTKVPMethod
from .structured import StructuredMethod, StructurePlan, fingerprint, plan_structure

__all__ = ["NTKCallInfo", "NTKMethod", "choose_method", "empirical_ntk", "last_call_info"]

_log = logging.getLogger("lightning_ntk.kernel")

# Above this many numbers in one Jacobian block, "auto" prefers NTK-vector products.
_JACOBIAN_BUDGET = 2**28
# "auto" times NTK-vector products / the per-example loop only up to this many
# vjp-jvp pairs (N2·C) / backward passes ((N1 + N2)·C): beyond, they are never fastest.
_NTK_VP_MEASURE_LIMIT = 256
_LOOP_MEASURE_LIMIT = 512
# Measured calls shorter than this are timed again (close contenders, best of up to five
# rounds), against the noise of a busy machine.
_QUICK_SECONDS = 0.2
_MEASURE_ROUNDS = 5


class NTKMethod(str, Enum):
    """How :func:`empirical_ntk` computes the kernel; every method is exact."""

    AUTO = "auto"
    """The cheapest exact method for the model and layout (see :func:`choose_method`)."""

    STRUCTURED = "structured"
    """Per-layer contractions ``(H Hᵀ) ⊙ (G Gᵀ)``; the default whenever a supported layer
    (Linear, Conv, Embedding, norm affine) holds trainable parameters."""

    JACOBIAN = "jacobian"
    """Materialised per-example Jacobians (``vmap``); any model with batching rules;
    memory ``O(N·C·P)`` per block."""

    NTK_VP = "ntk_vp"
    """NTK-vector products; models with batching and forward-mode rules; memory ``O(P)``
    per cotangent group, ``N2·C`` vjp / jvp pairs."""

    LOOP = "loop"
    """One reverse-mode gradient per example and class; any trainable model, slowest."""


# The fall-back chain, fastest first.
_CHAIN = (NTKMethod.STRUCTURED, NTKMethod.JACOBIAN, NTKMethod.NTK_VP, NTKMethod.LOOP)


@dataclass(frozen=True)
class NTKCallInfo:
    """How one :func:`empirical_ntk` call computed its kernel.

    Attributes:
        requested: the ``method`` argument (``"auto"``, ``"structured"``, ...).
        method: the method that produced the kernel.
        choice: ``"requested"``, ``"cost model"`` (auto, by its model), ``"measured"``
            (auto timed the candidates in this call) or ``"measured earlier"`` (a cached
            timing of the same model, inputs and layout).
        fallbacks: ``"<method>: <error>"`` for every method that could not run, in order
            (and ``"<method>/<part>: <error>"`` for a part that used a slower route).
        timings: seconds of each method timed by ``"auto"`` in this call.
        per_example: parameters whose kernel came from per-example Jacobians rather than
            a structured factorisation (all of them unless ``method == "structured"``).
    """

    requested: str
    method: str
    choice: str
    fallbacks: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    per_example: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line: the method, how it was chosen and the fall-backs."""
        text = f"method={self.method} ({self.choice})"
        if self.fallbacks:
            text += "; fell back from " + "; ".join(self.fallbacks)
        return text


_LAST = threading.local()


def last_call_info() -> Optional[NTKCallInfo]:
    """:class:`NTKCallInfo` of the last :func:`empirical_ntk` call in this thread."""
    return getattr(_LAST, "info", None)


def _check_method(method: Union[str, NTKMethod]) -> NTKMethod:
    try:
        return NTKMethod(method)
    except ValueError:
        choices = tuple(m.value for m in NTKMethod)
        raise ValueError(f"Expected `method` to be one of {choices} but got {method!r}.") from None


def choose_method(
    fm: FunctionalModel, plan: Optional[StructurePlan], num_classes: int, chunk: int
) -> NTKMethod:
    """The cost model behind ``method="auto"``.

    * If any supported layer holds a selected parameter, ``"structured"``: its kernel
      for a Linear layer costs ``N²·(d_in + C²·d_out)`` against the ``N²·C²·d_in·d_out``
      of contracting Jacobians, and it uses per-example Jacobians for the rest anyway.
    * Otherwise ``"jacobian"`` while one Jacobian block (``chunk·C·P`` numbers) fits the
      budget, else ``"ntk_vp"``, whose memory does not grow with ``N·C·P``.

    The model is sure only when every selected parameter is structured. Otherwise
    ``"auto"`` times the feasible methods on the call itself (quick calls in up to five
    interleaved rounds, best of each) and returns the fastest one's kernel; the timings
    are kept per model, input signature, sizes and layout, the next two calls time the
    best and the runner-up once more each, and later calls use the fastest seen.
    Under a distributed process group the cost model decides (ranks never time).
    """
    if plan is not None and plan.structured_names:
        return NTKMethod.STRUCTURED
    if chunk * num_classes * fm.num_params <= _JACOBIAN_BUDGET:
        return NTKMethod.JACOBIAN
    return NTKMethod.NTK_VP


def _model_is_sure(plan: Optional[StructurePlan]) -> bool:
    return plan is not None and bool(plan.structured_names) and not plan.fallback_names


def empirical_ntk(
    model: nn.Module,
    x1: Any,
    x2: Optional[Any] = None,
    *,
    output: str = "full",
    method: Union[str, NTKMethod] = "auto",
    params: ParamSelector = None,
    per_layer: bool = False,
    chunk_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    output_fn: OutputFn = None,
    store_on: Union[str, torch.device, None] = None,
    distributed: bool = False,
    fallback: bool = True,
) -> Union[Tensor, dict[str, Tensor]]:
    """Empirical Neural Tangent Kernel ``Θ(X1, X2) = J(X1) J(X2)ᵀ`` of a classifier.

    With ``J(x) = ∂f(x; θ)/∂θ ∈ R^{C×P}`` the Jacobian of the logits with respect to the
    selected parameters, ``Θ(x, x')[a, b] = Σ_p J(x)[a, p] J(x')[b, p]``.

    Args:
        model: the network (a ``torch.compile`` wrapper is fine). Evaluated functionally
            with its buffers, in eval mode (BatchNorm running statistics, no dropout),
            with the math equivalents of fused attention kernels; its parameters,
            buffers, ``.grad``, modes, backend flags and the global RNG are left as found.
        x1: inputs ``(N1, ...)``: a tensor (integer inputs for models that start with an
            embedding), or a mapping / tuple of tensors sharing the batch dimension,
            passed as ``model(**x1)`` / ``model(*x1)`` (e.g. ``input_ids`` and
            ``attention_mask``).
        x2: inputs ``(N2, ...)`` with the structure and per-example shapes of ``x1``;
            ``None`` means ``x1``, which reuses work and returns an exactly symmetric kernel.
        output: ``"full"`` → ``(N1, N2, C, C)``; ``"diagonal"`` → ``(N1, N2, C)`` with
            ``Θ[i, j, a, a]``; ``"trace"`` → ``(N1, N2)``, the mean over classes.
        method: ``"auto"``, ``"structured"``, ``"jacobian"``, ``"ntk_vp"`` or ``"loop"``
            (see :class:`NTKMethod`); all return the same kernel.
        params: ``None`` for all trainable parameters (frozen ones are excluded); a name
            or list of names (a module name selects its parameters); or a predicate
            ``(name, parameter) -> bool``.
        per_layer: return ``{parameter name: its contribution}`` instead of the total;
            the parts sum to the total up to round-off.
        chunk_size: examples per block; bounds peak memory (``None``: one block).
        dtype: compute dtype (default: the parameters' dtype, float32 for half / bf16
            models); ``torch.float64`` for accurate spectra. TF32 is never used.
        output_fn: maps the model's raw output (tensor, tuple, dict) to ``(N, C)`` logits.
        store_on: device the assembled kernel is kept on (e.g. ``"cpu"`` for a large
            probe computed on a GPU: only one block at a time lives on the GPU).
        distributed: share the blocks among the ranks of the initialised default
            ``torch.distributed`` process group (every rank must call, with the same
            inputs); each rank computes its share and one all-reduce assembles the kernel
            on all ranks. Ignored when no process group is initialised.
        fallback: when the method cannot run on the model, move on to the next exact
            method of the chain structured → jacobian → ntk_vp → loop (default); with
            ``False`` its error is raised. See :func:`last_call_info`.

    Returns:
        The kernel in the requested layout, on the model's device, in the compute dtype;
        or a dict of such kernels when ``per_layer=True``.

    Raises:
        ValueError / TypeError: bad arguments or inputs, naming the argument, what came
            and what was expected; non-finite logits. Raised before any heavy work.
        RuntimeError: no method of the chain could run on the model (the last error,
            with every method's error in the message).
    """
    check_output(output)
    method = _check_method(method)
    check_inputs(x1, x2)
    if not isinstance(per_layer, bool):
        raise TypeError(f"Expected `per_layer` to be a bool but got {per_layer!r}.")
    if not isinstance(fallback, bool):
        raise TypeError(f"Expected `fallback` to be a bool but got {fallback!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"Expected `chunk_size` to be a positive int or None but got {chunk_size!r}."
        )

    fm = FunctionalModel(model, params=params, output_fn=output_fn, dtype=dtype)
    return ntk_of(
        fm, x1, x2, output=output, method=method, per_layer=per_layer, chunk_size=chunk_size,
        store_on=store_on, distributed=distributed, fallback=fallback,
    )  # fmt: skip


def ntk_of(
    fm: FunctionalModel,
    x1: Any,
    x2: Optional[Any] = None,
    *,
    output: str = "full",
    method: Union[str, NTKMethod] = NTKMethod.AUTO,
    per_layer: bool = False,
    chunk_size: Optional[int] = None,
    store_on: Union[str, torch.device, None] = None,
    distributed: bool = False,
    fallback: bool = True,
) -> Union[Tensor, dict[str, Tensor]]:
    """:func:`empirical_ntk` of a functional view the caller already built.

    For callers that evaluate one model several ways in one measurement (the monitor's
    report builds one :class:`FunctionalModel` and hands it to the kernel and the
    linearization). The arguments are those of :func:`empirical_ntk`, already validated.
    """
    method = _check_method(method)
    symmetric = x2 is None
    x1 = fm.cast_input(x1)
    x2 = x1 if symmetric else fm.cast_input(x2)
    with exact_matmuls(fm.device):
        with torch.no_grad():
            num_classes = fm.checked_logits(x1, "x1").shape[1]
            if not symmetric:
                fm.checked_logits(x2, "x2")
        n1, n2 = _inputs.batch_size(x1), _inputs.batch_size(x2)
        run = _Run(
            fm, x1, x2, output, per_layer, chunk_size or max(n1, n2), symmetric,
            None if store_on is None else torch.device(store_on), distributed, num_classes,
        )  # fmt: skip
        blocks, info = run.execute(method, fallback)
    _LAST.info = info
    _log.debug("empirical_ntk: %s", info.summary())
    return blocks if per_layer else blocks[""]


@dataclass
class _Measured:
    """Auto's timings for one call key: the best seen per method, and rechecks left."""

    seconds: dict[NTKMethod, float]
    checks: int

    @property
    def best(self) -> NTKMethod:
        return min(self.seconds, key=self.seconds.__getitem__)


# measured choices of "auto": {call key: timings}, least recently used dropped first. The
# first _RECHECKS calls after measuring time the best and the runner-up once more each.
_MEASURED: dict[tuple, _Measured] = {}
_MAX_MEASURED = 64
_RECHECKS = 2
# methods (or parts) PyTorch could not run on a model: {(model key, method): reason}.
# Skipped on later calls with the same model and input signature (out-of-memory errors,
# which depend on the sizes, are not remembered).
_FAILED: dict[tuple, str] = {}
_MAX_FAILED = 256


class _Run:
    """One kernel call: the methods tried in order, and auto's measured choice."""

    def __init__(
        self,
        fm: FunctionalModel,
        x1: Any,
        x2: Any,
        output: str,
        per_layer: bool,
        chunk: int,
        symmetric: bool,
        store_on: Optional[torch.device],
        distributed: bool,
        num_classes: int,
    ) -> None:
        self.fm, self.x1, self.x2, self.output, self.per_layer = fm, x1, x2, output, per_layer
        self.chunk, self.symmetric, self.store_on = chunk, symmetric, store_on
        self.distributed, self.num_classes = distributed, num_classes
        self.failures: list[str] = []
        self._model_key = (fingerprint(fm, x1), str(fm.device))
        self._plan: Optional[StructurePlan] = None
        self._plan_error: Optional[BaseException] = None
        self._planned = False

    # ------------------------------------------------------------------ chain
    def execute(self, method: NTKMethod, fallback: bool) -> tuple[dict[str, Tensor], NTKCallInfo]:
        timings: dict[str, float] = {}
        if method is NTKMethod.AUTO:
            order, choice, result = self._auto(timings)
            if result is not None:
                blocks, used, per_example = result
                return blocks, self._info("auto", used, choice, timings, per_example)
        else:
            order, choice = [method], "requested"
        if fallback:
            order = order + [m for m in _CHAIN[_CHAIN.index(order[-1]) + 1 :] if m not in order]
        last_error: Optional[BaseException] = None
        for candidate in order:
            try:
                blocks, per_example = self._compute(candidate)
            except Exception as err:
                last_error = err
                self._fail(candidate, err)
                if not fallback:
                    raise
                continue
            return blocks, self._info(method.value, candidate, choice, timings, per_example)
        tried = "; ".join(self.failures)
        raise RuntimeError(
            f"No exact NTK method could run on this model (tried {tried}). The last error "
            "is chained below; `loop` needs only that `loss.backward()` works on the model."
        ) from last_error

    def _info(
        self, requested: str, used: NTKMethod, choice: str, timings: dict, per_example: tuple
    ) -> NTKCallInfo:
        return NTKCallInfo(
            requested=requested,
            method=used.value,
            choice=choice,
            fallbacks=tuple(self.failures),
            timings=dict(timings),
            per_example=per_example,
        )

    def _fail(self, method: Union[NTKMethod, str], err: BaseException) -> None:
        name = method.value if isinstance(method, NTKMethod) else method
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
        self.failures.append(f"{name}: {reason[:300]}")
        _log.debug("empirical_ntk: method %s cannot run on this model (%s)", name, reason)

    # ------------------------------------------------------------------ auto
    def plan(self) -> StructurePlan:
        if not self._planned:
            self._planned = True
            try:
                self._plan = plan_structure(self.fm, self.x1)
            except Exception as err:
                self._plan_error = err
        if self._plan is None:
            assert self._plan_error is not None
            raise self._plan_error
        return self._plan

    def _auto(
        self, timings: dict[str, float]
    ) -> tuple[list[NTKMethod], str, Optional[tuple[dict[str, Tensor], NTKMethod, tuple]]]:
        """Auto's order of methods, how it chose, and a kernel if it measured one."""
        try:
            plan: Optional[StructurePlan] = self.plan()
        except Exception as err:
            self._fail(NTKMethod.STRUCTURED, err)
            plan = None
        picked = choose_method(self.fm, plan, self.num_classes, self.chunk)
        if _model_is_sure(plan) or _rank_and_world(self.distributed)[1] > 1:
            # (ranks never time: their timings, hence their collectives, could differ)
            return [picked], "cost model", None
        key = self._key()
        cached = _MEASURED.pop(key, None)
        if cached is not None:
            _MEASURED[key] = cached
            if cached.checks > 0:  # time the two best again: one slow sample never decides
                return self._recheck(cached, timings)
            return [cached.best], "measured earlier", None
        best: Optional[tuple[float, NTKMethod, dict[str, Tensor], tuple]] = None
        candidates = self._candidates(plan)
        seconds: dict[NTKMethod, float] = {}
        for round_ in range(_MEASURE_ROUNDS):
            for candidate in self._round(candidates, seconds, round_):
                if candidate is NTKMethod.LOOP and NTKMethod.JACOBIAN in seconds:
                    continue  # the same work as vmapped Jacobians, example by example
                start = time.perf_counter()
                try:
                    blocks, per_example = self._compute(candidate)
                except Exception as err:
                    if round_ == 0:
                        self._fail(candidate, err)
                    continue
                elapsed = time.perf_counter() - start
                seconds[candidate] = min(elapsed, seconds.get(candidate, elapsed))
                if best is None or elapsed < best[0]:
                    best = (elapsed, candidate, blocks, per_example)
            if not seconds or min(seconds.values()) >= _QUICK_SECONDS:
                break
        timings.update({m.value: t for m, t in seconds.items()})
        if best is None:  # every candidate failed: the rest of the chain
            rest = [m for m in _CHAIN if m not in candidates]
            return rest or [NTKMethod.LOOP], "measured", None
        _MEASURED[key] = _Measured(dict(seconds), _RECHECKS)
        while len(_MEASURED) > _MAX_MEASURED:
            del _MEASURED[next(iter(_MEASURED))]
        _log.debug(
            "empirical_ntk auto: measured %s",
            ", ".join(f"{m.value} {t:.4f}s" for m, t in seconds.items()),
        )
        _, used, blocks, per_example = best
        return [used], "measured", (blocks, used, per_example)

    def _recheck(
        self, measured: _Measured, timings: dict[str, float]
    ) -> tuple[list[NTKMethod], str, Optional[tuple[dict[str, Tensor], NTKMethod, tuple]]]:
        """One of the first calls after measuring: retime the best and the runner-up."""
        measured.checks -= 1
        ranked = sorted(measured.seconds, key=measured.seconds.__getitem__)
        best = ranked[0]
        contenders = [m for m in ranked[:2] if measured.seconds[m] <= 2 * measured.seconds[best]]
        result = None
        for candidate in contenders if measured.checks % 2 else contenders[::-1]:
            start = time.perf_counter()
            try:
                blocks, per_example = self._compute(candidate)
            except Exception as err:
                self._fail(candidate, err)
                measured.seconds.pop(candidate, None)
                continue
            elapsed = time.perf_counter() - start
            measured.seconds[candidate] = min(elapsed, measured.seconds[candidate])
            if result is None:
                result = (blocks, candidate, per_example)
        timings.update({m.value: t for m, t in measured.seconds.items()})
        if result is None:
            rest = [m for m in _CHAIN if m not in contenders]
            return rest or [NTKMethod.LOOP], "measured earlier", None
        return [result[1]], "measured earlier", result

    @staticmethod
    def _round(
        candidates: list[NTKMethod], seconds: dict[NTKMethod, float], round_: int
    ) -> list[NTKMethod]:
        """The candidates timed in a round: all at first, then the close contenders.

        Later rounds (only for quick calls, where noise is largest relative to the time)
        retime every candidate once (its first call may pay one-off costs), then those
        within 1.5x of the fastest, in rotated order, so that a single slow sample on a
        busy machine does not decide.
        """
        if round_ == 0:
            return list(candidates)
        if round_ == 1:  # every candidate once more: a first call pays one-off costs
            return [m for m in candidates if m in seconds]
        best = min(seconds.values())
        close = [m for m in candidates if m in seconds and seconds[m] <= 1.5 * best]
        if len(close) < 2:
            return []
        shift = round_ % len(close)
        return close[shift:] + close[:shift]

    def _candidates(self, plan: Optional[StructurePlan]) -> list[NTKMethod]:
        n1, n2, C = _inputs.batch_size(self.x1), _inputs.batch_size(self.x2), self.num_classes
        out = []
        if plan is not None and plan.structured_names:
            out.append(NTKMethod.STRUCTURED)
        if self.chunk * C * self.fm.num_params <= _JACOBIAN_BUDGET:
            out.append(NTKMethod.JACOBIAN)
        if n2 * C <= _NTK_VP_MEASURE_LIMIT or not out:
            out.append(NTKMethod.NTK_VP)
        if (n1 + (0 if self.symmetric else n2)) * C <= _LOOP_MEASURE_LIMIT:
            out.append(NTKMethod.LOOP)
        return out

    def _key(self) -> tuple:
        x2_sig = None if self.symmetric else (_inputs.batch_size(self.x2),)
        return (
            fingerprint(self.fm, self.x1),
            _inputs.batch_size(self.x1),
            x2_sig,
            self.output,
            self.per_layer,
            self.chunk,
            str(self.fm.device),
        )

    # ------------------------------------------------------------------ compute
    def _compute(self, method: NTKMethod) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        """The kernel by ``method``; a method that failed on this model before is skipped."""
        known = _FAILED.get((self._model_key, method.value))
        if known is not None:
            raise _KnownFailure(f"failed earlier on this model ({known})")
        try:
            return self._compute_now(method)
        except Exception as err:
            self._remember(method.value, err)
            raise

    def _remember(self, what: str, err: BaseException) -> None:
        if isinstance(err, (_KnownFailure, torch.OutOfMemoryError, MemoryError)):
            return
        _FAILED[(self._model_key, what)] = f"{type(err).__name__}: {str(err)[:200]}"
        while len(_FAILED) > _MAX_FAILED:
            del _FAILED[next(iter(_FAILED))]

    def _compute_now(self, method: NTKMethod) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        fm = self.fm
        engine: Any
        per_example: tuple[str, ...] = tuple(fm.names)
        if method is NTKMethod.STRUCTURED:
            plan = self.plan()
            part = "structured/jacobian of unstructured parameters"
            known = _FAILED.get((self._model_key, part))

            def on_fallback(err: BaseException) -> None:
                self._fail(part, err)
                self._remember(part, err)

            engine = StructuredMethod(
                fm, self.output, self.per_layer, plan, block_size=self.chunk,
                on_fallback=on_fallback, loop_fallback=known is not None,
            )  # fmt: skip
            if known is not None:
                self.failures.append(f"{part}: failed earlier on this model ({known})")
            per_example = tuple(plan.fallback_names)
        elif method is NTKMethod.JACOBIAN:
            engine = JacobianMethod(fm, self.output, self.per_layer)
        elif method is NTKMethod.NTK_VP:
            engine = NTKVPMethod(fm, self.output, self.per_layer)
        else:
            engine = LoopMethod(fm, self.output, self.per_layer)
        keys = list(fm.names) if self.per_layer else [""]
        C = self.num_classes
        layout = {"full": (C, C), "diagonal": (C,), "trace": ()}
        n1, n2 = _inputs.batch_size(self.x1), _inputs.batch_size(self.x2)
        shape = (n1, n2, *layout[self.output])
        blocks = _blockwise(
            engine, self.x1, self.x2, self.chunk, self.symmetric, self.output, keys, shape,
            self.store_on, self.distributed,
        )  # fmt: skip
        return blocks, per_example


class _KnownFailure(RuntimeError):
    """A method skipped because it failed on the same model before."""


def _blockwise(
    engine: Any,
    x1: Any,
    x2: Any,
    chunk: int,
    symmetric: bool,
    output: str,
    keys: list[str],
    shape: tuple[int, ...],
    store_on: Optional[torch.device],
    distributed: bool,
) -> dict[str, Tensor]:
    """Assemble kernel blocks of ``chunk`` examples each; for ``x2 = x1`` only ``j ≥ i``.

    When ``distributed``, the ranks of the default process group take contiguous, equal
    shares of the blocks (each block is computed by exactly one rank, so a sum all-reduce
    assembles the kernel on every rank). Blocks are kept on ``store_on`` as computed.
    """
    rank, world = _rank_and_world(distributed)
    x_device = _inputs.tensors_of(x1)[0].device
    device = x_device if world > 1 else (store_on or x_device)
    result = {key: torch.zeros(shape, dtype=engine.fm.dtype, device=device) for key in keys}
    pairs = [
        (s1, s2)
        for bi, s1 in enumerate(range(0, _inputs.batch_size(x1), chunk))
        for bj, s2 in enumerate(range(0, _inputs.batch_size(x2), chunk))
        if not (symmetric and bj < bi)
    ]
    share = pairs[rank * len(pairs) // world : (rank + 1) * len(pairs) // world]
    cached_start, f1 = None, None
    for s1, s2 in share:  # contiguous, so a row's features are computed once per rank
        rows, cols = slice(s1, s1 + chunk), slice(s2, s2 + chunk)
        if cached_start != s1:
            cached_start, f1 = s1, engine.features(_inputs.take(x1, rows))
        f2 = f1 if symmetric and s1 == s2 else engine.features(_inputs.take(x2, cols))
        for key, block in engine.block(f1, f2).items():
            block = block.to(device)
            result[key][rows, cols] = block
            if symmetric and s1 != s2:
                result[key][cols, rows] = transpose_kernel(block, output)
    if world > 1:
        import torch.distributed as dist

        for key in keys:
            dist.all_reduce(result[key])
            if store_on is not None:
                result[key] = result[key].to(store_on)
    if symmetric:
        result = {key: symmetrize(K, output) for key, K in result.items()}
    return result


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()
