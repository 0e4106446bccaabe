"""The NTK monitor for the ``lightning.pytorch`` namespace (``import lightning as L``).

``from lightning_ntk.lightning import NTKMonitor`` gives the same callback as
``lightning_ntk.NTKMonitor``, built on ``lightning.pytorch.Callback`` so that
``lightning.pytorch.Trainer`` and its ``LightningCLI`` accept it. Both classes come from
one implementation, :class:`lightning_ntk.monitor.callback.NTKMonitorBase`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .monitor.callback import monitor_class

__all__ = ["NTKMonitor"]

if TYPE_CHECKING:  # pragma: no cover - what type checkers see of the class built below
    import lightning.pytorch

    from .monitor.callback import NTKMonitorBase

    class NTKMonitor(NTKMonitorBase, lightning.pytorch.Callback):  # noqa: D101
        ...

else:
    NTKMonitor = monitor_class("lightning.pytorch")
