"""Infinite-width kernels of fully-connected networks, and networks that converge to them.

The network (``L = depth`` hidden layers of width ``n``, input dimension ``d``,
activation ``φ``, ``σ_w = weight_std``, ``σ_b = bias_std``), NTK parameterization:

    h¹ = (σ_w/√d) W¹ x + σ_b b¹,        h^{l+1} = (σ_w/√n) W^{l+1} φ(h^l) + σ_b b^{l+1},

with every ``W``, ``b`` entry i.i.d. ``N(0, 1)`` and logits ``f(x) = h^{L+1}(x) ∈ R^C``.
The standard parameterization has the same forward distribution with the scales moved
into the initialisation: ``h^{l+1} = W^{l+1} φ(h^l) + b^{l+1}``,
``W ~ N(0, σ_w²/fan_in)``, ``b ~ N(0, σ_b²)``.

As ``n → ∞`` (Neal 1996; Lee et al. 2018; Jacot et al. 2018; Arora et al. 2019) the
pre-activations become Gaussian processes with covariance ``Σ^l`` and the NTK becomes
deterministic, ``Θ(x, x') ⊗ I_C``, given by the layer recursion

    Σ¹(x, x')      = σ_w² x·x'/d + σ_b²
    Σ^{l+1}(x, x') = σ_w² E[φ(u) φ(v)] + σ_b²
    Σ̇^{l+1}(x, x') = σ_w² E[φ'(u) φ'(v)],    (u, v) ~ N(0, [[Σ^l(x,x), Σ^l(x,x')],
                                                          [Σ^l(x,x'), Σ^l(x',x')]])
    Θ¹ = Σ¹,       Θ^{l+1} = Θ^l Σ̇^{l+1} + Σ^{l+1},

and ``NNGP = Σ^{L+1}``, ``NTK = Θ^{L+1}``. Closed forms of the Gaussian expectations,
with ``c = Σ^l(x,x')``, ``a = Σ^l(x,x)``, ``b = Σ^l(x',x')``:

* ``"relu"`` (arc-cosine kernels, Cho & Saul 2009), ``ρ = c/√(ab) = cos ϑ``:
  ``E[φφ] = √(ab) (sin ϑ + (π − ϑ) cos ϑ) / (2π)``, ``E[φ'φ'] = (π − ϑ) / (2π)``.
* ``"erf"`` (Williams 1997): ``E[φφ] = (2/π) arcsin(2c / √((1 + 2a)(1 + 2b)))``,
  ``E[φ'φ'] = (4/π) / √((1 + 2a)(1 + 2b) − 4c²)``.
* ``"identity"``: ``E[φφ] = c``, ``E[φ'φ'] = 1``.

**Standard parameterization.** Its empirical NTK grows linearly with the width: the
gradient with respect to a hidden-to-hidden (or hidden-to-output) weight lacks the
``σ_w/√n`` factor of the NTK parameterization, so the layer's contribution is
``n/σ_w²`` times larger, while first-layer and bias contributions stay ``O(1)``. With
every hidden layer of width ``n``,

    Θ_std(x, x') / n  →  Θ̃^{L+1}(x, x'),    Θ̃¹ = 0,
    Θ̃^{l+1} = Θ̃^l Σ̇^{l+1} + (Σ^{l+1} − σ_b²)/σ_w² = Θ̃^l Σ̇^{l+1} + E_{Σ^l}[φ(u) φ(v)],

which is what ``parameterization="standard"`` returns (it needs ``depth ≥ 1``; the NNGP
is the same in both parameterizations). Equivalently, gradient descent on the standard
network with learning rate ``η/n`` follows the kernel dynamics of ``η Θ̃``; the NTK
parameterization trains in the same regime with a width-independent learning rate.
The remainder ``Θ_std/n − Θ̃`` is ``O(1/√n)`` (fluctuations) plus ``O(1/n)`` (first layer
and biases).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "NTKMLP", "PARAMETERIZATIONS", "analytic_nngp", "analytic_ntk"]

ACTIVATIONS = ("relu", "erf", "identity")
PARAMETERIZATIONS = ("ntk", "standard")


def analytic_ntk(
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    depth: int,
    activation: str = "relu",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    parameterization: str = "ntk",
) -> Tensor:
    """Infinite-width NTK ``Θ(X1, X2)`` of a fully-connected network (see module docstring).

    The full kernel is ``Θ(x, x') ⊗ I_C``: every logit has the same kernel and different
    logits are uncorrelated, so this is also the limit of
    ``empirical_ntk(model, x1, x2, output="trace")``.

    Args:
        x1: inputs ``(N1, d)`` (or ``(N1, ...)``, flattened to ``d`` features).
        x2: inputs ``(N2, d)``; ``None`` means ``x1``.
        depth: number of hidden layers ``L >= 0`` (``0`` is a linear model
            ``f = (σ_w/√d) W x + σ_b b``).
        activation: ``"relu"``, ``"erf"`` or ``"identity"``.
        weight_std: ``σ_w > 0``.
        bias_std: ``σ_b >= 0``.
        parameterization: ``"ntk"`` → ``Θ^{L+1}``; ``"standard"`` → ``lim Θ_std / n``
            (``n`` the hidden width), which needs ``depth >= 1``.

    Returns:
        The kernel ``(N1, N2)`` in float64, on ``x1``'s device.

    Raises:
        ValueError / TypeError: bad arguments, naming the argument.
    """
    if parameterization == "standard" and depth == 0:
        raise ValueError(
            "Expected `depth` >= 1 for parameterization='standard' (its kernel is the limit "
            "of Θ/width, and a network without hidden layers has no width) but got 0."
        )
    return _kernels(x1, x2, depth, activation, weight_std, bias_std, parameterization)[1]


def analytic_nngp(
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    depth: int,
    activation: str = "relu",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    parameterization: str = "ntk",
) -> Tensor:
    """Infinite-width NNGP covariance ``Σ^{L+1}(X1, X2)`` of the logits at initialisation.

    The covariance of ``f_a(x)`` and ``f_b(x')`` over random initialisations tends to
    ``Σ^{L+1}(x, x') δ_ab``; it is the same for both parameterizations (their forward
    passes have the same distribution).

    Args:
        x1: inputs ``(N1, d)``.
        x2: inputs ``(N2, d)``; ``None`` means ``x1``.
        depth: number of hidden layers ``L >= 0``.
        activation: ``"relu"``, ``"erf"`` or ``"identity"``.
        weight_std: ``σ_w > 0``.
        bias_std: ``σ_b >= 0``.
        parameterization: ``"ntk"`` or ``"standard"``; it does not change the NNGP and is
            accepted so that both functions take the same arguments.

    Returns:
        The covariance ``(N1, N2)`` in float64.
    """
    return _kernels(x1, x2, depth, activation, weight_std, bias_std, parameterization)[0]


class NTKMLP(nn.Module):
    """A fully-connected network whose empirical NTK tends to :func:`analytic_ntk`.

    Every layer is a bias-free :class:`torch.nn.Linear` holding unit-variance weights
    whose *output* is scaled (NTK parameterization)::

        h = (σ_w / √fan_in) · linear(x) + σ_b · b,      W, b ~ N(0, 1),

    or, with ``parameterization="standard"``, a plain ``nn.Linear`` with
    ``W ~ N(0, σ_w²/fan_in)`` and bias ``~ N(0, σ_b²)``. With ``bias_std=0`` there are no
    bias parameters in either parameterization. The activation follows every hidden
    layer, not the output layer.

    Args:
        in_features: input dimension ``d``.
        width: hidden width ``n``.
        depth: number of hidden layers ``L >= 0``.
        out_features: number of logits ``C``.
        activation: ``"relu"``, ``"erf"`` or ``"identity"``.
        parameterization: ``"ntk"`` or ``"standard"``.
        weight_std: ``σ_w > 0``.
        bias_std: ``σ_b >= 0``.

    Shapes:
        input ``(N, d)`` → logits ``(N, C)``.
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        out_features: int,
        activation: str = "relu",
        parameterization: str = "ntk",
        weight_std: float = 1.0,
        bias_std: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("width", width),
            ("out_features", out_features),
        ):
            _check_int(name, value, minimum=1)
        _check_int("depth", depth, minimum=0)
        _check_choice("activation", activation, ACTIVATIONS)
        _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        _check_stds(weight_std, bias_std)
        self.in_features, self.width, self.depth = in_features, width, depth
        self.activation = activation
        self.parameterization = parameterization
        self.weight_std, self.bias_std = float(weight_std), float(bias_std)
        sizes = [in_features] + [width] * depth + [out_features]
        self.layers = nn.ModuleList(
            _make_layer(fan_in, fan_out, parameterization, self.weight_std, self.bias_std)
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:])
        )
        self._phi = _ACTIVATION_FNS[activation]

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, C)`` of inputs ``(N, d)``."""
        h = x
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = self._phi(h)
            h = layer(h)
        return h

    def analytic_ntk(self, x1: Tensor, x2: Optional[Tensor] = None) -> Tensor:
        """The infinite-width limit of this network's trace NTK, ``(N1, N2)`` float64.

        For ``parameterization="standard"`` this is the limit of ``Θ / width``.
        """
        return analytic_ntk(x1, x2, **self._kernel_arguments())

    def analytic_nngp(self, x1: Tensor, x2: Optional[Tensor] = None) -> Tensor:
        """The infinite-width covariance of this network's logits, ``(N1, N2)`` float64."""
        return analytic_nngp(x1, x2, **self._kernel_arguments())

    def _kernel_arguments(self) -> dict[str, object]:
        return {
            "depth": self.depth,
            "activation": self.activation,
            "weight_std": self.weight_std,
            "bias_std": self.bias_std,
            "parameterization": self.parameterization,
        }

    def extra_repr(self) -> str:
        return (
            f"activation={self.activation!r}, parameterization={self.parameterization!r}, "
            f"weight_std={self.weight_std:g}, bias_std={self.bias_std:g}"
        )


class ScaledLinear(nn.Module):
    """``h = (σ_w/√fan_in) · W x + σ_b · b`` with unit-variance ``W`` and ``b``.

    Both live in one stock ``nn.Linear`` (``linear.weight = W``, ``linear.bias = b``),
    evaluated as ``σ_b · linear((σ_w / (σ_b √fan_in)) · x)`` — the same function and the
    same gradients — so that :func:`lightning_ntk.empirical_ntk`'s structured method
    covers every parameter (a bias held outside the ``nn.Linear`` would fall back to
    per-example Jacobians). Without a bias: ``(σ_w/√fan_in) · linear(x)``.
    """

    def __init__(self, fan_in: int, fan_out: int, weight_std: float, bias_std: float) -> None:
        super().__init__()
        self.linear = nn.Linear(fan_in, fan_out, bias=False)
        nn.init.normal_(self.linear.weight)
        self.scale = weight_std / math.sqrt(fan_in)
        self.bias_std = bias_std
        if bias_std > 0:
            self.linear.bias = nn.Parameter(torch.randn(fan_out))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, fan_in)`` → ``(N, fan_out)``."""
        if self.linear.bias is None:
            return self.scale * self.linear(x)
        return self.bias_std * self.linear((self.scale / self.bias_std) * x)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, bias_std={self.bias_std:g}"


def _make_layer(
    fan_in: int, fan_out: int, parameterization: str, weight_std: float, bias_std: float
) -> nn.Module:
    if parameterization == "ntk":
        return ScaledLinear(fan_in, fan_out, weight_std, bias_std)
    layer = nn.Linear(fan_in, fan_out, bias=bias_std > 0)
    nn.init.normal_(layer.weight, std=weight_std / math.sqrt(fan_in))
    if layer.bias is not None:
        nn.init.normal_(layer.bias, std=bias_std)
    return layer


_ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "erf": torch.erf,
    "identity": lambda h: h,
}


# ----------------------------------------------------------------------------- recursion


def _kernels(
    x1: Tensor,
    x2: Optional[Tensor],
    depth: int,
    activation: str,
    weight_std: float,
    bias_std: float,
    parameterization: str,
) -> tuple[Tensor, Tensor]:
    """``(NNGP, NTK)``, both ``(N1, N2)`` float64, by the layer recursion."""
    _check_int("depth", depth, minimum=0)
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    _check_stds(weight_std, bias_std)
    X1, X2 = _check_features(x1, x2)
    sw2, sb2 = float(weight_std) ** 2, float(bias_std) ** 2
    d = X1.shape[1]
    # Σ¹ on the cross pairs and on each input with itself (the diagonals are all we need).
    cov = sw2 * (X1 @ X2.T) / d + sb2  # (N1, N2)
    var1 = sw2 * (X1 * X1).sum(1) / d + sb2  # (N1,)
    var2 = sw2 * (X2 * X2).sum(1) / d + sb2  # (N2,)
    ntk = cov.clone() if parameterization == "ntk" else torch.zeros_like(cov)
    expect = _EXPECTATIONS[activation]
    for _ in range(depth):
        e_phi, e_dphi = expect(cov, var1[:, None], var2[None, :])
        cov_next = sw2 * e_phi + sb2
        sigma_dot = sw2 * e_dphi
        new_term = cov_next if parameterization == "ntk" else e_phi
        ntk = ntk * sigma_dot + new_term
        cov = cov_next
        var1 = sw2 * expect(var1, var1, var1, derivative=False)[0] + sb2
        var2 = sw2 * expect(var2, var2, var2, derivative=False)[0] + sb2
    return cov, ntk


def _relu_expectations(
    c: Tensor, a: Tensor, b: Tensor, derivative: bool = True
) -> tuple[Tensor, Optional[Tensor]]:
    """``E[relu(u) relu(v)]`` and ``E[1{u>0} 1{v>0}]`` for ``Cov(u, v) = [[a, c], [c, b]]``."""
    norm = torch.sqrt(a * b)
    # A zero-variance input (x = 0 without bias) has u ≡ 0: both expectations vanish.
    safe = norm > 0
    rho = torch.where(safe, c / torch.where(safe, norm, torch.ones_like(norm)), 0.0)
    angle = torch.arccos(rho.clamp(-1.0, 1.0))
    e_phi = norm * (torch.sin(angle) + (math.pi - angle) * torch.cos(angle)) / (2 * math.pi)
    e_phi = torch.where(safe, e_phi, 0.0)
    if not derivative:
        return e_phi, None
    e_dphi = torch.where(safe, (math.pi - angle) / (2 * math.pi), 0.0)
    return e_phi, e_dphi


def _erf_expectations(
    c: Tensor, a: Tensor, b: Tensor, derivative: bool = True
) -> tuple[Tensor, Optional[Tensor]]:
    """``E[erf(u) erf(v)]`` and ``E[erf'(u) erf'(v)]`` (Williams 1997)."""
    denom = (1 + 2 * a) * (1 + 2 * b)  # ≥ 1
    e_phi = (2 / math.pi) * torch.arcsin((2 * c / torch.sqrt(denom)).clamp(-1.0, 1.0))
    if not derivative:
        return e_phi, None
    e_dphi = (4 / math.pi) / torch.sqrt(denom - 4 * c * c)
    return e_phi, e_dphi


def _identity_expectations(
    c: Tensor, a: Tensor, b: Tensor, derivative: bool = True
) -> tuple[Tensor, Optional[Tensor]]:
    """``E[uv] = c`` and ``E[1·1] = 1``."""
    return c.clone(), (torch.ones_like(c) if derivative else None)


_EXPECTATIONS = {
    "relu": _relu_expectations,
    "erf": _erf_expectations,
    "identity": _identity_expectations,
}


# ---------------------------------------------------------------------------- validation


def _check_features(x1: Tensor, x2: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Inputs as float64 ``(N, d)`` matrices with a common ``d``."""
    mats = []
    for name, x in (("x1", x1), ("x2", x1 if x2 is None else x2)):
        if not isinstance(x, Tensor):
            raise TypeError(f"Expected `{name}` to be a torch.Tensor but got {type(x).__name__}.")
        if x.ndim < 2 or x.shape[0] == 0 or x[0].numel() == 0:
            raise ValueError(
                f"Expected `{name}` to be a non-empty batch of shape (N, d) but got shape "
                f"{tuple(x.shape)}."
            )
        mats.append(x.detach().reshape(x.shape[0], -1).to(device=x1.device, dtype=torch.float64))
    if mats[0].shape[1] != mats[1].shape[1]:
        raise ValueError(
            f"Expected `x2` to have the {mats[0].shape[1]} features of `x1` but got "
            f"{mats[1].shape[1]} (x1: {tuple(x1.shape)}, x2: {tuple(x2.shape)})."
        )
    return mats[0], mats[1]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"Expected `{name}` to be {kind} but got {value!r}.")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices} but got {value!r}.")


def _check_stds(weight_std: object, bias_std: object) -> None:
    for name, value, positive in (("weight_std", weight_std, True), ("bias_std", bias_std, False)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (value > 0 if positive else value >= 0)
        if not ok:
            bound = "> 0" if positive else ">= 0"
            raise ValueError(f"Expected `{name}` to be a finite float {bound} but got {value!r}.")
