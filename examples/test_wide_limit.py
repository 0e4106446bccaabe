"""Testing the wide-limit behaviour of your own model with ``lightning_ntk.testing``.

Run it like any test file (the pytest plugin comes with the package)::

    python -m pytest examples/test_wide_limit.py -q
    python -m pytest examples/test_wide_limit.py -q --ntk-widths=32,128,512 --ntk-seeds=0,1

What is checked, for a small MLP written the way you would write yours:

1. at initialisation, its empirical NTK tends to the analytic infinite-width NTK, with
   the ``1/√width`` rate of finite-width fluctuations;
2. trained with label smoothing (non-degenerate targets), it stays in the kernel regime:
   the kernel barely moves, and moves less the wider the network;
3. trained on hard one-hot labels without regularization, it leaves the kernel regime at
   every width: the centered logits keep growing like ``log(step)``.

Each helper raises an ``AssertionError`` whose message is a diagnostic report (a table
per width, the fitted slopes and the failed checks); print ``result.report()`` to see it
when the check passes.
"""

import math

import pytest
import torch
from torch import nn

from lightning_ntk.testing import (
    analytic_ntk,
    assert_breaks_down,
    assert_converges_to_analytic,
    assert_lazy_scaling,
    assert_lazy_training,
)

IN_FEATURES, NUM_CLASSES = 8, 4
SIGMA_W = math.sqrt(2.0)  # He scale for ReLU


class MyMLP(nn.Module):
    """Two hidden ReLU layers in NTK parameterization.

    Each layer computes ``σ_w · linear(x / √fan_in)`` with weights and biases ``N(0, 1)``,
    i.e. ``h = (σ_w/√fan_in) W x + σ_w b``: the infinite-width NTK is
    ``analytic_ntk(x, depth=2, weight_std=σ_w, bias_std=σ_w)``.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.Linear(IN_FEATURES, width),
                nn.Linear(width, width),
                nn.Linear(width, NUM_CLASSES),
            ]
        )
        for layer in self.layers:
            nn.init.normal_(layer.weight)
            nn.init.normal_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = torch.relu(x)
            x = SIGMA_W * layer(x / math.sqrt(layer.in_features))
        return x


def test_kernel_at_initialisation_converges_to_the_infinite_width_limit():
    x = torch.randn(6, IN_FEATURES, generator=torch.Generator().manual_seed(0))
    K_inf = analytic_ntk(x, depth=2, weight_std=SIGMA_W, bias_std=SIGMA_W)
    result = assert_converges_to_analytic(MyMLP, [64, 256, 1024], x, K_inf, seeds=(0, 1, 2))
    print(result.report())


@pytest.mark.wide_limit
def test_label_smoothing_keeps_training_in_the_kernel_regime(ntk_probe):
    data = ntk_probe(16, IN_FEATURES, NUM_CLASSES)
    train = {"steps": 40, "lr": 1.0, "label_smoothing": 0.1}
    # the relative kernel change ‖Θ_t − Θ_0‖/‖Θ_0‖ shrinks like a power of the width
    scaling = assert_lazy_scaling(
        MyMLP, data, widths=(32, 128, 512), seeds=(0, 1), max_slope=-0.25, **train
    )
    print(scaling.report())
    # and at width 512 it is small, as is the part of the change the linearized model misses
    assert_lazy_training(
        MyMLP, data, width=512, seeds=(0,), max_relative_change=0.1,
        max_linearization_error=0.2, **train,
    )  # fmt: skip


@pytest.mark.wide_limit
def test_hard_labels_without_regularization_leave_the_kernel_regime(ntk_probe):
    data = ntk_probe(16, IN_FEATURES, NUM_CLASSES)
    # zero loss needs infinite logits: their centered norm grows like log(step)
    result = assert_breaks_down(
        MyMLP, data, width=[32, 512], steps=40, lr=1.0, seeds=(0,), min_logit_slope=0.5
    )
    print(result.report())


@pytest.mark.wide_limit
def test_sweep_over_the_command_line_widths(ntk_probe, ntk_width_sweep):
    # widths and seeds come from --ntk-widths / --ntk-seeds (default 64,256,1024 and 0,1,2)
    result = ntk_width_sweep(
        MyMLP, ntk_probe(16, IN_FEATURES, NUM_CLASSES), steps=20, lr=1.0,
        weight_decay=0.01, decay_to="init",
    )  # fmt: skip
    drift = result.mean["relative_change"]
    assert drift[-1] < drift[0], result.report()
