"""One kernel call: the fall-back chain, auto's measured choice, the blockwise assembly.

The methods are tried in the chain's order; ``"auto"`` times the feasible ones when its
cost model is unsure; the kernel is assembled from blocks of examples, shared among the
ranks of a process group when distributed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import _inputs
from ._functional import FunctionalModel
from ._layout import symmetrize, transpose_kernel
from ._methods import CHAIN, JACOBIAN_BUDGET, NTKCallInfo, NTKMethod, choose_method, model_is_sure
from ._optimizer import KernelSpec
from ._plan import PlanMismatch, StructurePlan, fingerprint, plan_structure
from .jacobian import JacobianMethod
from .loop import LoopMethod
from .ntk_vp import NTKVPMethod
from .structured import StructuredMethod

__all__ = ["FAILED", "MEASURED", "Run", "rank_and_world"]

_log = logging.getLogger("lightning_ntk.kernel")


# "auto" times NTK-vector products / the per-example loop only up to this many
# vjp-jvp pairs (N2·C) / backward passes ((N1 + N2)·C): beyond, they are never fastest.
_NTK_VP_MEASURE_LIMIT = 256


_LOOP_MEASURE_LIMIT = 512


# Measured calls shorter than this are timed again (close contenders, best of up to five
# rounds), against the noise of a busy machine.
_QUICK_SECONDS = 0.2


_MEASURE_ROUNDS = 5


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
MEASURED: dict[tuple, _Measured] = {}


_MAX_MEASURED = 64


_RECHECKS = 2


# methods (or parts) PyTorch could not run on a model: {(model key, method): reason}.
# The key is what the failure depends on: the model's structure and module settings
# (e.g. an embedding's `sparse` flag), selection, dtype, input signature and device.
# Skipped on later calls with the same key while the chain has a later method to try;
# the last method is always run (out-of-memory errors, which depend on the sizes, are
# not remembered).
FAILED: dict[tuple, str] = {}


_MAX_FAILED = 256


class Run:
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
        spec: Optional[KernelSpec] = None,
    ) -> None:
        self.fm, self.x1, self.x2, self.output, self.per_layer = fm, x1, x2, output, per_layer
        self.chunk, self.symmetric, self.store_on = chunk, symmetric, store_on
        self.distributed, self.num_classes = distributed, num_classes
        self.spec = spec or KernelSpec()
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
            order = order + [m for m in CHAIN[CHAIN.index(order[-1]) + 1 :] if m not in order]
        if method is not NTKMethod.AUTO and not self.spec.supports(method):
            why = f"method={method.value!r} does not compute kernel={self.spec.kind.value!r}"
            if not fallback:
                supported = [m.value for m in CHAIN if self.spec.supports(m)]
                raise ValueError(f"{why}; use one of {supported} or method='auto'.")
            self.failures.append(f"{method.value}: does not compute this kernel (not tried)")
        order = [m for m in order if self.spec.supports(m)]  # the rest: never tried
        last_error: Optional[BaseException] = None
        for position, candidate in enumerate(order):
            try:
                blocks, per_example = self._compute(candidate, position < len(order) - 1)
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
        plan: Optional[StructurePlan] = None
        if self.spec.supports(NTKMethod.STRUCTURED):  # never planned for other kernels
            try:
                plan = self.plan()
            except Exception as err:
                self._fail(NTKMethod.STRUCTURED, err)
        picked = choose_method(self.fm, plan, self.num_classes, self.chunk, self.spec.kind)
        if model_is_sure(plan) or rank_and_world(self.distributed)[1] > 1:
            # (ranks never time: their timings, hence their collectives, could differ)
            return [picked], "cost model", None
        key = self._key()
        cached = MEASURED.pop(key, None)
        if cached is not None:
            MEASURED[key] = cached
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
            rest = [m for m in CHAIN if m not in candidates and self.spec.supports(m)]
            return rest or [NTKMethod.LOOP], "measured", None
        MEASURED[key] = _Measured(dict(seconds), _RECHECKS)
        while len(MEASURED) > _MAX_MEASURED:
            del MEASURED[next(iter(MEASURED))]
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
            rest = [m for m in CHAIN if m not in contenders]
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
        if self.chunk * C * self.fm.num_params <= JACOBIAN_BUDGET:
            out.append(NTKMethod.JACOBIAN)
        if n2 * C <= _NTK_VP_MEASURE_LIMIT or not out:
            out.append(NTKMethod.NTK_VP)
        if (n1 + (0 if self.symmetric else n2)) * C <= _LOOP_MEASURE_LIMIT:
            out.append(NTKMethod.LOOP)
        supported = [m for m in out if self.spec.supports(m)]
        return supported or [NTKMethod.JACOBIAN]

    def _key(self) -> tuple:
        x2_sig = None if self.symmetric else (_inputs.batch_size(self.x2),)
        return (
            fingerprint(self.fm, self.x1, settings=False),  # timings: the structure alone
            _inputs.batch_size(self.x1),
            x2_sig,
            self.output,
            self.per_layer,
            self.chunk,
            str(self.fm.device),
            self.spec.kind,
        )

    # ------------------------------------------------------------------ compute
    def _compute(
        self, method: NTKMethod, skip_known: bool = True
    ) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        """The kernel by ``method``; one that failed on this computation before is skipped.

        Args:
            method: the method.
            skip_known: skip it if it failed before on the same model key (``False`` for
                the last method left to try: it runs whatever was remembered).
        """
        known = FAILED.get((self._model_key, method.value)) if skip_known else None
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
        FAILED[(self._model_key, what)] = f"{type(err).__name__}: {str(err)[:200]}"
        while len(FAILED) > _MAX_FAILED:
            del FAILED[next(iter(FAILED))]

    def _compute_now(self, method: NTKMethod) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        fm = self.fm
        engine: Any
        per_example: tuple[str, ...] = tuple(fm.names)
        if method is NTKMethod.STRUCTURED:
            return self._structured()
        elif method is NTKMethod.JACOBIAN:
            engine = JacobianMethod(fm, self.output, self.per_layer, self.spec)
        elif method is NTKMethod.NTK_VP:
            engine = NTKVPMethod(fm, self.output, self.per_layer, spec=self.spec)
        else:
            engine = LoopMethod(fm, self.output, self.per_layer, self.spec)
        return self._assemble(engine), per_example

    def _structured(self) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        """The structured kernel; layers that fail the per-call check use Jacobians.

        A planned layer that, on this call's inputs, does not behave as its plan assumes
        (:class:`._plan.PlanMismatch`) is dropped from the plan for the rest of the call
        and the kernel is assembled again.
        """
        plan = self.plan()
        part = "structured/jacobian of unstructured parameters"
        known = FAILED.get((self._model_key, part))
        if known is not None:
            self.failures.append(f"{part}: failed earlier on this model ({known})")

        def on_fallback(err: BaseException) -> None:
            self._fail(part, err)
            self._remember(part, err)

        while True:
            engine = StructuredMethod(
                self.fm, self.output, self.per_layer, plan, block_size=self.chunk,
                on_fallback=on_fallback, loop_fallback=known is not None,
            )  # fmt: skip
            try:
                return self._assemble(engine), tuple(plan.fallback_names)
            except PlanMismatch as mismatch:
                for name, why in mismatch.reasons.items():
                    self.failures.append(
                        f"structured/{name or 'model'}: on these inputs the layer {why}; "
                        "its parameters used per-example Jacobians"
                    )
                    _log.debug("empirical_ntk: structured layer %r %s", name, why)
                plan = plan.without(set(mismatch.reasons), list(self.fm.names))
                self._plan = plan  # for the rest of this call only: the cache is untouched

    def _assemble(self, engine: Any) -> dict[str, Tensor]:
        """The kernel blocks of ``engine`` over the call's inputs."""
        keys = list(self.fm.names) if self.per_layer else [""]
        C = self.num_classes
        layout = {"full": (C, C), "diagonal": (C,), "trace": ()}
        n1, n2 = _inputs.batch_size(self.x1), _inputs.batch_size(self.x2)
        shape = (n1, n2, *layout[self.output])
        return _blockwise(
            engine, self.x1, self.x2, self.chunk, self.symmetric, self.output, keys, shape,
            self.store_on, self.distributed, mirror=self.spec.symmetric,
        )  # fmt: skip


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
    mirror: bool = True,
) -> dict[str, Tensor]:
    """Assemble kernel blocks of ``chunk`` examples each; for ``x2 = x1`` only ``j ≥ i``.

    ``symmetric`` means ``x2`` is ``x1``: a chunk's features are reused for both sides,
    and, when the kernel is symmetric (``mirror``), only the blocks ``j ≥ i`` are
    computed, mirrored, and the result is symmetrised exactly. An asymmetric kernel
    (``mirror=False``) computes every block and is returned as computed.

    When ``distributed``, the ranks of the default process group take contiguous, equal
    shares of the blocks (each block is computed by exactly one rank, so a sum all-reduce
    assembles the kernel on every rank). Blocks are kept on ``store_on`` as computed.
    """
    rank, world = rank_and_world(distributed)
    x_device = _inputs.tensors_of(x1)[0].device
    device = x_device if world > 1 else (store_on or x_device)
    result = {key: torch.zeros(shape, dtype=engine.fm.dtype, device=device) for key in keys}
    pairs = [
        (s1, s2)
        for bi, s1 in enumerate(range(0, _inputs.batch_size(x1), chunk))
        for bj, s2 in enumerate(range(0, _inputs.batch_size(x2), chunk))
        if not (symmetric and mirror and bj < bi)
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
            if symmetric and mirror and s1 != s2:
                result[key][cols, rows] = transpose_kernel(block, output)
    if world > 1:
        import torch.distributed as dist

        for key in keys:
            dist.all_reduce(result[key])
            if store_on is not None:
                result[key] = result[key].to(store_on)
    if symmetric and mirror:
        result = {key: symmetrize(K, output) for key, K in result.items()}
    return result


def rank_and_world(distributed: bool = True) -> tuple[int, int]:
    """``(rank, world size)`` in the default process group; ``(0, 1)`` without one."""
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()
