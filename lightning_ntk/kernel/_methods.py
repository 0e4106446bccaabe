"""The exact methods, how one kernel call reports the method it used, and auto's cost model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from ._functional import FunctionalModel
from ._plan import StructurePlan

__all__ = [
    "CHAIN",
    "JACOBIAN_BUDGET",
    "NTKCallInfo",
    "NTKMethod",
    "choose_method",
    "model_is_sure",
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
        choice: ``"requested"``, ``"cost model"`` (auto, by its model), ``"measured"``
            (auto timed the candidates in this call) or ``"measured earlier"`` (a cached
            timing of the same model, inputs and layout).
        fallbacks: ``"<method>: <error>"`` for every method that could not run, in order
            (and ``"<method>/<part>: <error>"`` for a part that used a slower route).
        timings: seconds of each method timed by ``"auto"`` in this call.
        per_example: parameters whose kernel came from per-example Jacobians rather than
            a structured factorisation (all of them unless ``method == "structured"``).
    """

    requested: str
    method: str
    choice: str
    fallbacks: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
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
) -> NTKMethod:
    """The cost model behind ``method="auto"``.

    For optimizer kernels other than ``"sgd"`` there is no plan (structured methods do not
    compute them); ``"signgd"`` needs the sign of both Jacobians, so always ``"jacobian"``
    (bound its memory with ``chunk_size``).

    * If any supported layer holds a selected parameter, ``"structured"``: its kernel
      for a Linear layer costs ``N²·(d_in + C²·d_out)`` against the ``N²·C²·d_in·d_out``
      of contracting Jacobians, and it uses per-example Jacobians for the rest anyway.
    * Otherwise ``"jacobian"`` while one Jacobian block (``chunk·C·P`` numbers) fits the
      budget, else ``"ntk_vp"``, whose memory does not grow with ``N·C·P``.

    The model is sure only when every selected parameter is structured. Otherwise
    ``"auto"`` times the feasible methods on the call itself (quick calls in up to five
    interleaved rounds, best of each) and returns the fastest one's kernel; the timings
    are kept per model, input signature, sizes and layout, the next two calls time the
    best and the runner-up once more each, and later calls use the fastest seen.
    Under a distributed process group the cost model decides (ranks never time).
    """
    if plan is not None and plan.structured_names:
        return NTKMethod.STRUCTURED
    if kernel == "signgd" or chunk * num_classes * fm.num_params <= JACOBIAN_BUDGET:
        return NTKMethod.JACOBIAN
    return NTKMethod.NTK_VP


def model_is_sure(plan: Optional[StructurePlan]) -> bool:
    return plan is not None and bool(plan.structured_names) and not plan.fallback_names
