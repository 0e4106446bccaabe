"""The linearized model of a network and how far the network is from it.

* :func:`linearize` → :class:`LinearizedModel`: ``f_lin(x; θ) = f(x; θ0) + J0(x)(θ − θ0)``,
  one exact ``J v`` per call (:mod:`.model`);
* :func:`linearization_error`, :func:`prob_tv`, :func:`argmax_agreement`: distances
  between the network's logits and its linearization's (:mod:`.distances`).

Layer: may import :mod:`lightning_ntk.kernel` only.
"""

from .distances import argmax_agreement, linearization_error, prob_tv
from .model import LinearizedModel, linearize

__all__ = [
    "LinearizedModel",
    "argmax_agreement",
    "linearization_error",
    "linearize",
    "prob_tv",
]
