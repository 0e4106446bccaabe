"""The empirical NTK engine: one exact kernel, several ways to compute it.

Methods (all exact; they differ only in cost):

* ``"structured"`` (:mod:`.structured`): per-layer contractions from layer inputs and
  output cotangents; never forms a per-example gradient where the layer's structure
  makes it unnecessary. Unsupported parameters fall back to Jacobian contraction.
* ``"jacobian"`` (:mod:`.jacobian`): ``vmap(jacrev)`` per-example Jacobians, contracted.
* ``"ntk_vp"`` (:mod:`.ntk_vp`): NTK-vector products (vjp then jvp), memory-light.
* ``"auto"``: the cheapest of the above by the cost model in :func:`choose_method`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ._functional import FunctionalModel, OutputFn, ParamSelector, check_inputs, exact_matmuls
from ._layout import check_output, symmetrize, transpose_kernel
from .jacobian import JacobianMethod
from .ntk_vp import NTKVPMethod
from .structured import StructuredMethod, StructurePlan, plan_structure

__all__ = ["NTKMethod", "choose_method", "empirical_ntk"]

# Above this many numbers in one Jacobian block, "auto" prefers NTK-vector products.
_JACOBIAN_BUDGET = 2**28


class NTKMethod(str, Enum):
    """How :func:`empirical_ntk` computes the kernel; every method is exact."""

    AUTO = "auto"
    """The cheapest exact method for the model and layout (see :func:`choose_method`)."""

    STRUCTURED = "structured"
    """Per-layer contractions ``(H Hᵀ) ⊙ (G Gᵀ)``; the default whenever a supported layer
    (Linear, Conv, Embedding, norm affine) holds trainable parameters."""

    JACOBIAN = "jacobian"
    """Materialised per-example Jacobians; any model; memory ``O(N·C·P)`` per block."""

    NTK_VP = "ntk_vp"
    """NTK-vector products; any model; memory ``O(P)`` per cotangent group, slowest."""


def _check_method(method: Union[str, NTKMethod]) -> NTKMethod:
    try:
        return NTKMethod(method)
    except ValueError:
        choices = tuple(m.value for m in NTKMethod)
        raise ValueError(f"Expected `method` to be one of {choices} but got {method!r}.") from None


def choose_method(
    fm: FunctionalModel, plan: StructurePlan, num_classes: int, chunk: int
) -> NTKMethod:
    """The cost model behind ``method="auto"``.

    * If any supported layer holds a selected parameter, ``"structured"``: its kernel
      for a Linear layer costs ``N²·(d_in + C²·d_out)`` against the ``N²·C²·d_in·d_out``
      of contracting Jacobians, and it falls back to Jacobians for the rest anyway.
    * Otherwise ``"jacobian"`` while one Jacobian block (``chunk·C·P`` numbers) fits the
      budget, else ``"ntk_vp"``, whose memory does not grow with ``N·C·P``.
    """
    if plan.structured_names:
        return NTKMethod.STRUCTURED
    if chunk * num_classes * fm.num_params <= _JACOBIAN_BUDGET:
        return NTKMethod.JACOBIAN
    return NTKMethod.NTK_VP


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
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
) -> Union[Tensor, dict[str, Tensor]]:
    """Empirical Neural Tangent Kernel ``Θ(X1, X2) = J(X1) J(X2)ᵀ`` of a classifier.

    With ``J(x) = ∂f(x; θ)/∂θ ∈ R^{C×P}`` the Jacobian of the logits with respect to the
    selected parameters, ``Θ(x, x')[a, b] = Σ_p J(x)[a, p] J(x')[b, p]``.

    Args:
        model: the network (a ``torch.compile`` wrapper is fine). Evaluated functionally
            with its buffers, in eval mode (BatchNorm running statistics, no dropout);
            its parameters, buffers, ``.grad``, modes and the global RNG are left as found.
        x1: inputs ``(N1, ...)``; integer inputs for models that start with an embedding.
        x2: inputs ``(N2, ...)`` with the per-example shape of ``x1``; ``None`` means
            ``x1``, which reuses work and returns an exactly symmetric kernel.
        output: ``"full"`` → ``(N1, N2, C, C)``; ``"diagonal"`` → ``(N1, N2, C)`` with
            ``Θ[i, j, a, a]``; ``"trace"`` → ``(N1, N2)``, the mean over classes.
        method: ``"auto"``, ``"structured"``, ``"jacobian"`` or ``"ntk_vp"`` (see
            :class:`NTKMethod`); all return the same kernel.
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

    Returns:
        The kernel in the requested layout, on the model's device, in the compute dtype;
        or a dict of such kernels when ``per_layer=True``.

    Raises:
        ValueError / TypeError: bad arguments or inputs, naming the argument, what came
            and what was expected; non-finite logits. Raised before any heavy work.
    """
    check_output(output)
    method = _check_method(method)
    check_inputs(x1, x2)
    if not isinstance(per_layer, bool):
        raise TypeError(f"Expected `per_layer` to be a bool but got {per_layer!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"Expected `chunk_size` to be a positive int or None but got {chunk_size!r}."
        )

    fm = FunctionalModel(model, params=params, output_fn=output_fn, dtype=dtype)
    return ntk_of(
        fm, x1, x2, output=output, method=method, per_layer=per_layer, chunk_size=chunk_size,
        store_on=store_on, distributed=distributed,
    )  # fmt: skip


def ntk_of(
    fm: FunctionalModel,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    output: str = "full",
    method: Union[str, NTKMethod] = NTKMethod.AUTO,
    per_layer: bool = False,
    chunk_size: Optional[int] = None,
    store_on: Union[str, torch.device, None] = None,
    distributed: bool = False,
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
        chunk = chunk_size or max(x1.shape[0], x2.shape[0])
        plan = None
        if method in (NTKMethod.AUTO, NTKMethod.STRUCTURED):
            plan = plan_structure(fm, x1)
        if method is NTKMethod.AUTO:
            method = choose_method(fm, plan, num_classes, chunk)
        engine: Any
        if method is NTKMethod.STRUCTURED:
            engine = StructuredMethod(fm, output, per_layer, plan, block_size=chunk)
        elif method is NTKMethod.JACOBIAN:
            engine = JacobianMethod(fm, output, per_layer)
        else:
            engine = NTKVPMethod(fm, output, per_layer)

        keys = list(fm.names) if per_layer else [""]
        layout = {"full": (num_classes, num_classes), "diagonal": (num_classes,), "trace": ()}
        shape = (x1.shape[0], x2.shape[0], *layout[output])
        blocks = _blockwise(
            engine, x1, x2, chunk, symmetric, output, keys, shape,
            None if store_on is None else torch.device(store_on), distributed,
        )  # fmt: skip
    return blocks if per_layer else blocks[""]


def _blockwise(
    engine: Any,
    x1: Tensor,
    x2: Tensor,
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
    device = x1.device if world > 1 else (store_on or x1.device)
    result = {key: torch.zeros(shape, dtype=engine.fm.dtype, device=device) for key in keys}
    pairs = [
        (s1, s2)
        for bi, s1 in enumerate(range(0, x1.shape[0], chunk))
        for bj, s2 in enumerate(range(0, x2.shape[0], chunk))
        if not (symmetric and bj < bi)
    ]
    share = pairs[rank * len(pairs) // world : (rank + 1) * len(pairs) // world]
    cached_start, f1 = None, None
    for s1, s2 in share:  # contiguous, so a row's features are computed once per rank
        rows, cols = slice(s1, s1 + chunk), slice(s2, s2 + chunk)
        if cached_start != s1:
            cached_start, f1 = s1, engine.features(x1[rows])
        f2 = f1 if symmetric and s1 == s2 else engine.features(x2[cols])
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
