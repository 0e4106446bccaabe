"""Layers written as function calls: ``F.linear``, ``F.conv1d/2d/3d``, ``@`` on a parameter.

A model need not hold its weights in ``nn.Linear`` / ``nn.Conv*`` modules to have the
structure the structured method uses. An NTK-parameterized layer is typically

    y = F.linear(h, w * (σ_w / √K), b * σ_b)

whose weight Jacobian for example ``i`` is ``c · Σ_t G[i,t] ⊗ h[i,t]`` with ``c = σ_w / √K``:
the factors of a ``Linear`` with its input scaled by ``c`` (and the bias gradient scaled
by ``σ_b``). While a forward pass runs, :class:`CallRecorder` (a
:class:`torch.overrides.TorchFunctionMode`) follows the selected parameters: it tracks
``w * c``, ``c * w`` and ``w / c`` for a constant ``c`` (a Python number, or a 0-dim
tensor that needs no gradient) and their transposes (``.T``, ``.t()``, ``.mT``,
``.transpose``), and sees every ``F.linear`` / ``F.conv*`` call whose weight is a selected
parameter or such a scaled one, and every ``h @ w.T`` / ``h @ w`` (``torch.matmul``) with
``h`` of two or more dimensions, a ``Linear`` with weight ``wᵀ`` for the latter, with the
call's own settings (:class:`CallSpec`).

Nothing here is trusted on its own: the plan verifies each such layer per example
against autograd and re-checks it on every call (:mod:`._plan`), exactly as for module
layers; a scale or a use this module gets wrong makes that check fail and the parameter
falls back to per-example Jacobians.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["CallRecorder", "CallSpec", "discover"]


_LINEAR = (F.linear,)
_MATMUL = {torch.matmul, Tensor.matmul, Tensor.__matmul__}
_TRANSPOSE = {torch.t, Tensor.t, torch.transpose, Tensor.transpose}
_TRANSPOSE_PROPERTIES = (Tensor.T, Tensor.mT)
_CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_MUL = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__}
_DIV = {torch.div, Tensor.div, Tensor.__truediv__, torch.true_divide, Tensor.true_divide}


@dataclass(frozen=True)
class CallSpec:
    """One ``F.linear`` / ``F.conv*`` call on a selected weight, as this forward made it.

    ``kernel_size``, ``stride``, ``padding`` and ``dilation`` use the attribute names of
    ``nn.Conv*`` (so :func:`._recording.unfold` reads them alike); empty for ``linear``.

    Attributes:
        op: ``"linear"``, ``"matmul"`` (``h @ w``: a ``linear`` without bias), ``"conv1d"``,
            ``"conv2d"`` or ``"conv3d"``.
        weight: name of the selected weight parameter.
        bias: name of the selected bias parameter, ``None`` if the bias is none or a
            constant.
        weight_scale: ``c`` in ``weight = c · θ_w``.
        bias_scale: the same for the bias.
        transposed: the ``linear`` weight is ``c · θᵀ`` (``θ`` stored ``(K, D)``).
    """

    op: str
    weight: str
    bias: Optional[str] = None
    weight_scale: float = 1.0
    bias_scale: float = 1.0
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Union[str, tuple[int, ...]] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    transposed: bool = False


OnCall = Callable[[CallSpec, Tensor, Tensor], Tensor]


class CallRecorder(TorchFunctionMode):
    """Sees the layer calls made on selected parameters while the mode is active.

    Args:
        params: ``{name: tensor}`` exactly as the forward pass receives them (tensors are
            recognised by identity).
        on_call: ``(spec, input, output) -> output`` for each ``F.linear`` / ``F.conv*``
            call whose weight is one of ``params`` (scaled or not); what it returns
            replaces the call's output.
        weights: record only calls on these weight names (``None``: all).
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        on_call: OnCall,
        weights: Optional[set[str]] = None,
    ) -> None:
        super().__init__()
        self._names = {id(t): name for name, t in params.items()}
        # id of a tensor -> (the tensor, kept alive so that its id stays its own,
        # the parameter's name, its scale, whether it is transposed)
        self._scaled: dict[int, tuple[Tensor, str, float, bool]] = {}
        self._on_call = on_call
        self._weights = weights

    def _resolve(self, t: Any) -> Optional[tuple[str, float, bool]]:
        """``(name, c, transposed)`` if ``t`` is ``c · θ_name`` (or ``c · θ_nameᵀ``)."""
        if not isinstance(t, Tensor):
            return None
        name = self._names.get(id(t))
        if name is not None:
            return name, 1.0, False
        scaled = self._scaled.get(id(t))
        if scaled is not None and scaled[0] is t:
            return scaled[1], scaled[2], scaled[3]
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _MUL or func in _DIV:
            self._track_scale(func, args, kwargs, out)
        elif func in _TRANSPOSE or getattr(func, "__self__", None) in _TRANSPOSE_PROPERTIES:
            self._track_transpose(func, args, kwargs, out)
        elif func in _LINEAR or func in _CONVS or func in _MATMUL:
            spec = self._spec(func, args, kwargs)
            if spec is not None and (self._weights is None or spec.weight in self._weights):
                out = self._on_call(spec, args[0], out)
        return out

    def _track_scale(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Remember ``out = c · θ`` for ``θ * c``, ``c * θ`` and ``θ / c``."""
        if len(args) != 2 or kwargs or not isinstance(out, Tensor):
            return  # rounding_mode, out=: not a plain scaling
        pairs = [(args[0], args[1])] if func in _DIV else [(args[0], args[1]), (args[1], args[0])]
        for operand, other in pairs:
            resolved = self._resolve(operand)
            c = _constant(other)
            if resolved is None or c is None or out.shape != operand.shape:
                continue
            name, scale, transposed = resolved
            scale = scale / c if func in _DIV else scale * c
            self._scaled[id(out)] = (out, name, scale, transposed)
            return

    def _track_transpose(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Remember ``out = c · θᵀ`` for the transpose of a (scaled) 2-d parameter."""
        resolved = self._resolve(args[0]) if args else None
        if resolved is None or not isinstance(out, Tensor) or args[0].ndim != 2:
            return
        if func in (torch.transpose, Tensor.transpose):
            dims = [*args[1:], *kwargs.values()]
            if len(dims) != 2 or (int(dims[0]) - int(dims[1])) % 2 != 1:
                return  # transpose(0, 0): the tensor itself
        if out.ndim != 2 or out.shape != args[0].shape[::-1]:
            return
        name, scale, transposed = resolved
        self._scaled[id(out)] = (out, name, scale, not transposed)

    def _spec(self, func: Any, args: tuple, kwargs: dict) -> Optional[CallSpec]:
        """The call's :class:`CallSpec`, if its weight is a tracked parameter."""
        if func in _MATMUL:  # h @ B = linear(h, Bᵀ)
            if len(args) != 2 or kwargs or not isinstance(args[0], Tensor):
                return None
            resolved = self._resolve(args[1])
            if resolved is None or args[1].ndim != 2 or args[0].ndim < 2:
                return None
            name, scale, transposed = resolved
            return CallSpec("matmul", name, None, scale, transposed=not transposed)
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if not isinstance(bound.get("input"), Tensor):
            return None
        weight = self._resolve(bound.get("weight"))
        if weight is None:
            return None
        bias = self._resolve(bound.get("bias"))
        bias_name, bias_scale = (bias[0], bias[1]) if bias is not None else (None, 1.0)
        if func in _LINEAR:
            return CallSpec(
                "linear", weight[0], bias_name, weight[1], bias_scale, transposed=weight[2]
            )
        if weight[2]:
            return None  # a convolution of a transposed parameter: not a layer of it
        dims = _CONVS[func]
        w = bound["weight"]
        padding = bound.get("padding", 0)
        return CallSpec(
            f"conv{dims}d", weight[0], bias_name, weight[1], bias_scale,
            kernel_size=tuple(w.shape[2:]),
            stride=_ntuple(bound.get("stride", 1), dims),
            padding=padding if isinstance(padding, str) else _ntuple(padding, dims),
            dilation=_ntuple(bound.get("dilation", 1), dims),
            groups=int(bound.get("groups", 1)),
        )  # fmt: skip


def _constant(value: Any) -> Optional[float]:
    """A Python number, or a 0-dim tensor needing no gradient, as a float; else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value != 0 else None
    if isinstance(value, Tensor) and value.ndim == 0 and not value.requires_grad:
        if not value.is_complex():
            c = float(value)
            return c if c != 0 else None
    return None


def _ntuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    values = tuple(int(v) for v in value)
    return values * dims if len(values) == 1 else values


def discover(forward: Callable[[Mapping[str, Tensor]], Any], params: Mapping[str, Tensor]) -> dict:
    """``{weight name: [CallSpec, ...]}`` of the layer calls one forward pass makes.

    Args:
        forward: runs the model at the given parameters.
        params: the selected parameters.
    """
    calls: dict[str, list[CallSpec]] = {}

    def on_call(spec: CallSpec, inp: Tensor, out: Tensor) -> Tensor:
        calls.setdefault(spec.weight, []).append(spec)
        return out

    with torch.no_grad(), CallRecorder(params, on_call):
        forward(params)
    return calls
