"""The model as the engine sees it: ``x ↦ forward_fn(model, x)`` as a module.

:class:`ForwardModule` wraps a user's model and optional ``forward_fn`` so the kernel
engine evaluates an ordinary module; the helpers map parameter names and selectors
between the wrapper and the user's model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._functional import unwrap_module

ForwardFn = Callable[[nn.Module, Tensor], Any]


class ForwardModule(nn.Module):
    """``x ↦ forward_fn(model, x)`` as a module, so the model is evaluated functionally.

    Its parameters are the model's, prefixed ``"model."``; compiled sub-modules run
    eagerly inside it (the kernel transforms need eager execution).
    """

    PREFIX = "model."

    def __init__(self, model: nn.Module, forward_fn: Optional[ForwardFn] = None) -> None:
        super().__init__()
        self.model = unwrap_module(model)
        self._forward_fn = forward_fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``forward_fn(model, x)`` with the batch ``x`` whole, else ``model(...)``.

        The engine calls ``module(x)``, ``module(**x)`` or ``module(*x)`` for a tensor, a
        mapping or a tuple batch (:mod:`._inputs`); ``forward_fn`` receives the batch as
        it was given.
        """
        with _eager():
            if self._forward_fn is None:
                return self.model(*args, **kwargs)
            if kwargs and not args:
                x: Any = dict(kwargs)
            elif len(args) == 1 and not kwargs:
                x = args[0]
            else:
                x = tuple(args)
            return self._forward_fn(self.model, x)


def selector_on_wrapper(params: Any) -> Any:
    """The model's ``params`` selector as a selector of its :class:`ForwardModule`.

    ``None``, a name, a list of names or a predicate ``(name, parameter) -> bool``; names
    gain the wrapper's prefix, and a predicate sees the model's own names.
    """
    prefix = ForwardModule.PREFIX
    if params is None:
        return None
    if isinstance(params, str):
        return prefix + params
    if callable(params):
        return lambda name, p: params(name[len(prefix) :], p)
    return [prefix + s if isinstance(s, str) else s for s in params]


def strip_prefix(name: str) -> str:
    """A parameter name of :class:`ForwardModule` as the user's model names it."""
    name = name[len(ForwardModule.PREFIX) :] if name.startswith(ForwardModule.PREFIX) else name
    return name.replace("_orig_mod.", "")


def module_of(name: str) -> str:
    """The module a parameter belongs to: its name without ``.weight`` / ``.bias`` etc."""
    name = strip_prefix(name)
    return name.rsplit(".", 1)[0] if "." in name else name


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # torch < 2.6: compiled sub-modules are traced as they are
        yield
        return
    with set_stance("force_eager"):
        yield
