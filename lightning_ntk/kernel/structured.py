"""Structured per-layer contraction (work in progress: every parameter falls back)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .._functional import FunctionalModel
from .jacobian import contract, jacobians


@dataclass
class StructurePlan:
    structured_names: list[str] = field(default_factory=list)
    fallback_names: list[str] = field(default_factory=list)


def plan_structure(fm: FunctionalModel) -> StructurePlan:
    return StructurePlan([], list(fm.names))


class StructuredMethod:
    name = "structured"

    def __init__(self, fm: FunctionalModel, output: str, per_layer: bool) -> None:
        self.fm, self.output, self.per_layer = fm, output, per_layer

    def features(self, x: Tensor) -> dict[str, Tensor]:
        return jacobians(self.fm, x, self.fm.names)

    def block(self, f1: dict[str, Tensor], f2: dict[str, Tensor]) -> dict[str, Tensor]:
        return contract(f1, f2, self.output, self.per_layer)
