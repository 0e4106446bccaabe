"""Auto's cost model: estimated seconds of each exact method, from counts, never timings.

The estimate of a method is a fixed cost per dispatched operation (eager PyTorch pays
tens of microseconds per operation, more under ``vmap``: on the small models people
monitor this is most of the time) plus its arithmetic at a nominal rate plus, for
materialised Jacobians, the bytes they write. The counts come from one forward pass
of a single example under a dispatch mode (:func:`forward_profile`: operations and
matrix FLOPs), cached per model structure, and from the structured plan (layer widths)
when there is one. Everything is a deterministic function of the model's structure and
the call's shapes: the same model and inputs get the same choice in every process.

Per call of ``N1 × N2`` examples (``N = N1 + N2``, or ``N1`` when ``x2`` is ``x1``),
``C`` classes, ``P`` selected parameters, ``F`` forward FLOPs per example, ``k`` output
numbers per example pair (``C²`` full, ``C`` diagonal / trace):

* ``jacobian``: ``N·F`` forward and ``2·N·C·F`` backward FLOPs, ``N·C·P`` numbers
  written, ``2·N1·N2·k·P`` to contract;
* ``ntk_vp``: ``N2·C`` vjp / jvp pairs over the batch, about ``3·N1·N2·C·F``;
* ``structured``: a recording forward, a backward with ``C`` cotangents and a checking
  backward (``(3 + 2·C)·N·F``), per layer the cheaper of the Gram route
  ``2·N1·N2·(k·d_out + d_in)·T²`` (``T``: positions the layer saw in the counted pass)
  and per-example weight gradients ``2·N·C·d_out·d_in·T + 2·N1·N2·k·d_out·d_in`` (an embedding:
  ``2·N1·N2·k·d_out·T``, over matching tokens only), and per-example
  Jacobians of the parameters that fall back;
* ``loop``: ``N·C`` backward passes, one operation sequence each (only ever a fall-back).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ._functional import FunctionalModel
from ._plan import StructurePlan

__all__ = ["ForwardProfile", "estimate_seconds", "forward_profile"]


# seconds per dispatched operation of one forward pass, per method: each method runs the
# forward (and its backward) this many times over, under vmap where it batches
_OP_SECONDS = {"jacobian": 2.5e-4, "ntk_vp": 6e-4, "structured": 6e-4, "loop": 1.5e-4}


# fixed seconds of one call beyond the model's operations (the method's own bookkeeping)
_FIXED_SECONDS = {"jacobian": 2e-3, "ntk_vp": 2e-3, "structured": 4e-3, "loop": 1e-3}


_LAYER_SECONDS = 5e-4  # the structured method's per-layer factor work


_FLOPS_PER_SECOND = 3e10  # nominal arithmetic rate


_BYTES_PER_SECOND = 5e9  # nominal rate of writing materialised Jacobians


class ForwardProfile(tuple):
    """``(operations, FLOPs per example, {module name: positions})`` of one forward pass.

    A module's positions are the rows its weight is applied to per example (tokens,
    output pixels): its output numbers per example over its output width.
    """

    @property
    def ops(self) -> int:
        return int(self[0])

    @property
    def flops(self) -> float:
        return float(self[1])

    @property
    def positions(self) -> dict[str, float]:
        return self[2] if len(self) > 2 else {}


class _CountOps(TorchDispatchMode):
    """Counts the dispatched operations and the FLOPs of those PyTorch has formulas for."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.flops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.count += 1
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


_PROFILES: dict[tuple, ForwardProfile] = {}


_MAX_PROFILES = 64


def forward_profile(fm: FunctionalModel, x_one: Any, key: tuple) -> ForwardProfile:
    """Operations and FLOPs of one forward pass of one example, cached under ``key``.

    The pass runs with gradients enabled on the selected parameters, as every method
    runs it (fused inference paths, such as the Transformer encoder's, are not taken).
    A model whose forward cannot be counted gets a dense estimate: 2 FLOPs per
    parameter, one operation per parameter tensor.
    """
    cached = _PROFILES.pop(key, None)
    if cached is None:
        params = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
        positions: dict[str, float] = {}

        def hook(name: str, width: int) -> Any:
            def seen(module: Any, inputs: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor) and width > 0:
                    positions[name] = positions.get(name, 0.0) + out.numel() / width

            return seen

        handles = []
        for name, module in fm.module.named_modules():
            if isinstance(module, torch.jit.ScriptModule):  # takes no hooks; uncounted width
                continue
            # (read from _parameters: the `weight` attribute of a parametrized module
            # would run its parametrization, which may write buffers, e.g. spectral norm)
            weight = module._parameters.get("weight")
            if weight is not None and weight.dim() >= 2:
                handles.append(module.register_forward_hook(hook(name, weight.shape[0])))
        try:
            counter = _CountOps()
            with torch.enable_grad(), counter:
                fm(params, x_one)
            cached = ForwardProfile((counter.count, counter.flops, positions))
        except Exception:
            cached = ForwardProfile((len(params), 2 * fm.num_params, {}))
        finally:
            for handle in handles:
                handle.remove()
    _PROFILES[key] = cached  # (re)inserted last: most recently used
    while len(_PROFILES) > _MAX_PROFILES:
        del _PROFILES[next(iter(_PROFILES))]
    return cached


def estimate_seconds(
    method: str,
    fm: FunctionalModel,
    profile: ForwardProfile,
    plan: Optional[StructurePlan],
    n1: int,
    n2: int,
    num_classes: int,
    output: str,
    symmetric: bool,
    per_layer: bool = False,
) -> float:
    """Estimated seconds of one call by ``method`` (see the module docstring).

    Args:
        method: ``"structured"``, ``"jacobian"``, ``"ntk_vp"`` or ``"loop"``.
        fm: the functional model.
        profile: its :func:`forward_profile`.
        plan: the structured plan (``"structured"`` only).
        n1: examples of ``x1``.
        n2: examples of ``x2`` (``n1`` when ``x2`` is ``x1``).
        num_classes: ``C``.
        output: ``"full"``, ``"diagonal"`` or ``"trace"``.
        symmetric: ``x2`` is ``x1``.
        per_layer: one kernel per parameter group.
    """
    C, P, F, ops = num_classes, fm.num_params, max(profile.flops, 1.0), max(profile.ops, 1)
    n = n1 if symmetric else n1 + n2
    pairs = n1 * n2 / (2 if symmetric else 1)
    k = C * C if output == "full" else C
    fixed = _FIXED_SECONDS[method] + _OP_SECONDS[method] * ops
    if method == "jacobian":
        flops = 3 * n * C * F + 2 * pairs * k * P
        return fixed + flops / _FLOPS_PER_SECOND + 4 * n * C * P / _BYTES_PER_SECOND
    if method == "ntk_vp":
        groups = len(fm.names) if per_layer else 1
        flops = n1 * n2 * C * F * (2 + groups)
        return fixed * (1 + groups) / 2 + flops / _FLOPS_PER_SECOND
    if method == "loop":
        return n * C * (fixed + 3 * F / _FLOPS_PER_SECOND) + 2 * pairs * k * P / _FLOPS_PER_SECOND
    assert plan is not None
    positions = max(1.0, F / (2 * P))  # average uses of a weight per example
    layer_flops = 0.0
    for layer in plan.layers:
        if layer.weight is None:  # norm affine: per-example gradients of a few numbers
            layer_flops += 2 * pairs * k * fm.params[layer.param_names[0]].numel()
            continue
        shape = fm.params[layer.weight].shape
        d_out, d_in = shape[0], math.prod(shape[1:])
        T = max(1.0, profile.positions.get(layer.name, positions))
        if isinstance(layer.module, torch.nn.Embedding):  # matching token positions only
            layer_flops += 2 * pairs * k * d_out * T
            continue
        gram = 2 * pairs * (k * d_out + d_in) * T * T
        per_example = 2 * n * C * d_out * d_in * T + 2 * pairs * k * d_out * d_in
        layer_flops += min(gram, per_example)  # as the method picks per layer
    flops = (3 + 2 * C) * n * F + layer_flops
    seconds = fixed + _LAYER_SECONDS * len(plan.layers) + flops / _FLOPS_PER_SECOND
    if plan.fallback_names:  # per-example Jacobians of the rest
        P_rest = sum(fm.params[name].numel() for name in plan.fallback_names)
        seconds += _FIXED_SECONDS["jacobian"] + _OP_SECONDS["jacobian"] * ops
        seconds += (3 * n * C * F + 2 * pairs * k * P_rest) / _FLOPS_PER_SECOND
        seconds += 4 * n * C * P_rest / _BYTES_PER_SECOND
    return seconds
