"""Opt-in kernel estimators for many classes, where even the exact trace is out of reach.

The exact trace kernel ``(1/C) Σ_a J_a(x)·J_a(x')`` needs ``C`` backward passes per
example. Both estimators here cost ``k`` instead; neither is exact, and both say so.

* :func:`sketched_trace_ntk`: for random output projections ``v ∈ R^C`` with
  ``E[v vᵀ] = I`` (Rademacher or standard Gaussian entries),
  ``E[(vᵀJ(x))·(vᵀJ(x'))] = Σ_a J_a(x)·J_a(x')``, so the mean over ``k`` projections
  of ``(vᵀJ(x))·(vᵀJ(x'))/C`` is an unbiased estimate of the trace kernel, with a
  standard error from their spread that shrinks like ``1/sqrt(k)``. Each projection is
  the kernel of the scalar model ``vᵀ f``, so every exact method applies to it.
* :func:`class_subset_ntk`: the exact kernel restricted to a subset of classes, e.g.
  :func:`probe_classes` (the probe's true classes plus each example's top-k logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .._functional import FunctionalModel, OutputFn

_DISTRIBUTIONS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class SketchedKernel:
    """An unbiased kernel estimate with its standard error.

    Attributes:
        estimate: ``(N1, N2)`` mean over projections.
        standard_error: ``(N1, N2)`` standard error of the mean (sample std / sqrt(k)).
        num_projections: ``k``.
    """

    estimate: Tensor
    standard_error: Tensor
    num_projections: int


def sketched_trace_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    num_projections: int = 16,
    distribution: str = "rademacher",
    seed: int = 0,
    output_fn: OutputFn = None,
    **kwargs: Any,
) -> SketchedKernel:
    """Unbiased estimate of the ``"trace"`` kernel from ``k`` random output projections.

    Args:
        model: the network.
        x1: inputs ``(N1, ...)``.
        x2: inputs ``(N2, ...)``; ``None`` means ``x1``.
        num_projections: ``k`` projections (``k`` backward passes instead of ``C``).
        distribution: ``"rademacher"`` (±1 entries; lower variance) or ``"gaussian"``.
        seed: seed of the estimator's own generator (the global RNG is untouched).
        output_fn: maps the model's raw output to ``(N, C)`` logits.
        **kwargs: passed to :func:`lightning_ntk.empirical_ntk` (``method``,
            ``params``, ``chunk_size``, ``dtype``).

    Returns:
        A :class:`SketchedKernel` whose ``estimate`` approximates
        ``empirical_ntk(..., output="trace")``.
    """
    from . import empirical_ntk

    if (
        isinstance(num_projections, bool)
        or not isinstance(num_projections, int)
        or num_projections < 2
    ):
        raise ValueError(
            f"Expected `num_projections` to be an int >= 2 (a standard error needs two) but got "
            f"{num_projections!r}."
        )
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(
            f"Expected `distribution` to be one of {_DISTRIBUTIONS} but got {distribution!r}."
        )
    for key in ("output", "per_layer"):
        if key in kwargs:
            raise TypeError(
                f"sketched_trace_ntk() does not take `{key}`: it estimates the trace layout."
            )
    fm = FunctionalModel(model, params=kwargs.get("params"), output_fn=output_fn)
    with torch.no_grad():
        C = fm.checked_logits(fm.cast_input(x1[:1]), "x1").shape[1]
    generator = torch.Generator().manual_seed(seed)
    if distribution == "rademacher":
        V = torch.randint(0, 2, (num_projections, C), generator=generator).double() * 2 - 1
    else:
        V = torch.randn(num_projections, C, generator=generator, dtype=torch.float64)

    def projected(out: Any) -> Tensor:
        logits = out if output_fn is None else output_fn(out)
        return logits @ V.to(logits.device, logits.dtype).T  # (N, k)

    per_projection = empirical_ntk(model, x1, x2, output="diagonal", output_fn=projected, **kwargs)
    samples = per_projection / C  # (N1, N2, k): each an unbiased estimate of the trace kernel
    estimate = samples.mean(dim=-1)
    standard_error = samples.std(dim=-1) / num_projections**0.5
    return SketchedKernel(estimate, standard_error, num_projections)


def class_subset_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    classes: Tensor,
    output_fn: OutputFn = None,
    **kwargs: Any,
) -> Tensor:
    """The exact kernel restricted to the classes ``classes`` (``m`` indices).

    ``output="full"`` gives ``(N1, N2, m, m)`` with entry ``[i, j, r, s] =
    Θ(x_i, x_j)[classes[r], classes[s]]``; the other layouts follow. Costs ``m``
    backward passes per example instead of ``C``.
    """
    from . import empirical_ntk

    if not isinstance(classes, Tensor) or classes.ndim != 1 or classes.numel() == 0:
        raise ValueError(
            "Expected `classes` to be a non-empty 1-D tensor of class indices but got "
            f"{classes if not isinstance(classes, Tensor) else tuple(classes.shape)}."
        )
    classes = classes.long()

    def subset(out: Any) -> Tensor:
        logits = out if output_fn is None else output_fn(out)
        if int(classes.max()) >= logits.shape[1] or int(classes.min()) < 0:
            raise ValueError(
                f"`classes` holds indices outside [0, {logits.shape[1]}) for a model with "
                f"{logits.shape[1]} classes."
            )
        return logits[:, classes.to(logits.device)]

    return empirical_ntk(model, x1, x2, output_fn=subset, **kwargs)


def probe_classes(logits: Tensor, labels: Optional[Tensor] = None, top_k: int = 5) -> Tensor:
    """Classes that matter on a probe: its true labels plus each example's top-k logits.

    Args:
        logits: ``(N, C)`` logits on the probe.
        labels: ``(N,)`` true classes, if known.
        top_k: how many of each example's largest logits to include.

    Returns:
        Sorted unique class indices ``(m,)``, for :func:`class_subset_ntk`.
    """
    if logits.ndim != 2:
        raise ValueError(f"Expected `logits` of shape (N, C) but got {tuple(logits.shape)}.")
    top = logits.topk(min(top_k, logits.shape[1]), dim=1).indices.flatten()
    if labels is not None:
        top = torch.cat([top, labels.to(top.device).long().flatten()])
    return torch.unique(top)
