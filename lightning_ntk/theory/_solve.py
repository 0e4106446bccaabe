"""Numerics behind :func:`lightning_ntk.kernel_solution` and :func:`lightning_ntk.kernel_flow`.

Everything is float64 on flattened, sample-major logits ``f ∈ R^{N·C}``
(``f[(i, a)] = f_a(x_i)``) with the kernel in matrix form ``M (N·C, N·C)``.
``G = M / N`` (mean-reduced loss) or ``G = M`` (summed loss) is the kernel the gradient
sees, ``p(f)`` the row-wise softmax and ``D(f)`` its block-diagonal Jacobian
``D_i = diag(p_i) − p_i p_iᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def kernel_as_matrix(K: Tensor, num_classes: int) -> Tensor:
    """Matrix form ``(N1·C, N2·C)`` in float64 of a kernel in any layout.

    ``"full"`` ``(N1, N2, C, C)`` is reshaped sample-major; ``"diagonal"`` ``(N1, N2, C)``
    is ``Θ[i, j, a, a] δ_ab``; ``"trace"`` ``(N1, N2)`` is ``K ⊗ I_C`` (the infinite-width
    structure, every class seeing the same scalar kernel).
    """
    K = K.double()
    C = num_classes
    if K.ndim == 2:
        K = K[:, :, None, None] * torch.eye(C, dtype=K.dtype, device=K.device)
    elif K.ndim == 3:
        K = torch.diag_embed(K)
    N1, N2 = K.shape[:2]
    return K.permute(0, 2, 1, 3).reshape(N1 * C, N2 * C)


def softmax_rows(f: Tensor, C: int) -> Tensor:
    """Row-wise softmax of flattened logits ``(N·C,)`` → ``(N·C,)``."""
    return torch.softmax(f.view(-1, C), dim=1).reshape(-1)


def times_softmax_jacobian(A: Tensor, f: Tensor, C: int) -> Tensor:
    """``A D(f)`` for ``A (R, N·C)`` without forming the block-diagonal ``D``."""
    p = torch.softmax(f.view(-1, C), dim=1)  # (N, C)
    D = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C)
    R = A.shape[0]
    AD = torch.einsum("rnc,ncd->rnd", A.view(R, -1, C), D)
    return AD.reshape(R, -1)


@dataclass
class NewtonResult:
    """Outcome of :func:`solve_regularized`."""

    f: Tensor
    iterations: int
    converged: bool
    residual: float


def solve_regularized(
    G: Tensor, c: Tensor, y: Tensor, lam: float, C: int, *, tol: float, max_iter: int
) -> NewtonResult:
    """Damped Newton for ``F(f) = f − c + G (p(f) − y) / λ = 0``.

    ``F`` is the gradient, multiplied by ``G``, of the strongly convex
    ``L(f) + (λ/2)(f − c)ᵀ G⁻¹ (f − c)``; its Jacobian ``I + G D(f) / λ`` has
    eigenvalues with real part ``≥ 1`` (``G D`` is a product of PSD matrices), so each
    Newton step is well defined. Steps are halved until ``‖F‖_∞`` decreases
    sufficiently (Armijo on the residual norm). Converged when ``max |F| ≤ tol`` or when
    a full Newton step moves ``f`` by at most ``tol · (1 + max |f|)`` (for small ``λ`` the
    residual's round-off floor, ``~ eps ‖G‖ / λ``, can exceed ``tol``).

    Args:
        G: ``(N·C, N·C)`` kernel seen by the gradient.
        c: ``(N·C,)`` the fixed point's offset, ``f_0 − s``.
        y: ``(N·C,)`` targets.
        lam: ``λ > 0``.
        C: number of classes.
        tol: tolerance on the residual and on the relative Newton step.
        max_iter: Newton iterations at most.
    """
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)

    def residual_of(f: Tensor) -> Tensor:
        return f - c + G @ (softmax_rows(f, C) - y) / lam

    f = c.clone()
    F = residual_of(f)
    norm = float(F.norm())
    for iteration in range(1, max_iter + 1):
        if float(F.abs().max()) <= tol:
            return NewtonResult(f, iteration - 1, True, float(F.abs().max()))
        jacobian = eye + times_softmax_jacobian(G, f, C) / lam
        step = torch.linalg.solve(jacobian, -F)
        if float(step.abs().max()) <= tol * (1 + float(f.abs().max())):
            # Newton's step bounds the distance to the root: f is accurate to round-off
            f = f + step
            F = residual_of(f)
            return NewtonResult(f, iteration, True, float(F.abs().max()))
        t = 1.0
        while True:
            f_new = f + t * step
            F_new = residual_of(f_new)
            norm_new = float(F_new.norm())
            if norm_new <= (1 - 1e-4 * t) * norm or t < 1e-10:
                break
            t *= 0.5
        if t < 1e-10:  # no decrease along the Newton direction: stuck
            return NewtonResult(f, iteration, False, float(F.abs().max()))
        f, F, norm = f_new, F_new, norm_new
    converged = float(F.abs().max()) <= tol
    return NewtonResult(f, max_iter, converged, float(F.abs().max()))


def solve_interpolating(M: Tensor, f0: Tensor, y: Tensor, C: int) -> tuple[Tensor, Tensor, float]:
    """``f = f_0 + M α`` with ``softmax(f) = y`` row-wise, ``α`` summing to 0 in each row.

    ``softmax(f_i) = y_i`` means ``f_i = log y_i + κ_i 1``. Gradient descent keeps
    ``f − f_0 = M α`` with every ``α_i ⊥ 1`` (the loss gradient ``p − y`` sums to 0 per
    row), so with ``Q`` an orthonormal basis of ``{α_i ⊥ 1}`` and ``E`` the per-row
    constants, ``[M Q, E] [β; κ] = log y − f_0`` is one square linear system
    (least squares, minimum norm, if singular).

    Returns:
        ``(f, α, residual)`` with ``residual = max |softmax(f) − y|``.
    """
    N = f0.numel() // C
    # orthonormal basis of {v ∈ R^C : Σ v = 0}: the last C − 1 columns of Q from QR of [1, I]
    ones = torch.ones(C, 1, dtype=M.dtype, device=M.device)
    eye_c = torch.eye(C, dtype=M.dtype, device=M.device)
    basis = torch.linalg.qr(torch.cat([ones, eye_c], dim=1)).Q[:, 1:C].contiguous()  # (C, C − 1)
    Q = torch.kron(torch.eye(N, dtype=M.dtype, device=M.device), basis)  # (N·C, N·(C − 1))
    E = torch.kron(torch.eye(N, dtype=M.dtype, device=M.device), ones)  # (N·C, N)
    system = torch.cat([M @ Q, E], dim=1)  # (N·C, N·C)
    rhs = (y.log() - f0).unsqueeze(1)
    driver = "gelsd" if M.device.type == "cpu" else None  # CUDA offers "gels" only
    solution = torch.linalg.lstsq(system, rhs, driver=driver).solution.squeeze(1)
    alpha = Q @ solution[: N * (C - 1)]
    f = f0 + M @ alpha
    residual = float((softmax_rows(f, C) - y).abs().max())
    return f, alpha, residual


def flow(
    G: Tensor,
    f0: Tensor,
    y: Tensor,
    C: int,
    *,
    lr: float,
    steps: int,
    lam: float,
    shift: Tensor,
    G_test: Optional[Tensor] = None,
    f0_test: Optional[Tensor] = None,
    shift_test: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Iterate ``f ← f − η [G (p(f) − y) + λ (f − f_0 + s)]`` (and the test rows along).

    Returns:
        ``(steps + 1, N·C)`` train trajectory and ``(steps + 1, M·C)`` test trajectory
        (or ``None``).
    """
    train = f0.new_empty(steps + 1, f0.numel())
    train[0] = f0
    test = None
    if G_test is not None:
        assert f0_test is not None and shift_test is not None  # given with G_test
        test = f0.new_empty(steps + 1, f0_test.numel())
        test[0] = f0_test
    f, g = f0, f0_test
    for k in range(steps):
        error = softmax_rows(f, C) - y
        f_next = f - lr * (G @ error + lam * (f - f0 + shift))
        if test is not None:
            assert G_test is not None and g is not None and f0_test is not None
            assert shift_test is not None
            g = g - lr * (G_test @ error + lam * (g - f0_test + shift_test))
            test[k + 1] = g
        f = f_next
        train[k + 1] = f
    return train, test
