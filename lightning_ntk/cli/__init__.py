"""The ``lightning-ntk`` command: ``demo`` and ``report``.

``lightning-ntk demo`` trains the same classifier on scikit-learn's bundled digits under
the paper's conditions (hard targets; L2 regularization; label smoothing; a narrow
network) with :class:`~lightning_ntk.NTKMonitor` attached, prints what the monitor
concluded and writes TensorBoard logs and a figure. ``lightning-ntk report LOGDIR``
rebuilds the figure and a text summary from the TensorBoard or CSV logs the
monitor wrote.

Both subcommands exit with status 0 on success, 2 on bad options (with a message that
says what was expected) and 1 when the work itself fails.

Layer: the top; may import everything in the package. The command imports torch and
Lightning only once a subcommand runs.
"""

from ._commands import build_parser, main

__all__ = ["build_parser", "main"]
