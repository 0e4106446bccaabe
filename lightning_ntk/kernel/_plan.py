"""Which layers the structured method may factorise, verified per example on the call's inputs.

:func:`plan_structure` lists the supported layers holding selected parameters and keeps
those whose factors reproduce autograd's per-example gradients (see :mod:`.structured`);
plans are cached per model fingerprint. A cached plan is never trusted blindly:
:func:`check_call` re-checks, on every chunk of every call, what the plan assumes, from
the recording the structured method makes anyway plus one more backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import _inputs
from ._calls import CallSpec, discover
from ._functional import FunctionalModel
from ._recording import (
    CONVS,
    NORMS,
    Layer,
    Recording,
    call_layer,
    candidate_layers,
    record,
    summed_gradients,
)

__all__ = ["PlanMismatch", "StructurePlan", "check_call", "fingerprint", "plan_structure"]


_VERIFY_EXAMPLES = 4


_VERIFY_BUDGET = 2**26  # numbers of the per-example reference gradients


_VERIFY_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass
class StructurePlan:
    """Which selected parameters are structured and which fall back to Jacobians."""

    layers: list[Layer] = field(default_factory=list)
    fallback_names: list[str] = field(default_factory=list)

    @property
    def structured_names(self) -> list[str]:
        """Selected parameters with a structured kernel, in layer order."""
        return [n for layer in self.layers for n in layer.param_names]

    def without(self, layer_names: set[str], order: list[str]) -> StructurePlan:
        """The plan with the named layers' parameters handed to per-example Jacobians.

        Args:
            layer_names: module names of the layers to drop.
            order: every selected parameter name, in the order of ``fallback_names``.
        """
        kept = [layer for layer in self.layers if layer.name not in layer_names]
        structured = {n for layer in kept for n in layer.param_names}
        return StructurePlan(kept, [n for n in order if n not in structured])


class PlanMismatch(RuntimeError):
    """A planned layer did not behave, on this call's inputs, as its plan assumes.

    Attributes:
        reasons: ``{layer name: what differed}``.
    """

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(f"layer {name!r} {why}" for name, why in reasons.items()))


def plan_structure(fm: FunctionalModel, x: Tensor) -> StructurePlan:
    """Find the supported layers of ``fm`` and verify them on a few examples of ``x``.

    The verified plan is remembered under a fingerprint of the model's structure: the
    selected names, the compute dtype, the per-example input shape and every module's
    name, type, parameter identities and plain settings. Repeated calls on the same
    model (a monitor's reports, also through a fresh wrapper module each time) skip the
    verification pass; any change of that fingerprint (a replaced layer or parameter,
    new tying, a changed flag) verifies again. What no fingerprint sees (data-dependent
    control flow, settings held in containers) is caught by :func:`check_call` on every
    call. At most ``_MAX_PLANS`` plans are kept, the least recently used dropped first.
    """
    key = fingerprint(fm, x)
    roles = _PLANS.pop(key, None)
    if roles is None:
        candidates = candidate_layers(fm, _supported)
        candidates += _call_candidates(fm, candidates, _inputs.take(x, slice(0, _VERIFY_EXAMPLES)))
        if candidates:
            candidates = _verified(fm, candidates, _verification_batch(fm, candidates, x))
        roles = [(layer.name, layer.weight, layer.bias, layer.op) for layer in candidates]
    _PLANS[key] = roles  # (re)inserted last: most recently used
    while len(_PLANS) > _MAX_PLANS:
        del _PLANS[next(iter(_PLANS))]
    modules = dict(fm.module.named_modules())
    layers = [
        Layer(name, modules[name], weight, bias) if op is None else call_layer(op, weight, bias)
        for name, weight, bias, op in roles
    ]
    structured = {n for layer in layers for n in layer.param_names}
    return StructurePlan(layers, [n for n in fm.names if n not in structured])


_MAX_PLANS = 32


_PLANS: dict[tuple, list[tuple[str, Optional[str], Optional[str], Optional[str]]]] = {}


def fingerprint(fm: FunctionalModel, x: Any, settings: bool = True) -> tuple:
    """The model's structure, selection, dtype and per-example input signature.

    The structure is every module's name, type and parameter identities, and with
    ``settings`` also its plain settings (:func:`_settings`: ``sparse``, ``padding_idx``,
    flags a forward branches on), so that what is remembered of a model's computation
    (a verified plan, a method that failed) is forgotten when one of them changes.
    """
    structure = tuple(
        (
            name,
            type(m),
            tuple((k, id(p)) for k, p in m._parameters.items()),
            _settings(m) if settings else (),
        )
        for name, m in fm.module.named_modules(remove_duplicate=False)
    )
    return (tuple(fm.names), fm.dtype, _inputs.example_signature(x), structure)


_PLAIN = (bool, int, float, str, type(None), torch.dtype)

# Attributes that change while a model trains but that no forward reads: ``training``
# (the engine evaluates in eval mode whatever the flag says) and Lightning's record of
# the hook being run (a LightningModule's ``_current_fx_name``, a different name in
# every hook, would otherwise verify the plan again for each hook that measures).
_BOOKKEEPING = frozenset({"training", "_current_fx_name"})


def _settings(module: nn.Module) -> tuple:
    """The module's attributes of plain types (numbers, strings, flags, tuples of them).

    Bookkeeping that no forward reads is left out (:data:`_BOOKKEEPING`).
    """

    def plain(value: Any) -> bool:
        if isinstance(value, tuple):
            return all(plain(v) for v in value)
        return isinstance(value, _PLAIN)

    return tuple(
        (key, value)
        for key, value in vars(module).items()
        if key not in _BOOKKEEPING and plain(value)
    )


def _verification_batch(fm: FunctionalModel, layers: list[Layer], x: Any) -> Any:
    """At least two examples (one repeated if need be), fewer for very large layers."""
    largest = max(fm.params[n].numel() for layer in layers for n in layer.param_names)
    n = max(2, min(_VERIFY_EXAMPLES, _VERIFY_BUDGET // max(1, largest)))
    x = _inputs.take(x, slice(0, n))
    while _inputs.batch_size(x) < 2:
        x = _inputs.concat([x, x])
    return x


# --------------------------------------------------------------------------- plan


def _call_candidates(fm: FunctionalModel, modules: list[Layer], x: Any) -> list[Layer]:
    """Layer calls (``F.linear``, ``F.conv*``, ``@``) on selected weights no module layer holds.

    One forward pass on ``x`` lists the calls (:func:`._calls.discover`); a weight called
    once becomes a candidate, with its call's bias if that bias is a selected parameter
    no other layer uses.
    """
    claimed = {n for layer in modules for n in layer.param_names}
    params = {n: t for n, t in fm.params.items() if n not in claimed}
    if not params:
        return []
    calls = discover(lambda p: fm({**fm.params, **p}, x), params)
    bias_users: dict[str, int] = {}
    for specs in calls.values():
        for spec in specs:
            if spec.bias is not None:
                bias_users[spec.bias] = bias_users.get(spec.bias, 0) + 1
    layers = []
    for weight, specs in calls.items():
        if len(specs) != 1:
            continue  # called twice: not one H (the per-call check would refuse it too)
        bias = specs[0].bias
        if bias is not None and (bias_users[bias] != 1 or bias in calls):
            bias = None
        layers.append(call_layer(specs[0].op, weight, bias))
    return layers


def _operands_differ(layer: Layer) -> Optional[str]:
    """How a layer call, in the latest recording, differs from its plan (``None``: it does not)."""
    spec: Optional[CallSpec] = layer.spec
    if layer.op is None or spec is None:
        return None  # a module layer, or a call not made (its call count says so)
    if spec.op != layer.op:
        return f"was called as {spec.op} where it was verified as {layer.op}"
    if spec.bias != layer.bias:
        return "was called with another bias than when it was verified"
    return None


def _supported(module: nn.Module) -> bool:
    """Whether the module is of a type with a structured kernel and its stock forward."""
    for base in (nn.Linear, *CONVS, nn.Embedding, *NORMS):
        if isinstance(module, base):
            if (
                type(module).forward is not base.forward
                and base is not nn.modules.batchnorm._BatchNorm
            ):
                return False
            break
    else:
        return False
    if isinstance(module, CONVS):
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


def _verified(fm: FunctionalModel, layers: list[Layer], x: Any) -> list[Layer]:
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
    rec = record(fm, layers, x, cotangents=per_example_cotangents)
    truth = _single_example_gradients(fm, names, x, drawn[0])
    norms = [
        sum(float(g.square().sum()) for g in t.values() if g is not None) ** 0.5 for t in truth
    ]
    rtol = _VERIFY_RTOL.get(fm.dtype, 1e-3)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=fm.device)
    kept = []
    for layer in layers:
        if rec.calls.get(layer.name, 0) != 1 or _operands_differ(layer) is not None:
            continue  # reused module (or never called): its inputs are not one H
        inp, grad = rec.inputs[layer.name], rec.cotangents[layer.name]  # grad (n, *out)
        if inp.ndim == 0 or inp.shape[0] != n or grad.ndim < 2 or grad.shape[1] != n:
            continue  # batch-free input or output broadcast over the batch
        leak = grad[off_diagonal].norm().item()  # cotangent of example r on other rows
        if leak > rtol * max(grad.norm().item(), 1e-30):
            continue  # rows are not examples (e.g. a sequence-first layout)
        for r in range(n):
            rebuilt = summed_gradients(layer, inp, grad[r : r + 1], fm)
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


# ------------------------------------------------------------------ every call
def check_call(fm: FunctionalModel, layers: list[Layer], rec: Recording, n: int) -> None:
    """Check, on one chunk's recording, every assumption of the plan; raise if one fails.

    The structured kernel of a layer is exact when, in this very forward pass,

    * the layer is called exactly once (not a data-dependent number of times);
    * its input and output have ``n`` rows, one per example of the chunk;
    * its output rows of example ``i`` reach only the logits of example ``i``;
    * its selected parameters act only through this call.

    The first two are read from the recording. The last two are checked with a random
    direction ``u (N, C)`` pushed back once (``rec.probe``): autograd's cotangent of the
    layer output for ``⟨u, f⟩`` must equal ``Σ_a u[i, a] G[a, i]`` on the rows of each
    example ``i`` (rows of one example reaching another's logits make them differ), and
    the parameter gradient rebuilt from the factors with that cotangent must equal
    autograd's (a use outside the call makes them differ). Both sides are linear in
    ``u``: agreement on a random direction means agreement everywhere, with
    probability one.

    Raises:
        PlanMismatch: naming each layer that failed and how.
    """
    probe = rec.probe
    assert probe is not None, "record(..., probe=True) gives the check its direction"
    rtol = _VERIFY_RTOL.get(fm.dtype, 1e-3)
    reasons: dict[str, str] = {}
    norms = [g.norm() for g in probe.param_grads.values() if g is not None]
    floor = 1e-6 * float(torch.stack(norms).norm()) if norms else 0.0
    for layer in layers:
        calls = rec.calls.get(layer.name, 0)
        if calls != 1:
            reasons[layer.name] = f"was called {calls} times in one forward pass"
            continue
        differs = _operands_differ(layer)
        if differs is not None:
            reasons[layer.name] = differs
            continue
        inp, G = rec.inputs[layer.name], rec.cotangents[layer.name]  # G (C, N, *out)
        if inp.ndim == 0 or inp.shape[0] != n or G.ndim < 2 or G.shape[1] != n:
            reasons[layer.name] = f"does not have one row per example ({n} examples)"
            continue
        Gu = probe.cotangents[layer.name]  # (N, *out)
        C = G.shape[0]
        combined = torch.einsum("cn,cnm->nm", probe.u.T, G.reshape(C, n, -1))  # (N, M)
        scale = max(Gu.norm().item(), combined.norm().item(), 1e-30)
        if (Gu.reshape(n, -1) - combined).norm().item() > rtol * scale:
            reasons[layer.name] = "mixes examples: its output rows reach other examples' logits"
            continue
        for name, rebuilt in summed_gradients(layer, inp, Gu[None], fm).items():
            ref = probe.param_grads.get(name)
            ref = torch.zeros_like(rebuilt) if ref is None else ref.reshape(rebuilt.shape)
            scale = max(ref.norm().item(), rebuilt.norm().item(), floor, 1e-30)
            if (rebuilt - ref).norm().item() > rtol * scale:
                reasons[layer.name] = f"has its parameter {name!r} used outside its call"
                break
    if reasons:
        raise PlanMismatch(reasons)
