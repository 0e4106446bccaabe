"""A model seen as a pure function ``f(θ, X) -> logits`` of its selected parameters.

Everything that evaluates a user's model (the kernel methods, the reference, the
linearized model, the tracker) goes through :class:`FunctionalModel`, so that they all

* select the same parameters (trainable by default, or a user's names / predicate),
* evaluate with ``torch.func.functional_call`` and never write to the module: no
  parameter, buffer (BatchNorm running statistics), ``.grad`` or RNG state changes,
* see BatchNorm and dropout as in eval mode, with autocast off, and take dense gradients
  of sparse embeddings (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``),
* turn tuple / dict outputs into ``(N, C)`` logits through ``output_fn``,
* take inputs that are a tensor, or a mapping / tuple of tensors sharing the batch
  dimension (:mod:`._inputs`): ``model(x)``, ``model(**x)`` or ``model(*x)``,
* see a model sharded with FSDP2's ``fully_shard`` whole: its ``DTensor`` parameters
  are all-gathered once (:mod:`._sharded`), and FSDP's forward hooks are set aside
  while the engine evaluates it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import _inputs
from ._compat import math_kernels, quiet_batching_fallbacks
from ._sharded import call_module, full, is_dtensor, sharding_mesh

ParamSelector = Union[None, str, Sequence[str], Callable[[str, nn.Parameter], bool]]
OutputFn = Optional[Callable[[Any], Tensor]]


def unwrap_module(model: nn.Module) -> nn.Module:
    """Return the module a ``torch.compile`` (or DDP / DataParallel) wrapper holds."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module but got {type(model).__name__}.")
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.DataParallel)
        ):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def select_parameters(module: nn.Module, params: ParamSelector = None) -> list[str]:
    """Names of the trainable parameters that span the kernel, in registration order.

    Args:
        module: the (unwrapped) model.
        params: ``None`` for every parameter with ``requires_grad=True``; a name or a list
            of names, where a name selects a parameter or every parameter below a module
            (``"fc2"`` selects ``fc2.weight`` and ``fc2.bias``); or a predicate
            ``(name, parameter) -> bool``.

    Raises:
        ValueError: a name matches no trainable parameter, or nothing is selected.
    """
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    if params is None:
        selected = trainable
    elif callable(params):
        named = dict(module.named_parameters())
        selected = [name for name in trainable if params(name, named[name])]
    else:
        wanted = [params] if isinstance(params, str) else list(params)
        if not all(isinstance(w, str) for w in wanted):
            raise TypeError(
                "Expected `params` to be None, a name, a list of names or a predicate "
                f"(name, parameter) -> bool, but got {params!r}."
            )
        selected = []
        for want in wanted:
            matches = [n for n in trainable if n == want or n.startswith(want + ".")]
            if not matches:
                if want in frozen:
                    raise ValueError(
                        f"`params` names {want!r}, which is frozen (requires_grad=False); "
                        "frozen parameters do not enter the kernel."
                    )
                raise ValueError(
                    f"`params` names {want!r}, which matches no trainable parameter. "
                    f"Trainable parameters: {trainable}."
                )
            selected.extend(m for m in matches if m not in selected)
        order = {name: i for i, name in enumerate(trainable)}
        selected.sort(key=order.__getitem__)
    if not selected:
        raise ValueError(
            "The model has no trainable parameters to build a kernel from "
            f"(selected by `params`={params!r}; trainable: {trainable})."
        )
    return selected


def compute_dtype(
    module: nn.Module, names: Sequence[str], dtype: Optional[torch.dtype]
) -> torch.dtype:
    """The floating dtype kernels are computed in: ``dtype``, else the parameters' own.

    Half and bfloat16 parameters are computed in float32: their round-off would swamp
    the kernel's drift.
    """
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"Expected `dtype` to be a floating torch.dtype but got {dtype!r}.")
        return dtype
    first = dict(module.named_parameters())[names[0]].dtype
    return torch.float32 if first in (torch.float16, torch.bfloat16) else first


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, with dense gradients; each flag restored afterwards.

    See :func:`dense_gradients` for the second part.
    """
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with dense_gradients(module):
            yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def dense_gradients(module: nn.Module) -> Iterator[None]:
    """``sparse=False`` on every ``nn.Embedding`` / ``nn.EmbeddingBag`` inside the block.

    The forward function is the same; only the gradient's layout changes, from a sparse
    tensor (which ``vmap``, forward mode and reshaping reject) to the equal dense one.
    Each module's own flag is restored on exit.
    """
    sparse = [
        m for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
    ]
    try:
        for m in sparse:
            m.sparse = False
        yield
    finally:
        for m in sparse:
            m.sparse = True


def as_dense(gradient: Tensor) -> Tensor:
    """A gradient as a dense tensor (a sparse one from a custom sparse embedding densified)."""
    if gradient.layout != torch.strided:
        return gradient.to_dense()
    return gradient


@contextlib.contextmanager
def exact_matmuls(device: torch.device) -> Iterator[None]:
    """The engine's numerics inside the block: exact matmuls, no autocast, math kernels.

    Full-precision float32 matmuls, convolutions and RNNs (no TF32, no bf16 reduction),
    autocast off, and the math equivalents of fused attention / Transformer fast paths
    (:func:`._compat.math_kernels`), which have no forward-mode derivative; PyTorch's
    note that ``vmap`` runs an op without a batching rule is silenced
    (:func:`._compat.quiet_batching_fallbacks`). Every setting is restored on exit,
    exactly (see :func:`_full_precision`).
    """
    with _full_precision(), quiet_batching_fallbacks():
        with torch.autocast(device_type=device.type, enabled=False), math_kernels():
            yield


# (backend, operation) pairs of PyTorch's per-backend `fp32_precision` settings, parents
# first (a parent's value reaches its children when set, so they are restored after it).
_PRECISION_SCOPES = (
    ("generic", "all"),
    ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
    ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"),
)  # fmt: skip


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """``"ieee"`` float32 precision for every backend's matmuls, convolutions and RNNs.

    PyTorch has two APIs for these flags: the per-backend ``fp32_precision`` settings
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``torch.backends.cudnn.conv``,
    ``torch.backends.mkldnn``, ``torch.backends.fp32_precision``) and the legacy
    ``torch.set_float32_matmul_precision`` / ``allow_tf32`` flags, which are views of
    the former and raise once they are mixed with it. Where PyTorch has the per-backend
    settings, every one of them is read, set and restored through that API, whichever
    one the user set the flags with (restoring all of them leaves the legacy views as
    they were too); older versions use the legacy flags.
    """
    get = getattr(torch._C, "_get_fp32_precision_getter", None)
    set_ = getattr(torch._C, "_set_fp32_precision_setter", None)
    if get is None or set_ is None:  # older PyTorch: the legacy flags only
        matmul_precision = torch.get_float32_matmul_precision()
        cudnn_tf32 = torch.backends.cudnn.allow_tf32
        try:
            torch.set_float32_matmul_precision("highest")
            torch.backends.cudnn.allow_tf32 = False
            yield
        finally:
            torch.set_float32_matmul_precision(matmul_precision)
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
        return
    saved = [(scope, get(*scope)) for scope in _PRECISION_SCOPES]
    try:
        for backend, operation in _PRECISION_SCOPES:
            if operation != "all":
                set_(backend, operation, "ieee")
        yield
    finally:
        for (backend, operation), value in saved:
            set_(backend, operation, value)


class FunctionalModel:
    """``f(θ, x) -> logits (N, C)`` for a module, with θ the selected parameters.

    Args:
        model: any ``nn.Module`` (a ``torch.compile`` wrapper is unwrapped).
        params: which parameters span the kernel; see :func:`select_parameters`.
        output_fn: maps the model's raw output (tensor, tuple, dict) to ``(N, C)`` logits.
        dtype: compute dtype; see :func:`compute_dtype`.

    Attributes:
        module: the unwrapped module (never written to).
        names: selected parameter names.
        params: ``{name: detached tensor}`` of the selected parameters, in ``dtype``.
        constants: frozen / unselected parameters and buffers, floats cast to ``dtype``.
        dtype: the compute dtype.
        device: where the parameters live.
        sharded: whether the module has ``DTensor`` (FSDP2) parameters. Building the view
            then all-gathers them (a collective: every rank of the mesh builds it, in the
            same order), and ``params`` / ``constants`` hold the whole tensors: each rank
            holds a full copy of the model's parameters while the view lives.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        params: ParamSelector = None,
        output_fn: OutputFn = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"Expected `output_fn` to be callable but got {output_fn!r}.")
        self.module = unwrap_module(model)
        if isinstance(self.module, torch.jit.ScriptModule):
            raise TypeError(
                "Expected `model` to be an eager torch.nn.Module but got a TorchScript module "
                f"({type(self.module).__name__}, from torch.jit.script / trace), which cannot "
                "be evaluated at other parameter values; pass the module before scripting "
                "(scripted blocks inside an eager model are fine)."
            )
        check_placement(self.module)
        self.sharded = sharding_mesh(self.module) is not None
        self.names = select_parameters(self.module, params)
        self.dtype = compute_dtype(self.module, self.names, dtype)
        self.output_fn = output_fn
        selected = set(self.names)
        written = written_in_forward(self.module)
        self.params: dict[str, Tensor] = {}
        self.constants: dict[str, Tensor] = {}
        for name, p in self.module.named_parameters():
            target = self.params if name in selected else self.constants
            with torch.no_grad():
                target[name] = self._own(full(p.detach()), name in written)  # whole, if sharded
        for name, b in self.module.named_buffers():
            self.constants[name] = self._own(b.detach(), name in written)
        self.device = self.params[self.names[0]].device

    def _own(self, t: Tensor, written: bool) -> Tensor:
        """``t`` in the compute dtype; a copy if the forward writes it and it is the model's."""
        cast = self._cast(t)
        return cast.clone() if written and cast is t else cast

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    @property
    def num_params(self) -> int:
        """Number of scalar parameters P spanning the kernel."""
        return sum(p.numel() for p in self.params.values())

    def cast_input(self, x: Any) -> Any:
        """An input batch (tensor, mapping or tuple) on the model's device, floats in dtype."""
        return _inputs.map_tensors(x, lambda t: self._cast(t.to(self.device)))

    def raw(self, params: Mapping[str, Tensor], x: Any) -> Any:
        """The model's raw output at ``params`` (eval mode, buffers as they are)."""
        args, kwargs = _inputs.call_args(x)
        with eval_mode(self.module):
            return call_module(self.module, (params, self.constants), args, kwargs)

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Logits ``(N, C)`` of the batch ``x`` at parameters ``params``."""
        return self.to_logits(self.raw(params, x))

    def single(self, params: Mapping[str, Tensor], x: Any) -> Tensor:
        """Logits ``(C,)`` of one example ``x`` (no batch dimension), for ``vmap``."""
        return self(params, _inputs.unsqueeze(x)).squeeze(0)

    def to_logits(self, out: Any) -> Tensor:
        """Apply ``output_fn`` and check that the result is an ``(N, C)`` tensor."""
        if self.output_fn is not None:
            out = self.output_fn(out)
        if not isinstance(out, Tensor):
            hint = f" with keys {sorted(out)}" if isinstance(out, Mapping) else ""
            example = "out[0]" if isinstance(out, Sequence) else "out['logits']"
            raise TypeError(
                f"The model returned a {type(out).__name__}{hint}, not a logits tensor; pass "
                "`output_fn` mapping its output to (N, C) logits, e.g. "
                f"output_fn=lambda out: {example}."
            )
        if out.ndim != 2:
            raise ValueError(
                f"Expected the model's output to be logits of shape (N, C) but got shape "
                f"{tuple(out.shape)}; pass `output_fn` to map it to (N, C) (for a single "
                "output use output_fn=lambda out: out.reshape(len(out), -1))."
            )
        return out

    def differentiable_params(self) -> dict[str, Tensor]:
        """``params`` as leaves that require grad, like the model's own parameters.

        A forward pass that differentiates the model's parameters itself (an inner
        adaptation step ``torch.autograd.grad(loss, params, create_graph=True)``, a
        gradient penalty) runs on them as on the model; under ``torch.no_grad()`` they
        build no graph outside the forward's own ``torch.enable_grad()`` blocks.
        """
        return {name: p.detach().requires_grad_() for name, p in self.params.items()}

    def _failing_layer(self, x: Tensor) -> Optional[str]:
        """The innermost module in which a forward pass on ``x`` fails, described.

        Runs the forward once more with temporary pre-hooks on the leaf modules (removed
        before returning); ``None`` if it does not fail in a leaf module.
        """
        entered: list[tuple[str, nn.Module, list[tuple[int, ...]]]] = []
        exited: set[str] = set()

        def pre_hook(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                shapes = [tuple(a.shape) for a in args if isinstance(a, Tensor)]
                entered.append((name, module, shapes))

            return hook

        def post_hook(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                exited.add(name)

            return hook

        leaves = [  # the model itself is no layer: its own failure is reported as it is
            (n, m) for n, m in self.module.named_modules() if n and not list(m.children())
        ]
        handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in leaves]
        handles += [m.register_forward_hook(post_hook(n)) for n, m in leaves]
        try:
            with torch.no_grad():
                self(self.differentiable_params(), x)
        except RuntimeError:
            failed = [e for e in entered if e[0] not in exited]
            return _describe_failure(*failed[-1]) if failed else None
        finally:
            for handle in handles:
                handle.remove()
        return None

    def checked_logits(self, x: Tensor, argname: str = "x1") -> Tensor:
        """One plain forward pass that validates the model on ``x`` before heavy work.

        Returns:
            The detached logits ``(N, C)``.

        Raises:
            TypeError: the model cannot take ``x`` (e.g. integer inputs to a float model),
                or its output is not a tensor.
            ValueError: the output is not ``(N, C)`` or holds NaN / inf.
        """
        versions = tensor_versions(self.module)
        try:
            with torch.no_grad():
                logits = self(self.differentiable_params(), x)
        except (TypeError, ValueError):
            raise
        except RuntimeError as err:
            if not _inputs.is_floating(x) and isinstance(x, Tensor):
                raise TypeError(
                    f"`{argname}` has dtype {x.dtype} and the model failed on it ({err}); "
                    "integer inputs suit models that start with an embedding; pass float "
                    "features otherwise."
                ) from err
            failing = self._failing_layer(x)
            if failing is None:
                raise
            got = (
                f"of shape {tuple(x.shape)} (per-example shape {tuple(x.shape[1:])})"
                if isinstance(x, Tensor)
                else f"({_inputs.describe(x)})"
            )
            raise ValueError(f"The model failed on `{argname}` {got}: {failing} ({err})") from err
        check_unwritten(self.module, versions)
        n = _inputs.batch_size(x)
        if logits.shape[0] != n:
            raise ValueError(
                f"The model maps {n} examples of `{argname}` to {logits.shape[0]} "
                f"rows of logits (shape {tuple(logits.shape)}); expected one row per example."
            )
        bad = ~torch.isfinite(logits).all(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"The model's logits on `{argname}` are not finite (NaN or inf) at rows "
                f"{rows[:10]}{' ...' if len(rows) > 10 else ''}; the kernel is undefined there"
                f"{self._nonfinite_cause(x, argname)}."
            )
        return logits.detach()

    def _nonfinite_cause(self, x: Any, argname: str) -> str:
        """``": <what holds NaN / inf>"`` among ``x`` and the parameters, or ``""``."""
        tensors = [t for t in _inputs.tensors_of(x) if t.is_floating_point()]
        if any(not bool(torch.isfinite(t).all()) for t in tensors):
            return f": `{argname}` itself holds NaN / inf"
        names = [n for n, p in self.params.items() if not bool(torch.isfinite(p).all())]
        if names:
            listed = ", ".join(f"`{n}`" for n in names[:5]) + (" ..." if len(names) > 5 else "")
            which = (
                f"the parameter {listed} holds"
                if len(names) == 1
                else f"the parameters {listed} hold"
            )
            return f": {which} NaN / inf"
        return ""


def written_in_forward(module: nn.Module) -> set[str]:
    """Names of the tensors stock layers of ``module`` write in their forward, in eval mode.

    ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``max_norm`` renormalise, in place, the
    rows of their weight they look up. The engine evaluates such a layer on its own
    copy of the weight, so that the model is never written.
    """
    return {
        f"{name}.weight" if name else "weight"
        for name, m in module.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    }


def tensor_versions(module: nn.Module) -> dict[str, int]:
    """The version counter of each of the module's parameters and buffers (bumped by writes)."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return {name: t._version for name, t in named}


def check_unwritten(module: nn.Module, versions: dict[str, int]) -> None:
    """Raise if a parameter or buffer of ``module`` was written since ``versions`` was read.

    Raises:
        ValueError: naming the tensors the model's forward wrote in place.
    """
    written = [name for name, v in tensor_versions(module).items() if versions.get(name, v) != v]
    if written:
        raise ValueError(
            f"The model's forward wrote to {written} in place while the engine evaluated it "
            "in eval mode; the kernel is measured without changing the model, so make that "
            "write conditional on `self.training` (the engine evaluates in eval mode)."
        )


def check_placement(module: nn.Module) -> torch.device:
    """The one device holding the module's parameters and buffers, checked before any work.

    Parameters sharded with FSDP2 (``DTensor``) are accepted in the layouts
    :func:`._sharded.sharding_mesh` supports; their device is the local shard's.

    Raises:
        ValueError: a sharding the engine does not support (see
            :func:`._sharded.sharding_mesh`); the module spans several devices; or it is
            on the ``meta`` device, which holds no values.
    """
    parameters = list(module.named_parameters())
    tensors = [*parameters, *module.named_buffers()]
    sharding_mesh(module)
    devices: dict[torch.device, str] = {}
    for name, t in tensors:
        devices.setdefault(t.device, name)
    if len(devices) > 1:
        where = ", ".join(f"{name!r} on {device}" for device, name in devices.items())
        raise ValueError(
            f"The model's parameters and buffers are on several devices ({where}); the "
            "kernel needs the whole model on one device: move it there with `model.to(device)`."
        )
    device = next(iter(devices), torch.device("cpu"))
    if device.type == "meta":
        raise ValueError(
            "The model is on the meta device, which holds shapes but no values; materialise "
            "it first (e.g. `model.to_empty(device='cpu')`, then load its weights)."
        )
    return device


def check_input_device(x: Any, argname: str, device: torch.device) -> None:
    """Every tensor of the batch ``x`` is on ``device``, the model's, before any work.

    Raises:
        ValueError: naming the argument, the input's device and the model's.
    """
    for t in _inputs.tensors_of(x):
        if is_dtensor(t):
            raise ValueError(
                f"`{argname}` holds a DTensor: inputs must be plain tensors, the same batch "
                "on every rank (a sharded model is evaluated whole on each rank's inputs)."
            )
        if t.device != device:
            how = f"`{argname}.to({str(device)!r})`" if isinstance(x, Tensor) else "`.to` each"
            raise ValueError(
                f"`{argname}` is on {t.device} but the model is on {device}; move the inputs "
                f"to the model's device ({how})."
            )


def _describe_failure(name: str, module: nn.Module, shapes: list[tuple[int, ...]]) -> str:
    """Where a forward pass failed: the layer, what it got and what it expects."""
    got = ", ".join(str(shape) for shape in shapes) or "no tensor"
    where = f"its layer `{name}` ({module!r}) got an input of shape {got}"
    if isinstance(module, nn.Linear):
        return f"{where} but expects inputs (..., {module.in_features})"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        dims = ", ".join(["H", "W", "D"][: module.weight.ndim - 2])
        return f"{where} but expects (N, {module.in_channels}, {dims})"
    if isinstance(module, nn.Embedding):
        return f"{where} but expects integer indices below {module.num_embeddings}"
    return f"{where}, which it cannot take"


def check_inputs(x1: Any, x2: Any = None) -> None:
    """Validate the probe batches of a kernel call before any heavy work.

    Each is a tensor ``(N, ...)`` or a mapping / tuple of tensors sharing the batch
    dimension; ``x2`` must have the structure and per-example shapes of ``x1``.
    """
    _inputs.check_batch("x1", x1)
    if x2 is None:
        return
    _inputs.check_batch("x2", x2)
    if isinstance(x1, Tensor) and isinstance(x2, Tensor):
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(
                f"Expected `x2` to have the per-example shape of `x1`, {tuple(x1.shape[1:])}, "
                f"but got {tuple(x2.shape[1:])} (x1: {tuple(x1.shape)}, x2: {tuple(x2.shape)})."
            )
        if x1.is_floating_point() != x2.is_floating_point():
            raise TypeError(
                f"`x1` and `x2` must both be floating or both be integer; got {x1.dtype} and "
                f"{x2.dtype}."
            )
        return
    sig1 = [(k, s) for k, s, *_ in _inputs.example_signature(x1)]
    sig2 = [(k, s) for k, s, *_ in _inputs.example_signature(x2)]
    if type(x1) is not type(x2) or sig1 != sig2:
        raise ValueError(
            f"Expected `x2` to have the structure and per-example shapes of `x1` "
            f"but got x1: {_inputs.describe(x1)}, x2: {_inputs.describe(x2)}."
        )
