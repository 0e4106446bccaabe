"""The monitor: a probe set, a kernel report per schedule step, a verdict, and adapters.

* :class:`NTKTracker` (:mod:`.tracker`): framework-free; ``start(model)`` snapshots ``θ0``
  and ``Θ0`` on the probe set, ``update(model, step)`` returns an :class:`NTKReport`.
* :class:`NTKSettings` (:mod:`.settings`): what is measured and when, defined once for
  the tracker and the callback.
* :class:`NTKReport` (:mod:`.report`): one report's numbers, verdict and message.
* :class:`Thresholds` (defined in the internal ``_verdict`` module): the verdict's
  thresholds; ``_verdict`` also holds the diagnosis; :mod:`._schedule`: when to report;
  :mod:`._probe`: drawing the probe set from training batches.
* :mod:`.loggers`: TensorBoard extras (spectrum, kernel image, custom-scalars layout).
* :class:`NTKMonitor` (:mod:`.callback`): the thin Lightning adapter.

Layer: may import :mod:`lightning_ntk.kernel`, :mod:`lightning_ntk.linearization`,
:mod:`lightning_ntk.metrics` and :mod:`lightning_ntk.theory`; Lightning only inside
:mod:`.callback`, and only when the callback class is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY_ATTRIBUTES: dict[str, str] = {
    "NTKTracker": ".tracker",
    "NTKReport": ".report",
    "NTKMonitor": ".callback",
    "NTKSettings": ".settings",
    "Thresholds": "._verdict",
}

__all__ = sorted(_LAZY_ATTRIBUTES)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY_ATTRIBUTES)


if TYPE_CHECKING:  # pragma: no cover - static analysers see the real imports
    from ._verdict import Thresholds
    from .callback import NTKMonitor
    from .report import NTKReport
    from .settings import NTKSettings
    from .tracker import NTKTracker
