"""The monitor: a probe set, a kernel report per schedule step, a verdict, and adapters.

* :class:`NTKTracker` (:mod:`.tracker`): framework-free; ``start(model)`` snapshots ``θ0``
  and ``Θ0`` on the probe set, ``update(model, step)`` returns an :class:`NTKReport`.
* :class:`NTKSettings` (:mod:`.settings`): what is measured and when, defined once for
  the tracker and the callback.
* :class:`NTKReport` (:mod:`.report`): one report's numbers, verdict and message.
* :mod:`._verdict`: thresholds and the diagnosis; :mod:`._schedule`: when to report;
  :mod:`._probe`: drawing the probe set from training batches.
* :mod:`.loggers`: TensorBoard extras (spectrum, kernel image, custom-scalars layout).
* :class:`NTKMonitor` (:mod:`.callback`): the thin Lightning adapter.

Layer: may import :mod:`lightning_ntk.kernel`, :mod:`lightning_ntk.linearization`,
:mod:`lightning_ntk.metrics` and :mod:`lightning_ntk.theory`; Lightning only inside
:mod:`.callback`, and only when the callback class is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY_ATTRIBUTES: dict[str, str] = {
    "NTKTracker": ".tracker",
    "NTKReport": ".report",
    "NTKMonitor": ".callback",
    "NTKSettings": ".settings",
}

__all__ = sorted(_LAZY_ATTRIBUTES)


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - static analysers see the real imports
    from .callback import NTKMonitor
    from .report import NTKReport
    from .settings import NTKSettings
    from .tracker import NTKTracker
