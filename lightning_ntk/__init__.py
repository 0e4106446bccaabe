"""lightning_ntk: watch the empirical Neural Tangent Kernel of a classifier while it trains.

The public API is re-exported here lazily (PEP 562): ``import lightning_ntk`` and
``from lightning_ntk import empirical_ntk`` import only the torch core; Lightning is
imported the first time :class:`NTKMonitor` is touched.

Groups:

* kernel: :func:`empirical_ntk`, :func:`reference_ntk`
* linearized model: :func:`linearize`, :func:`linearization_error`, :func:`prob_tv`,
  :func:`argmax_agreement`
* metrics: :mod:`lightning_ntk.metrics`
* theory: :func:`predict_regime`, :func:`kernel_solution`, :func:`kernel_flow`
* monitoring: :class:`NTKTracker`, :class:`NTKReport`, :class:`NTKMonitor`,
  :class:`Thresholds`
* testing: :mod:`lightning_ntk.testing`
* uncertainty: :func:`kernel_ensemble`, :func:`deep_ensemble`, :func:`gp_laplace_classifier`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_LAZY_ATTRIBUTES: dict[str, str] = {
    # kernel
    "empirical_ntk": ".kernel",
    "reference_ntk": ".kernel.reference",
    # linearized model (module `linearization`: a module named `linearize` would shadow
    # the function of that name once imported)
    "linearize": ".linearization",
    "LinearizedModel": ".linearization",
    "linearization_error": ".linearization",
    "prob_tv": ".linearization",
    "argmax_agreement": ".linearization",
    # theory
    "predict_regime": ".theory",
    "RegimePrediction": ".theory",
    "kernel_solution": ".theory",
    "KernelSolution": ".theory",
    "kernel_flow": ".theory",
    # monitoring
    "NTKTracker": ".monitor.tracker",
    "NTKReport": ".monitor.tracker",
    "NTKMonitor": ".monitor.callback",
    "Thresholds": ".monitor._verdict",
    "LinearizationBreakdownWarning": ".exceptions",
    "NTKMeasurementWarning": ".exceptions",
    "LinearizationBreakdownError": ".exceptions",
    # predictive uncertainty over random initialisation
    "kernel_ensemble": ".uncertainty",
    "deep_ensemble": ".uncertainty",
    "gp_laplace_classifier": ".uncertainty",
}

_LAZY_SUBMODULES = {
    "kernel", "linearization", "metrics", "testing", "theory", "lightning", "uncertainty",
    "monitor",
}  # fmt: skip

__all__ = sorted(_LAZY_ATTRIBUTES)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY_ATTRIBUTES, _LAZY_SUBMODULES)


if TYPE_CHECKING:  # pragma: no cover - static analysers see the real imports
    from .exceptions import (
        LinearizationBreakdownError,
        LinearizationBreakdownWarning,
        NTKMeasurementWarning,
    )
    from .kernel import empirical_ntk
    from .kernel.reference import reference_ntk
    from .linearization import (
        LinearizedModel,
        argmax_agreement,
        linearization_error,
        linearize,
        prob_tv,
    )
    from .monitor._verdict import Thresholds
    from .monitor.callback import NTKMonitor
    from .monitor.tracker import NTKReport, NTKTracker
    from .theory import (
        KernelSolution,
        RegimePrediction,
        kernel_flow,
        kernel_solution,
        predict_regime,
    )
    from .uncertainty import deep_ensemble, gp_laplace_classifier, kernel_ensemble
