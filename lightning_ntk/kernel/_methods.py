"""The exact methods, how one kernel call reports the method it used, and auto's cost model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from ._functional import FunctionalModel
from ._plan import StructurePlan

__all__ = [
    "CHAIN",
    "JACOBIAN_BUDGET",
    "NTKCallInfo",
    "NTKMethod",
    "choose_method",
]


# Above this many numbers in one Jacobian block, "auto" prefers NTK-vector products.
JACOBIAN_BUDGET = 2**28


class NTKMethod(str, Enum):
    """How :func:`empirical_ntk` computes the kernel; every method is exact."""

    AUTO = "auto"
    """The cheapest exact method for the model and layout (see :func:`choose_method`)."""

    STRUCTURED = "structured"
    """Per-layer contractions ``(H Hᵀ) ⊙ (G Gᵀ)``; the default whenever a supported layer
    (Linear, Conv, Embedding, norm affine) holds trainable parameters."""

    JACOBIAN = "jacobian"
    """Materialised per-example Jacobians (``vmap``); any model with batching rules;
    memory ``O(N·C·P)`` per block."""

    NTK_VP = "ntk_vp"
    """NTK-vector products; models with batching and forward-mode rules; memory ``O(P)``
    per cotangent group, ``N2·C`` vjp / jvp pairs."""

    LOOP = "loop"
    """One reverse-mode gradient per example and class; any trainable model, slowest."""


# The fall-back chain, fastest first.
CHAIN = (NTKMethod.STRUCTURED, NTKMethod.JACOBIAN, NTKMethod.NTK_VP, NTKMethod.LOOP)


@dataclass(frozen=True)
class NTKCallInfo:
    """How one :func:`empirical_ntk` call computed its kernel.

    Attributes:
        requested: the ``method`` argument (``"auto"``, ``"structured"``, ...).
        method: the method that produced the kernel.
        choice: ``"requested"`` or ``"cost model"`` (auto: the cheapest estimate of its
            cost model, a deterministic function of the model's structure and the
            call's shapes; nothing is timed).
        fallbacks: ``"<method>: <error>"`` for every method that could not run, in order
            (and ``"<method>/<part>: <error>"`` for a part that used a slower route).
        estimates: auto's estimated seconds of each method it considered (see
            :func:`choose_method`); empty for an explicit method.
        per_example: parameters whose kernel came from per-example Jacobians rather than
            a structured factorisation (all of them unless ``method == "structured"``).
    """

    requested: str
    method: str
    choice: str
    fallbacks: tuple[str, ...] = ()
    estimates: Mapping[str, float] = field(default_factory=dict)
    per_example: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line: the method, how it was chosen and the fall-backs."""
        text = f"method={self.method} ({self.choice})"
        if self.fallbacks:
            text += "; fell back from " + "; ".join(self.fallbacks)
        return text


def choose_method(
    fm: FunctionalModel,
    plan: Optional[StructurePlan],
    num_classes: int,
    chunk: int,
    kernel: str = "sgd",
    *,
    x: Optional[Any] = None,
    output: str = "full",
) -> NTKMethod:
    """The cost model behind ``method="auto"``: the method of the cheapest estimate.

    Each method's cost is estimated from counts (:mod:`._cost`): the operations and
    FLOPs of one forward pass of one example, the structured plan's layer widths, ``N``,
    ``C``, ``P`` and the layout. On small models the fixed cost per operation dominates
    and materialised Jacobians usually win; as ``N·C·P`` grows their ``N²·C²·P``
    contraction makes the structured method (where ``plan`` has structured layers) the
    cheapest; NTK-vector products win where a forward pass is cheap relative to
    ``C·P``. Nothing is timed, so the choice is the same in every process for the same
    model and shapes; ``"auto"`` tries the other methods in the order of their
    estimates when the chosen one cannot run.

    For optimizer kernels other than ``"sgd"`` structured methods do not apply;
    ``"signgd"`` needs the sign of both Jacobians, so always ``"jacobian"`` (bound its
    memory with ``chunk_size``). Jacobians are not considered when one block
    (``chunk·C·P`` numbers) exceeds the budget.

    Args:
        fm: the functional model.
        plan: its structured plan, or ``None``.
        num_classes: ``C``.
        chunk: examples per block (and ``N1 = N2`` when ``x`` is not given).
        kernel: the optimizer kernel.
        x: the probe inputs (one example is run to count the forward pass); ``None``
            estimates from the parameter count alone.
        output: the layout.
    """
    from ._cost import ForwardProfile, estimate_seconds, forward_profile

    if kernel == "signgd":
        return NTKMethod.JACOBIAN
    n = chunk
    if x is None:
        profile = ForwardProfile((len(fm.names), 2 * fm.num_params))
    else:
        from . import _inputs
        from ._plan import fingerprint

        n = _inputs.batch_size(x)
        profile = forward_profile(fm, _inputs.take(x, slice(0, 1)), (fingerprint(fm, x),))
    methods = [NTKMethod.NTK_VP]
    if chunk * num_classes * fm.num_params <= JACOBIAN_BUDGET:
        methods.append(NTKMethod.JACOBIAN)
    if kernel == "sgd" and plan is not None and plan.structured_names:
        methods.append(NTKMethod.STRUCTURED)
    estimates = {
        m: estimate_seconds(m.value, fm, profile, plan, n, n, num_classes, output, True)
        for m in methods
    }
    return min(estimates, key=lambda m: (estimates[m], CHAIN.index(m)))
