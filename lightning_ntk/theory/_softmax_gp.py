"""Batched softmax-likelihood numerics for a kernel ``K ⊗ I_C``.

Shared by the ensembles and the GP-Laplace classifier of :mod:`lightning_ntk.uncertainty`.

All tensors are float64. Logits carry a leading batch of ``S`` independent problems
(initial-function draws): ``(S, N, C)``. The kernel ``K (N, N)`` is PSD and the same for
every class (the infinite-width structure ``K ⊗ I_C``).

**Mode.** For an offset ``c`` and a scaled kernel ``K̃``, :func:`find_mode` solves

    g = K̃ (Y − p(c + g)),        f = c + g,

which is at once the kernel fixed point ``f* = f0 − (1/λ) G (p(f*) − Y)`` (``c = f0``,
``K̃ = G / λ``) and the mode of the Laplace approximation of a GP with prior mean ``c``,
covariance ``K̃ ⊗ I_C`` and softmax likelihood ``Σ_i Y_i · log p(f_i)``. Newton's method
on the concave ``Ψ(g) = −½ gᵀ K̃⁻¹ g + Σ_i Y_i · log p(c_i + g_i)`` is Rasmussen & Williams
(2006) Algorithm 3.3: with ``W = D − ΠΠᵀ`` (``D = diag(p)``),

    b = W g + Y − p,   a = b − E K̃ b + E R (Σ_c E_c)⁻¹ Rᵀ E K̃ b,   g ← K̃ a,
    E_c = D_c^{1/2} (I + D_c^{1/2} K̃ D_c^{1/2})⁻¹ D_c^{1/2},

which needs ``C + 1`` Cholesky factors of ``N × N`` matrices per step and never inverts
``K̃``. Steps are halved until ``Ψ`` does not decrease.

**Flow.** :func:`flow` iterates ``f ← f − η [G (p(f) − Y) + λ (f − f0)]``, the logits of
gradient descent on the linearized model, for every draw at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Bytes of the (S, C, N, N) work arrays of one Newton chunk.
_CHUNK_BYTES = 2**27


@dataclass
class Mode:
    """Outcome of :func:`find_mode` for ``S`` problems.

    Attributes:
        g: ``f − c``, ``(S, N, C)``.
        a: ``Y − p(f)``, ``(S, N, C)``, with ``g = K̃ a``.
        iterations: Newton iterations of the slowest problem.
        residual: ``max |g − K̃ (Y − p(c + g))|`` over all problems.
    """

    g: Tensor
    a: Tensor
    iterations: int
    residual: float


def find_mode(
    K: Tensor, offset: Tensor, Y: Tensor, *, tol: float, max_iter: int, chunk: Optional[int] = None
) -> Mode:
    """Solve ``g = K (Y − p(offset + g))`` for a batch of offsets (module docstring).

    Args:
        K: the scaled kernel ``K̃``, ``(N, N)``, PSD.
        offset: ``c``, ``(S, N, C)``.
        Y: targets ``(N, C)`` (rows are probabilities).
        tol: stop when the residual is at most ``tol`` for every problem.
        max_iter: Newton iterations at most.
        chunk: problems per batch of work arrays (default: from a memory budget).

    Returns:
        A :class:`Mode`.
    """
    S, N, C = offset.shape
    if chunk is None:
        chunk = max(1, _CHUNK_BYTES // (8 * (C + 1) * N * N))
    parts = [
        _find_mode_chunk(K, offset[i : i + chunk], Y, tol, max_iter) for i in range(0, S, chunk)
    ]
    return Mode(
        g=torch.cat([p.g for p in parts]),
        a=torch.cat([p.a for p in parts]),
        iterations=max(p.iterations for p in parts),
        residual=max(p.residual for p in parts),
    )


@dataclass
class Factors:
    """``E_c`` ``(S, C, N, N)`` and the Cholesky factor of ``Σ_c E_c`` ``(S, N, N)``."""

    E: Tensor
    L_sum: Tensor


def factors(K: Tensor, p: Tensor) -> Factors:
    """The matrices ``E_c`` of Algorithm 3.3 at probabilities ``p (S, N, C)``."""
    N = K.shape[0]
    d = p.clamp_min(0).sqrt().transpose(1, 2)  # (S, C, N): D_c^{1/2}
    eye = torch.eye(N, dtype=K.dtype, device=K.device)
    B = eye + d[..., :, None] * K * d[..., None, :]  # (S, C, N, N)
    L = torch.linalg.cholesky(B)
    X = torch.linalg.solve_triangular(L, torch.diag_embed(d), upper=False)  # L⁻¹ D^{1/2}
    E = X.transpose(-1, -2) @ X  # (S, C, N, N)
    L_sum = torch.linalg.cholesky(E.sum(1))  # (S, N, N), PD: Σ_c p_ic = 1
    return Factors(E=E, L_sum=L_sum)


def newton_direction(K: Tensor, g: Tensor, p: Tensor, Y: Tensor, fac: Factors) -> Tensor:
    """``a_new`` of Algorithm 3.3 (the next iterate is ``g = K a_new``)."""
    b = p * g - p * (p * g).sum(-1, keepdim=True) + Y - p  # W g + Y − p, (S, N, C)
    Kb = torch.einsum("nm,smc->snc", K, b)
    EKb = torch.einsum("scnm,smc->snc", fac.E, Kb)
    v = torch.cholesky_solve(EKb.sum(-1, keepdim=True), fac.L_sum)  # (S, N, 1)
    ERv = torch.einsum("scnm,sm->snc", fac.E, v.squeeze(-1))
    return b - EKb + ERv


def flow(
    G: Tensor,
    f0: Tensor,
    Y: Tensor,
    *,
    lr: float,
    steps: int,
    lam: float,
    G_test: Optional[Tensor] = None,
    f0_test: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """``steps`` of ``f ← f − η [G (p(f) − Y) + λ (f − f0)]`` for every draw.

    Args:
        G: ``(N, N)`` kernel seen by the gradient.
        f0: ``(S, N, C)`` initial logits.
        Y: ``(N, C)`` targets.
        lr: ``η``.
        steps: number of steps.
        lam: ``λ ≥ 0``.
        G_test: ``(M, N)`` to move test logits along.
        f0_test: ``(S, M, C)`` initial test logits.

    Returns:
        Final ``(S, N, C)`` train and ``(S, M, C)`` test logits (or ``None``).
    """
    f, h = f0.clone(), None if f0_test is None else f0_test.clone()
    for _ in range(steps):
        error = torch.softmax(f, dim=-1) - Y  # (S, N, C)
        if h is not None:
            assert f0_test is not None  # h is its copy
            h = h - lr * (torch.einsum("mn,snc->smc", G_test, error) + lam * (h - f0_test))
        f = f - lr * (torch.einsum("nm,smc->snc", G, error) + lam * (f - f0))
    return f, h


# ---------------------------------------------------------------------- helpers


def _find_mode_chunk(K: Tensor, c: Tensor, Y: Tensor, tol: float, max_iter: int) -> Mode:
    g = torch.zeros_like(c)
    a = torch.zeros_like(c)
    psi = _objective(a, g, c, Y)
    iterations = 0
    for iterations in range(max_iter + 1):
        p = torch.softmax(c + g, dim=-1)
        residual = (g - torch.einsum("nm,smc->snc", K, Y - p)).abs().amax(dim=(1, 2))
        if bool((residual <= tol).all()) or iterations == max_iter:
            break
        a_new = newton_direction(K, g, p, Y, factors(K, p))
        g_new = torch.einsum("nm,smc->snc", K, a_new)
        g, a, psi = _line_search(g, a, g_new - g, a_new - a, psi, c, Y)
    return Mode(
        g=g,
        a=Y - torch.softmax(c + g, dim=-1),
        iterations=iterations,
        residual=float(residual.max()),
    )


def _objective(a: Tensor, g: Tensor, c: Tensor, Y: Tensor) -> Tensor:
    """``Ψ = −½ aᵀ g + Σ Y · log p(c + g)`` per problem, ``(S,)``."""
    return -0.5 * (a * g).sum((1, 2)) + (Y * torch.log_softmax(c + g, dim=-1)).sum((1, 2))


def _line_search(
    g: Tensor, a: Tensor, dg: Tensor, da: Tensor, psi: Tensor, c: Tensor, Y: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Halve each problem's step until ``Ψ`` does not decrease (at most 30 halvings)."""
    t = torch.ones_like(psi)
    pending = torch.ones_like(psi, dtype=torch.bool)
    new_g, new_a, new_psi = g, a, psi
    for _ in range(31):
        cand_g = g + t[:, None, None] * dg
        cand_a = a + t[:, None, None] * da
        cand_psi = _objective(cand_a, cand_g, c, Y)
        accept = pending & (cand_psi >= psi - 1e-12 * psi.abs().clamp_min(1.0))
        new_g = torch.where(accept[:, None, None], cand_g, new_g)
        new_a = torch.where(accept[:, None, None], cand_a, new_a)
        new_psi = torch.where(accept, cand_psi, new_psi)
        pending = pending & ~accept
        if not bool(pending.any()):
            break
        t = torch.where(pending, t / 2, t)
    return new_g, new_a, new_psi
