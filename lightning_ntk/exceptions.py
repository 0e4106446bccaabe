"""Warnings and errors: training left the kernel regime, or a measurement failed."""

from __future__ import annotations


class LinearizationBreakdownWarning(UserWarning):
    """Training has left the kernel (linearized) regime; the message says why."""


class LinearizationBreakdownError(RuntimeError):
    """Raised instead of the warning when the user asked for ``on_breakdown="raise"``."""


class NTKMeasurementWarning(UserWarning):
    """A metric could not be computed for this model; it is ``nan`` and training goes on.

    Issued once per cause; the message names the operation that failed and a workaround.
    """
