"""Kernel layouts and the contractions that produce them.

A Jacobian block ``J`` has shape ``(N, C, P)``: ``J[i, a, p] = ∂f_a(x_i)/∂θ_p``.

====================  =====================  ===========================================
``output``            shape                  entry
====================  =====================  ===========================================
``"full"``            ``(N1, N2, C, C)``     ``Θ(x_i, x_j)[a, b] = Σ_p J1[i,a,p] J2[j,b,p]``
``"diagonal"``        ``(N1, N2, C)``        ``Θ(x_i, x_j)[a, a]``
``"trace"``           ``(N1, N2)``           ``(1/C) Σ_a Θ(x_i, x_j)[a, a]``
====================  =====================  ===========================================
"""

from __future__ import annotations

from torch import Tensor

OUTPUTS = ("full", "diagonal", "trace")


def check_output(output: str) -> str:
    """Validate the ``output`` layout name."""
    if output not in OUTPUTS:
        raise ValueError(f"Expected `output` to be one of {OUTPUTS} but got {output!r}.")
    return output


def contract_jacobians(J1: Tensor, J2: Tensor, output: str) -> Tensor:
    """Kernel block from Jacobian blocks ``J1 (N1, C, P)`` and ``J2 (N2, C, P)``."""
    N1, C, P = J1.shape
    N2 = J2.shape[0]
    if output == "full":
        K = J1.reshape(N1 * C, P) @ J2.reshape(N2 * C, P).T  # (N1·C, N2·C)
        return K.reshape(N1, C, N2, C).permute(0, 2, 1, 3)
    K = J1.transpose(0, 1) @ J2.permute(1, 2, 0)  # (C, N1, N2)
    return from_class_diagonal(K, output)


def from_class_diagonal(K: Tensor, output: str) -> Tensor:
    """``(C, N1, N2)`` per-class kernels to the ``"diagonal"`` or ``"trace"`` layout."""
    if output == "diagonal":
        return K.permute(1, 2, 0)
    return K.mean(dim=0)


def reduce_full(K: Tensor, output: str) -> Tensor:
    """A ``"full"`` kernel ``(N1, N2, C, C)`` in the requested layout."""
    if output == "full":
        return K
    diag = K.diagonal(dim1=2, dim2=3)  # (N1, N2, C)
    return diag if output == "diagonal" else diag.mean(dim=-1)


def transpose_kernel(K: Tensor, output: str) -> Tensor:
    """``Θ(X2, X1)`` from ``Θ(X1, X2)``: swap the samples (and, if full, the classes)."""
    if output == "full":
        return K.permute(1, 0, 3, 2)
    return K.transpose(0, 1)


def symmetrize(K: Tensor, output: str) -> Tensor:
    """Exactly symmetric ``(K + Kᵀ) / 2`` for a kernel of a batch with itself."""
    return 0.5 * (K + transpose_kernel(K, output))
