"""Which kernel the monitor measures: the ``kernel`` setting, resolved and described.

``kernel="sgd"`` (default) is the NTK ``J Jᵀ``; ``"signgd"``, ``"asymmetric_signgd"`` and
``"adam"`` are the engine's kernels of other optimizers
(:mod:`lightning_ntk.kernel._optimizer`); ``"optimizer"`` picks the one of the optimizer
training uses:

==========================================  ========================  =====================
optimizer                                   kernel                    why
==========================================  ========================  =====================
``torch.optim.SGD``                         ``"sgd"``                 gradient descent
``torch.optim.Adam`` / ``AdamW``            ``"adam"``                preconditioned GD
a class named ``SignSGD``, ``Signum``,      ``"asymmetric_signgd"``   a step along the sign
``Lion``                                                              of a gradient
any other, or none                          ``"sgd"``                 stated in the report
==========================================  ========================  =====================

A sign optimizer's step on a gradient at ``x2`` moves the logits at ``x1`` by
``J(x1) sign(J(x2))ᵀ``: the asymmetric SignGD kernel, not the symmetric overlap of sign
patterns ``"signgd"``. Optimizers whose step is not one of these kernels (Adagrad,
RMSprop, NAdam, RAdam, Adamax, ...) are measured with the SGD kernel, and each report's
``kernel`` says so.

**Adam's preconditioner is frozen.** ``d = 1/(√v̂ + ε)`` exists only after the optimizer's
first step and changes at every step. The monitor reads it once — at ``NTKTracker.start`` when
the optimizer already has state for every selected parameter, else at the first report
at which it has — and keeps it: ``Θ0 = J(θ0) diag(d) J(θ0)ᵀ`` (at ``θ0``, computed when
``d`` is read) and every ``Θ_t = J(θ_t) diag(d) J(θ_t)ᵀ``. The drift then measures what
laziness is about, the Jacobian's motion, in Adam's geometry; with a preconditioner read
anew at every report, a network whose Jacobian does not move at all would show the
drift of Adam's second-moment average (large over its first ``~1/(1 − β2)`` steps).
Reports before ``d`` is read have no kernel values (``nan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..kernel._functional import FunctionalModel
from ..kernel._optimizer import KernelSpec, OptimizerKernel, preconditioner

__all__ = ["MeasuredKernel", "frozen_preconditioner", "kernel_spec_of", "resolve_kernel"]

# optimizers stepping along the sign of a (momentum-averaged) gradient, by class name
SIGN_OPTIMIZERS = frozenset({"SignSGD", "Signum", "Lion"})


@dataclass(frozen=True)
class MeasuredKernel:
    """The kernel a tracker measures, and how it was chosen.

    Attributes:
        kind: the engine's kernel (``"sgd"``, ``"signgd"``, ``"asymmetric_signgd"``,
            ``"adam"``).
        source: how: ``"set"`` (the setting named it) or, for ``kernel="optimizer"``,
            what was read from the optimizer.
    """

    kind: str
    source: str

    def describe(self, preconditioner_step: Optional[int] = None) -> str:
        """One line for the report: the kernel, why, and Adam's frozen preconditioner."""
        text = f"{self.kind} ({self.source})"
        if self.kind == OptimizerKernel.ADAM.value:
            if preconditioner_step is None:
                text += "; Adam's preconditioner not read yet (no optimizer state)"
            else:
                text += f"; Adam's preconditioner frozen at step {preconditioner_step}"
        return text


def resolve_kernel(setting: str, optimizer: Any) -> MeasuredKernel:
    """The kernel of the ``kernel`` setting for a tracker given ``optimizer``.

    Raises:
        ValueError: ``kernel="adam"`` without an optimizer.
        TypeError: ``kernel="adam"`` with an optimizer that is not an Adam / AdamW.
    """
    if setting != "optimizer":
        if setting == OptimizerKernel.ADAM.value:
            if optimizer is None:
                raise ValueError(
                    "kernel='adam' reads the preconditioner from the Adam optimizer's state: "
                    "pass optimizer=<your torch.optim.Adam or AdamW> to the tracker (the "
                    "callback reads the first optimizer of the Lightning module)."
                )
            if not isinstance(optimizer, torch.optim.Adam):
                raise TypeError(
                    "Expected the optimizer to be a torch.optim.Adam or AdamW for "
                    f"kernel='adam' but got {type(optimizer).__name__}; pass "
                    "kernel='optimizer' to measure the kernel of the optimizer in use."
                )
        return MeasuredKernel(setting, "set")
    if optimizer is None:
        return MeasuredKernel("sgd", "kernel='optimizer' without an optimizer: the SGD kernel")
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
        return MeasuredKernel("adam", f"the kernel of the optimizer, {name}")
    if isinstance(optimizer, torch.optim.SGD):
        return MeasuredKernel("sgd", f"the kernel of the optimizer, {name}")
    if name in SIGN_OPTIMIZERS:
        return MeasuredKernel(
            "asymmetric_signgd", f"the kernel of the optimizer, {name}, a sign optimizer"
        )
    return MeasuredKernel(
        "sgd",
        f"the optimizer {name} has no kernel of its own here (SGD, Adam / AdamW and sign "
        "optimizers have): the SGD kernel",
    )


def frozen_preconditioner(optimizer: Any, fm: FunctionalModel) -> Optional[dict[str, Tensor]]:
    """Adam's ``d = 1/(√v̂+ε)`` for ``fm``'s parameters, or ``None`` before it has state.

    Returns ``{name: d}`` flattened ``(P_l,)`` in float64 on the CPU (kept in the
    tracker's state and checkpoints).

    Raises:
        ValueError: a selected parameter that is not among the optimizer's.
    """
    parameters = dict(fm.module.named_parameters())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if all(id(parameters[name]) in held for name in fm.names) and any(
        not optimizer.state.get(parameters[name]) for name in fm.names
    ):
        return None  # before the first step (or a parameter without a gradient yet)
    d = preconditioner(optimizer, fm.module, fm.names)  # names a parameter it does not hold
    return {name: t.detach().double().reshape(-1).cpu() for name, t in d.items()}


def kernel_spec_of(kind: str, d: Optional[dict[str, Tensor]], fm: FunctionalModel) -> KernelSpec:
    """The engine's :class:`KernelSpec` of ``kind``, Adam's with the frozen ``d``."""
    scale = None
    if d is not None:
        scale = {n: t.to(device=fm.device, dtype=fm.dtype) for n, t in d.items()}
    return KernelSpec(OptimizerKernel(kind), scale)
