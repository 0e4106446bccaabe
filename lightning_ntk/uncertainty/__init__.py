"""Predictive uncertainty over random initialisation, and a Bayesian reference.

"The Neural Tangent Kernel for Classification" (Plenk et al., arXiv 2605.17606): in the
lazy regime (L2 regularisation towards the initialisation ``λ > 0``, or non-degenerate
targets) the trained logits are an explicit function of the initial ones,

    f*(X)  = f0(X) − (1/λ) G (p(f*(X)) − Y),                       (λ > 0)
    f*(x)  = f0(x) − (1/λ) G(x, X) (p(f*(X)) − Y),

with ``G = Θ/N`` (mean-reduced loss) or ``Θ`` (summed), or, for ``λ = 0`` and every
target probability positive, ``f*(X) = f0(X) + Θ α`` with ``p(f*(X)) = Y`` and
``f*(x) = f0(x) + Θ(x, X) α``; after ``T`` steps of gradient descent with learning rate
``η`` the logits follow ``f ← f − η [G (p(f) − Y) + λ (f − f0)]`` instead. At infinite
width ``Θ`` is deterministic and ``f0`` is a Gaussian process with the NNGP covariance
``Σ ⊗ I_C``, so the randomness of the initialisation induces a distribution over trained
predictors. Here the kernel is always class-shared, ``K ⊗ I_C`` (trace layout ``(N, N)``).

* :func:`kernel_ensemble`: draw ``f0`` jointly on train and test points from the NNGP
  (analytic for :class:`~lightning_ntk.testing.NTKMLP`, or the empirical covariance of
  the initial logits of a few real initialisations), map every draw to its trained
  logits, summarise.
* :func:`kernel_solutions`: that map for given initial logits, vectorised over draws.
* :func:`deep_ensemble`: train real networks from different seeds, summarise the same way.
* :func:`gp_laplace_classifier`: a GP classifier with the same kind of kernel, Laplace
  approximated (Rasmussen & Williams 2006, §3.5), as the Bayesian reference.
"""

from ._common import EnsemblePrediction
from ._deep_ensemble import deep_ensemble
from ._gp_laplace import GPLaplacePrediction, gp_laplace_classifier
from ._kernel_ensemble import KernelSolutions, kernel_ensemble, kernel_solutions

__all__ = [
    "EnsemblePrediction",
    "GPLaplacePrediction",
    "KernelSolutions",
    "deep_ensemble",
    "gp_laplace_classifier",
    "kernel_ensemble",
    "kernel_solutions",
]
