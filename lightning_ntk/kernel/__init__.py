"""The empirical NTK engine: one exact kernel, several ways to compute it.

Methods (all exact; they differ only in cost), in the order of the fall-back chain:

* ``"structured"`` (:mod:`.structured`): per-layer contractions from layer inputs and
  output cotangents; never forms a per-example gradient where the layer's structure
  makes it unnecessary. Unsupported parameters use per-example Jacobians.
* ``"jacobian"`` (:mod:`.jacobian`): ``vmap(jacrev)`` per-example Jacobians, contracted.
* ``"ntk_vp"`` (:mod:`.ntk_vp`): NTK-vector products (vjp then jvp), memory-light.
* ``"loop"`` (:mod:`.loop`): one reverse-mode gradient per example and class, no
  ``vmap`` and no forward mode: runs on any model that can be trained.
* ``"auto"``: the cheapest of the above by a cost model from counted operations and
  FLOPs, never timings, so the same model and shapes get the same method in every
  process (see :func:`choose_method`).

**Kernels of optimizers** (``kernel=``, :class:`OptimizerKernel`): ``"sgd"`` (the NTK),
``"signgd"``, ``"asymmetric_signgd"`` and ``"adam"`` (with Adam's current
preconditioner); a method that cannot compute the requested kernel is not tried.

**Fall-back.** When PyTorch cannot run a method on a model (an op without a batching or
forward-mode rule, data-dependent control flow such as ``.item()``, a fused kernel), the
call moves on to the next method of the chain; every method is exact, so the kernel is
the same. A method whose transforms PyTorch computes wrongly on a model, without an
error (a wrong batching rule; a whole-batch ``vjp`` of a forward that mixes examples),
fails the check it makes on every chunk against plain per-example autograd
(:mod:`._checks`) and falls back the same way. :func:`last_call_info` tells which method
produced the last kernel, which failed and why; the same is logged at DEBUG level on the
``"lightning_ntk"`` logger.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import _inputs
from ._functional import (
    FunctionalModel,
    OutputFn,
    ParamSelector,
    check_input_device,
    check_inputs,
    exact_matmuls,
)
from ._layout import check_output
from ._methods import NTKCallInfo, NTKMethod, choose_method
from ._optimizer import KernelSpec, OptimizerKernel, check_kernel, kernel_spec
from ._run import Run

__all__ = [
    "NTKCallInfo",
    "NTKMethod",
    "OptimizerKernel",
    "choose_method",
    "empirical_ntk",
    "last_call_info",
]

_log = logging.getLogger("lightning_ntk.kernel")


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
    kernel: Union[str, OptimizerKernel] = "sgd",
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Union[Tensor, dict[str, Tensor]]:
    """Empirical Neural Tangent Kernel ``Θ(X1, X2) = J(X1) J(X2)ᵀ`` of a classifier.

    With ``J(x) = ∂f(x; θ)/∂θ ∈ R^{C×P}`` the Jacobian of the logits with respect to the
    selected parameters, ``Θ(x, x')[a, b] = Σ_p J(x)[a, p] J(x')[b, p]``. Other
    optimizers' kernels (``kernel=``) replace ``J(x)`` or ``J(x')`` by ``sign(J)``
    entrywise, or insert Adam's preconditioner ``diag(1/(√v̂+ε))`` between them.

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
            on all ranks. Ignored when no process group is initialised. Always on for a
            sharded model (below).
        fallback: when the method cannot run on the model, move on to the next exact
            method of the chain structured → jacobian → ntk_vp → loop (default); with
            ``False`` its error is raised. See :func:`last_call_info`.
        kernel: which optimizer's kernel (see :class:`OptimizerKernel`):
            ``"sgd"`` ``J(x1) J(x2)ᵀ`` (default); ``"signgd"`` ``sign(J(x1)) sign(J(x2))ᵀ``;
            ``"asymmetric_signgd"`` ``J(x1) sign(J(x2))ᵀ`` (Malladi et al. 2023: the sign
            is on the second argument, whose gradient the SignGD step takes; with
            ``x2=None`` it is ``J(x1) sign(J(x1))ᵀ``, not symmetrised); ``"adam"``
            ``J(x1) diag(1/(√v̂+ε)) J(x2)ᵀ``. ``"structured"`` computes only ``"sgd"``
            and ``"ntk_vp"`` not ``"signgd"``: the chain and ``"auto"`` skip them.
        optimizer: for ``kernel="adam"``, the ``torch.optim.Adam`` / ``AdamW`` training
            the model, after its first step: ``v̂`` is its bias-corrected ``exp_avg_sq``
            and ``ε`` its ``eps``; parameters are matched by identity. ``None`` otherwise.

    **Sharded models** (FSDP2's ``fully_shard``: ``DTensor`` parameters on one 1-D device
    mesh spanning the default process group, placed ``Shard(dim)`` or ``Replicate()``).
    Every rank of the mesh must call, with the same inputs and arguments. Each
    sharded parameter is all-gathered (``full_tensor()``), the model is evaluated
    functionally on the whole parameters with FSDP's forward hooks set aside, the blocks
    of example pairs are shared among the ranks as with ``distributed=True`` (one block,
    hence one rank's work, when ``chunk_size`` is ``None``: pass ``chunk_size`` to split
    the work) and one all-reduce sums them: every rank returns the same kernel, that of
    the unsharded model. Memory: during the call each rank holds the whole
    parameter set (all layers at once, in the compute dtype) besides its shards, plus
    its share of the blocks' work and the whole kernel; the model is left sharded as
    found (parameters, hooks and FSDP's state untouched). Tensor-parallel modules
    (``parallelize_module``) are refused.

    Returns:
        The kernel in the requested layout, on the model's device, in the compute dtype;
        or a dict of such kernels when ``per_layer=True``.

    Raises:
        ValueError / TypeError: bad arguments or inputs, naming the argument, what came
            and what was expected; non-finite logits; inputs on another device than the
            model, a model spread over several devices or on the ``meta`` device, a
            sharding other than the one above (a 2-D mesh, several meshes, a mesh
            smaller than the process group, ``Partial`` placements, sharded buffers) or
            ``DTensor`` inputs; ``optimizer``
            missing for ``kernel="adam"`` or given for another kernel, not an Adam, without
            state yet or without a selected parameter; ``fallback=False`` with a method
            that does not compute ``kernel``. Raised before any heavy work.
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

    check_kernel(kernel)

    fm = FunctionalModel(model, params=params, output_fn=output_fn, dtype=dtype)
    spec = kernel_spec(kernel, optimizer, fm.module, fm.names, fm.dtype, fm.device)
    check_input_device(x1, "x1", fm.device)
    if x2 is not None:
        check_input_device(x2, "x2", fm.device)
    return ntk_of(
        fm, x1, x2, output=output, method=method, per_layer=per_layer, chunk_size=chunk_size,
        store_on=store_on, distributed=distributed, fallback=fallback, spec=spec,
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
    spec: Optional[KernelSpec] = None,
    logits: Optional[Tensor] = None,
) -> Union[Tensor, dict[str, Tensor]]:
    """:func:`empirical_ntk` of a functional view the caller already built.

    For callers that evaluate one model several ways in one measurement (the monitor's
    report builds one :class:`FunctionalModel` and hands it to the kernel and the
    linearization). The arguments are those of :func:`empirical_ntk`, already validated;
    ``spec`` is the optimizer's kernel (``None``: ``"sgd"``). ``logits`` are
    ``fm(fm.params, x1)``, ``(N1, C)``, when the caller already evaluated and checked
    them (finite, one row per example) for ``x2 = None``: the validating forward pass
    is then not run again.
    """
    method = _check_method(method)
    symmetric = x2 is None
    x1 = fm.cast_input(x1)
    x2 = x1 if symmetric else fm.cast_input(x2)
    with exact_matmuls(fm.device):
        with torch.no_grad():
            if logits is not None and symmetric and logits.shape[0] == _inputs.batch_size(x1):
                num_classes = logits.shape[1]
            else:
                num_classes = fm.checked_logits(x1, "x1").shape[1]
            if not symmetric:
                fm.checked_logits(x2, "x2")
        n1, n2 = _inputs.batch_size(x1), _inputs.batch_size(x2)
        if fm.sharded:  # every rank is here: they share the blocks, one sum assembles
            distributed = True  # the same kernel, bit for bit, on every rank
        run = Run(
            fm, x1, x2, output, per_layer, chunk_size or max(n1, n2), symmetric,
            None if store_on is None else torch.device(store_on), distributed, num_classes,
            spec,
        )  # fmt: skip
        blocks, info = run.execute(method, fallback)
    _LAST.info = info
    _log.debug("empirical_ntk: %s", info.summary())
    return blocks if per_layer else blocks[""]
