"""The kernels of the optimizers: SGD, SignGD, asymmetric SignGD and Adam.

With ``J(x) ∈ R^{C×P}`` the Jacobian of the logits and ``sign`` taken entrywise (per
example ``x`` and logit ``a``, of the row ``J_a(x) ∈ R^P``; ``sign(0) = 0``, and an entry
within round-off of zero counts as zero, see :func:`row_signs`):

=======================  ==========================================  =====================
``kernel``               ``Θ(x1, x2)``                               symmetric
=======================  ==========================================  =====================
``"sgd"``                ``J(x1) J(x2)ᵀ``                            yes
``"signgd"``             ``sign(J(x1)) sign(J(x2))ᵀ``                yes
``"asymmetric_signgd"``  ``J(x1) sign(J(x2))ᵀ``                      no
``"adam"``               ``J(x1) diag(d) J(x2)ᵀ``,                   yes
                         ``d = 1 / (√v̂ + ε)``
=======================  ==========================================  =====================

The Adam kernel reads ``v̂ = exp_avg_sq / (1 − β2^step)`` (``max_exp_avg_sq`` with
``amsgrad``) and ``ε`` from a ``torch.optim.Adam`` / ``AdamW`` state: it is the kernel of
gradient descent preconditioned by Adam's current ``diag(d)``, i.e. the ordinary NTK of
the reparameterisation ``θ = θ0 + diag(d)^{1/2} φ``; the Jacobian methods scale ``J`` by
``√d`` on both sides, NTK-vector products scale the tangent by ``d``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._methods import NTKMethod
from ._sharded import full

__all__ = ["KernelSpec", "OptimizerKernel", "kernel_spec", "preconditioner"]


class OptimizerKernel(str, Enum):
    """Which optimizer's kernel :func:`~lightning_ntk.empirical_ntk` computes."""

    SGD = "sgd"
    """``J(x1) J(x2)ᵀ``: the kernel of (stochastic) gradient descent, the NTK."""

    SIGNGD = "signgd"
    """``sign(J(x1)) sign(J(x2))ᵀ``: symmetric, sign of every Jacobian entry."""

    ASYMMETRIC_SIGNGD = "asymmetric_signgd"
    """``J(x1) sign(J(x2))ᵀ`` (Malladi et al. 2023): the first-order effect on ``f(x1)``
    of a SignGD step on a gradient at ``x2``; Adam's early phase."""

    ADAM = "adam"
    """``J(x1) diag(1/(√v̂+ε)) J(x2)ᵀ`` with Adam's current second-moment estimate."""


# The methods that compute each kernel exactly. Structured factorisations contract
# ``J Jᵀ`` without ever forming a Jacobian entry, so they cannot take its sign or an
# entrywise preconditioner; NTK-vector products push a sign or a scaling through the
# tangent of ``x2`` only, so ``"signgd"`` (a sign on both sides) needs Jacobians.
_SUPPORTED = {
    OptimizerKernel.SGD: frozenset(NTKMethod) - {NTKMethod.AUTO},
    OptimizerKernel.SIGNGD: frozenset({NTKMethod.JACOBIAN, NTKMethod.LOOP}),
    OptimizerKernel.ASYMMETRIC_SIGNGD: frozenset(
        {NTKMethod.JACOBIAN, NTKMethod.NTK_VP, NTKMethod.LOOP}
    ),
    OptimizerKernel.ADAM: frozenset({NTKMethod.JACOBIAN, NTKMethod.NTK_VP, NTKMethod.LOOP}),
}


@dataclass(frozen=True)
class KernelSpec:
    """The kernel one call computes, and what each method needs to compute it.

    Attributes:
        kind: the optimizer's kernel.
        scale: for ``"adam"``, the preconditioner ``d = 1/(√v̂+ε)`` per selected parameter,
            flattened ``{name: (P_l,)}`` in the compute dtype; ``None`` otherwise.
    """

    kind: OptimizerKernel = OptimizerKernel.SGD
    scale: Optional[Mapping[str, Tensor]] = None

    @property
    def symmetric(self) -> bool:
        """Whether ``Θ(x2, x1) = Θ(x1, x2)ᵀ`` (all kernels but the asymmetric one)."""
        return self.kind is not OptimizerKernel.ASYMMETRIC_SIGNGD

    def supports(self, method: NTKMethod) -> bool:
        """Whether ``method`` computes this kernel exactly."""
        return method in _SUPPORTED[self.kind]

    def sides(self, J: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The factors ``L, R`` of ``Θ = L(x1) R(x2)ᵀ`` from Jacobians ``{name: (N, C, P_l)}``.

        ``sgd``: ``(J, J)``; ``signgd``: ``(sign J, sign J)``; ``asymmetric_signgd``:
        ``(J, sign J)``; ``adam``: ``(J √d, J √d)``. Symmetric kernels return one dict
        twice (the same object), so contractions can reuse it.
        """
        kind = self.kind
        if kind is OptimizerKernel.SGD:
            return J, J
        if kind is OptimizerKernel.SIGNGD:
            signs = row_signs(J, sample_dims=2)
            return signs, signs
        if kind is OptimizerKernel.ASYMMETRIC_SIGNGD:
            return J, row_signs(J, sample_dims=2)
        assert self.scale is not None
        scaled = {name: j * self.scale[name].sqrt() for name, j in J.items()}  # (N, C, P_l)
        return scaled, scaled

    def tangents(self, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map the rows ``J(x2)[b]`` (``{name: (k, *shape)}``) to what ``J(x1)`` is applied to.

        ``sgd``: unchanged; ``asymmetric_signgd``: ``sign``; ``adam``: times ``d``.
        """
        kind = self.kind
        if kind is OptimizerKernel.SGD:
            return tangents
        if kind is OptimizerKernel.ASYMMETRIC_SIGNGD:
            return row_signs(tangents, sample_dims=1)
        if kind is OptimizerKernel.ADAM:
            assert self.scale is not None
            return {name: t * self.scale[name].reshape(t.shape[1:]) for name, t in tangents.items()}
        raise NotImplementedError(f"kernel={kind.value!r} has no NTK-vector product form.")


# An entry ``|J_a,p(x)| ≤ ROUND_OFF · eps · max_p |J_a,p(x)|`` counts as zero in a sign
# kernel: entries that are zero in exact arithmetic (e.g. the gradient of an attention
# key bias, which softmax removes) come out of autodiff as round-off, up to about
# ``eps · max`` in float32 and far below in float64, with a sign that depends on the
# route; genuine entries this small do not survive the float32 computation either.
ROUND_OFF = 8


def row_signs(J: Mapping[str, Tensor], sample_dims: int) -> dict[str, Tensor]:
    """``sign`` of each Jacobian row's entries, with round-off counted as zero.

    A row is ``J_a(x) ∈ R^P`` over all parameters of ``J`` together; an entry counts as
    zero when ``|J_a,p(x)| ≤ 8 · eps · max_p |J_a,p(x)|`` (``eps`` of the dtype).

    Args:
        J: ``{name: (*rows, *shape_l)}`` with ``sample_dims`` leading row dimensions, e.g.
            Jacobians ``(N, C, P_l)`` (``sample_dims=2``) or tangents ``(k, *shape_l)``
            (``sample_dims=1``).
        sample_dims: the number of leading dimensions that index rows.

    Returns:
        ``{name: sign}`` of ``J``'s shapes, entries in ``{-1, 0, 1}``.
    """
    tensors = list(J.values())
    rows = tensors[0].shape[:sample_dims]
    scale = torch.stack([t.reshape(*rows, -1).abs().amax(-1) for t in tensors]).amax(0)
    threshold = ROUND_OFF * torch.finfo(tensors[0].dtype).eps * scale  # (*rows)
    out = {}
    for name, t in J.items():
        bound = threshold.reshape(*rows, *([1] * (t.dim() - sample_dims)))
        out[name] = torch.where(t.abs() > bound, torch.sign(t), torch.zeros_like(t))
    return out


def check_kernel(kernel: Union[str, OptimizerKernel]) -> OptimizerKernel:
    """Validate the ``kernel`` argument."""
    try:
        return OptimizerKernel(kernel)
    except ValueError:
        choices = tuple(k.value for k in OptimizerKernel)
        raise ValueError(f"Expected `kernel` to be one of {choices} but got {kernel!r}.") from None


def kernel_spec(
    kernel: Union[str, OptimizerKernel],
    optimizer: Any,
    module: torch.nn.Module,
    names: list[str],
    dtype: torch.dtype,
    device: torch.device,
) -> KernelSpec:
    """The :class:`KernelSpec` of a call, the optimizer's state read and checked.

    Args:
        kernel: the ``kernel`` argument (already validated by :func:`check_kernel`).
        optimizer: the ``optimizer`` argument: a ``torch.optim.Adam`` / ``AdamW`` for
            ``kernel="adam"``, ``None`` otherwise.
        module: the (unwrapped) model whose parameters ``names`` refers to.
        names: the selected parameter names.
        dtype: the compute dtype.
        device: the model's device.

    Raises:
        ValueError: ``optimizer`` missing for ``"adam"`` or given for another kernel; see
            :func:`preconditioner` for the optimizer's own errors.
        TypeError: see :func:`preconditioner`.
    """
    kind = check_kernel(kernel)
    if kind is not OptimizerKernel.ADAM:
        if optimizer is not None:
            raise ValueError(
                f"`optimizer` is read only by kernel='adam' but kernel={kind.value!r} was "
                "asked for; pass optimizer=None."
            )
        return KernelSpec(kind)
    if optimizer is None:
        raise ValueError(
            "kernel='adam' needs the Adam optimizer whose state it reads: pass "
            "optimizer=<your torch.optim.Adam or AdamW>."
        )
    d = preconditioner(optimizer, module, names)
    return KernelSpec(kind, {n: t.to(device=device, dtype=dtype).reshape(-1) for n, t in d.items()})


def preconditioner(optimizer: Any, module: torch.nn.Module, names: list[str]) -> dict[str, Tensor]:
    """Adam's current diagonal preconditioner ``d = 1/(√v̂ + ε)`` per selected parameter.

    ``√v̂ = √(exp_avg_sq) / √(1 − β2^step)`` as in ``torch.optim.Adam``'s step
    (``max_exp_avg_sq`` with ``amsgrad=True``); shapes are those of the parameters. The
    optimizer's parameters are matched to ``module``'s by identity.

    Args:
        optimizer: a ``torch.optim.Adam`` or ``AdamW`` that has taken at least one step.
        module: the model.
        names: the selected parameter names of ``module``.

    Returns:
        ``{name: d}`` in float64, each of its parameter's shape, on the state's device.

    Raises:
        TypeError: ``optimizer`` is not an Adam / AdamW.
        ValueError: a selected parameter is not in the optimizer, or has no state yet
            (before the optimizer's first step).
    """
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
        raise TypeError(
            "Expected `optimizer` to be a torch.optim.Adam or AdamW (kernel='adam' reads "
            f"its exp_avg_sq) but got {type(optimizer).__name__}."
        )
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    parameters = dict(module.named_parameters())
    d = {}
    for name in names:
        p = parameters[name]
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(
                f"Parameter {name!r} is not among the parameters of `optimizer`: pass the "
                "optimizer that trains this model, or restrict `params` to the parameters "
                "it holds."
            )
        state = optimizer.state.get(p, {})
        second = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        if second not in state or "step" not in state:
            raise ValueError(
                f"`optimizer` has no state for parameter {name!r} yet: Adam creates "
                f"{second} at its first step() with a gradient for it; compute "
                "kernel='adam' after that step."
            )
        step = float(state["step"])
        beta2 = float(group["betas"][1])
        bias_correction2 = 1.0 - beta2**step
        if not bias_correction2 > 0.0:
            raise ValueError(
                f"`optimizer` state of parameter {name!r} has step={step:g} and "
                f"beta2={beta2:g}: the bias correction 1 - beta2**step is not positive."
            )
        # (a sharded parameter's state is sharded too: all-gathered whole)
        v_hat_sqrt = full(state[second].detach()).double().sqrt() / bias_correction2**0.5
        d[name] = 1.0 / (v_hat_sqrt + float(group["eps"]))
    return d
