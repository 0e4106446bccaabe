"""The linearized model ``f_lin(x; θ) = f(x; θ0) + J0(x)(θ − θ0)``.

:func:`linearize` snapshots ``θ0`` and returns a :class:`LinearizedModel`. Each call is
one ``torch.func.jvp`` at ``θ0`` with tangent ``θ − θ0``: the Jacobian ``J0(x)`` is never
materialised, so the cost is about two forward passes whatever the number of parameters.
Forward mode is the true derivative of the forward pass. Fused attention and Transformer
fast paths are replaced by their math equivalents during the evaluation (they have no
forward-mode rule); the user's settings are restored afterwards.

Where an op still has no forward-mode rule, ``J v`` is computed by exact fall-backs, in
order (:attr:`LinearizedModel.mode` says which ran; each is logged at DEBUG level):

1. ``"jvp"``; on CPU again with oneDNN off (``"jvp_composite"``: ``nn.LSTM`` as cells);
2. ``"double_vjp"``: the reverse-mode identity ``J v = ∂/∂u ⟨Jᵀ u, v⟩``;
3. ``"loop"``: per-example reverse-mode gradients, one example and class at a time.

Reverse mode silently differs from the forward pass's derivative wherever a backward is
not that derivative (``Embedding(padding_idx=...)`` once the padding row moved, custom
functions whose backward detaches). So a reverse-mode result is used only after it
matched a float64 central finite difference of the forward pass along the same tangent
(Richardson-extrapolated); otherwise the call raises instead of returning a plausible
wrong number.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..kernel import _inputs
from ..kernel._directional import BackwardMismatch, checked, double_vjp, forward_mode, loop_jvp
from ..kernel._functional import (
    FunctionalModel,
    OutputFn,
    ParamSelector,
    eval_mode,
    exact_matmuls,
    unwrap_module,
)
from ..kernel._sharded import call_module, full

__all__ = ["LinearizedModel", "linearize"]

ParamSource = Union[None, Mapping[str, Tensor], nn.Module]

_BUFFERS = ("initial", "current")
_MODES = ("jvp", "jvp_composite", "double_vjp", "loop")
_log = logging.getLogger("lightning_ntk.linearization")


def linearize(
    model: nn.Module,
    params0: Optional[Mapping[str, Tensor]] = None,
    *,
    params: ParamSelector = None,
    output_fn: OutputFn = None,
    store_on: Union[str, torch.device, None] = None,
    buffers: str = "initial",
    dtype: Optional[torch.dtype] = None,
) -> LinearizedModel:
    """Linearize ``model`` around its current parameters (or ``params0``).

    ``f_lin(x; θ) = f(x; θ0) + J0(x)(θ − θ0)`` with ``J0(x) = ∂f(x; θ)/∂θ`` at ``θ0``.

    Args:
        model: the network; evaluated functionally in eval mode and never written to.
            The returned object keeps a reference to it: calling it without ``params``
            reads the model's parameters *at call time*.
        params0: ``{name: tensor}`` to linearize around instead of the model's current
            values; it must hold every selected parameter, with matching shapes.
        params: which parameters ``θ`` spans (see :func:`lightning_ntk.empirical_ntk`);
            the others are held fixed like the buffers (see ``buffers``).
        output_fn: maps the model's raw output (tensor, tuple, dict) to ``(N, C)`` logits.
        store_on: device for the ``θ0`` snapshot (e.g. ``"cpu"`` for a large model on a
            GPU); it is moved to the model's device for each call. ``None``: the
            model's device.
        buffers: ``"initial"`` (default) evaluates ``f(x; θ0)`` and its Jacobian with the
            buffers (e.g. BatchNorm running statistics) and unselected parameters as they
            are now (copied), so the linear model is one fixed function of ``θ``;
            ``"current"`` reads them from the module at call time.
        dtype: compute dtype (default: the parameters'; float32 for half / bf16).

    A model sharded with FSDP2's ``fully_shard`` is linearized whole: ``θ0`` is kept as
    whole tensors (all-gathered: one full copy of the selected parameters per rank), and
    each call all-gathers the current parameters (``params=None``, a sharded module or
    ``DTensor`` values), so every rank calls together.

    Returns:
        A :class:`LinearizedModel`.
    """
    return LinearizedModel(
        model,
        params0,
        params=params,
        output_fn=output_fn,
        store_on=store_on,
        buffers=buffers,
        dtype=dtype,
    )


class LinearizedModel:
    """``f_lin(x; θ) = f(x; θ0) + J0(x)(θ − θ0)``, one ``jvp`` per call.

    Build it with :func:`linearize`; the arguments are the same.

    Attributes:
        names: the parameter names ``θ`` spans, in registration order.
        params0: ``{name: tensor}``, the detached snapshot ``θ0`` (on ``store_on``).
        model: the (unwrapped) module whose live parameters ``θt`` are read by default.
    """

    def __init__(
        self,
        model: nn.Module,
        params0: Optional[Mapping[str, Tensor]] = None,
        *,
        params: ParamSelector = None,
        output_fn: OutputFn = None,
        store_on: Union[str, torch.device, None] = None,
        buffers: str = "initial",
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        fm = FunctionalModel(model, params=params, output_fn=output_fn, dtype=dtype)
        self._setup(fm, params0, store_on=store_on, buffers=buffers)

    @classmethod
    def of(
        cls,
        fm: FunctionalModel,
        params0: Optional[Mapping[str, Tensor]] = None,
        *,
        store_on: Union[str, torch.device, None] = None,
        buffers: str = "initial",
    ) -> LinearizedModel:
        """The linearized model of a functional view the caller already built.

        For callers that evaluate one model several ways in one measurement (the
        monitor's report); the other arguments are those of :func:`linearize`.
        """
        self = cls.__new__(cls)
        self._setup(fm, params0, store_on=store_on, buffers=buffers)
        return self

    def _setup(
        self,
        fm: FunctionalModel,
        params0: Optional[Mapping[str, Tensor]],
        *,
        store_on: Union[str, torch.device, None],
        buffers: str,
    ) -> None:
        if buffers not in _BUFFERS:
            raise ValueError(f"Expected `buffers` to be one of {_BUFFERS} but got {buffers!r}.")
        self._fm = fm
        self.model = self._fm.module
        self.names: list[str] = list(self._fm.names)
        self._buffers = buffers
        self._store_on = None if store_on is None else torch.device(store_on)
        source = self._fm.params if params0 is None else params0
        if params0 is not None and not isinstance(params0, Mapping):
            raise TypeError(
                "Expected `params0` to be None or a mapping {name: tensor} but got "
                f"{type(params0).__name__}."
            )
        snapshot = self._select(source, "params0")
        device = self._store_on or self._fm.device
        # clone: the module's parameters are updated in place while it trains
        self.params0: dict[str, Tensor] = {
            name: full(t.detach()).to(device=device, dtype=self._fm.dtype).clone()
            for name, t in snapshot.items()
        }  # whole tensors, also for a sharded model (`full` all-gathers a DTensor)
        self._constants0: dict[str, Tensor] = {}
        if buffers == "initial":  # "current" reads the module at call time: no copy
            self._constants0 = {name: t.clone() for name, t in self._fm.constants.items()}
        self._live: Optional[dict[str, Tensor]] = None  # "current" constants of this call
        self.mode: Optional[str] = None
        """How the last ``J v`` was computed: ``"jvp"``, ``"jvp_composite"``,
        ``"double_vjp"`` or ``"loop"`` (see the module docstring); ``None`` before a call."""
        self.fallbacks: list[str] = []
        """``"<mode>: <error>"`` for each route that could not run in the last call."""

    # ------------------------------------------------------------------ evaluation

    def __call__(self, x: Tensor, params: ParamSource = None) -> Tensor:
        """Logits ``f_lin(x; θ) = f(x; θ0) + J0(x)(θ − θ0)``, shape ``(N, C)``.

        Args:
            x: a batch ``(N, ...)`` the model accepts (integer inputs for embeddings).
            params: ``θ``: ``None`` for the model's current parameters (read now, detached);
                a mapping ``{name: tensor}`` or an ``nn.Module`` with the same parameter
                names. Gradients flow to tensors passed here, so the linearized model
                can be trained.
        """
        f_lin, _ = self.logits_and_initial(x, params)
        return f_lin

    def logits_and_initial(self, x: Tensor, params: ParamSource = None) -> tuple[Tensor, Tensor]:
        """``(f_lin(x; θ), f(x; θ0))`` from the one ``jvp`` that yields both, ``(N, C)`` each.

        Args:
            x: as for :meth:`__call__`.
            params: as for :meth:`__call__`.
        """
        theta = self._theta(params)
        theta0 = self._params0_on_device()
        tangent = {name: theta[name] - theta0[name] for name in self.names}
        f0, Jt = self._jvp(x, theta0, tangent)
        return f0 + Jt, f0

    def initial_logits(self, x: Tensor) -> Tensor:
        """``f(x; θ0)``, shape ``(N, C)``."""
        x = self._fm.cast_input(x)
        self._live = None
        with exact_matmuls(self._fm.device), torch.no_grad():
            return self._evaluate(self._params0_on_device(), x)

    def tangent_logits(self, x: Tensor, tangent: ParamSource) -> Tensor:
        """``J0(x) v`` for a tangent ``v`` (a mapping or module like ``params``), ``(N, C)``.

        ``tangent_logits(x, lin.params0)`` is ``J0(x) θ0``, the shift ``s`` of plain
        weight decay in :func:`lightning_ntk.kernel_solution`.
        """
        if tangent is None:
            raise TypeError("Expected `tangent` to be a mapping {name: tensor} or a module.")
        v = self._theta(tangent, argname="tangent")
        return self._jvp(x, self._params0_on_device(), v)[1]

    # ------------------------------------------------------------------ helpers

    def _jvp(
        self, x: Any, theta0: dict[str, Tensor], tangent: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(f(x; θ0), J0(x) v)`` by the first route of the chain that runs (and checks)."""
        x = self._fm.cast_input(x)
        self.fallbacks = []
        self._live = None  # "current" constants: read from the module anew for this call
        evaluate = self._evaluate
        routes: list[tuple[str, Callable[[], tuple[Tensor, Tensor]]]] = [
            ("jvp", lambda: forward_mode(evaluate, x, theta0, tangent)),
            ("double_vjp", lambda: self._checked(x, theta0, tangent, double_vjp)),
            ("loop", lambda: self._checked(x, theta0, tangent, loop_jvp)),
        ]
        if self._fm.device.type == "cpu" and torch.backends.mkldnn.is_available():
            composite = ("jvp_composite", lambda: forward_mode(evaluate, x, theta0, tangent, True))
            routes.insert(1, composite)
        start = _LAST_MODE.get(_mode_key(self._fm, self.model))
        if start is not None:  # the route that worked for this model last time goes first
            routes.sort(key=lambda route: route[0] != start)
        last: Optional[BaseException] = None
        mismatch = False
        for mode, route in routes:
            try:
                with exact_matmuls(self._fm.device):
                    out = route()
            except RuntimeError as err:  # no rule for an op (NotImplementedError too): next route
                last = err
                mismatch = mismatch or isinstance(err, BackwardMismatch)
                reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
                self.fallbacks.append(f"{mode}: {reason[:300]}")
                _log.debug("linearize: %s cannot run on this model (%s)", mode, reason)
                continue
            self.mode = mode
            key = _mode_key(self._fm, self.model)
            _LAST_MODE.pop(key, None)
            _LAST_MODE[key] = mode  # most recently used last
            while len(_LAST_MODE) > 32:
                del _LAST_MODE[next(iter(_LAST_MODE))]
            if self.fallbacks:
                _log.debug("linearize: J v by %s after %s", mode, "; ".join(self.fallbacks))
            return out
        if not mismatch:  # a batch the model cannot take at all: its own error, naming `x`
            with exact_matmuls(self._fm.device):
                self._fm.checked_logits(x, "x")
        cause = (
            "the reverse-mode result did not match a float64 finite difference of the forward "
            "pass (the model's backward is not its forward's derivative)"
            if mismatch
            else "no route could run on the model (each route's error is listed)"
        )
        raise RuntimeError(
            f"The linearized model cannot be evaluated exactly: {cause}: "
            + "; ".join(self.fallbacks)
            + "."
        ) from last

    def _checked(
        self, x: Any, theta0: dict[str, Tensor], tangent: dict[str, Tensor], route: Callable
    ) -> tuple[Tensor, Tensor]:
        """A reverse-mode route's ``(f0, J v)``, kept only if finite differences agree."""
        result = route(self._evaluate, x, theta0, tangent)
        return checked(result, self._evaluate64(x), theta0, tangent, self._fm.dtype)

    def _evaluate64(self, x: Any) -> Callable[[Mapping[str, Tensor]], Tensor]:
        """``θ ↦ f(x; θ)`` in float64 with this model's constants, for finite differences."""
        x64 = _inputs.map_tensors(x, lambda t: t.double() if t.is_floating_point() else t)
        constants = self._constants()
        constants = {n: t.double() if t.is_floating_point() else t for n, t in constants.items()}

        def f(theta: Mapping[str, Tensor]) -> Tensor:
            args, kwargs = _inputs.call_args(x64)
            # leaves that require grad, like the model's own parameters: a forward may
            # differentiate them itself (an inner adaptation step); no graph otherwise
            theta = {name: t.detach().requires_grad_() for name, t in theta.items()}
            with eval_mode(self.model), torch.no_grad():
                out = call_module(self.model, (theta, constants), args, kwargs)
            return self._fm.to_logits(out).double()

        return f

    def _evaluate(self, theta: Mapping[str, Tensor], x: Any) -> Tensor:
        constants = self._constants()
        args, kwargs = _inputs.call_args(x)
        with eval_mode(self.model):
            out = call_module(self.model, (theta, constants), args, kwargs)
        return self._fm.to_logits(out)

    def _constants(self) -> dict[str, Tensor]:
        """The fixed tensors of this call: the copies, or the module's read once per call."""
        if self._buffers == "initial":
            return self._constants0
        if self._live is None:  # once per call: reading a sharded model all-gathers
            self._live = self._live_constants()
        return self._live

    def _live_constants(self) -> dict[str, Tensor]:
        selected = set(self.names)
        live: dict[str, Tensor] = {}
        for name, p in self.model.named_parameters():
            if name not in selected:
                live[name] = self._fm._cast(full(p.detach()))
        for name, b in self.model.named_buffers():
            live[name] = self._fm._cast(b.detach())
        return live

    def _params0_on_device(self) -> dict[str, Tensor]:
        device = self._fm.device
        return {name: t.to(device, non_blocking=True) for name, t in self.params0.items()}

    def _theta(self, params: ParamSource, argname: str = "params") -> dict[str, Tensor]:
        if params is None:
            live = dict(self.model.named_parameters())
            chosen = {name: live[name].detach() for name in self.names}  # gathered below
        elif isinstance(params, nn.Module):
            chosen = self._select(dict(unwrap_module(params).named_parameters()), argname)
        elif isinstance(params, Mapping):
            chosen = self._select(params, argname)
        else:
            raise TypeError(
                f"Expected `{argname}` to be None, a mapping {{name: tensor}} or an nn.Module "
                f"but got {type(params).__name__}."
            )
        device, dtype = self._fm.device, self._fm.dtype
        # a sharded parameter is all-gathered (differentiably): every rank must call
        return {name: full(t).to(device=device, dtype=dtype) for name, t in chosen.items()}

    def _select(self, source: Mapping[str, Tensor], argname: str) -> dict[str, Tensor]:
        """The selected names from ``source``, checked for presence, type and shape."""
        missing = [name for name in self.names if name not in source]
        if missing:
            raise ValueError(
                f"`{argname}` lacks the parameters {missing}; expected every one of "
                f"{self.names} (got {sorted(source)})."
            )
        shapes = {name: p.shape for name, p in self._fm.params.items()}
        chosen: dict[str, Tensor] = {}
        for name in self.names:
            t = source[name]
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"Expected `{argname}[{name!r}]` to be a tensor but got {type(t).__name__}."
                )
            if t.shape != shapes[name]:
                raise ValueError(
                    f"Expected `{argname}[{name!r}]` to have shape {tuple(shapes[name])} but "
                    f"got {tuple(t.shape)}."
                )
            chosen[name] = t
        return chosen


# the route that last worked, per model structure (a monitor builds a new linearized model
# for every report): {key: mode}
_LAST_MODE: dict[tuple, str] = {}


def _mode_key(fm: FunctionalModel, module: nn.Module) -> tuple:
    params = tuple((n, id(p)) for n, p in module.named_parameters())
    return (type(module), tuple(fm.names), fm.dtype, params)
