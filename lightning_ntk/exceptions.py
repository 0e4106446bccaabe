"""Warnings and errors raised when training leaves the kernel regime."""

from __future__ import annotations


class LinearizationBreakdownWarning(UserWarning):
    """Training has left the kernel (linearized) regime; the message says why."""


class LinearizationBreakdownError(RuntimeError):
    """Raised instead of the warning when the user asked for ``on_breakdown="raise"``."""
