"""Model inputs: a tensor, or a mapping / tuple of tensors sharing the batch dimension.

A batch ``x`` is one of

* a tensor ``(N, ...)``, passed to the model as ``model(x)``;
* a mapping of names to tensors ``(N, ...)`` (e.g. ``input_ids`` and ``attention_mask`` of
  a Hugging Face model), passed as keyword arguments ``model(**x)``;
* a tuple / list of tensors ``(N, ...)``, passed as positional arguments ``model(*x)``.

Non-tensor entries of a mapping or tuple (flags such as ``return_dict=False``) are
passed through unchanged and never sliced. The helpers below slice, cast, move and
describe such batches uniformly, so every method handles all three kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor


def tensors_of(x: Any) -> list[Tensor]:
    """The tensors of a batch, in a fixed order."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [v for v in x.values() if isinstance(v, Tensor)]
    if isinstance(x, (tuple, list)):
        return [v for v in x if isinstance(v, Tensor)]
    return []


def map_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """The batch with ``fn`` applied to each of its tensors (other entries kept)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in x.items()}
    return type(x)(fn(v) if isinstance(v, Tensor) else v for v in x)


def batch_size(x: Any) -> int:
    """``N``, the shared leading dimension of the batch's tensors."""
    return tensors_of(x)[0].shape[0]


def take(x: Any, index: Any) -> Any:
    """Rows ``index`` (a slice or an index tensor) of every tensor of the batch."""
    return map_tensors(x, lambda t: t[index])


def concat(parts: list[Any]) -> Any:
    """Batches concatenated along the batch dimension."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {
            k: torch.cat([p[k] for p in parts]) if isinstance(v, Tensor) else v
            for k, v in first.items()
        }
    return type(first)(
        torch.cat([p[i] for p in parts]) if isinstance(v, Tensor) else v
        for i, v in enumerate(first)
    )


def unsqueeze(x: Any) -> Any:
    """One example without batch dimension as a batch of one (for ``vmap``)."""
    return map_tensors(x, lambda t: t.unsqueeze(0))


def call(module: Any, x: Any) -> Any:
    """``module(x)``, ``module(**x)`` or ``module(*x)`` for a tensor, mapping or tuple."""
    if isinstance(x, Mapping):
        return module(**x)
    if isinstance(x, (tuple, list)):
        return module(*x)
    return module(x)


def call_args(x: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` that :func:`call` passes for the batch ``x``."""
    if isinstance(x, Mapping):
        return (), dict(x)
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (x,), {}


def is_floating(x: Any) -> bool:
    """Whether the batch is float features (its first tensor is floating)."""
    return tensors_of(x)[0].is_floating_point()


def example_signature(x: Any) -> tuple:
    """Per-example shapes and dtypes of the batch's tensors (keys included)."""
    if isinstance(x, Mapping):
        items = [(k, v) for k, v in x.items()]
    elif isinstance(x, (tuple, list)):
        items = list(enumerate(x))
    else:
        items = [(None, x)]
    return tuple(
        (k, tuple(v.shape[1:]), v.dtype) if isinstance(v, Tensor) else (k, repr(v))
        for k, v in items
    )


def describe(x: Any) -> str:
    """A short description of a batch for error messages."""
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in x.items()) + "}"
    return "(" + ", ".join(_short(v) for v in x) + ")"


def _short(v: Any) -> str:
    return f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else repr(v)


def check_batch(name: str, x: Any) -> None:
    """Validate one batch: a tensor or a mapping / tuple of tensors with one leading size.

    Raises:
        TypeError: not a tensor, mapping or tuple of tensors.
        ValueError: an empty batch, a 0-dim tensor, or tensors of different leading sizes.
    """
    if isinstance(x, Tensor):
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(
                f"Expected `{name}` to be a non-empty batch of shape (N, ...) with N >= 1 but "
                f"got shape {tuple(x.shape)}."
            )
        return
    if not isinstance(x, (Mapping, tuple, list)):
        raise TypeError(
            f"Expected `{name}` to be a torch.Tensor, or a mapping / tuple of tensors sharing "
            f"the batch dimension, but got {type(x).__name__}."
        )
    tensors = tensors_of(x)
    if not tensors:
        raise TypeError(
            f"Expected `{name}` to be a torch.Tensor, or a mapping / tuple of tensors sharing "
            f"the batch dimension, but got a {type(x).__name__} without tensors."
        )
    sizes = {t.shape[0] if t.ndim else None for t in tensors}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"Expected the tensors of `{name}` to share a non-empty batch dimension N >= 1 "
            f"but got {describe(x)}."
        )
