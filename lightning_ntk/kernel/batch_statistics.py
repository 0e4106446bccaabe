"""The kernel of the function training differentiates: normalisation with batch statistics.

In training mode a BatchNorm layer normalises with the mean and variance of the batch it
is given, and SGD differentiates *that* function; the running buffers it updates on the
side only matter in eval mode. The NTK that governs training is therefore the one of the
whole-batch function

    ``F(θ) = f(X; θ) ∈ R^{N×C}``, normalisation layers using the statistics of ``X``,

with dropout off. Its outputs are coupled (each row depends on every probe input through
the batch mean and variance), so per-example ``vmap`` methods do not apply. The exact
kernel is

    ``Θ[(i, a), (j, b)] = ⟨∂F_{i,a}/∂θ, ∂F_{j,b}/∂θ⟩``,

computed here without the Jacobian ``J = ∂F/∂θ ∈ R^{(N·C)×P}``: one forward pass records
each layer's input, batched backward passes of the ``N·C`` basis cotangents (in chunks)
record the cotangents of its output, and each layer's part of ``J Jᵀ`` is contracted from
those factors (:mod:`._batch_factors`, verified on every call; parameters of other layers
get their Jacobian rows from the same backward pass). Memory does not grow with
``N·C·P``. Where the recording itself fails, the kernel falls back to the whole Jacobian
(:func:`batch_jacobian`: one ``vjp`` of the whole batch, the basis cotangents pulled back
through it, contracted as ``J Jᵀ``).

The running buffers are never read or written: while a measurement runs, each
normalisation layer's ``forward`` is replaced by a batch-statistics normalisation without
buffers (``F.batch_norm(x, None, None, γ, β, training=True)``), and
every other sub-module is in eval mode; every flag and ``forward`` is restored afterwards.
Frozen parameters therefore mean *exactly* zero kernel drift, whatever the buffers do.

Layers covered: ``BatchNorm1d/2d/3d``, their lazy variants, ``SyncBatchNorm`` (normalised
with the local probe's statistics, no collective) and ``track_running_stats=False``.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap

from . import _inputs
from ._batch_factors import batch_kernel_matrix, plan_batch
from ._checks import combination_differs, random_weights
from ._compat import jvp
from ._functional import (
    FunctionalModel,
    OutputFn,
    ParamSelector,
    check_inputs,
    dense_gradients,
    exact_matmuls,
    unwrap_module,
)
from ._layout import check_output, contract_jacobians, reduce_full, symmetrize
from ._optimizer import KernelSpec, OptimizerKernel
from ._sharded import call_module

__all__ = [
    "BatchStatisticsModel",
    "batch_jacobian",
    "batch_ntk",
    "batch_ntk_of",
    "batch_statistics_mode",
    "linearized_logits",
    "measured_model",
    "uses_batch_statistics",
]

# Above this many numbers in one Jacobian block the cotangents are pulled back in chunks.
_JACOBIAN_BUDGET = 2**26

_BATCH_NORM = nn.modules.batchnorm._BatchNorm
# where cotangents are pulled back one by one (faster than a vmapped backward there)
_LOOP_DEVICES = ("cpu",)


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether a sub-module normalises with batch statistics in training (a BatchNorm)."""
    return any(isinstance(m, _BATCH_NORM) for m in model.modules())


def _batch_norm_forward(self: nn.Module, input: Tensor) -> Tensor:
    """Normalise with the statistics of ``input``; no buffer is read or written."""
    self._check_input_dim(input)  # type: ignore[operator]
    return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)


@contextlib.contextmanager
def batch_statistics_mode(model: nn.Module) -> Iterator[None]:
    """Inside: normalisation layers use batch statistics without buffers; the rest eval.

    Every sub-module's ``training`` flag and every replaced ``forward`` are restored on
    exit, also when the block raises.
    """
    flags = [(m, m.training) for m in model.modules()]
    patched: list[tuple[nn.Module, Any]] = []
    try:
        model.eval()
        for m in model.modules():
            if isinstance(m, _BATCH_NORM):
                patched.append((m, m.__dict__.get("forward", _MISSING)))
                m.forward = types.MethodType(_batch_norm_forward, m)  # type: ignore[method-assign]
        yield
    finally:
        for m, previous in patched:
            if previous is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous  # type: ignore[method-assign]
        for m, training in flags:
            m.training = training


_MISSING = object()


class BatchStatisticsModel(FunctionalModel):
    """:class:`FunctionalModel` of the whole-batch function with batch statistics.

    Same arguments and attributes; :meth:`raw` evaluates under
    :func:`batch_statistics_mode` instead of eval mode, so ``fm(params, X)`` is the
    function SGD differentiates on the batch ``X`` (rows coupled through BatchNorm).
    """

    def raw(self, params: Mapping[str, Tensor], x: Any) -> Any:
        """The model's raw output at ``params`` on the batch ``x``, with batch statistics.

        ``x`` is passed as :meth:`FunctionalModel.raw` passes it (a mapping by keyword).
        """
        args, kwargs = _inputs.call_args(x)
        with batch_statistics_mode(self.module), dense_gradients(self.module):
            return call_module(self.module, (params, self.constants), args, kwargs)

    def single(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Not defined: the rows of a batch-statistics model are coupled."""
        raise TypeError(
            "A model normalising with batch statistics has no per-example function; use "
            "`batch_ntk` (whole-batch Jacobian) instead of per-example methods."
        )


def batch_jacobian(fm: FunctionalModel, x: Tensor) -> dict[str, Tensor]:
    """``J = ∂F/∂θ`` of the whole-batch logits ``F = fm(θ, x)``: ``{name: (N, C, P_l)}``.

    One ``vjp`` at ``θ``, then the ``N·C`` basis cotangents pulled back through it. On
    accelerators they go through ``vmap`` in chunks of at most ``_JACOBIAN_BUDGET``
    numbers (a loop where ``vmap`` fails, or where a random combination of its results
    differs from one plain pullback: a batching rule PyTorch gets wrong); on the CPU a
    loop, which measured 2–7× faster there than the batched backward (BatchNorm MLP and
    CNNs of 3k–40k parameters, 160 cotangents). Memory: ``N·C·P`` numbers for ``J``.
    """
    logits, pullback = vjp(lambda p: fm(p, x), fm.params)
    N, C = logits.shape
    P = fm.num_params
    rows = N * C
    eye = torch.eye(rows, dtype=logits.dtype, device=logits.device).reshape(rows, N, C)
    parts: list[dict[str, Tensor]] = []
    if logits.device.type not in _LOOP_DEVICES:
        chunk = max(1, min(rows, _JACOBIAN_BUDGET // max(P, 1)))
        try:
            for start in range(0, rows, chunk):
                (part,) = vmap(pullback)(eye[start : start + chunk])
                parts.append(part)
        except (RuntimeError, NotImplementedError):
            parts = []
        if parts and not _pullbacks_agree(pullback, eye, parts, fm.names):
            parts = []  # a batching rule PyTorch gets wrong: one cotangent at a time
    if not parts:
        grads = [pullback(v)[0] for v in eye]
        parts = [{name: torch.stack([g[name] for g in grads]) for name in fm.names}]
    return {name: torch.cat([p[name] for p in parts]).reshape(N, C, -1) for name in fm.names}


def _pullbacks_agree(
    pullback: Any, eye: Tensor, parts: list[dict[str, Tensor]], names: list[str]
) -> bool:
    """Whether the vmapped pullbacks, summed along random weights, equal one plain pullback.

    See :func:`._checks.combination_differs`.
    """
    weights = random_weights(len(eye), eye, seed=0)
    (single,) = pullback(torch.einsum("k,knc->nc", weights, eye))
    batched = {name: torch.cat([part[name] for part in parts]) for name in names}
    return not combination_differs(weights, batched, single)


def batch_ntk(
    model: nn.Module,
    x: Tensor,
    *,
    output: str = "full",
    params: ParamSelector = None,
    per_layer: bool = False,
    dtype: Optional[torch.dtype] = None,
    output_fn: OutputFn = None,
) -> Any:
    """Exact NTK of the whole-batch function ``F(θ) = f(X; θ)`` with batch statistics.

    ``Θ[i, j, a, b] = Σ_p J[i, a, p] J[j, b, p]`` with ``J = ∂F/∂θ`` (see the module
    docstring); for a model without normalisation layers it equals
    :func:`lightning_ntk.empirical_ntk` of ``x`` with itself.

    Args:
        model: the network; evaluated functionally, never written to (modes restored).
        x: the batch ``(N, ...)``; BatchNorm1d needs ``N ≥ 2``.
        output: ``"full"`` → ``(N, N, C, C)``, ``"diagonal"`` → ``(N, N, C)``,
            ``"trace"`` → ``(N, N)`` (mean over classes).
        params: parameter selection, as in :func:`lightning_ntk.empirical_ntk`.
        per_layer: return ``{parameter name: its contribution}``; parts sum to the total.
        dtype: compute dtype (default: the parameters'; float32 for half / bf16).
        output_fn: maps the model's raw output to ``(N, C)`` logits.

    Returns:
        The symmetric kernel in the requested layout (or a dict of them).
    """
    check_output(output)
    check_inputs(x)
    fm = BatchStatisticsModel(model, params=params, output_fn=output_fn, dtype=dtype)
    x = fm.cast_input(x)
    with exact_matmuls(fm.device):
        fm.checked_logits(x, "x")
    return batch_ntk_of(fm, x, output=output, per_layer=per_layer)


def batch_ntk_of(
    fm: FunctionalModel,
    x: Tensor,
    *,
    output: str = "full",
    per_layer: bool = False,
    spec: Optional[KernelSpec] = None,
) -> Any:
    """:func:`batch_ntk` of a functional view the caller already built (arguments checked).

    ``spec`` is an optimizer's kernel (``None``: ``"sgd"``); any other than ``"sgd"``
    is contracted from the whole Jacobian's sides ``L(X) R(X)ᵀ``
    (:meth:`~lightning_ntk.kernel.KernelSpec.sides`), the layer factors giving ``J Jᵀ`` only.
    """
    x = fm.cast_input(x)
    if spec is not None and spec.kind is not OptimizerKernel.SGD:
        with exact_matmuls(fm.device):
            left, right = spec.sides(batch_jacobian(fm, x))  # {name: (N, C, P_l)}
            parts = {name: contract_jacobians(left[name], right[name], output) for name in fm.names}
        if spec.symmetric:
            parts = {name: symmetrize(part, output) for name, part in parts.items()}
        return parts if per_layer else sum(parts.values())
    with exact_matmuls(fm.device):
        try:
            parts = _factored(fm, x, output, per_layer)
        except (RuntimeError, NotImplementedError):  # the recording failed: whole Jacobian
            J = batch_jacobian(fm, x)
            parts = {name: _contract(J[name], output) for name in fm.names}
    if per_layer:
        return parts
    return sum(parts.values())


def _factored(fm: FunctionalModel, x: Tensor, output: str, per_layer: bool) -> dict[str, Tensor]:
    """The kernel (per parameter with ``per_layer``) from layer factors of the whole batch."""
    plan = plan_batch(fm, x)
    N, C = plan.num_examples, plan.num_classes
    matrices = batch_kernel_matrix(fm, x, plan, per_layer)
    parts = {
        name: reduce_full(M.reshape(N, C, N, C).permute(0, 2, 1, 3), output)
        for name, M in matrices.items()
    }
    if not per_layer:
        return parts
    return {name: parts[name] for name in fm.names}


def _contract(J: Tensor, output: str) -> Tensor:
    """``J (N, C, P)`` → ``J Jᵀ`` in the layout, exactly symmetric."""
    N, C, P = J.shape
    if output == "full":
        M = J.reshape(N * C, P) @ J.reshape(N * C, P).T  # (N·C, N·C)
        M = 0.5 * (M + M.T)
        return M.reshape(N, C, N, C).permute(0, 2, 1, 3)
    K = J.transpose(0, 1) @ J.permute(1, 2, 0)  # (C, N, N)
    K = 0.5 * (K + K.transpose(1, 2))
    return K.permute(1, 2, 0) if output == "diagonal" else K.mean(dim=0)


def linearized_logits(
    fm: FunctionalModel,
    theta0: Mapping[str, Tensor],
    theta: Mapping[str, Tensor],
    x: Tensor,
    f0: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(f_lin, f0)``: ``f0 = fm(θ0, x)`` by a plain forward, ``f_lin = f0 + J0 (θ − θ0)``.

    ``f0`` goes through the same plain forward as ``f = fm(θ, x)`` and the tangent part is
    one ``jvp``: with ``θ = θ0`` the tangent is zero and ``f = f0 = f_lin`` exactly, so an
    unmoved network reports no drift at all. Works for :class:`BatchStatisticsModel`
    (the whole batch is one function) and for the eval-mode :class:`FunctionalModel`.
    A caller that already holds ``fm(θ0, x)`` from that plain forward passes it as ``f0``
    (the monitor keeps the probe's logits of ``θ0`` and of each report) and saves it.
    """
    theta0 = {name: theta0[name] for name in fm.names}
    tangent = {name: theta[name] - theta0[name] for name in fm.names}
    with exact_matmuls(fm.device):
        if f0 is None:
            with torch.no_grad():
                f0 = fm(theta0, x)
        _, Jt = jvp(lambda p: fm(p, x), (theta0,), (tangent,))
    return f0 + Jt.detach(), f0


NORMALIZATIONS = ("batch", "running")


def measured_model(
    model: nn.Module,
    normalization: str,
    *,
    params: ParamSelector = None,
    output_fn: OutputFn = None,
    dtype: Optional[torch.dtype] = None,
) -> FunctionalModel:
    """The function a monitor measures: batch statistics (training's) or running (eval).

    ``normalization="batch"`` gives a :class:`BatchStatisticsModel` when the model has a
    BatchNorm layer (otherwise both choices are the same eval-mode function: dropout
    off, no buffer matters); ``"running"`` the eval-mode :class:`FunctionalModel`.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"Expected `normalization` to be one of {NORMALIZATIONS} but got {normalization!r}."
        )
    cls = FunctionalModel
    if normalization == "batch" and uses_batch_statistics(unwrap_module(model)):
        cls = BatchStatisticsModel
    return cls(model, params=params, output_fn=output_fn, dtype=dtype)
