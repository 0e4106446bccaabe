"""Ensemble statistics and input checks shared by :mod:`lightning_ntk.uncertainty`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..theory._checks import check_labels_fit, check_soft_targets, check_tensor


@dataclass(frozen=True)
class EnsemblePrediction:
    """Statistics of an ensemble of ``S`` predictors on ``M`` test points, ``C`` classes.

    Expectations and variances are over the members (unbiased, ``1/(S − 1)``); all
    tensors are float64.

    Attributes:
        member_logits: ``f_s(x)``, ``(S, M, C)``.
        logit_mean: ``E[f(x)]``, ``(M, C)``.
        logit_cov: per-point class covariance ``Cov[f(x)]``, ``(M, C, C)``.
        logit_variance: ``tr Cov[f(x)] / C``, ``(M,)``.
        probs: mean predictive probabilities ``p̄(x) = E[softmax f(x)]``, ``(M, C)``.
        variance: ``Σ_a Var[softmax f(x)]_a``, the spread of the members'
            probabilities, ``(M,)``.
        entropy: predictive entropy ``H[p̄(x)]``, ``(M,)``.
        expected_entropy: ``E[H[softmax f(x)]]``, ``(M,)``.
        mutual_information: ``entropy − expected_entropy ≥ 0`` (disagreement), ``(M,)``.
        member_logits0: the members' initial logits at the test points, ``(S, M, C)``.
        member_train_logits0: the members' initial logits on the training set,
            ``(S, N, C)``.
        member_train_logits: the members' final logits on the training set, ``(S, N, C)``.
        converged: every member's fixed point met the tolerance (kernel ensembles).
        residual: the largest fixed-point residual over the members (kernel ensembles).
    """

    member_logits: Tensor
    logit_mean: Tensor
    logit_cov: Tensor
    logit_variance: Tensor
    probs: Tensor
    variance: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    member_logits0: Optional[Tensor] = None
    member_train_logits0: Optional[Tensor] = None
    member_train_logits: Optional[Tensor] = None
    converged: Optional[bool] = None
    residual: Optional[float] = None

    @property
    def member_probs(self) -> Tensor:
        """``softmax f_s(x)``, ``(S, M, C)``."""
        return torch.softmax(self.member_logits, dim=-1)

    def covariance(self) -> Tensor:
        """Joint covariance of all test logits, sample-major ``(M·C, M·C)``, symmetric PSD."""
        S = self.member_logits.shape[0]
        centered = (self.member_logits - self.logit_mean).reshape(S, -1)  # (S, M·C)
        cov = centered.T @ centered / max(S - 1, 1)
        return (cov + cov.T) / 2

    @classmethod
    def from_member_logits(cls, member_logits: Tensor, **extra: Any) -> EnsemblePrediction:
        """Summarise ``(S, M, C)`` member logits (``S ≥ 2``); ``extra`` fills the rest."""
        f = member_logits.double()
        S = f.shape[0]
        mean = f.mean(0)
        centered = f - mean
        cov = torch.einsum("smc,smd->mcd", centered, centered) / (S - 1)
        p = torch.softmax(f, dim=-1)  # (S, M, C)
        probs = p.mean(0)
        member_entropy = -(p * torch.log_softmax(f, dim=-1)).sum(-1)  # (S, M)
        entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
        expected_entropy = member_entropy.mean(0)
        return cls(
            member_logits=f,
            logit_mean=mean,
            logit_cov=(cov + cov.transpose(1, 2)) / 2,
            logit_variance=torch.diagonal(cov, dim1=1, dim2=2).mean(-1),
            probs=probs,
            variance=p.var(0).sum(-1),
            entropy=entropy,
            expected_entropy=expected_entropy,
            mutual_information=(entropy - expected_entropy).clamp_min(0),
            **extra,
        )


def build_model(model_fn: Callable[[], nn.Module], generator: torch.Generator) -> nn.Module:
    """``model_fn()`` under a forked global RNG seeded from ``generator``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected the model factory to return an nn.Module but got {type(model).__name__}."
        )
    return model


def targets_matrix(targets: Tensor, N: int, C: int, source: Optional[str] = None) -> Tensor:
    """Float64 ``Y (N, C)`` from labels ``(N,)`` or soft targets ``(N, C)``.

    ``source`` names the logits ``C`` was read from (e.g. ``"`logits0`"``): the labels
    are then checked against them (:func:`~lightning_ntk.theory._checks.check_labels_fit`).
    """
    from ..metrics.functional import targets_matrix as one_hot_or_soft

    check_tensor(targets, "targets")
    check_targets_rows(targets, N)
    if source is not None:
        check_labels_fit(targets, C, source)
    Y = one_hot_or_soft(targets, None if targets.is_floating_point() else C, num_rows=N)
    if Y.shape != (N, C):
        raise ValueError(
            f"Expected soft `targets` of shape ({N}, {C}) but got {tuple(targets.shape)}."
        )
    check_soft_targets(Y)
    return Y


def check_targets_rows(targets: Tensor, N: int) -> None:
    check_tensor(targets, "targets")
    if targets.ndim not in (1, 2) or targets.shape[0] != N:
        raise ValueError(
            f"Expected `targets` to be labels of shape ({N},) or soft targets of shape "
            f"({N}, C), one row per training input, but got {tuple(targets.shape)}."
        )


def check_inputs(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    check_tensor(x_train, "x_train")
    check_tensor(x_test, "x_test")
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(
                f"Expected `{name}` to be a non-empty batch of shape (N, ...) but got "
                f"{tuple(x.shape)}."
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"Expected `x_test` to have the per-example shape {tuple(x_train.shape[1:])} of "
            f"`x_train` but got {tuple(x_test.shape[1:])}."
        )
    return x_train.detach(), x_test.detach()


def check_option(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices} but got {value!r}.")


def check_positive_int(
    value: Any, name: str, *, minimum: int = 1, allow_zero: bool = False
) -> None:
    low = 0 if allow_zero else minimum
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Expected `{name}` to be an int >= {low} but got {value!r}.")
