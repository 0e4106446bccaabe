"""Models sharded with FSDP2 (``fully_shard``): ``DTensor`` parameters, evaluated whole.

A sharded parameter is a ``DTensor``: each rank holds one slice (its local shard) and
FSDP's forward hooks all-gather the whole tensor around each module's forward. The
engine evaluates models functionally, with parameters it chooses, so it does the same
explicitly:

* :func:`sharding_mesh` checks the sharding before any work: every ``DTensor`` of the
  model on one 1-D device mesh spanning every rank of the default process group, placed
  ``Shard(dim)`` or ``Replicate()``; anything else is refused with a ``ValueError``;
* :func:`full` all-gathers a ``DTensor`` into the plain whole tensor (``full_tensor()``,
  a collective: every rank calls it, in the same order);
* :func:`call_module` is ``torch.func.functional_call`` (each attribute slot swapped
  once, :mod:`._slots`) with FSDP's forward hooks set aside for the call, so the
  module runs with the tensors given (the hooks would swap in their own all-gathered
  parameters, which carry no derivative to the given ones). The module's own hook
  dictionaries are put back untouched afterwards.

The kernel of the whole model is then computed exactly as for an unsharded one, its
blocks shared among the ranks (:func:`lightning_ntk.kernel._run.rank_and_world`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._slots import slot_tensors

__all__ = [
    "Layout", "call_module", "full", "is_dtensor", "layouts_of", "sharding_mesh", "to_shards",
    "whole",
]  # fmt: skip


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed`` DTensor (a sharded or replicated tensor)."""
    if type(t) in (Tensor, nn.Parameter) or not isinstance(t, Tensor):
        return False
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor of a ``DTensor`` (an all-gather over its mesh); others unchanged."""
    if not is_dtensor(t):
        return t
    return t.full_tensor()  # type: ignore[attr-defined]


class Layout(NamedTuple):
    """How a parameter is sharded: its mesh, placements, global shape and stride, device."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]
    device: torch.device

    def local_shape(self) -> torch.Size:
        """The shape of this rank's shard (no data, no communication)."""
        from torch.distributed.tensor import distribute_tensor

        empty = torch.empty(self.shape, device="meta")
        shard = distribute_tensor(empty, self.mesh, self.placements, src_data_rank=None)
        return shard.to_local().shape


def layouts_of(module: nn.Module) -> dict[str, Layout]:
    """``{name: Layout}`` of the module's parameters that are ``DTensor``s now.

    (FSDP2 leaves the root's parameters unsharded after a forward without backward: they
    are plain tensors then and have no layout here.)
    """
    return {
        name: Layout(p.device_mesh, tuple(p.placements), p.shape, p.stride(), p.device)  # type: ignore[attr-defined]
        for name, p in module.named_parameters()
        if is_dtensor(p)
    }


def to_shards(tensors: Mapping[str, Tensor], layouts: Mapping[str, Layout]) -> dict[str, Tensor]:
    """This rank's shards of the whole tensors named in ``layouts``; others kept as they are.

    ``tensors[name]`` is the whole value of a parameter sharded as ``layouts[name]``
    (e.g. a copy of ``θ0``); the result holds only this rank's slice of it (no
    communication). :func:`whole` is the inverse.
    """
    from torch.distributed.tensor import distribute_tensor

    out = dict(tensors)
    for name, layout in layouts.items():
        if name in out:
            t = out[name]
            shard = distribute_tensor(t, layout.mesh, layout.placements, src_data_rank=None)
            out[name] = shard.to_local().clone()
    return out


def whole(
    tensors: Mapping[str, Tensor], names: Sequence[str], layouts: Mapping[str, Layout]
) -> dict[str, Tensor]:
    """The whole tensors of :func:`to_shards`'s shards ``names`` (an all-gather each).

    Raises:
        ValueError: a name without a layout (the model is no longer sharded that way), or
            a shard whose shape is not this rank's share of the layout (the model is
            sharded otherwise, or over another number of ranks, than when it was taken).
    """
    from torch.distributed.tensor import DTensor

    out = dict(tensors)
    for name in names:
        shard, layout = tensors[name], layouts.get(name)
        local = None if layout is None else layout.local_shape()
        if local != shard.shape:
            now = "not sharded" if local is None else f"sharded to {tuple(local)} on this rank"
            raise ValueError(
                f"This rank's shard of {name!r} was kept with shape {tuple(shard.shape)}, "
                f"but the model's parameter is now {now}; resume with the model sharded as "
                "when the state was saved (the same mesh and number of ranks), after a "
                "training step (FSDP2 leaves the root's parameters unsharded after a "
                "forward without backward)."
            )
        assert layout is not None
        gathered = DTensor.from_local(
            shard.to(layout.device),  # (a loaded state dict's shards are on the CPU)
            layout.mesh,
            layout.placements,
            shape=layout.shape,
            stride=layout.stride,
        )
        out[name] = gathered.full_tensor()
    return out


def sharding_mesh(module: nn.Module) -> Optional[Any]:
    """The device mesh the module's ``DTensor`` parameters live on; ``None`` if unsharded.

    Raises:
        ValueError: naming the tensor and why, for a sharding the engine does not handle:
            a module whose forward hooks redistribute ``DTensor`` inputs or outputs
            (tensor parallelism: ``parallelize_module``, ``distribute_module``); a buffer
            that is a ``DTensor``; tensors on several meshes (a model sharded
            partly on one mesh and partly on another); a mesh of more than one dimension
            (e.g. HSDP's ``Replicate`` + ``Shard``); a ``Partial`` placement (a pending
            reduction); or a mesh that does not span every rank of the default process
            group (the kernel's blocks are shared among, and summed over, that group).
    """
    mesh = None
    first = ""
    for name, m in module.named_modules():
        if _redistributes_tensors(m):
            raise ValueError(
                f"The model's module {name or type(m).__name__!r} converts its inputs or "
                "outputs to and from DTensors in its own forward hooks (tensor parallelism, "
                "e.g. `parallelize_module`); the kernel engine evaluates the model on whole "
                "plain parameters and cannot run such a module exactly; shard the model "
                "with FSDP2's `fully_shard` alone."
            )
    for name, t in module.named_buffers():
        if is_dtensor(t):
            raise ValueError(
                f"The model's buffer {name!r} is a DTensor: sharded buffers are not supported "
                "(FSDP2's `fully_shard` shards parameters only; keep buffers plain tensors)."
            )
    for name, p in module.named_parameters():
        if not is_dtensor(p):
            continue
        where = p.device_mesh  # type: ignore[attr-defined]
        if mesh is None:
            mesh, first = where, name
        elif where != mesh:
            raise ValueError(
                f"The model's parameters {first!r} and {name!r} are sharded on different "
                f"device meshes ({mesh} and {where}); the kernel of a sharded model needs "
                "every sharded parameter on one mesh (call `fully_shard` with the same `mesh`)."
            )
        if where.ndim != 1:
            raise ValueError(
                f"The model's parameter {name!r} is sharded on a {where.ndim}-D device mesh "
                f"({where}, placements {tuple(p.placements)}); only 1-D meshes (FSDP2's "  # type: ignore[attr-defined]
                "`fully_shard` over one mesh dimension) are supported, not hybrid "
                "Replicate + Shard meshes; under Lightning's `ModelParallelStrategy`, "
                'shard on `self.device_mesh["data_parallel"]`.'
            )
        for placement in p.placements:  # type: ignore[attr-defined]
            if not (placement.is_shard() or placement.is_replicate()):
                raise ValueError(
                    f"The model's parameter {name!r} has placement {placement} on its mesh; "
                    "only Shard(dim) and Replicate() parameters hold their values (a Partial "
                    "one is a pending sum)."
                )
    if mesh is None:
        return None
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if mesh.size() != world:
        raise ValueError(
            f"The model's parameter {first!r} is sharded on a device mesh of {mesh.size()} "
            f"ranks ({mesh}) but the default process group has {world}; the kernel of a "
            "sharded model is shared among, and summed over, every rank of the default "
            "process group, so the mesh must span all of them."
        )
    return mesh


@contextlib.contextmanager
def fsdp_hooks_off(module: nn.Module) -> Iterator[None]:
    """FSDP's forward hooks on ``module`` and its children set aside inside the block.

    Each FSDP module gets, for the block, copies of its forward-hook dictionaries
    without FSDP's entries (other hooks, e.g. the engine's own, stay); the original
    dictionaries, never modified, are put back on exit.
    """
    saved: list[tuple[nn.Module, OrderedDict, OrderedDict]] = []
    try:
        for m in module.modules():
            ids = _fsdp_hook_ids(m)
            if not ids:
                continue
            pre, post = m._forward_pre_hooks, m._forward_hooks
            saved.append((m, pre, post))
            m._forward_pre_hooks = OrderedDict((k, h) for k, h in pre.items() if k not in ids)
            m._forward_hooks = OrderedDict((k, h) for k, h in post.items() if k not in ids)
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post


def call_module(
    module: nn.Module,
    tensors: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    args: tuple[Any, ...],
    kwargs: Optional[dict[str, Any]] = None,
) -> Any:
    """``functional_call(module, tensors, args, kwargs)``, FSDP's forward hooks set aside.

    Each attribute slot is swapped once (:func:`._slots.slot_tensors`), so a submodule
    registered under several names is restored exactly.
    """
    given = {**tensors[1], **tensors[0]}
    with fsdp_hooks_off(module):
        return functional_call(module, slot_tensors(module, given), args, kwargs, tie_weights=False)


def _fsdp_hook_ids(module: nn.Module) -> set[int]:
    """Ids of the forward hooks ``fully_shard`` registered on ``module`` (none if not FSDP)."""
    get_state = getattr(module, "_get_fsdp_state", None)
    if get_state is None or not torch.distributed.is_available():
        return set()
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return set()
    state = get_state()
    ids: set[int] = set()
    for attr in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
        handle = getattr(state, attr, None)
        for h in getattr(handle, "handles", (handle,)):
            if h is not None:
                ids.add(h.id)
    return ids


def _redistributes_tensors(module: nn.Module) -> bool:
    """Whether ``module`` carries forward hooks of ``torch.distributed.tensor``.

    ``distribute_module`` (behind tensor parallelism's ``parallelize_module``) hooks the
    module's forward to turn inputs into ``DTensor``s and outputs back; a forward on
    whole plain parameters cannot run through them, and a layer parallelized so may also
    have been rewritten for its local shard (e.g. its number of attention heads).
    """
    hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
    return any(
        str(getattr(hook, "__module__", "") or "").startswith("torch.distributed.tensor")
        for hook in hooks
    )
