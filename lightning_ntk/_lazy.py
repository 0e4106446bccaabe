"""Public names that load on first use (PEP 562), for the package and its subpackages.

``import lightning_ntk`` then loads neither torch nor Lightning, and the pytest plugin
registers without importing torch. Imports nothing from the package: every layer may
use it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Collection, Mapping
from types import ModuleType
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    module_name: str, attributes: Mapping[str, str], submodules: Collection[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` of a module whose public names are loaded when first used.

    Args:
        module_name: the module's ``__name__``.
        attributes: public name -> relative module that defines it (e.g. ``".tracker"``).
        submodules: subpackages reachable as attributes (``lightning_ntk.testing``).

    Returns:
        ``__getattr__``, which imports a name's module, caches the name in the module and
        returns it; and ``__dir__``, which lists the public names (loaded or not), the
        public submodules and the module's dunders, not its helpers.
    """
    module = sys.modules[module_name]

    def __getattr__(name: str) -> Any:
        if name in attributes:
            value = getattr(importlib.import_module(attributes[name], module_name), name)
            setattr(module, name, value)  # cache: later look-ups skip this function
            return value
        if name in submodules:
            return importlib.import_module(f".{name}", module_name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        names = vars(module)
        dunders = {name for name in names if name.startswith("__")}
        loaded = {
            name
            for name, value in names.items()
            if isinstance(value, ModuleType)
            and value.__name__.startswith(f"{module_name}.")
            and not name.startswith("_")
        }
        public = set(getattr(module, "__all__", ())) | set(attributes) | set(submodules)
        return sorted(dunders | public | loaded)

    return __getattr__, __dir__
