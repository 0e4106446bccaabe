"""The engine on more classes of models: each test pins one on which a path went wrong.

Every method must return the reference kernel and leave the model as it found it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ntk import empirical_ntk, linearize, reference_ntk

from .test_engine_models import _assert_untouched, _snapshot
from .test_kernel import assert_kernel_close

METHODS = ["auto", "structured", "jacobian", "ntk_vp", "loop"]


class _InnerStep(nn.Module):
    """One gradient step on a loss of the batch inside the forward (MAML-style adaptation).

    ``torch.autograd.grad(loss, (w, b), create_graph=True)`` needs parameters that require
    grad, as the model's own do; the logits are those of the adapted weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4) / 2)
        self.b = nn.Parameter(torch.zeros(3))
        self.lr = nn.Parameter(torch.tensor(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            loss = F.linear(x, self.w, self.b).pow(2).mean()
            gw, gb = torch.autograd.grad(loss, (self.w, self.b), create_graph=True)
        return F.linear(x, self.w - self.lr * gw, self.b - self.lr * gb)


def _per_example_kernel(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``J(x1) J(x2)ᵀ`` from plain autograd on the model itself, one example at a time."""
    params = list(model.parameters())

    def jacobian(x: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(len(x)):
            logits = model(x[i : i + 1])[0]
            rows.append(
                torch.stack(
                    [
                        torch.cat(
                            [g.flatten() for g in torch.autograd.grad(f, params, retain_graph=True)]
                        )
                        for f in logits
                    ]
                )
            )
        return torch.stack(rows)  # (N, C, P)

    return torch.einsum("iap,jbp->ijab", jacobian(x1), jacobian(x2))


@pytest.mark.parametrize("method", METHODS)
def test_a_forward_that_differentiates_its_own_parameters_has_the_reference_kernel(method):
    torch.manual_seed(0)
    model = _InnerStep().double()
    x1 = torch.randn(4, 4, dtype=torch.float64)
    x2 = torch.randn(3, 4, dtype=torch.float64)
    expected = _per_example_kernel(copy.deepcopy(model), x1, x2)
    assert_kernel_close(reference_ntk(model, x1, x2), expected, 1e-10, "reference")
    snapshot = _snapshot(model)
    for second, want in ((x2, expected), (None, _per_example_kernel(model, x1, x1))):
        K = empirical_ntk(model, x1, second, method=method)
        _assert_untouched(model, snapshot, method)
        assert_kernel_close(K, want, 1e-10, f"inner_step/{method}")


def test_the_linearized_model_of_a_forward_that_differentiates_its_own_parameters():
    """The inner step mixes the batch: ``J v`` is the batch function's, as autograd has it."""
    torch.manual_seed(0)
    model = _InnerStep().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    params = dict(model.named_parameters())
    tangent = {name: torch.randn_like(p) for name, p in params.items()}
    snapshot = _snapshot(model)
    Jv = linearize(model).tangent_logits(x, tangent)
    _assert_untouched(model, snapshot, "linearize")
    logits = model(x)
    u = torch.ones_like(logits, requires_grad=True)  # J v = ∂/∂u ⟨Jᵀ u, v⟩
    grads = torch.autograd.grad(logits, list(params.values()), u, create_graph=True)
    inner = sum((g * tangent[name]).sum() for g, name in zip(grads, params))
    expected = torch.autograd.grad(inner, u)[0]
    torch.testing.assert_close(Jv, expected, rtol=1e-10, atol=1e-12)


class _ScriptedBlock(nn.Module):
    """A ``torch.jit.script``ed block: its containers refuse hooks and wrap their dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.jit.script(nn.Sequential(nn.Linear(4, 5), nn.Tanh()))
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("method", METHODS)
def test_a_scripted_block_has_the_reference_kernel(method):
    torch.manual_seed(0)
    model = _ScriptedBlock().double()
    x1 = torch.randn(4, 4, dtype=torch.float64)
    x2 = torch.randn(3, 4, dtype=torch.float64)
    snapshot = _snapshot(model)
    K = empirical_ntk(model, x1, x2, method=method)
    _assert_untouched(model, snapshot, method)
    assert_kernel_close(K, reference_ntk(model, x1, x2), 1e-10, f"scripted/{method}")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_scripted_model_is_refused_naming_the_eager_module():
    model = torch.jit.script(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    x = torch.randn(3, 4)
    for entry in (empirical_ntk, reference_ntk, linearize):
        with pytest.raises(TypeError, match=r"`model` to be an eager.*before scripting"):
            entry(model) if entry is linearize else entry(model, x)


class _WhitenedByCholesky(nn.Module):
    """No submodules; its forward fails on a batch whose Gram matrix is singular."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gram = x.T @ x  # (4, 4), singular for fewer than 4 examples
        return x @ torch.cholesky_solve(self.w, torch.linalg.cholesky(gram))


def test_a_failure_of_the_model_itself_is_not_blamed_on_a_layer_and_the_input_shape():
    model = _WhitenedByCholesky().double()
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="positive-definite") as raised:
        empirical_ntk(model, x)
    assert "its layer" not in str(raised.value)
