"""What the structured method records of a layer, and the factors it builds from that.

One forward pass with hooks records each supported layer's input (a module's, or that
of a ``F.linear`` / ``F.conv*`` / ``@`` call on a selected weight, seen by
:mod:`._calls`); one batched backward gives the cotangents of its output. From those,
:func:`weight_factors` gives the ``(H, G)`` factors of a weight's per-example gradient
and :func:`small_per_example` the per-example gradients of small parameters (biases,
norm affines).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._calls import CallRecorder, CallSpec
from ._factors import LayerInput, per_example_outer
from ._functional import FunctionalModel

__all__ = [
    "CONVS",
    "NORMS",
    "Layer",
    "Probe",
    "Recording",
    "call_layer",
    "candidate_layers",
    "hooks",
    "record",
    "small_per_example",
    "summed_gradients",
    "unfold",
    "weight_factors",
]


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclass
class Layer:
    """A supported module, or a layer call, whose selected parameters get a structured kernel.

    A layer call (``op`` set: ``"linear"``, ``"conv1d"``, ...) is a ``F.linear`` /
    ``F.conv*`` call on the selected weight, wherever the forward makes it; ``spec`` is
    what the latest recording saw of it (:func:`record` sets it).
    """

    name: str  # module name, or "F.<op>(<weight name>)" / "torch.matmul(...)" for a call
    module: Optional[nn.Module]
    weight: Optional[str] = None  # full parameter names, if selected
    bias: Optional[str] = None
    use_gram: bool = False  # decided per block size in StructuredMethod
    op: Optional[str] = None
    spec: Optional[CallSpec] = None

    @property
    def param_names(self) -> list[str]:
        """The layer's selected parameter names."""
        return [n for n in (self.weight, self.bias) if n is not None]

    @property
    def groups(self) -> int:
        """Convolution groups (1 for every other layer)."""
        if self.op is not None:
            return self.spec.groups if self.spec is not None else 1
        return getattr(self.module, "groups", 1)


def call_layer(op: str, weight: str, bias: Optional[str]) -> Layer:
    """The :class:`Layer` of the ``F.<op>`` (``torch.matmul``) call on the weight ``weight``."""
    function = "torch.matmul" if op == "matmul" else f"F.{op}"
    return Layer(f"{function}({weight})", None, weight, bias, op=op)


# ------------------------------------------------------------------ recording
def candidate_layers(fm: FunctionalModel, supported: Callable[[nn.Module], bool]) -> list[Layer]:
    """Modules ``supported`` accepts, each with the selected parameters it alone holds.

    A parameter shared with another module (tied weights) is left to the generic route:
    its kernel is not one layer's.
    """
    owners: dict[int, int] = {}
    for module in fm.module.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    selected = set(fm.names)
    layers = []
    for mod_name, module in fm.module.named_modules():
        if not supported(module):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        layer = Layer(mod_name, module)
        for role in ("weight", "bias"):
            p = module._parameters.get(role)
            if p is not None and prefix + role in selected and owners[id(p)] == 1:
                setattr(layer, role, prefix + role)
        if layer.param_names:
            layers.append(layer)
    return layers


@contextlib.contextmanager
def hooks(layers: list[Layer], hook: Callable[[Layer, Any, Any], Any]) -> Iterator[None]:
    handles = [
        layer.module.register_forward_hook(lambda m, i, o, layer=layer: hook(layer, i, o))
        for layer in layers
        if layer.module is not None
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Recording:
    inputs: dict[str, Tensor]  # layer -> its input
    cotangents: dict[str, Tensor]  # layer -> (R, N, *output_shape)
    param_grads: dict[str, Optional[Tensor]]  # wrt name -> (R, *shape)
    calls: dict[str, int]  # layer -> calls in one forward
    probe: Optional[Probe] = None  # one random direction, for the per-call check


@dataclass
class Probe:
    """One random direction ``u (N, C)`` of the logits and what autograd gives for it.

    Attributes:
        u: the direction, one row per example.
        cotangents: ``{layer: ∂⟨u, f⟩/∂y (N, *output_shape)}``, the cotangent of each
            layer's output.
        param_grads: ``{name: ∂⟨u, f⟩/∂θ}`` of the layers' selected parameters.
    """

    u: Tensor
    cotangents: dict[str, Tensor]
    param_grads: dict[str, Optional[Tensor]]


def record(
    fm: FunctionalModel,
    layers: list[Layer],
    x: Tensor,
    cotangents: Optional[Callable[[Tensor], Tensor]] = None,
    wrt: Optional[dict[str, Tensor]] = None,
    probe: bool = False,
) -> Recording:
    """Inputs of each layer and the cotangents of its output, from one forward and backward.

    A zero tensor ``z`` requiring grad is added to each layer's output, so that
    ``∂f/∂z = ∂f/∂y``; autograd never differentiates with respect to parameters unless
    asked to through ``wrt``.

    Args:
        fm: the functional model.
        layers: the layers to record.
        x: a chunk of inputs ``(N, ...)``.
        cotangents: maps the logits ``(N, C)`` to ``R`` output cotangents ``(R, N, C)``;
            ``None`` for the ``C`` one-hot directions (``R = C``).
        wrt: parameters (requiring grad) to differentiate as well, replacing
            ``fm.params`` entries of the same name in the forward pass.
        probe: also push one random direction ``u (N, C)`` back (one more backward
            pass), to the layers' outputs and to their selected parameters
            (:class:`Probe`): what :func:`._plan.check_call` compares the factors with.
    """
    inputs: dict[str, Tensor] = {}
    zeros: dict[str, Tensor] = {}
    calls: dict[str, int] = {}

    def hook(layer: Layer, inp: tuple, out: Tensor) -> Tensor:
        calls[layer.name] = calls.get(layer.name, 0) + 1
        inputs[layer.name] = inp[0].detach()
        z = torch.zeros_like(out, requires_grad=True)
        zeros[layer.name] = z
        return out + z

    wrt = wrt or {}
    probe_wrt: dict[str, Tensor] = {}
    if probe:  # the layers' own parameters, to compare their factors with autograd
        names = [n for layer in layers for n in layer.param_names if n not in wrt]
        probe_wrt = {n: fm.params[n].detach().requires_grad_() for n in names}
    params = {**fm.params, **probe_wrt, **wrt}
    with torch.enable_grad(), hooks(layers, hook), _layer_calls(layers, params, hook):
        logits = fm(params, x)  # (N, C)
    N, C = logits.shape
    if cotangents is None:
        eye = torch.eye(C, dtype=logits.dtype, device=logits.device)
        cts = eye.unsqueeze(1).expand(C, N, C)  # (C, N, C)
    else:
        cts = cotangents(logits)
    targets = [zeros[n] for n in zeros] + list(wrt.values())
    try:
        grads = torch.autograd.grad(
            logits, targets, grad_outputs=cts, is_grads_batched=True, allow_unused=True,
            retain_graph=probe,
        )  # fmt: skip
    except RuntimeError:  # an op without a batching rule: one backward per direction
        rows = [
            torch.autograd.grad(
                logits, targets, grad_outputs=ct, retain_graph=True, allow_unused=True
            )
            for ct in cts
        ]
        grads = tuple(
            None if rows[0][k] is None else torch.stack([r[k] for r in rows])
            for k in range(len(targets))
        )
    layer_grads = dict(zip(zeros, grads))
    result = {
        name: g if g is not None else zeros[name].new_zeros(len(cts), *zeros[name].shape)
        for name, g in layer_grads.items()
    }
    param_grads = dict(zip(wrt, grads[len(zeros) :]))
    recording = Recording(inputs, result, param_grads, calls)
    if probe:
        recording.probe = _probe(logits, zeros, {**probe_wrt, **wrt})
    return recording


@contextlib.contextmanager
def _layer_calls(
    layers: list[Layer], params: dict[str, Tensor], hook: Callable[[Layer, Any, Any], Any]
) -> Iterator[None]:
    """Record the layer calls among ``layers`` (:mod:`._calls`); nothing if there are none.

    Each layer's ``spec`` becomes that of its latest call in this forward pass.
    """
    calls = {layer.weight: layer for layer in layers if layer.op is not None}
    if not calls:
        yield
        return
    for layer in calls.values():
        layer.spec = None

    def on_call(spec: CallSpec, inp: Tensor, out: Tensor) -> Tensor:
        layer = calls[spec.weight]
        layer.spec = spec
        return hook(layer, (inp,), out)

    with CallRecorder(params, on_call, weights=set(calls)):
        yield


def _probe(logits: Tensor, zeros: dict[str, Tensor], wrt: dict[str, Tensor]) -> Probe:
    """Push a random ``u (N, C)`` back to the layers' outputs and their parameters.

    ``u`` comes from a generator of its own (the global RNG is untouched).
    """
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(logits.shape, generator=generator, dtype=torch.float64)
    u = u.to(device=logits.device, dtype=logits.dtype)
    grads = torch.autograd.grad(
        logits, [*zeros.values(), *wrt.values()], grad_outputs=u, allow_unused=True
    )
    cotangents = {
        name: g if g is not None else torch.zeros_like(zeros[name]) for name, g in zip(zeros, grads)
    }
    return Probe(u, cotangents, dict(zip(wrt, grads[len(zeros) :])))


# ------------------------------------------------------------------ per layer
def weight_factors(
    layer: Layer, inp: Tensor, grad: Tensor, fm: FunctionalModel
) -> tuple[Optional[LayerInput], Tensor]:
    """``H`` and ``G (R, N, T, D)`` of the layer's weight (``(None, grad)`` for norms)."""
    if layer.op is not None:
        return _call_factors(layer.spec, inp, grad)
    module = layer.module
    R, N = grad.shape[:2]
    if isinstance(module, nn.Linear):
        K = inp.shape[-1]
        return LayerInput(dense=inp.reshape(N, -1, K)), grad.reshape(R, N, -1, grad.shape[-1])
    if isinstance(module, CONVS):
        patches = unfold(inp, module)  # (N, T, Cin·k)
        G = grad.flatten(start_dim=3).transpose(2, 3)  # (R, N, T, Cout)
        return LayerInput(dense=patches), G
    if isinstance(module, nn.Embedding):
        tokens = inp.reshape(N, -1)
        if module.padding_idx is not None:
            tokens = tokens.masked_fill(tokens == module.padding_idx, -1)
        G = grad.reshape(R, N, -1, grad.shape[-1])
        return LayerInput(tokens=tokens, vocab=module.num_embeddings, dtype=fm.dtype), G
    return None, grad


def small_per_example(
    layer: Layer, inp: Tensor, grad: Tensor, fm: FunctionalModel
) -> dict[str, Tensor]:
    """Per-example gradients ``(N, C, P)`` of biases and norm-layer affine weights."""
    module = layer.module
    R, N = grad.shape[:2]
    out: dict[str, Tensor] = {}
    if layer.op is not None:  # a layer call: c_b · Σ_t G
        if layer.bias is not None:
            summed = (
                grad.reshape(R, N, -1, grad.shape[-1]).sum(2)
                if layer.op == "linear"
                else grad.flatten(start_dim=3).sum(3)
            )
            out[layer.bias] = layer.spec.bias_scale * summed.transpose(0, 1)
        return out
    if isinstance(module, (nn.Linear, nn.Embedding)):
        if layer.bias is not None:
            out[layer.bias] = grad.reshape(R, N, -1, grad.shape[-1]).sum(2).transpose(0, 1)
        return out
    if isinstance(module, CONVS):
        if layer.bias is not None:
            out[layer.bias] = grad.flatten(start_dim=3).sum(3).transpose(0, 1)
        return out
    # norm layers: y = x̂ ⊙ w + b
    if isinstance(module, nn.LayerNorm):
        P = module.weight.numel() if module.weight is not None else module.bias.numel()
        x_hat = F.layer_norm(inp, module.normalized_shape, eps=module.eps).reshape(N, -1, P)
        g = grad.reshape(R, N, -1, P)
        weight_grad = lambda: (g * x_hat).sum(2)  # noqa: E731
        bias_grad = lambda: g.sum(2)  # noqa: E731
    else:  # BatchNorm (running statistics) and GroupNorm: per channel
        Ch = inp.shape[1]
        if isinstance(module, nn.GroupNorm):
            x_hat = F.group_norm(inp, module.num_groups, eps=module.eps)
        else:
            prefix = f"{layer.name}." if layer.name else ""
            mean = fm.constants[prefix + "running_mean"]
            var = fm.constants[prefix + "running_var"]
            shape = (1, Ch) + (1,) * (inp.ndim - 2)
            x_hat = (inp - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
        x_hat = x_hat.reshape(N, Ch, -1)
        g = grad.reshape(R, N, Ch, -1)
        weight_grad = lambda: (g * x_hat).sum(3)  # noqa: E731
        bias_grad = lambda: g.sum(3)  # noqa: E731
    if layer.weight is not None:
        out[layer.weight] = weight_grad().transpose(0, 1)
    if layer.bias is not None:
        out[layer.bias] = bias_grad().transpose(0, 1)
    return out


def summed_gradients(
    layer: Layer, inp: Tensor, grad: Tensor, fm: FunctionalModel
) -> dict[str, Tensor]:
    """``Σ_i`` of the layer's per-example gradients for one cotangent (``grad (1, N, ...)``)."""
    summed = {
        name: J.sum(0).reshape(-1) for name, J in small_per_example(layer, inp, grad, fm).items()
    }
    if layer.weight is not None and not isinstance(layer.module, NORMS):
        H, G = weight_factors(layer, inp, grad, fm)
        groups = layer.groups
        if groups == 1:
            outer = H.summed_outer(G[0])  # (D, K)
            if layer.spec is not None and layer.spec.transposed:
                outer = outer.T  # θ stored (K, D)
            summed[layer.weight] = outer.reshape(-1)
        else:
            summed[layer.weight] = per_example_outer(H, G, groups).sum(0).reshape(-1)
    return summed


def _call_factors(spec: CallSpec, inp: Tensor, grad: Tensor) -> tuple[LayerInput, Tensor]:
    """``H`` and ``G`` of a layer call's weight ``c · θ``: its input scaled by ``c``.

    ``∂f/∂θ = c · Σ_t G[t] ⊗ H[t]``, so ``c · H`` is the input of the unscaled weight.
    """
    R, N = grad.shape[:2]
    if spec.op in ("linear", "matmul"):
        K = inp.shape[-1]
        H = inp.reshape(N, -1, K)
        G = grad.reshape(R, N, -1, grad.shape[-1])
    else:
        H = unfold(inp, spec)  # (N, T, Cin·k)
        G = grad.flatten(start_dim=3).transpose(2, 3)  # (R, N, T, Cout)
    if spec.weight_scale != 1.0:
        H = H * spec.weight_scale
    return LayerInput(dense=H), G


def unfold(x: Tensor, conv: Any) -> Tensor:
    """Input patches of an N-d convolution: ``(N, T, C_in·Π k)``, weight-flatten order.

    ``conv`` is an ``nn.Conv*`` module or a :class:`._calls.CallSpec` of a convolution.
    """
    dims = x.ndim - 2
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads = [(0, 0)] * dims
        else:  # "same": as torch pads, the extra element goes to the end
            pads = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in conv.padding]
    flat_pad = [v for pair in reversed(pads) for v in pair]
    x = F.pad(x, flat_pad)
    if dims == 2:  # im2col: one pass, where the strided views below copy slowly
        patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C_in·k, T)
        return patches.transpose(1, 2)
    for d in range(dims):
        span = dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])[..., :: dilation[d]]
    # (N, C_in, *out, *k) -> (N, *out, C_in, *k)
    N = x.shape[0]
    perm = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    x = x.permute(perm)
    T = 1
    for s in x.shape[1 : 1 + dims]:
        T *= s
    return x.reshape(N, T, -1)
