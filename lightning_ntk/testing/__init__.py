"""Test helpers for wide-limit behaviour: analytic kernels, assertions and width sweeps.

Every assertion returns a result object when it passes and otherwise raises
:class:`AssertionError` with a diagnostic report (failing entries, ratios, tolerances,
fitted slopes) that reads well in a pytest failure.

Analytic kernels and reference networks (see :mod:`lightning_ntk.testing._analytic` for the
recursion and the parameterizations):

* :func:`analytic_ntk`, :func:`analytic_nngp`: infinite-width kernels of an MLP.
* :class:`NTKMLP`: an MLP whose empirical NTK converges to :func:`analytic_ntk`.

Assertions on kernels:

* :func:`assert_ntk_close`: entrywise ``|K − K_ref| ≤ atol + rtol·|K_ref|``.
* :func:`assert_converges_to_analytic`: the empirical kernel tends to the analytic one as
  the width grows, at the ``1/√width`` rate.

Training sweeps (see :mod:`lightning_ntk.testing._sweep`):

* :func:`width_sweep`: train each width over a few seeds; kernel drift, linearization
  error and logit growth per width, with log-log slopes against the width.
* :func:`assert_lazy_training`, :func:`assert_lazy_scaling`: the kernel barely moves, and
  moves less the wider the network (regularized or non-degenerate targets).
* :func:`assert_breaks_down`: centered logits keep growing with the steps (hard targets,
  no regularization), the paper's breakdown of the kernel regime.

Layer: may import :mod:`lightning_ntk.kernel`, :mod:`lightning_ntk.linearization` and
:mod:`lightning_ntk.metrics`. The names load lazily (PEP 562), so the pytest plugin
(:mod:`lightning_ntk.testing.pytest_plugin`) registers without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# public name -> submodule that defines it
_LAZY_ATTRIBUTES: dict[str, str] = {
    "NTKMLP": "._analytic",
    "ConvergenceResult": ".kernel_assertions",
    "KernelComparison": ".kernel_assertions",
    "SlopeFit": "._sweep",
    "WidthSweepResult": "._sweep",
    "analytic_nngp": "._analytic",
    "analytic_ntk": "._analytic",
    "assert_breaks_down": ".training_assertions",
    "assert_converges_to_analytic": ".kernel_assertions",
    "assert_lazy_scaling": ".training_assertions",
    "assert_lazy_training": ".training_assertions",
    "assert_ntk_close": ".kernel_assertions",
    "fit_loglog_slope": "._sweep",
    "make_classification_data": "._sweep",
    "width_sweep": "._sweep",
}

__all__ = sorted(_LAZY_ATTRIBUTES)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY_ATTRIBUTES)


if TYPE_CHECKING:  # pragma: no cover - static analysers see the real imports
    from ._analytic import NTKMLP, analytic_nngp, analytic_ntk
    from ._sweep import (
        SlopeFit,
        WidthSweepResult,
        fit_loglog_slope,
        make_classification_data,
        width_sweep,
    )
    from .kernel_assertions import (
        ConvergenceResult,
        KernelComparison,
        assert_converges_to_analytic,
        assert_ntk_close,
    )
    from .training_assertions import assert_breaks_down, assert_lazy_scaling, assert_lazy_training
