"""What the theory predicts: the regime of a training setup and the kernel-predicted logits.

"The Neural Tangent Kernel for Classification" (Plenk et al., arXiv 2605.17606): with
cross-entropy, a wide network stays in the kernel (lazy) regime when the loss has an
L2 term on the parameters (``λ > 0``) or when the targets are non-degenerate (every
class has positive probability, e.g. label smoothing). With hard one-hot targets and
``λ = 0`` zero loss needs infinite logits: they diverge and the linearization breaks.

* :func:`predict_regime` reads those conditions off an optimizer, a loss and targets;
  :func:`optimal_logits` is the finite optimum ``log t − mean(log t)`` of non-degenerate targets.
* :func:`kernel_solution` gives the trained logits of the linearized model in closed form
  (a fixed point solved by Newton's method), on the training set and at new inputs.
* :func:`kernel_flow` integrates the function-space gradient-descent dynamics step by step.
* :class:`LinearizedTraining` holds their settings (the loss and, for a flow, the steps),
  shared with :func:`lightning_ntk.uncertainty.kernel_solutions` and
  :func:`lightning_ntk.uncertainty.kernel_ensemble`; each function also takes its fields
  as keywords (``kernel_solution(ntk, f0, y, weight_decay=0.1)``).

Conventions shared by the last two. Logits ``f (N, C)``, ``p(f)`` the row softmax,
targets ``Y (N, C)`` (after label smoothing ``ε``: ``(1 − ε) Y + ε / C``), learning rate
``η``, L2 strength ``λ``. The loss is ``mean_i CE(f(x_i), y_i) + (λ/2)‖θ − θ_ref‖²``
(``reduction="mean"``, the default and PyTorch's) or the sum over ``i``
(``reduction="sum"``); ``G = Θ0 / N`` or ``G = Θ0`` is the kernel the gradient sees.
Gradient descent on the *linearized* model, ``θ ← θ − η ∇``, moves its logits exactly by

    f ← f − η [G (p(f) − Y) + λ (f − f0 + s)],

because ``f_lin`` is linear in ``θ``: ``s = 0`` for decay towards ``θ_ref = θ0``
(``decay_to="init"``) and ``s = J0 θ0`` (a jvp, :func:`weight_decay_shift`) for plain
weight decay towards 0 (``decay_to="zero"``, what ``torch.optim.SGD(weight_decay=λ)``
does). Its fixed points:

* ``λ > 0``: ``f* = f0 − s − (1/λ) G (p(f*) − Y)``, and at new inputs
  ``f*(x) = f0(x) − s(x) − (1/λ) G(x, X) (p(f*) − Y)``;
* ``λ = 0``, every target probability positive: ``f* = f0 + Θ0 α`` with
  ``p(f*) = Y`` (each row of ``α`` summing to 0), and ``f*(x) = f0(x) + Θ0(x, X) α``;
* ``λ = 0`` and some target probability 0 (hard labels): none; the centered logits
  grow without bound (logarithmically in the number of steps).

Layer: may import :mod:`lightning_ntk.kernel`, :mod:`lightning_ntk.linearization` and
:mod:`lightning_ntk.metrics`; never the monitor or Lightning.
"""

from ._kernel_solution import KernelSolution, kernel_flow, kernel_solution, weight_decay_shift
from ._training import LinearizedTraining
from .regime import RegimePrediction, optimal_logits, predict_regime

__all__ = [
    "KernelSolution",
    "LinearizedTraining",
    "RegimePrediction",
    "kernel_flow",
    "kernel_solution",
    "optimal_logits",
    "predict_regime",
    "weight_decay_shift",
]
