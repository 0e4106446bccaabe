"""LinearizedTraining: the objective and the duration of training the linearized model.

One set of settings for :func:`lightning_ntk.theory.kernel_solution`,
:func:`lightning_ntk.theory.kernel_flow`, :func:`lightning_ntk.uncertainty.kernel_solutions`
and :func:`lightning_ntk.uncertainty.kernel_ensemble`, validated once when it is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional

from ._checks import check_nonnegative, check_option, check_smoothing

DECAY_TO = ("init", "zero")
REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class LinearizedTraining:
    """How the linearized model ``f_lin = f0 + J0 (θ − θ0)`` is trained.

    The loss is ``mean_i CE(f(x_i), Y_i) + (λ/2) ‖θ − θ_ref‖²`` with the smoothed targets
    ``Y = (1 − ε) Y_hard + ε / C`` (``reduction="sum"``: the sum over ``i``), so the
    kernel the gradient sees is ``G = Θ0 / N`` (``"mean"``) or ``Θ0`` (``"sum"``).
    Full-batch gradient descent with learning rate ``η`` moves the logits by
    ``f ← f − η [G (p(f) − Y) + λ (f − f0 + s)]`` (``s = 0`` for ``θ_ref = θ0``,
    ``s = J0 θ0`` for ``θ_ref = 0``). With ``steps=None`` the trained logits are the
    fixed point of this map; with ``steps`` and ``lr``, the logits after that many steps.

    Attributes:
        weight_decay: ``λ ≥ 0``.
        label_smoothing: ``ε ∈ [0, 1)``, applied to the targets as
            ``nn.CrossEntropyLoss(label_smoothing=ε)`` does.
        decay_to: ``θ_ref``: ``"init"`` (``θ0``, ``s = 0``) or ``"zero"`` (plain weight
            decay, what ``torch.optim.SGD(weight_decay=λ)`` does, ``s = J0 θ0``). Ignored
            when ``λ = 0``.
        reduction: ``"mean"`` (PyTorch's default, ``G = Θ0 / N``) or ``"sum"`` (``G = Θ0``).
        steps: ``None`` for the trained (fixed-point) logits, or a number of full-batch
            gradient steps ``≥ 0`` (with ``lr``).
        lr: learning rate ``η > 0`` of those steps (with ``steps``).

    Raises:
        ValueError: a setting out of range, or only one of ``steps`` and ``lr``.

    Example:
        ``kernel_solution(ntk, logits0, y, LinearizedTraining(weight_decay=1e-2))``, or
        the shorthand ``kernel_solution(ntk, logits0, y, weight_decay=1e-2)``.
    """

    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    decay_to: str = "init"
    reduction: str = "mean"
    steps: Optional[int] = None
    lr: Optional[float] = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "weight_decay", check_nonnegative(self.weight_decay, "weight_decay")
        )
        object.__setattr__(self, "label_smoothing", check_smoothing(self.label_smoothing))
        check_option(self.decay_to, "decay_to", DECAY_TO)
        check_option(self.reduction, "reduction", REDUCTIONS)
        if self.steps is None and self.lr is None:
            return
        steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(
                f"Expected `steps` to be a non-negative int with `lr` but got {steps!r}."
            )
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"Expected `lr` to be a positive float with `steps` but got {lr!r}.")
        object.__setattr__(self, "lr", check_nonnegative(lr, "lr"))

    @property
    def finite_time(self) -> bool:
        """Whether the logits are followed for ``steps`` steps rather than to the fixed point."""
        return self.steps is not None

    def kernel_scale(self, num_examples: int) -> int:
        """``N`` for ``reduction="mean"`` (``G = Θ0 / N``), else 1."""
        return num_examples if self.reduction == "mean" else 1


def resolve_training(
    training: Optional[LinearizedTraining], settings: Mapping[str, Any], caller: str
) -> LinearizedTraining:
    """``training``, or the :class:`LinearizedTraining` built from keyword ``settings``.

    Raises:
        TypeError: an argument that is not a field of :class:`LinearizedTraining`, a
            ``training`` that is not one, or both ``training`` and ``settings``.
    """
    names = [f.name for f in fields(LinearizedTraining)]
    unknown = [name for name in settings if name not in names]
    if unknown:
        raise TypeError(
            f"{caller}() got an unexpected keyword argument {unknown[0]!r}; the settings of "
            f"the training are {', '.join(names)}."
        )
    if training is None:
        return LinearizedTraining(**settings)
    if not isinstance(training, LinearizedTraining):
        raise TypeError(
            f"Expected `training` to be a LinearizedTraining but got {type(training).__name__}."
        )
    if settings:
        raise TypeError(
            f"{caller}() got `training` and its settings {', '.join(settings)} as keywords: "
            f"pass one of them (e.g. dataclasses.replace(training, {next(iter(settings))}=...))."
        )
    return training
