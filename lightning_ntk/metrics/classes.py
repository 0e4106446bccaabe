"""``torchmetrics.Metric`` versions of the kernel and linearization metrics.

Each class only holds states; the maths is in :mod:`lightning_ntk.metrics.functional`
and :mod:`lightning_ntk.linearization`. Every state is a float64 sum (``dist_reduce_fx="sum"``),
so streaming over batches, and over ranks, gives the one-shot value.

Every class plots like torchmetrics' own: ``metric.plot()`` draws the current value,
``metric.plot([v1, v2, ...])`` a series of values (needs ``matplotlib``: the ``plot``
extra, ``pip install "lightning-ntk[plot]"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torchmetrics import Metric

from ..linearization.distances import (
    TASKS,
    _argmax_equal_rows,
    _linearization_error_compute,
    _linearization_error_update,
    _prob_tv_rows,
)
from ._alignment import _target_alignment_compute, _target_alignment_update
from .functional import _logit_norm_rows, softmax_form

__all__ = ["ArgmaxAgreement", "LinearizationError", "LogitNorm", "ProbTV", "TargetAlignment"]

_F64 = torch.float64


def _zero(*shape: int) -> Tensor:
    return torch.zeros(shape, dtype=_F64)


class _PlotMixin:
    """``plot()`` as in torchmetrics' own metrics (a scalar value, or a series of them)."""

    def plot(self, val: Optional[Union[Tensor, Sequence[Tensor]]] = None, ax: Any = None) -> Any:
        """Plot one value of the metric, or a series of values, with matplotlib.

        Args:
            val: a value returned by ``compute()`` / ``forward()``, or a sequence of them;
                ``None`` plots the current ``compute()``.
            ax: a matplotlib ``Axes`` to draw into; ``None`` makes a new figure.

        Returns:
            ``(figure, axes)``.

        Raises:
            ModuleNotFoundError: matplotlib is not installed (the ``plot`` extra).
        """
        return self._plot(val, ax)  # type: ignore[attr-defined]


class TargetAlignment(_PlotMixin, Metric):
    """Centered alignment ``A(K_trace, Y Yᵀ)`` streamed over blocks of kernel rows.

    The probe kernel ``K (N, N)`` (or ``(N, N, C)`` / ``(N, N, C, C)``, reduced to trace)
    arrives as row blocks ``K[B, :]`` that together hold every row once, e.g. from
    ``empirical_ntk(model, x[B], x)``. The metric keeps ``O(C²)`` sufficient statistics
    (see :func:`~lightning_ntk.metrics._alignment._target_alignment_update`), so the
    ``N × N`` kernel is never held at once. ``K`` must be symmetric (a kernel of the
    probe set with itself).

    Args:
        num_classes: number of classes ``C`` (for integer labels and the state shapes).
        kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = TargetAlignment(num_classes=3)
        >>> for rows in torch.arange(N).split(16):  # doctest: +SKIP
        ...     metric.update(empirical_ntk(model, x[rows], x, output="trace"), y[rows], y)
        >>> metric.compute()  # == target_alignment(empirical_ntk(model, x), y)  # doctest: +SKIP
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound: Optional[float] = -1.0
    plot_upper_bound: Optional[float] = 1.0

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"Expected argument `num_classes` to be a positive int but got {num_classes!r}."
            )
        self.num_classes = num_classes
        C = num_classes
        for name in ("num_rows", "num_entries", "sum_k", "sum_k2", "sum_r2", "sum_kyy"):
            self.add_state(name, default=_zero(), dist_reduce_fx="sum")
        self.add_state("ry", default=_zero(C), dist_reduce_fx="sum")
        self.add_state("sum_y", default=_zero(C), dist_reduce_fx="sum")
        self.add_state("yy", default=_zero(C, C), dist_reduce_fx="sum")

    def update(self, kernel_rows: Tensor, row_targets: Tensor, targets: Tensor) -> None:
        """Add rows ``K[B, :]`` (``(b, N)`` or per-class layouts), their targets and all targets.

        Args:
            kernel_rows: the rows of the probe kernel for the examples ``B``.
            row_targets: labels ``(b,)`` or soft targets ``(b, C)`` of ``B``.
            targets: labels ``(N,)`` or soft targets ``(N, C)`` of the whole probe set.
        """
        stats = _target_alignment_update(kernel_rows, row_targets, targets, self.num_classes)
        if stats["ry"].shape[0] != self.num_classes:
            raise ValueError(
                f"Expected targets with {self.num_classes} classes (`num_classes`) but got "
                f"{stats['ry'].shape[0]}."
            )
        for name, value in stats.items():
            setattr(self, name, getattr(self, name) + value.to(self.device))

    def compute(self) -> Tensor:
        """The alignment of the streamed kernel with the targets, a 0-dim float64 tensor."""
        return _target_alignment_compute({name: getattr(self, name) for name in _STATS})


_STATS = ("num_rows", "num_entries", "sum_k", "sum_k2", "sum_r2", "sum_kyy", "ry", "sum_y", "yy")


class LinearizationError(_PlotMixin, Metric):
    """``‖f − f_lin‖_F / max(‖f − f0‖_F, eps)`` accumulated over batches.

    Keeps the two sums of squares; the ratio of their square roots is the one-shot value
    on the concatenated batches.

    Args:
        eps: floor of the denominator.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    residual_sq: Tensor
    change_sq: Tensor

    def __init__(self, eps: float = 1e-12, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise ValueError(f"Expected argument `eps` to be a positive float but got {eps!r}.")
        self.eps = float(eps)
        self.add_state("residual_sq", default=_zero(), dist_reduce_fx="sum")
        self.add_state("change_sq", default=_zero(), dist_reduce_fx="sum")

    def update(self, logits: Tensor, logits_lin: Tensor, logits0: Tensor) -> None:
        """Add a batch of ``f(X; θt)``, ``f_lin(X; θt)`` and ``f(X; θ0)``, each ``(N, C)``."""
        num_sq, den_sq = _linearization_error_update(logits.detach(), logits_lin.detach(), logits0)
        self.residual_sq += num_sq.to(self.device)
        self.change_sq += den_sq.to(self.device)

    def compute(self) -> Tensor:
        """The linearization error, a 0-dim float64 tensor."""
        return _linearization_error_compute(self.residual_sq, self.change_sq, self.eps)


class _RowMean(_PlotMixin, Metric):
    """Mean over all rows seen of a per-row quantity, for one task of torchmetrics' convention."""

    is_differentiable = False
    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self, task: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if task is not None and task not in TASKS:
            raise ValueError(f"Expected argument `task` to be one of {TASKS} but got {task!r}.")
        self.task = task
        self.add_state("total", default=_zero(), dist_reduce_fx="sum")
        self.add_state("count", default=_zero(), dist_reduce_fx="sum")

    def _softmax_pair(self, logits: Tensor, logits_lin: Tensor) -> tuple[Tensor, Tensor]:
        """Both batches as softmax logits: sigmoid outputs ``z`` become rows ``[0, z]``."""
        for name, value in (("logits", logits), ("logits_lin", logits_lin)):
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"Expected `{name}` to be a torch.Tensor but got {type(value).__name__}."
                )
        if logits_lin.shape != logits.shape:
            raise ValueError(
                f"Expected `logits_lin` to have the shape of `logits`, {tuple(logits.shape)}, "
                f"but got {tuple(logits_lin.shape)}."
            )
        return softmax_form(logits, self.task), softmax_form(logits_lin, self.task)

    def _add(self, per_row: Tensor) -> None:
        self.total += per_row.detach().to(device=self.device, dtype=_F64).sum()
        self.count += per_row.shape[0]

    def compute(self) -> Tensor:
        """The mean over rows, a 0-dim float64 tensor (NaN before any update)."""
        return self.total / self.count


class ProbTV(_RowMean):
    """Mean total-variation distance between the predicted distributions of ``f`` and ``f_lin``.

    Multiclass: ``½ Σ_a |softmax(f)_a − softmax(f_lin)_a|`` per row. Sigmoid outputs
    (binary, multilabel) are read as two-class softmaxes of ``[0, z]``: per output, the
    distance ``|sigmoid(z) − sigmoid(z_lin)|`` of two Bernoulli distributions, averaged
    over rows and outputs (as the monitor's ``prob_tv``).

    Args:
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``None`` (inferred from
            each batch's shape: one output is binary, several are multiclass).
        kwargs: passed to ``torchmetrics.Metric``.
    """

    higher_is_better: Optional[bool] = False
    plot_lower_bound: Optional[float] = 0.0
    plot_upper_bound: Optional[float] = 1.0

    def update(self, logits: Tensor, logits_lin: Tensor) -> None:
        """Add a batch of logits and linearized logits, each ``(N, C)`` (``(N,)`` binary)."""
        self._add(_prob_tv_rows(*self._softmax_pair(logits, logits_lin)))


class ArgmaxAgreement(_RowMean):
    """Fraction of predictions ``f`` and ``f_lin`` agree on.

    Multiclass: rows where ``argmax f == argmax f_lin``. Sigmoid outputs (binary,
    multilabel): outputs where ``sign z == sign z_lin`` (the argmax of ``[0, z]``),
    averaged over rows and outputs (as the monitor's ``argmax_agreement``).

    Args:
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``None`` (inferred from
            each batch's shape: one output is binary, several are multiclass).
        kwargs: passed to ``torchmetrics.Metric``.
    """

    higher_is_better: Optional[bool] = True
    plot_lower_bound: Optional[float] = 0.0
    plot_upper_bound: Optional[float] = 1.0

    def update(self, logits: Tensor, logits_lin: Tensor) -> None:
        """Add a batch of logits and linearized logits, each ``(N, C)`` (``(N,)`` binary)."""
        self._add(_argmax_equal_rows(*self._softmax_pair(logits, logits_lin)))


class LogitNorm(_RowMean):
    """Mean size of the logits in margin units (:func:`~lightning_ntk.metrics.logit_norm`).

    Args:
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``None`` (inferred from
            each batch's shape: one output is binary).
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    higher_is_better: Optional[bool] = None

    def update(self, logits: Tensor) -> None:
        """Add a batch of logits ``(N, C)`` (``(N,)`` or ``(N, 1)`` for one binary output)."""
        self._add(_logit_norm_rows(logits, self.task))
