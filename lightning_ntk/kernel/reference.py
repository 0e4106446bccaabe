"""Slow, dense, float64 reference for the empirical NTK.

It materialises the whole Jacobian ``J (N, C, P)`` in float64, one reverse-mode gradient
per example and class (a plain loop of ``torch.autograd.grad``: no ``vmap``, no
forward-mode AD, so it runs on every model that can be trained), and contracts it with
one ``einsum``. It is exact and simple by design, and it is what every fast method in
:mod:`lightning_ntk.kernel` is tested against. Memory is ``O(N·C·P)``: use it on small
models and probe sets only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._functional import FunctionalModel, OutputFn, ParamSelector, check_inputs, exact_matmuls
from ._layout import check_output
from ._optimizer import OptimizerKernel, check_kernel, kernel_spec, row_signs
from .loop import loop_jacobians


def reference_ntk(
    model: nn.Module,
    x1: Any,
    x2: Optional[Any] = None,
    *,
    output: str = "full",
    params: ParamSelector = None,
    output_fn: OutputFn = None,
    kernel: str = "sgd",
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Tensor:
    """Empirical NTK ``Θ(X1, X2) = J(X1) J(X2)ᵀ`` computed densely in float64.

    Optimizer kernels from the same dense Jacobians, by their definitions:
    ``"signgd"`` ``sign(J1) sign(J2)ᵀ``, ``"asymmetric_signgd"`` ``J1 sign(J2)ᵀ``,
    ``"adam"`` ``J1 diag(d) J2ᵀ`` with ``d = 1/(√v̂+ε)`` read from ``optimizer``.

    Args:
        model: the network; evaluated functionally in eval mode, never mutated.
        x1: inputs ``(N1, ...)``: a tensor, or a mapping / tuple of tensors sharing the
            batch dimension.
        x2: inputs ``(N2, ...)`` of the same structure; ``None`` means ``x1``.
        output: ``"full" (N1, N2, C, C)``, ``"diagonal" (N1, N2, C)`` or
            ``"trace" (N1, N2)`` (mean over classes).
        params: parameter selection, as in :func:`lightning_ntk.empirical_ntk`.
        output_fn: maps the model's raw output to ``(N, C)`` logits.
        kernel: ``"sgd"``, ``"signgd"``, ``"asymmetric_signgd"`` or ``"adam"``.
        optimizer: the Adam / AdamW whose state ``kernel="adam"`` reads.

    Returns:
        The kernel in float64, in the requested layout.
    """
    check_output(output)
    check_inputs(x1, x2)
    kind = check_kernel(kernel)
    fm = FunctionalModel(model, params=params, output_fn=output_fn, dtype=torch.float64)
    spec = kernel_spec(kind, optimizer, fm.module, fm.names, torch.float64, fm.device)
    x1 = fm.cast_input(x1)
    x2 = x1 if x2 is None else fm.cast_input(x2)
    with exact_matmuls(fm.device):
        fm.checked_logits(x1, "x1")
        fm.checked_logits(x2, "x2")

        def flat_jacobian(x: Any) -> Tensor:
            jac = loop_jacobians(fm, x, fm.names)  # {name: (N, C, P_l)}
            return torch.cat(list(jac.values()), dim=2)  # (N, C, P)

        J1 = flat_jacobian(x1)  # (N1, C, P)
        J2 = flat_jacobian(x2)  # (N2, C, P)
    if kind in (OptimizerKernel.SIGNGD, OptimizerKernel.ASYMMETRIC_SIGNGD):
        J2 = row_signs({"": J2}, sample_dims=2)[""]  # sign, round-off counted as zero
    if kind is OptimizerKernel.SIGNGD:
        J1 = row_signs({"": J1}, sample_dims=2)[""]
    if kind is OptimizerKernel.ADAM:
        assert spec.scale is not None
        J1 = J1 * torch.cat([spec.scale[name] for name in fm.names])  # J1 diag(d)
    K = torch.einsum("iap,jbp->ijab", J1, J2)  # (N1, N2, C, C)
    if output == "full":
        return K
    diag = torch.diagonal(K, dim1=2, dim2=3)  # (N1, N2, C)
    return diag if output == "diagonal" else diag.mean(dim=-1)
