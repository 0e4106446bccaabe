"""Which Lightning strategies the monitor runs under, and why the others are refused.

The monitor measures the whole model on every rank. Under DDP each rank holds it; under
``ModelParallelStrategy`` with FSDP2 alone (``fully_shard`` on the ``"data_parallel"``
mesh, ``tensor_parallel_size=1``) the engine gathers the ``DTensor`` parameters whole
(:mod:`lightning_ntk.kernel._sharded`). The other sharded strategies keep parameters in
forms the engine does not read exactly, and are refused at ``setup``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["strategy_refusal"]

_FSDP2 = (
    "ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1) "
    "with FSDP2's `fully_shard` applied in `configure_model`"
)
# strategy class name -> why the monitor refuses it
_REFUSED = {
    "DeepSpeedStrategy": (
        "DeepSpeed partitions parameters into its own flat buffers, which the kernel engine "
        f"cannot gather; use strategy='ddp' or {_FSDP2}"
    ),
    "FSDPStrategy": (
        "it wraps the model in FSDP1's FullyShardedDataParallel, whose flattened parameters "
        "the kernel engine does not gather, and PyTorch runs FSDP1 only on GPUs, where the "
        "monitor has not been tested under it; use "
        f"{_FSDP2}, or strategy='ddp'"
    ),
    "XLAFSDPStrategy": (
        "XLA's FSDP keeps parameters in its own flat shards, which the kernel engine cannot "
        f"gather; use {_FSDP2}, or strategy='ddp'"
    ),
}


def strategy_refusal(strategy: Any) -> str:
    """Why the monitor refuses ``strategy`` (one sentence), or ``""`` if it runs under it.

    Refused: DeepSpeed, FSDP1 (``FSDPStrategy``), XLA's FSDP, and ``ModelParallelStrategy``
    with a tensor-parallel mesh dimension of more than one device (tensor-parallel layers
    redistribute their inputs and outputs in forward hooks; the engine evaluates the model
    on whole parameters and refuses them).
    """
    name = type(strategy).__name__
    lineage = [cls.__name__ for cls in type(strategy).__mro__]
    for refused, why in _REFUSED.items():
        if refused in lineage:
            return f"NTKMonitor does not support {name}: {why}."
    if "ModelParallelStrategy" in lineage:
        tensor_parallel = _tensor_parallel_size(strategy)
        if tensor_parallel > 1:
            return (
                f"NTKMonitor supports {name} with FSDP2 alone, not tensor parallelism (got "
                f"tensor_parallel_size={tensor_parallel}): tensor-parallel layers redistribute "
                "their inputs and outputs in their own hooks, which the kernel engine cannot "
                f"evaluate exactly; use {_FSDP2}."
            )
    return ""


def _tensor_parallel_size(strategy: Any) -> int:
    """The size of the strategy's ``"tensor_parallel"`` mesh dimension (1 without one)."""
    try:
        mesh = strategy.device_mesh  # set up before the callbacks' `setup`
    except RuntimeError:  # not yet: the size it was given, if a number
        size = getattr(strategy, "_tensor_parallel_size", 1)
        return size if isinstance(size, int) else 1
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if "tensor_parallel" not in names:
        return 1
    return int(mesh["tensor_parallel"].size())
