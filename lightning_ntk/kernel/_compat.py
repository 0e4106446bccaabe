"""Math equivalents of fused fast paths, switched on only inside the engine's evaluation.

Some fused kernels compute the same function as their composite definition but have no
forward-mode derivative, no double backward or no batching rule:

* ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``
  take a fused fast path (``aten::_transformer_encoder_layer_fwd``,
  ``_native_multi_head_attention``) in eval mode or without grad;
* ``F.scaled_dot_product_attention`` dispatches to flash / memory-efficient kernels
  (``_scaled_dot_product_flash_attention_for_cpu`` has neither forward AD nor double
  backward).

:func:`math_kernels` turns both off for the duration of a block and restores the user's
settings afterwards, so training outside the engine keeps its speed. The math paths are
the reference definitions of these ops: the function is the same up to round-off.

:func:`forward_ad_kernels` additionally turns oneDNN (mkldnn) off: CPU ``nn.LSTM`` then
runs as composite cells, which have forward-mode derivatives (``mkldnn_rnn_layer`` has
none). It is used only around forward-mode evaluations, because the composite LSTM in
turn has no batching rule.

:func:`quiet_batching_fallbacks` silences, inside the engine, PyTorch's warning that an op
has no batching rule and runs through ``vmap``'s slower per-example loop ("There is a
performance drop because we have not yet implemented the batching rule for ...", a
request to file an issue upstream): the engine's result is exact either way and its
cost model chose the method, so the note is nothing a user can act on.

:func:`jvp` is ``torch.func.jvp`` after PyTorch's forward-mode decompositions were loaded
once without the ``torch.jit.script`` deprecation warnings their loading emits (one per
decomposition, PyTorch's own and nothing a user can act on).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.func


@contextlib.contextmanager
def math_kernels() -> Iterator[None]:
    """No fused Transformer fast path and math-only SDPA inside the block; restored after."""
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        except ImportError:  # torch < 2.3: nothing to switch
            pass
        try:
            if mha is not None:
                mha.set_fastpath_enabled(False)
            yield
        finally:
            if mha is not None:
                mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def forward_ad_kernels() -> Iterator[None]:
    """:func:`math_kernels` and no oneDNN kernels (composite RNN cells) inside the block.

    Only the ``enabled`` flag of oneDNN is switched (``torch.backends.mkldnn.flags``
    would also write its legacy TF32 flag, which PyTorch refuses once the per-backend
    precision API is in use).
    """
    enabled = torch.backends.mkldnn.enabled
    with math_kernels():
        try:
            torch.backends.mkldnn.enabled = False
            yield
        finally:
            torch.backends.mkldnn.enabled = enabled


@contextlib.contextmanager
def quiet_batching_fallbacks() -> Iterator[None]:
    """Inside the block, no warning that ``vmap`` runs an op without a batching rule."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="There is a performance drop because we have not yet implemented the "
            "batching rule",
            category=UserWarning,
        )
        yield


_DECOMPOSITIONS_LOADED = False


def jvp(*args: Any, **kwargs: Any) -> Any:
    """``torch.func.jvp``; the first call loads PyTorch's forward-mode decompositions quietly."""
    global _DECOMPOSITIONS_LOADED
    if not _DECOMPOSITIONS_LOADED:
        load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
        if load is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore",
                    message=r"`torch\.jit\.script` is deprecated",
                    category=DeprecationWarning,
                )
                load()
        _DECOMPOSITIONS_LOADED = True
    return torch.func.jvp(*args, **kwargs)
