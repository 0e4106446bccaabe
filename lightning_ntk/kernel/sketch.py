"""Opt-in kernel estimators for many classes, where even the exact trace is out of reach.

The exact trace kernel ``(1/C) Σ_a J_a(x)·J_a(x')`` needs ``C`` backward passes per
example. The estimators here cost ``k`` or ``m`` instead, and each says what it gives.

* :func:`sketched_trace_ntk`: for random output projections ``v ∈ R^C`` with
  ``E[v vᵀ] = I`` (Rademacher or standard Gaussian entries),
  ``E[(vᵀJ(x))·(vᵀJ(x'))] = Σ_a J_a(x)·J_a(x')``, so the mean over ``k`` projections
  of ``(vᵀJ(x))·(vᵀJ(x'))/C`` is an unbiased estimate of the trace kernel, with a
  standard error from their spread that shrinks like ``1/sqrt(k)``. Each projection is
  the kernel of the scalar model ``vᵀ f``, so every exact method applies to it.
* :func:`class_subset_ntk`: the exact kernel restricted to ``m`` classes, ``m``
  backward passes per example.

  - shared subset ``c (m,)``: ``K[i, j, r, s] = Θ(x_i, x_j)[c_r, c_s]``, e.g. the
    union returned by :func:`probe_classes` (the probe's labels plus every example's
    top-k logits), which for many examples can hold most of the ``C`` classes;
  - per-example subsets ``c (N1, m)``, ``c' (N2, m)``:
    ``K[i, j, r, s] = Θ(x_i, x_j)[c[i, r], c'[j, s]]``, e.g.
    ``probe_classes(..., per_example=True)`` (each example's label first, then its
    top-k other logits), so ``m = k + 1`` whatever ``N``. It is the exact kernel of the
    model ``x_i ↦ f(x_i)[c[i]] ∈ R^m``; the indices travel with the inputs, so every
    method, chunking and parameter selection of :func:`lightning_ntk.empirical_ntk`
    applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ._forward import ForwardModule, selector_on_wrapper
from ._functional import FunctionalModel, OutputFn, check_inputs

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
    classes2: Optional[Tensor] = None,
    output_fn: OutputFn = None,
    **kwargs: Any,
) -> Union[Tensor, dict[str, Tensor]]:
    """The exact kernel restricted to a few classes, shared or chosen per example.

    * Shared subset, ``classes`` 1-D ``(m,)``: ``output="full"`` gives
      ``(N1, N2, m, m)`` with ``K[i, j, r, s] = Θ(x_i, x_j)[c_r, c_s]``; ``"diagonal"``
      ``(N1, N2, m)`` with ``Θ(x_i, x_j)[c_r, c_r]``; ``"trace"`` the mean over ``r``.
    * Per-example subsets, ``classes`` 2-D ``(N1, m)`` (row ``i``: the classes of
      ``x_i``) and ``classes2`` ``(N2, m)`` for ``x2``: ``"full"`` gives
      ``(N1, N2, m, m)`` with ``K[i, j, r, s] = Θ(x_i, x_j)[classes[i, r],
      classes2[j, s]]``; ``"diagonal"`` ``(N1, N2, m)`` with ``K[i, j, r] =
      Θ(x_i, x_j)[classes[i, r], classes2[j, r]]``; ``"trace"`` ``(N1, N2)``, the
      mean over ``r`` of the diagonal. For ``x2=None``, ``classes2 = classes`` and the
      kernel is exactly symmetric, ``K[i, j, r, s] = K[j, i, s, r]``.

    Both cost ``m`` backward passes per example instead of ``C``. Per-example subsets
    are computed as the kernel of the model ``x_i ↦ f(x_i)[classes[i]] ∈ R^m``, whose
    input carries the example's class indices along with it, so every method, chunk and
    parameter selection of :func:`lightning_ntk.empirical_ntk` applies unchanged.

    Args:
        model: the network (never mutated).
        x1: inputs ``(N1, ...)``.
        x2: inputs ``(N2, ...)``; ``None`` means ``x1``.
        classes: ``(m,)`` class indices shared by all examples, or an integer tensor
            ``(N1, m)`` of per-example class indices (e.g. from
            ``probe_classes(..., per_example=True)``).
        classes2: ``(N2, m)`` per-example class indices of ``x2``; required with ``x2``
            and 2-D ``classes``, not allowed otherwise.
        output_fn: maps the model's raw output to ``(N, C)`` logits.
        **kwargs: passed to :func:`lightning_ntk.empirical_ntk` (``output``,
            ``method``, ``params``, ``per_layer``, ``chunk_size``, ``dtype``,
            ``store_on``); ``per_layer=True`` keys are the model's parameter names.

    Returns:
        The restricted kernel in the requested layout, or a dict of them per parameter.

    Raises:
        ValueError: ill-shaped ``classes`` / ``classes2``, indices outside ``[0, C)``,
            ``x2`` without ``classes2``, or a different ``m`` in the two.
        TypeError: per-example classes that are not integers.
    """
    from . import empirical_ntk

    if isinstance(classes, Tensor) and classes.ndim == 2:
        return _per_example_subset_ntk(model, x1, x2, classes, classes2, output_fn, kwargs)
    if not isinstance(classes, Tensor) or classes.ndim != 1 or classes.numel() == 0:
        raise ValueError(
            "Expected `classes` to be a non-empty 1-D tensor of shared class indices (m,) or "
            "a 2-D integer tensor (N1, m) of per-example ones but got "
            f"{classes if not isinstance(classes, Tensor) else tuple(classes.shape)}."
        )
    if classes2 is not None:
        raise ValueError(
            "`classes2` goes with per-example classes: expected `classes` of shape (N1, m) "
            f"but got shape {tuple(classes.shape)}."
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


def probe_classes(
    logits: Tensor,
    labels: Optional[Tensor] = None,
    top_k: int = 5,
    *,
    per_example: bool = False,
) -> Tensor:
    """Classes that matter on a probe: its true labels and each example's top-k logits.

    Args:
        logits: ``(N, C)`` logits on the probe.
        labels: ``(N,)`` true classes in ``[0, C)``, if known.
        top_k: how many of each example's largest logits to include (``1 ≤ top_k ≤ C``;
            ``≤ C - 1`` per example with labels).
        per_example: return one row of classes per example instead of their union.

    Returns:
        With ``per_example=False``, the sorted unique union of the labels and every
        example's ``top_k`` largest logits, ``(m,)`` int64. With ``per_example=True``,
        ``(N, m)`` int64 for :func:`class_subset_ntk`: row ``i`` is ``labels[i]``
        followed by the ``top_k`` largest logits of example ``i`` other than its label,
        in decreasing order (``m = top_k + 1``, all distinct); without labels, its
        ``top_k`` largest logits (``m = top_k``).

    Raises:
        ValueError: ``logits`` not 2-D, ``top_k`` not a positive int within the bound,
            ``labels`` not ``(N,)`` or outside ``[0, C)``.
        TypeError: non-integer ``labels``.
    """
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"Expected `logits` of shape (N, C) but got {got}.")
    N, C = logits.shape
    if not isinstance(per_example, bool):
        raise TypeError(f"Expected `per_example` to be a bool but got {per_example!r}.")
    if labels is not None:
        labels = _checked_labels(labels, N, C).to(logits.device)
    bound = C - 1 if per_example and labels is not None else C
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= bound:
        reason = " (the label takes one of the C classes)" if bound < C else ""
        raise ValueError(
            f"Expected `top_k` to be a positive int <= {bound}{reason} for {C} classes but "
            f"got {top_k!r}."
        )
    if not per_example:
        top = logits.topk(top_k, dim=1).indices.flatten()
        if labels is not None:
            top = torch.cat([top, labels])
        return torch.unique(top)
    if labels is None:
        return logits.topk(top_k, dim=1).indices  # (N, k)
    top = logits.topk(top_k + 1, dim=1).indices  # (N, k + 1), decreasing
    others = top != labels[:, None]
    others[others.all(dim=1), -1] = False  # label not among them: drop the (k+1)-th
    return torch.cat([labels[:, None], top[others].reshape(N, top_k)], dim=1)  # (N, k + 1)


def _checked_labels(labels: Any, N: int, C: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.shape != (N,):
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"Expected `labels` of shape ({N},), one per row of `logits`, but got {got}."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"Expected `labels` to hold integer classes but got dtype {labels.dtype}.")
    labels = labels.long()
    if N and (int(labels.min()) < 0 or int(labels.max()) >= C):
        raise ValueError(
            f"Expected `labels` in [0, {C}) for {C} classes but got values in "
            f"[{int(labels.min())}, {int(labels.max())}]."
        )
    return labels


# ----------------------------------------------------------------- per-example subsets
def _per_example_subset_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor],
    classes: Tensor,
    classes2: Optional[Tensor],
    output_fn: OutputFn,
    kwargs: dict[str, Any],
) -> Union[Tensor, dict[str, Tensor]]:
    """``class_subset_ntk`` for ``classes (N1, m)``: the kernel of ``x ↦ f(x)[c(x)]``.

    Each example travels as ``z = [flatten(x), c]`` (``D + m`` numbers; floating inputs
    in the compute dtype, which holds integers below ``2/eps`` exactly, integer inputs
    in int64), and :class:`_ClassRows` splits ``z`` again inside a
    :class:`~lightning_ntk.kernel._forward.ForwardModule`, so the kernel engine sees an ordinary
    model ``z ↦ f(x)[c] ∈ R^m`` whose parameters are the model's, prefixed ``"model."``.
    """
    from . import empirical_ntk

    check_inputs(x1, x2)
    m = _checked_rows(classes, "classes", x1, "x1")
    if x2 is None and classes2 is not None:
        raise ValueError(
            "`classes2` goes with `x2`: for x2=None the kernel is over `x1` with itself and "
            "uses `classes` on both sides; got x2=None and `classes2` of shape "
            f"{tuple(classes2.shape) if isinstance(classes2, Tensor) else classes2!r}."
        )
    if x2 is not None:
        if classes2 is None:
            raise ValueError(
                f"Expected `classes2` of shape ({x2.shape[0]}, {m}), the per-example classes "
                "of `x2`, alongside per-example `classes` but got None."
            )
        m2 = _checked_rows(classes2, "classes2", x2, "x2")
        if m2 != m:
            raise ValueError(
                f"Expected `classes2` to hold m = {m} classes per example like `classes` "
                f"(shape {tuple(classes.shape)}) but got shape {tuple(classes2.shape)}."
            )
    kwargs = dict(kwargs)
    params = kwargs.pop("params", None)
    fm = FunctionalModel(model, params=params, output_fn=output_fn, dtype=kwargs.get("dtype"))
    with torch.no_grad():
        C = fm.checked_logits(fm.cast_input(x1[:1]), "x1").shape[1]
    for name, rows in (("classes", classes), ("classes2", classes2)):
        if rows is not None and (int(rows.min()) < 0 or int(rows.max()) >= C):
            raise ValueError(
                f"`{name}` holds indices outside [0, {C}) for a model with {C} classes "
                f"(values in [{int(rows.min())}, {int(rows.max())}])."
            )
    carrier = fm.dtype if x1.is_floating_point() else torch.int64
    if carrier.is_floating_point and C > 2 / torch.finfo(carrier).eps:
        raise ValueError(
            f"The compute dtype {carrier} holds class indices exactly only below "
            f"{int(2 / torch.finfo(carrier).eps)} but the model has {C} classes; pass "
            "`dtype=torch.float32` or wider."
        )
    x1 = fm.cast_input(x1)
    wrapper = ForwardModule(model, _ClassRows(x1.shape[1:], x1.dtype, m, output_fn))
    z1 = _with_classes(x1, classes, carrier)
    z2 = None if x2 is None else _with_classes(fm.cast_input(x2), classes2, carrier)
    result = empirical_ntk(wrapper, z1, z2, params=selector_on_wrapper(params), **kwargs)
    if isinstance(result, dict):
        prefix = len(ForwardModule.PREFIX)
        return {name[prefix:]: part for name, part in result.items()}
    return result


class _ClassRows:
    """``(model, z) ↦ f(x)[c]`` for ``z = [flatten(x), c]``: logits ``(N, m)`` per row."""

    def __init__(
        self, example_shape: torch.Size, input_dtype: torch.dtype, m: int, output_fn: OutputFn
    ) -> None:
        self.example_shape, self.input_dtype = example_shape, input_dtype
        self.m, self.output_fn = m, output_fn

    def __call__(self, model: nn.Module, z: Tensor) -> Any:
        x = z[:, : -self.m].reshape(z.shape[0], *self.example_shape).to(self.input_dtype)
        index = z[:, -self.m :]  # (N, m)
        index = (index.round() if index.is_floating_point() else index).long()
        out = model(x)
        logits = out if self.output_fn is None else self.output_fn(out)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            return logits  # FunctionalModel.to_logits explains what is wrong
        return logits.gather(1, index)  # (N, m)


def _with_classes(x: Tensor, classes: Tensor, carrier: torch.dtype) -> Tensor:
    """``z = [flatten(x), c]`` of shape ``(N, D + m)`` in the ``carrier`` dtype."""
    flat = x.reshape(x.shape[0], -1).to(carrier)
    return torch.cat([flat, classes.to(flat.device, carrier)], dim=1)


def _checked_rows(classes: Any, name: str, x: Tensor, x_name: str) -> int:
    """Validate per-example classes ``(N, m)`` of the batch ``x``; return ``m``."""
    if not isinstance(classes, Tensor) or classes.ndim != 2:
        got = tuple(classes.shape) if isinstance(classes, Tensor) else type(classes).__name__
        raise ValueError(
            f"Expected `{name}` to be a 2-D tensor ({x.shape[0]}, m) of per-example class "
            f"indices but got {got}."
        )
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise TypeError(
            f"Expected `{name}` to hold integer class indices but got dtype {classes.dtype}."
        )
    if classes.shape[0] != x.shape[0] or classes.shape[1] == 0:
        raise ValueError(
            f"Expected `{name}` of shape ({x.shape[0]}, m) with m >= 1, one row per example "
            f"of `{x_name}`, but got {tuple(classes.shape)}."
        )
    return classes.shape[1]
