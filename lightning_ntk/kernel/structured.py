"""Structured per-layer contraction: the kernel from layer inputs and output cotangents.

One forward pass records, for every supported layer, its input ``H``; one batched
backward pass (``C`` cotangents at once) gives the cotangents ``G[a]`` of its output for
every class ``a``. No parameter gradient is ever taken by autograd. Then, per layer:

* ``nn.Linear`` (any leading dimensions): ``Θ_W = Σ_{t,s} (H Hᵀ) ⊙ (G Gᵀ)``, which for a
  plain ``(N, d_in)`` input is ``(H Hᵀ) ⊙ (G Gᵀ)``; the bias adds ``G Gᵀ`` (folded into
  the same product as ``(H Hᵀ + 1) ⊙ (G Gᵀ)``).
* ``nn.Conv1d/2d/3d`` (zero padding, any stride / dilation / groups): the same with the
  unfolded input patches as ``H``; per layer the cheaper of the patch Gram and
  per-example-gradient contraction is used (:func:`._factors.prefer_gram`).
* ``nn.Embedding``: the same with one-hot ``H``, i.e. the token-equality Gram, summed
  over the matching token positions only.
* affine parameters of ``nn.LayerNorm``, ``nn.BatchNorm1d/2d/3d`` (running statistics)
  and ``nn.GroupNorm``: small per-example gradients ``Σ G ⊙ x̂`` and ``Σ G``.

Everything else falls back to exact Jacobian contraction (:mod:`.jacobian`) for that
parameter: parameters of other modules (custom layers, attention's packed projections),
tied or reused weights (a parameter held by two modules, a module called twice),
convolutions with non-zero padding modes, embeddings with ``max_norm``, BatchNorm without
running statistics, subclasses that override ``forward``.

Before use, every structured parameter is *verified per example* on the call's own
inputs: for a random cotangent ``u_r`` on each of a few examples ``r`` (one backward pass
for all of them), the layer's input and output must have one row per example, the output
cotangent must vanish on every other example's rows, and the gradient rebuilt from the
layer's factors must equal autograd's gradient of ``⟨u_r, f(x_r)⟩``. A layer applied to a
batch-free input whose output is broadcast over the batch (a ``(1, T)`` position-index
buffer, ``arange``, a learned constant), applied to a sequence-first layout, or whose
parameter is also used outside its call fails that test and falls back. Every call also
checks that each layer's recorded input and output have one row per example. The kernel
is therefore always exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _inputs
from ._factors import (
    LayerInput,
    contract_gram,
    contract_token_pairs,
    per_example_outer,
    prefer_gram,
)
from ._functional import FunctionalModel
from ._layout import contract_jacobians
from .jacobian import jacobians
from .loop import loop_jacobians

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_VERIFY_EXAMPLES = 4
_VERIFY_BUDGET = 2**26  # numbers of the per-example reference gradients
_CONCAT_BELOW = 1024  # parameters: smaller per-example gradient blocks share one product
_VERIFY_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass
class _Layer:
    """A supported module whose selected parameters get a structured kernel."""

    name: str  # module name
    module: nn.Module
    weight: Optional[str] = None  # full parameter names, if selected
    bias: Optional[str] = None
    use_gram: bool = False  # decided per block size in StructuredMethod

    @property
    def param_names(self) -> list[str]:
        """The layer's selected parameter names."""
        return [n for n in (self.weight, self.bias) if n is not None]


@dataclass
class StructurePlan:
    """Which selected parameters are structured and which fall back to Jacobians."""

    layers: list[_Layer] = field(default_factory=list)
    fallback_names: list[str] = field(default_factory=list)

    @property
    def structured_names(self) -> list[str]:
        """Selected parameters with a structured kernel, in layer order."""
        return [n for layer in self.layers for n in layer.param_names]


def plan_structure(fm: FunctionalModel, x: Tensor) -> StructurePlan:
    """Find the supported layers of ``fm`` and verify them on a few examples of ``x``.

    The verified plan is remembered under a fingerprint of the model's structure: the
    selected names, the compute dtype, the per-example input shape and every module's
    name, type and parameter identities. Repeated calls on the same model (a monitor's
    reports, also through a fresh wrapper module each time) skip the verification pass;
    any change of that fingerprint (a replaced layer or parameter, new tying) verifies
    again. At most ``_MAX_PLANS`` plans are kept, the least recently used dropped first.
    """
    key = fingerprint(fm, x)
    roles = _PLANS.pop(key, None)
    if roles is None:
        candidates = _candidate_layers(fm)
        if candidates:
            candidates = _verified(fm, candidates, _verification_batch(fm, candidates, x))
        roles = [(layer.name, layer.weight, layer.bias) for layer in candidates]
    _PLANS[key] = roles  # (re)inserted last: most recently used
    while len(_PLANS) > _MAX_PLANS:
        del _PLANS[next(iter(_PLANS))]
    modules = dict(fm.module.named_modules())
    layers = [_Layer(name, modules[name], weight, bias) for name, weight, bias in roles]
    structured = {n for layer in layers for n in layer.param_names}
    return StructurePlan(layers, [n for n in fm.names if n not in structured])


_MAX_PLANS = 32
_PLANS: dict[tuple, list[tuple[str, Optional[str], Optional[str]]]] = {}


def fingerprint(fm: FunctionalModel, x: Any) -> tuple:
    """The model's structure, selection, dtype and per-example input signature."""
    structure = tuple(
        (name, type(m), tuple((k, id(p)) for k, p in m._parameters.items()))
        for name, m in fm.module.named_modules(remove_duplicate=False)
    )
    return (tuple(fm.names), fm.dtype, _inputs.example_signature(x), structure)


def _verification_batch(fm: FunctionalModel, layers: list[_Layer], x: Any) -> Any:
    """At least two examples (one repeated if need be), fewer for very large layers."""
    largest = max(fm.params[n].numel() for layer in layers for n in layer.param_names)
    n = max(2, min(_VERIFY_EXAMPLES, _VERIFY_BUDGET // max(1, largest)))
    x = _inputs.take(x, slice(0, n))
    while _inputs.batch_size(x) < 2:
        x = _inputs.concat([x, x])
    return x


class StructuredMethod:
    """``method="structured"``: see the module docstring."""

    name = "structured"

    def __init__(
        self,
        fm: FunctionalModel,
        output: str,
        per_layer: bool,
        plan: StructurePlan,
        block_size: int,
        on_fallback: Optional[Callable[[BaseException], None]] = None,
        loop_fallback: bool = False,
    ) -> None:
        self.fm, self.output, self.per_layer, self.plan = fm, output, per_layer, plan
        self._block_size = block_size
        self._on_fallback = on_fallback
        self._loop_fallback = loop_fallback  # per-example Jacobians by a loop (no vmap)

    # ----------------------------------------------------------------- features
    def features(self, x: Any) -> dict[str, Any]:
        """Per-example gradients ``{name: (N, C, P)}`` and Gram factors for a chunk.

        Raises:
            RuntimeError: a layer's recorded input or output does not have one row per
                example of ``x`` (the chain then falls back to another method).
        """
        per_example: dict[str, Tensor] = {}
        grams: dict[str, tuple[LayerInput, Tensor, Optional[str]]] = {}
        if self.plan.layers:
            rec = _record(self.fm, self.plan.layers, x)
            inputs, cotangents = rec.inputs, rec.cotangents
            _check_rows(self.plan.layers, rec, _inputs.batch_size(x))
            for layer in self.plan.layers:
                H, G = _weight_factors(layer, inputs[layer.name], cotangents[layer.name], self.fm)
                for name, J in _small_per_example(
                    layer, inputs[layer.name], cotangents[layer.name], self.fm
                ).items():
                    per_example[name] = J
                if layer.weight is None or isinstance(layer.module, _NORMS):
                    continue  # norm weights are among the small per-example gradients
                if self._use_gram(layer, H, G):
                    # the bias kernel Σ G·G reuses the weight's cotangent Gram
                    bias = layer.bias if layer.bias in per_example else None
                    if bias is not None:
                        del per_example[bias]
                    grams[layer.weight] = (H, G, bias)
                else:
                    groups = getattr(layer.module, "groups", 1)
                    per_example[layer.weight] = per_example_outer(H, G, groups)
        if self.plan.fallback_names:
            per_example.update(self._fallback_jacobians(x))
        return {"per_example": per_example, "grams": grams}

    def _fallback_jacobians(self, x: Any) -> dict[str, Tensor]:
        """Per-example Jacobians of the unstructured parameters: ``vmap``, else a loop."""
        names = self.plan.fallback_names
        if not self._loop_fallback:
            try:
                return jacobians(self.fm, x, names)
            except Exception as err:
                self._loop_fallback = True
                if self._on_fallback is not None:
                    self._on_fallback(err)
        return loop_jacobians(self.fm, x, names)

    def _use_gram(self, layer: _Layer, H: LayerInput, G: Tensor) -> bool:
        if getattr(layer.module, "groups", 1) != 1:
            return False
        C, _, T, D = G.shape
        matches = None
        if H.tokens is not None:  # per example of this block, scaled to a full block
            matches = H.matches() * self._block_size // max(1, H.tokens.shape[0])
        return prefer_gram(self._block_size, C, T, H.width, D, self.output, matches)

    # ------------------------------------------------------------------- blocks
    def block(self, f1: dict[str, Any], f2: dict[str, Any]) -> dict[str, Tensor]:
        """Kernel block: one entry per parameter, or the total under ``""``."""
        J1, J2 = f1["per_example"], f2["per_example"]
        parts: dict[str, Tensor] = {}
        for name, (H1, G1, bias) in f1["grams"].items():
            H2, G2, _ = f2["grams"][name]
            if H1.tokens is not None:  # an embedding (no bias): matching tokens only
                parts[name] = contract_token_pairs(H1, H2, G1, G2, self.output)
                continue
            A = H1.gram(H2)  # (N1, T, N2, S)
            if bias is None:
                parts[name] = contract_gram(A, G1, G2, self.output)
            elif self.per_layer:
                parts[name], parts[bias] = contract_gram(A, G1, G2, self.output, with_bias=True)
            else:  # bias gradient Σ_t G: the same product with H·H' + 1
                parts[name] = contract_gram(A + 1.0, G1, G2, self.output)
        if self.per_layer:
            for name in J1:
                parts[name] = contract_jacobians(J1[name], J2[name], self.output)
            return parts
        # large per-example blocks are contracted one by one (concatenating them would
        # copy them all); the small ones together, as one product
        small = [name for name, J in J1.items() if J.shape[2] < _CONCAT_BELOW]
        if small:
            cat1 = torch.cat([J1[name] for name in small], dim=2)  # (N1, C, P')
            cat2 = cat1 if J2 is J1 else torch.cat([J2[name] for name in small], dim=2)
            parts[""] = contract_jacobians(cat1, cat2, self.output)
        for name, J in J1.items():
            if name not in small:
                parts[name] = contract_jacobians(J, J2[name], self.output)
        total = None
        for K in parts.values():
            total = K if total is None else total + K
        return {"": total}


# --------------------------------------------------------------------------- plan
def _candidate_layers(fm: FunctionalModel) -> list[_Layer]:
    """Supported modules whose selected parameters they alone hold."""
    owners: dict[int, int] = {}
    for module in fm.module.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    selected = set(fm.names)
    layers = []
    for mod_name, module in fm.module.named_modules():
        if not _supported(module):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        layer = _Layer(mod_name, module)
        for role in ("weight", "bias"):
            p = module._parameters.get(role)
            full = prefix + role
            if p is not None and full in selected and owners[id(p)] == 1:
                setattr(layer, role, full)
        if layer.param_names:
            layers.append(layer)
    return layers


def _supported(module: nn.Module) -> bool:
    """Whether the module is of a type with a structured kernel and its stock forward."""
    for base in (nn.Linear, *_CONVS, nn.Embedding, *_NORMS):
        if isinstance(module, base):
            if (
                type(module).forward is not base.forward
                and base is not nn.modules.batchnorm._BatchNorm
            ):
                return False
            break
    else:
        return False
    if isinstance(module, _CONVS):
        return module.padding_mode == "zeros"
    if isinstance(module, nn.Embedding):
        return module.max_norm is None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            module.track_running_stats
            and module.running_mean is not None
            and (type(module).forward is nn.modules.batchnorm._BatchNorm.forward)
        )
    return True


def _verified(fm: FunctionalModel, layers: list[_Layer], x: Any) -> list[_Layer]:
    """Keep the parameters whose factors reproduce autograd's *per-example* gradients.

    With ``n`` examples and a random cotangent ``u[r] (C,)`` for each example ``r`` (the
    method's own generator; the global RNG is untouched), one forward and one batched
    backward pass give, for every ``r``, the layer's output cotangent ``G_r``; autograd
    on each example alone (a batch of one, as the reference defines the per-example
    Jacobian) gives ``g_r = ∂⟨u[r], f(x_r)⟩/∂θ``. A layer is kept only if

    * its module is called exactly once per forward;
    * its input and output have ``n`` rows, one per example;
    * ``G_r`` vanishes on the rows of every example but ``r`` (the output is per example);

    and each of its parameters only if the gradient rebuilt from the factors, ``Σ_i`` of
    the per-example gradients for ``G_r``, equals ``g_r`` for every ``r``. Together these
    give ``J_i(θ)ᵀ u[i]`` rebuilt = autograd's for every example ``i``: a linear map that
    agrees on a random direction agrees everywhere, with probability one.
    """
    n = _inputs.batch_size(x)
    generator = torch.Generator().manual_seed(0)
    drawn: list[Tensor] = []

    def per_example_cotangents(logits: Tensor) -> Tensor:
        u = torch.randn(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
        drawn.append(u)
        eye = torch.eye(n, dtype=logits.dtype, device=logits.device)
        return eye[:, :, None] * u[None]  # (n, n, C): row r only on example r

    names = [name for layer in layers for name in layer.param_names]
    rec = _record(fm, layers, x, cotangents=per_example_cotangents)
    truth = _single_example_gradients(fm, names, x, drawn[0])
    norms = [
        sum(float(g.square().sum()) for g in t.values() if g is not None) ** 0.5 for t in truth
    ]
    rtol = _VERIFY_RTOL.get(fm.dtype, 1e-3)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=fm.device)
    kept = []
    for layer in layers:
        if rec.calls.get(layer.name, 0) != 1:
            continue  # reused module (or never called): its inputs are not one H
        inp, grad = rec.inputs[layer.name], rec.cotangents[layer.name]  # grad (n, *out)
        if inp.ndim == 0 or inp.shape[0] != n or grad.ndim < 2 or grad.shape[1] != n:
            continue  # batch-free input or output broadcast over the batch
        leak = grad[off_diagonal].norm().item()  # cotangent of example r on other rows
        if leak > rtol * max(grad.norm().item(), 1e-30):
            continue  # rows are not examples (e.g. a sequence-first layout)
        for r in range(n):
            rebuilt = _summed_gradients(layer, inp, grad[r : r + 1], fm)
            for name, g in rebuilt.items():
                ref = truth[r][name]
                ref = torch.zeros_like(g) if ref is None else ref.reshape(g.shape)
                # round-off is judged against the example's whole gradient (a parameter
                # whose true gradient is zero, e.g. an attention key bias, rebuilds to ~0)
                scale = max(ref.norm().item(), g.norm().item(), 1e-6 * norms[r], 1e-30)
                if (g - ref).norm().item() > rtol * scale:  # e.g. used outside the call
                    setattr(layer, "weight" if name == layer.weight else "bias", None)
        if layer.param_names:
            kept.append(layer)
    return kept


def _single_example_gradients(
    fm: FunctionalModel, names: list[str], x: Any, u: Tensor
) -> list[dict[str, Optional[Tensor]]]:
    """``∂⟨u[r], f(x_r)⟩/∂θ`` for each example ``r``, each from a batch of one."""
    out = []
    for r in range(_inputs.batch_size(x)):
        wrt = {name: fm.params[name].detach().requires_grad_() for name in names}
        with torch.enable_grad():
            logits = fm({**fm.params, **wrt}, _inputs.take(x, slice(r, r + 1)))  # (1, C)
        grads = torch.autograd.grad(
            logits, list(wrt.values()), grad_outputs=u[r : r + 1], allow_unused=True
        )
        out.append(dict(zip(wrt, grads)))
    return out


def _check_rows(layers: list[_Layer], rec: _Recording, n: int) -> None:
    """Every recorded layer input and output cotangent has one row per example."""
    for layer in layers:
        inp, grad = rec.inputs.get(layer.name), rec.cotangents.get(layer.name)
        if inp is None or grad is None or inp.shape[:1] != (n,) or grad.shape[1:2] != (n,):
            raise RuntimeError(
                f"structured: the input or output of layer {layer.name!r} does not have one "
                f"row per example ({n} examples); its kernel cannot be factorised."
            )


# ------------------------------------------------------------------ recording
@contextlib.contextmanager
def _hooks(layers: list[_Layer], hook: Callable[[_Layer, Any, Any], Any]) -> Iterator[None]:
    handles = [
        layer.module.register_forward_hook(lambda m, i, o, layer=layer: hook(layer, i, o))
        for layer in layers
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Recording:
    inputs: dict[str, Tensor]  # layer -> its input
    cotangents: dict[str, Tensor]  # layer -> (R, N, *output_shape)
    param_grads: dict[str, Optional[Tensor]]  # wrt name -> (R, *shape)
    calls: dict[str, int]  # layer -> calls in one forward


def _record(
    fm: FunctionalModel,
    layers: list[_Layer],
    x: Tensor,
    cotangents: Optional[Callable[[Tensor], Tensor]] = None,
    wrt: Optional[dict[str, Tensor]] = None,
) -> _Recording:
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
    """
    inputs: dict[str, Tensor] = {}
    zeros: dict[str, Tensor] = {}
    calls: dict[str, int] = {}

    def hook(layer: _Layer, inp: tuple, out: Tensor) -> Tensor:
        calls[layer.name] = calls.get(layer.name, 0) + 1
        inputs[layer.name] = inp[0].detach()
        z = torch.zeros_like(out, requires_grad=True)
        zeros[layer.name] = z
        return out + z

    wrt = wrt or {}
    with torch.enable_grad(), _hooks(layers, hook):
        logits = fm({**fm.params, **wrt}, x)  # (N, C)
    N, C = logits.shape
    if cotangents is None:
        eye = torch.eye(C, dtype=logits.dtype, device=logits.device)
        cts = eye.unsqueeze(1).expand(C, N, C)  # (C, N, C)
    else:
        cts = cotangents(logits)
    targets = [zeros[n] for n in zeros] + list(wrt.values())
    try:
        grads = torch.autograd.grad(
            logits, targets, grad_outputs=cts, is_grads_batched=True, allow_unused=True
        )
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
    return _Recording(inputs, result, param_grads, calls)


# ------------------------------------------------------------------ per layer
def _weight_factors(
    layer: _Layer, inp: Tensor, grad: Tensor, fm: FunctionalModel
) -> tuple[Optional[LayerInput], Tensor]:
    """``H`` and ``G (R, N, T, D)`` of the layer's weight (``(None, grad)`` for norms)."""
    module = layer.module
    R, N = grad.shape[:2]
    if isinstance(module, nn.Linear):
        K = inp.shape[-1]
        return LayerInput(dense=inp.reshape(N, -1, K)), grad.reshape(R, N, -1, grad.shape[-1])
    if isinstance(module, _CONVS):
        patches = _unfold(inp, module)  # (N, T, Cin·k)
        G = grad.flatten(start_dim=3).transpose(2, 3)  # (R, N, T, Cout)
        return LayerInput(dense=patches), G
    if isinstance(module, nn.Embedding):
        tokens = inp.reshape(N, -1)
        if module.padding_idx is not None:
            tokens = tokens.masked_fill(tokens == module.padding_idx, -1)
        G = grad.reshape(R, N, -1, grad.shape[-1])
        return LayerInput(tokens=tokens, vocab=module.num_embeddings, dtype=fm.dtype), G
    return None, grad


def _small_per_example(
    layer: _Layer, inp: Tensor, grad: Tensor, fm: FunctionalModel
) -> dict[str, Tensor]:
    """Per-example gradients ``(N, C, P)`` of biases and norm-layer affine weights."""
    module = layer.module
    R, N = grad.shape[:2]
    out: dict[str, Tensor] = {}
    if isinstance(module, (nn.Linear, nn.Embedding)):
        if layer.bias is not None:
            out[layer.bias] = grad.reshape(R, N, -1, grad.shape[-1]).sum(2).transpose(0, 1)
        return out
    if isinstance(module, _CONVS):
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


def _summed_gradients(
    layer: _Layer, inp: Tensor, grad: Tensor, fm: FunctionalModel
) -> dict[str, Tensor]:
    """``Σ_i`` of the layer's per-example gradients for one cotangent (``grad (1, N, ...)``)."""
    summed = {
        name: J.sum(0).reshape(-1) for name, J in _small_per_example(layer, inp, grad, fm).items()
    }
    if layer.weight is not None and not isinstance(layer.module, _NORMS):
        H, G = _weight_factors(layer, inp, grad, fm)
        groups = getattr(layer.module, "groups", 1)
        if groups == 1:
            summed[layer.weight] = H.summed_outer(G[0]).reshape(-1)
        else:
            summed[layer.weight] = per_example_outer(H, G, groups).sum(0).reshape(-1)
    return summed


def _unfold(x: Tensor, conv: nn.Module) -> Tensor:
    """Input patches of an N-d convolution: ``(N, T, C_in·Π k)``, weight-flatten order."""
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
