"""One kernel call: the fall-back chain, auto's choice, the blockwise assembly.

The methods are tried in the chain's order; ``"auto"`` orders them by its cost model
(:mod:`._cost`: counts, never timings), cheapest first; the kernel is assembled from
blocks of examples, shared among the ranks of a process group when distributed.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import _inputs
from ._cost import estimate_seconds, forward_profile
from ._functional import FunctionalModel
from ._layout import symmetrize, transpose_kernel
from ._methods import CHAIN, JACOBIAN_BUDGET, NTKCallInfo, NTKMethod
from ._optimizer import KernelSpec
from ._plan import PlanMismatch, StructurePlan, fingerprint, plan_structure
from .jacobian import JacobianMethod
from .loop import LoopMethod
from .ntk_vp import NTKVPMethod
from .structured import StructuredMethod

__all__ = ["FAILED", "ORDERS", "Run", "rank_and_world"]

_log = logging.getLogger("lightning_ntk.kernel")


# auto's order of methods and its estimates: {(model key, kernel, sizes, layout, ...):
# (order, estimates)}, least recently used dropped first. A pure function of the key
# (counts, never timings): the cache only saves the counting forward pass.
ORDERS: dict[tuple, tuple[list[NTKMethod], dict[str, float]]] = {}


_MAX_ORDERS = 64


# methods (or parts) PyTorch could not run on a model: {(model key, method): reason}.
# The key is what the failure depends on: the model's structure and module settings
# (e.g. an embedding's `sparse` flag), selection, dtype, input signature and device.
# Skipped on later calls with the same key while the chain has a later method to try;
# the last method is always run (out-of-memory errors, which depend on the sizes, are
# not remembered).
FAILED: dict[tuple, str] = {}


_MAX_FAILED = 256


class Run:
    """One kernel call: the methods tried in order, and auto's choice."""

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
        estimates: dict[str, float] = {}
        if method is NTKMethod.AUTO:
            order, estimates = self._auto()
            choice = "cost model"
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
            return blocks, self._info(method.value, candidate, choice, estimates, per_example)
        tried = "; ".join(self.failures)
        raise RuntimeError(
            f"No exact NTK method could run on this model (tried {tried}). The last error "
            "is chained below; `loop` needs only that `loss.backward()` works on the model."
        ) from last_error

    def _info(
        self, requested: str, used: NTKMethod, choice: str, estimates: dict, per_example: tuple
    ) -> NTKCallInfo:
        return NTKCallInfo(
            requested=requested,
            method=used.value,
            choice=choice,
            fallbacks=tuple(self.failures),
            estimates=dict(estimates),
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

    def _auto(self) -> tuple[list[NTKMethod], dict[str, float]]:
        """Auto's order of methods, cheapest estimate first, and the estimates.

        The structured plan (a verification pass) is made only when the structured
        method's fixed cost alone could beat the cheapest other estimate among the
        methods that have not failed on this model. The order is kept per model
        structure, shapes, layout, kernel and known failures (:data:`ORDERS`).
        """
        failed = tuple(m for m in CHAIN if (self._model_key, m.value) in FAILED)
        key = (
            self._model_key, self.spec.kind, _inputs.batch_size(self.x1),
            None if self.symmetric else _inputs.batch_size(self.x2), self.output,
            self.per_layer, self.chunk, failed,
        )  # fmt: skip
        cached = ORDERS.pop(key, None)
        if cached is None:
            cached = self._rank(failed)
        ORDERS[key] = cached  # (re)inserted last: most recently used
        while len(ORDERS) > _MAX_ORDERS:
            del ORDERS[next(iter(ORDERS))]
        return list(cached[0]), dict(cached[1])

    def _rank(self, failed: tuple[NTKMethod, ...]) -> tuple[list[NTKMethod], dict[str, float]]:
        """The order and estimates; methods that failed on this model before go last."""
        one = _inputs.take(self.x1, slice(0, 1))
        profile = forward_profile(self.fm, one, (self._model_key, self.spec.kind))
        n1, n2 = _inputs.batch_size(self.x1), _inputs.batch_size(self.x2)

        def estimate(method: NTKMethod, plan: Optional[StructurePlan] = None) -> float:
            return estimate_seconds(
                method.value, self.fm, profile, plan, n1, n2, self.num_classes,
                self.output, self.symmetric, self.per_layer,
            )  # fmt: skip

        estimates: dict[NTKMethod, float] = {}
        if (
            NTKMethod.JACOBIAN not in failed
            and self.spec.supports(NTKMethod.JACOBIAN)
            and (
                self.chunk * self.num_classes * self.fm.num_params <= JACOBIAN_BUDGET
                or self.spec.kind == "signgd"
            )
        ):
            estimates[NTKMethod.JACOBIAN] = estimate(NTKMethod.JACOBIAN)
        if NTKMethod.NTK_VP not in failed and self.spec.supports(NTKMethod.NTK_VP):
            estimates[NTKMethod.NTK_VP] = estimate(NTKMethod.NTK_VP)
        if self.spec.supports(NTKMethod.STRUCTURED):  # never planned for other kernels
            floor = estimate(NTKMethod.STRUCTURED, StructurePlan())
            if not estimates or floor < min(estimates.values()):
                try:
                    plan = self.plan()
                except Exception as err:
                    self._fail(NTKMethod.STRUCTURED, err)
                else:
                    if plan.structured_names:
                        estimates[NTKMethod.STRUCTURED] = estimate(NTKMethod.STRUCTURED, plan)
        ranked = sorted(estimates, key=lambda m: (estimates[m], CHAIN.index(m)))
        rest = [m for m in CHAIN if m not in ranked and self.spec.supports(m)]
        if NTKMethod.STRUCTURED in rest and self._plan is None:
            rest.remove(NTKMethod.STRUCTURED)  # not planned (or no plan): never cheaper
        rest.sort(key=lambda m: m in failed)  # known failures last (skipped but the last)
        _log.debug(
            "empirical_ntk auto: estimated %s",
            ", ".join(f"{m.value} {estimates[m]:.4f}s" for m in ranked),
        )
        return ranked + rest or [NTKMethod.LOOP], {m.value: t for m, t in estimates.items()}

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
