"""The tensors a functional call swaps into a module: one per attribute slot.

``torch.func.functional_call(module, tensors)`` swaps each given tensor into the module
under its name and swaps the original back afterwards. With ``tie_weights=True`` (its
default) it also swaps the value in under every other name of the same tensor. A
submodule registered under two names (``self.alias = self.block``, or
``nn.ModuleList([block] * 3)``, a weight-shared block) gives one attribute *slot*
(``block.weight``) several names; swapping it once per name saves the engine's tensor
as the "original" of the second name, and restoring leaves that tensor, not the user's
``nn.Parameter``, in the module: the model is silently rewritten (its optimizer then
trains a parameter the forward no longer uses).

:func:`slot_tensors` therefore names each slot once: a slot is a ``(module, attribute)``
pair, and a given tensor goes to every slot that holds the same tensor as the name it
was given under (tied weights: distinct modules sharing one ``nn.Parameter``), as
``tie_weights=True`` would, but each slot only once. The functional call then runs with
``tie_weights=False`` and restores every slot exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor, nn

__all__ = ["slot_tensors"]


def slot_tensors(module: nn.Module, given: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{slot name: tensor}`` that swaps each given tensor into every slot holding it.

    Args:
        module: the module the tensors are swapped into.
        given: ``{name: tensor}`` under any of the names of a parameter or buffer
            (``named_parameters()`` / ``named_buffers()`` names, aliases included).

    Returns:
        For every slot holding a given tensor's original, that slot's first name mapped to
        the given tensor; names the module does not have are passed through unchanged.

    Raises:
        ValueError: two different tensors are given for one (tied) tensor of the module.
    """
    slot_name: dict[tuple[int, str], str] = {}  # (id(owner), attribute) -> first name
    tied: dict[int, list[str]] = {}  # id(original tensor) -> its slots' first names
    original: dict[str, int] = {}  # every name -> id(original tensor)
    for name, tensor, owner, attribute in _named_slots(module):
        key = (id(owner), attribute)
        original[name] = id(tensor)
        if key not in slot_name:
            slot_name[key] = name
            tied.setdefault(id(tensor), []).append(name)
    out: dict[str, Tensor] = {}
    for name, value in given.items():
        if name not in original:
            out[name] = value
            continue
        for slot in tied[original[name]]:
            if slot in out and out[slot] is not value:
                raise ValueError(
                    f"Got two different tensors for {name!r} and a name tied to it "
                    f"({slot!r}); a tied parameter takes one value."
                )
            out[slot] = value
    return out


def _named_slots(module: nn.Module) -> Iterator[tuple[str, Tensor, nn.Module, str]]:
    """``(name, tensor, owner module, attribute)`` for every name of every parameter / buffer."""
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for registry in (owner._parameters, owner._buffers):
            for attribute, tensor in registry.items():
                if tensor is not None:
                    name = f"{prefix}.{attribute}" if prefix else attribute
                    yield name, tensor, owner, attribute
