"""Multi-class GP classifier with the Laplace approximation; see :mod:`lightning_ntk.uncertainty`.

Latent functions ``f_a ~ GP(0, K)`` independently for the ``C`` classes (covariance
``K ⊗ I_C``), likelihood ``p(y | f) = Π_i softmax(f(x_i))_{y_i}`` (soft targets:
``Σ_i Y_i · log softmax f(x_i)``). Rasmussen & Williams (2006), §3.5:

* mode ``f̂ = K (Y − p(f̂))`` by Newton's method (Algorithm 3.3);
* Gaussian approximation ``q(f | X, y) = N(f̂, (K⁻¹ + W)⁻¹)``, ``W = D − ΠΠᵀ``;
* at a test point (Algorithm 3.4) ``μ* = K(x*, X) (Y − p(f̂))`` and
  ``Σ*_{ab} = δ_ab (k(x*, x*) − k*ᵀ E_a k*) + k*ᵀ E_a (Σ_c E_c)⁻¹ E_b k*``;
* predictive probabilities ``E[softmax f*]`` by Monte Carlo over ``N(μ*, Σ*)``
  (``averaging="mc"``) or the probit-style approximation
  ``softmax(μ* / √(1 + (π/8) diag Σ*))`` (``averaging="probit"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..theory import _softmax_gp
from ..theory._checks import check_smoothing, check_tensor
from ._common import check_option, check_positive_int, targets_matrix

_AVERAGING = ("mc", "probit")


@dataclass(frozen=True)
class GPLaplacePrediction:
    """Laplace-approximate GP classifier on ``M`` test points.

    Attributes:
        probs: predictive probabilities ``E_q[softmax f*]``, ``(M, C)``.
        latent_mean: ``μ*``, ``(M, C)``.
        latent_cov: ``Σ*``, ``(M, C, C)``, symmetric PSD.
        train_latent: the mode ``f̂`` on the training set, ``(N, C)``.
        iterations: Newton iterations.
        residual: ``max |f̂ − K (Y − p(f̂))|``.
    """

    probs: Tensor
    latent_mean: Tensor
    latent_cov: Tensor
    train_latent: Tensor
    iterations: int
    residual: float


def gp_laplace_classifier(
    kernel: Tensor,
    targets: Tensor,
    kernel_test: Tensor,
    kernel_test_diag: Tensor,
    *,
    num_classes: Optional[int] = None,
    label_smoothing: float = 0.0,
    averaging: str = "mc",
    num_samples: int = 1000,
    seed: int = 0,
    tol: float = 1e-9,
    max_iter: int = 100,
) -> GPLaplacePrediction:
    """Multi-class GP classification with the Laplace approximation (module docstring).

    Args:
        kernel: prior covariance of each latent function on the training inputs,
            ``K(X, X)``, ``(N, N)`` (e.g. ``analytic_nngp(x)``).
        targets: integer labels ``(N,)`` or soft targets ``(N, C)``.
        kernel_test: ``K(X_test, X)``, ``(M, N)``.
        kernel_test_diag: prior variances ``k(x*, x*)``, ``(M,)``.
        num_classes: ``C`` for integer labels (default: the largest label + 1).
        label_smoothing: ``ε ∈ [0, 1)`` applied to the targets (0: the usual categorical
            likelihood).
        averaging: ``"mc"`` or ``"probit"``.
        num_samples: Monte Carlo samples per test point (``"mc"``).
        seed: seed of the private generator of the Monte Carlo samples.
        tol: tolerance on the mode's residual.
        max_iter: Newton iterations at most.

    Returns:
        :class:`GPLaplacePrediction`, float64.

    Raises:
        ValueError / TypeError: bad shapes or options.
        RuntimeError: Newton's method missed ``tol`` within ``max_iter``.
    """
    check_option(averaging, "averaging", _AVERAGING)
    check_positive_int(num_samples, "num_samples")
    check_positive_int(max_iter, "max_iter")
    for name, value in (("kernel", kernel), ("kernel_test", kernel_test)):
        check_tensor(value, name)
    check_tensor(kernel_test_diag, "kernel_test_diag")
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"Expected `kernel` to be of shape (N, N) but got {tuple(kernel.shape)}.")
    N = kernel.shape[0]
    if N == 0:
        raise ValueError("Expected `kernel` to be of shape (N, N) with N >= 1 but got (0, 0).")
    if kernel_test.ndim != 2 or kernel_test.shape[1] != N:
        raise ValueError(
            f"Expected `kernel_test` to be of shape (M, {N}) but got {tuple(kernel_test.shape)}."
        )
    M = kernel_test.shape[0]
    if tuple(kernel_test_diag.shape) != (M,):
        raise ValueError(
            f"Expected `kernel_test_diag` to be of shape ({M},) but got "
            f"{tuple(kernel_test_diag.shape)}."
        )
    if targets.ndim == 2:
        C = targets.shape[1]
    elif num_classes is None:
        C = int(targets.max()) + 1
    else:
        check_positive_int(num_classes, "num_classes", minimum=2)
        C = num_classes
    eps = check_smoothing(label_smoothing)
    Y = (1 - eps) * targets_matrix(targets, N, C) + eps / C
    K = kernel.double()
    K_test = kernel_test.double().to(K.device)
    Y = Y.to(K.device)
    mode = _softmax_gp.find_mode(
        K, torch.zeros(1, N, C, dtype=K.dtype, device=K.device), Y, tol=tol, max_iter=max_iter
    )
    if mode.residual > tol:
        raise RuntimeError(
            f"gp_laplace_classifier did not converge: residual {mode.residual:.3g} > tol "
            f"{tol:g} after {mode.iterations} iterations; raise `max_iter` or loosen `tol`."
        )
    p = torch.softmax(mode.g, dim=-1)  # (1, N, C)
    mean = K_test @ mode.a[0]  # (M, C)
    factors = _softmax_gp.factors(K, p)
    E, L_sum = factors.E[0], factors.L_sum[0]  # (C, N, N), (N, N)
    B = torch.einsum("cnm,tm->tcn", E, K_test)  # b_a = E_a k*, (M, C, N)
    explained = torch.einsum("tcn,tn->tc", B, K_test)  # k*ᵀ E_a k*
    solved = torch.cholesky_solve(B.reshape(M * C, N).T, L_sum).T.reshape(M, C, N)
    cov = torch.diag_embed(kernel_test_diag.double().to(K.device)[:, None] - explained)
    cov = cov + torch.einsum("tcn,tdn->tcd", B, solved)
    cov = (cov + cov.transpose(1, 2)) / 2
    if averaging == "probit":
        variances = torch.diagonal(cov, dim1=1, dim2=2)
        probs = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * variances), dim=-1)
    else:
        probs = _mc_probs(mean, cov, num_samples, seed)
    return GPLaplacePrediction(
        probs=probs,
        latent_mean=mean,
        latent_cov=cov,
        train_latent=mode.g[0],
        iterations=mode.iterations,
        residual=mode.residual,
    )


def _mc_probs(mean: Tensor, cov: Tensor, num_samples: int, seed: int) -> Tensor:
    """``E[softmax f]`` for ``f ~ N(mean, cov)`` per point, by Monte Carlo ``(M, C)``."""
    M, C = mean.shape
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # (M, C), (M, C, C)
    root = eigenvectors * eigenvalues.clamp_min(0).sqrt()[:, None, :]
    generator = torch.Generator().manual_seed(int(seed))
    z = torch.randn(num_samples, M, C, generator=generator, dtype=mean.dtype).to(mean.device)
    samples = mean + torch.einsum("mcd,smd->smc", root, z)
    return torch.softmax(samples, dim=-1).mean(0)
