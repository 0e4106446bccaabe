"""The engine on classes of models beyond the registry's cases.

Each test pins a class of models on which an engine path once went wrong: every method
must leave the user's model exactly as it found it (parameter objects, values, buffers)
and return the reference kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_ntk import empirical_ntk, linearize, reference_ntk
from lightning_ntk.kernel import last_call_info
from lightning_ntk.kernel._slots import slot_tensors

from .cases import CASES_BY_NAME
from .test_kernel import assert_kernel_close

METHODS = ["structured", "jacobian", "ntk_vp", "loop"]


def _snapshot(model: nn.Module) -> tuple[list, dict[str, torch.Tensor]]:
    """Every parameter object under every name, and every value, as they are now."""
    objects = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    values = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return objects, values


def _assert_untouched(model: nn.Module, snapshot: tuple[list, dict], what: str) -> None:
    objects, values = snapshot
    now = model.named_parameters(remove_duplicate=False)
    for (name, p), (name0, p0) in zip(now, objects):
        assert name == name0 and p is p0, f"{what}: {name} is no longer the model's Parameter"
        assert isinstance(p, nn.Parameter) and p.requires_grad, f"{what}: {name} replaced"
    for key, value in model.state_dict(keep_vars=True).items():
        assert torch.equal(value.detach(), values[key]), f"{what}: {key} was written"


@pytest.mark.parametrize("method", METHODS)
def test_a_block_registered_under_several_names_is_left_as_found(method):
    case = CASES_BY_NAME["block_registered_twice"]
    model = case.model()
    x1, x2 = case.inputs(4, seed=1), case.inputs(3, seed=2)
    expected = reference_ntk(copy.deepcopy(model), x1, x2)
    snapshot = _snapshot(model)
    for _ in range(2):  # a second call sees the model the first one left
        K = empirical_ntk(model, x1, x2, method=method)
        _assert_untouched(model, snapshot, method)
        assert_kernel_close(K, expected, 1e-10, f"block_registered_twice/{method}")


def test_the_linearized_model_leaves_a_block_registered_twice_as_found():
    case = CASES_BY_NAME["block_registered_twice"]
    model = case.model()
    snapshot = _snapshot(model)
    lin = linearize(model)
    lin(case.inputs(3))
    _assert_untouched(model, snapshot, "linearize")


def test_slot_tensors_names_each_slot_once_and_follows_tied_parameters():
    block = nn.Linear(2, 2)
    model = nn.Module()
    model.a, model.b = block, block  # one slot, two names
    model.c = nn.Linear(2, 2)
    model.c.weight = block.weight  # a tied parameter: another slot, the same tensor
    value = torch.zeros(2, 2)
    slots = slot_tensors(model, {"a.weight": value, "c.bias": model.c.bias})
    assert set(slots) == {"a.weight", "c.weight", "c.bias"}
    assert slots["a.weight"] is value and slots["c.weight"] is value
    with pytest.raises(ValueError, match="tied parameter takes one value"):
        slot_tensors(model, {"a.weight": value, "c.weight": torch.ones(2, 2)})


class _MaxNormEmbedding(nn.Module):
    """``nn.Embedding(max_norm=1)``: its forward renormalises the rows it looks up, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, max_norm=1.0)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.embed.weight.mul_(3.0)  # rows longer than max_norm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(dim=1))


@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_an_embedding_with_max_norm_is_measured_on_a_copy_of_its_table(method):
    torch.manual_seed(0)
    model = _MaxNormEmbedding().double()
    x = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    expected = reference_ntk(copy.deepcopy(model), x)
    snapshot = _snapshot(model)
    K = empirical_ntk(model, x, method=method)
    _assert_untouched(model, snapshot, method)
    assert_kernel_close(K, expected, 1e-10, f"max_norm/{method}")


def test_reference_and_linearization_leave_an_embedding_with_max_norm_as_found():
    torch.manual_seed(0)
    model = _MaxNormEmbedding().double()
    x = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    snapshot = _snapshot(model)
    reference_ntk(model, x)
    linearize(model)(x)
    _assert_untouched(model, snapshot, "reference / linearize")


class _CountsCalls(nn.Module):
    """A buffer written by every forward, in eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x)


def test_a_forward_that_writes_the_model_is_refused_before_any_work():
    model = _CountsCalls().double()
    with pytest.raises(ValueError, match=r"wrote to \['calls'\] in place.*self.training"):
        empirical_ntk(model, torch.randn(3, 4, dtype=torch.float64))


class _Bilinear(nn.Module):
    """``nn.Bilinear`` (``aten::_trilinear``, which ``vmap`` runs without a batching rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(4, 3)
        self.bilinear = nn.Bilinear(5, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bilinear(torch.tanh(self.a(x)), torch.tanh(self.b(x)))


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp"])
def test_no_warning_about_batching_rules_reaches_the_user(method, recwarn):
    torch.manual_seed(0)
    model = _Bilinear().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    K = empirical_ntk(model, x, method=method)
    assert_kernel_close(K, reference_ntk(model, x), 1e-10, f"bilinear/{method}")
    assert not [w for w in recwarn if "batching rule" in str(w.message)], [
        str(w.message) for w in recwarn
    ]


def _assert_exact_and_fell_back(case_name: str, method: str, reason: str) -> None:
    case = CASES_BY_NAME[case_name]
    model = case.model()
    x1, x2 = case.inputs(5, seed=1), case.inputs(3, seed=2)
    for second in (None, x2):
        K = empirical_ntk(model, x1, second, method=method)
        expected = reference_ntk(model, x1, second)
        assert_kernel_close(K, expected, 1e-10, f"{case_name}/{method}")
        info = last_call_info()
        assert info.method != method and any(reason in f for f in info.fallbacks), info


def test_a_wrong_batching_rule_makes_the_jacobian_method_fall_back():
    """``vmap(jacrev)`` of ``torch.cdist`` returns wrong per-example Jacobians, no error."""
    _assert_exact_and_fell_back("rbf_cdist", "jacobian", "vmap(jacrev) is wrong on this model")


def test_ntk_vector_products_of_a_model_mixing_examples_fall_back():
    """A whole-batch vjp of a forward that mixes examples is not the per-example kernel."""
    _assert_exact_and_fell_back(
        "attention_given_batch_first", "ntk_vp", "couples the examples of a batch"
    )


class _FrequencyScaledEmbedding(nn.Module):
    """``scale_grad_by_freq=True``: the backward divides by each token's count in the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4, scale_grad_by_freq=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(dim=1))


@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_an_embedding_scaling_gradients_by_frequency_has_the_reference_kernel(method):
    torch.manual_seed(0)
    model = _FrequencyScaledEmbedding().double()
    x1 = torch.randint(0, 6, (5, 5), generator=torch.Generator().manual_seed(1))
    x2 = torch.randint(0, 6, (3, 5), generator=torch.Generator().manual_seed(2))
    K = empirical_ntk(model, x1, x2, method=method)
    assert_kernel_close(K, reference_ntk(model, x1, x2), 1e-10, f"scale_grad_by_freq/{method}")


class _BatchNormRBF(nn.Module):
    """BatchNorm, then Gaussian units on learned centres through ``torch.cdist``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.centres = nn.Parameter(torch.randn(6, 4))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.inp(x))
        return self.head(torch.exp(-0.5 * torch.cdist(h, self.centres) ** 2))


def test_vmapped_whole_batch_pullbacks_that_disagree_are_looped(monkeypatch):
    """On accelerators the whole-batch Jacobian is vmapped; ``cdist``'s backward is not."""
    from lightning_ntk.kernel import batch_statistics

    torch.manual_seed(0)
    fm = batch_statistics.BatchStatisticsModel(_BatchNormRBF().double())
    x = torch.randn(5, 4, dtype=torch.float64)
    looped = batch_statistics.batch_jacobian(fm, x)
    monkeypatch.setattr(batch_statistics, "_LOOP_DEVICES", ())  # as on accelerators
    vmapped = batch_statistics.batch_jacobian(fm, x)
    for name, J in looped.items():
        torch.testing.assert_close(vmapped[name], J, rtol=1e-10, atol=1e-12)


class _UnusedParameter(nn.Module):
    """A parameter the forward does not use (a head kept for another task)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.other_head = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_a_selected_parameter_that_no_logit_uses_has_a_zero_kernel(method):
    model = _UnusedParameter().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    K = empirical_ntk(model, x, params=["other_head"], method=method)
    assert torch.equal(K, torch.zeros(3, 3, 3, 3, dtype=torch.float64))
    assert torch.equal(reference_ntk(model, x, params=["other_head"]), K)


class _BiasBeforeGroupNorm(nn.Module):
    """A convolution bias that GroupNorm cancels: its kernel is round-off around zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("per_layer", [False, True])
def test_ntk_vector_products_run_where_their_transforms_are_right(per_layer):
    """No false alarm: a padding row (no gradient, a forward derivative) or a zero kernel."""
    case = CASES_BY_NAME["text_embedding_layernorm"]  # padding_idx=0, tokens 0 drawn
    torch.manual_seed(0)
    models = [
        (case.model(), case.inputs(4, seed=1)),
        (_BiasBeforeGroupNorm().double(), torch.randn(4, 3, 5, 5, dtype=torch.float64)),
    ]
    for model, x in models:
        K = empirical_ntk(model, x, method="ntk_vp", per_layer=per_layer)
        info = last_call_info()
        assert info.method == "ntk_vp", info.fallbacks
        total = sum(K.values()) if per_layer else K
        assert_kernel_close(total, reference_ntk(model, x), 1e-10, type(model).__name__)
