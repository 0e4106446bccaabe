"""Every kernel method against the float64 reference, over the registry of model cases."""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
from torch import nn

from lightning_ntk import empirical_ntk, reference_ntk
from lightning_ntk.kernel import NTKMethod
from lightning_ntk.kernel._functional import FunctionalModel
from lightning_ntk.kernel._inputs import map_tensors
from lightning_ntk.kernel.structured import plan_structure

from .cases import ARCHITECTURES, CASES, CASES_BY_NAME, ModelCase

METHODS = ["structured", "jacobian", "ntk_vp", "loop", "auto"]
OUTPUTS = ["full", "diagonal", "trace"]


def assert_kernel_close(K, R, rtol, what=""):
    """Max-abs error relative to the reference's scale, with the worst entry reported."""
    assert K.shape == R.shape, f"{what}: shape {tuple(K.shape)} != reference {tuple(R.shape)}"
    err = (K.double() - R).abs()
    scale = R.abs().max().item()
    worst = err.argmax().item()
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    assert err.max().item() <= rtol * scale, (
        f"{what}: max error {err.max().item():.3e} at {index} "
        f"(got {K.flatten()[worst].item():.6e}, reference {R.flatten()[worst].item():.6e}), "
        f"tolerance {rtol:.1e} × scale {scale:.3e}"
    )


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request) -> ModelCase:
    return request.param


@pytest.fixture(scope="module")
def references():
    """Float64 reference kernels per case, computed once: ``{(case, x2 given): full}``."""
    cache = {}

    def get(case, second_given):
        key = (case.name, second_given)
        if key not in cache:
            x1, x2 = case.inputs(5, seed=1), case.inputs(3, seed=2)
            cache[key] = reference_ntk(
                model_of(case), x1, x2 if second_given else None, output_fn=case.output_fn
            )
        return cache[key]

    return get


_MODELS = {}


def matching(patterns, names):
    """The names matched by any of the ``fnmatch`` patterns."""
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def model_of(case):
    if case.name not in _MODELS:
        _MODELS[case.name] = case.model()
    return _MODELS[case.name]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_reference_float64(case, method, references):
    model = model_of(case)
    x1, x2 = case.inputs(5, seed=1), case.inputs(3, seed=2)
    for second in (x2, None):
        full = references(case, second is not None)
        expected = {"full": full, "diagonal": full.diagonal(dim1=2, dim2=3)}
        expected["trace"] = expected["diagonal"].mean(-1)
        for output in OUTPUTS:
            K = empirical_ntk(
                model, x1, second, output=output, method=method, output_fn=case.output_fn
            )
            assert K.dtype == torch.float64
            which = "set" if second is not None else "None"
            assert_kernel_close(
                K, expected[output], 1e-10, f"{case.name}/{method}/{output}/x2={which}"
            )


@pytest.mark.parametrize("method", ["structured", "jacobian", "ntk_vp"])
def test_chunked_blocks_equal_one_block(case, method):
    if case in ARCHITECTURES and method != "structured":
        pytest.skip("block assembly of the generic methods is covered by the basic cases")
    model = case.model()
    x1, x2 = case.inputs(5, seed=3), case.inputs(3, seed=4)
    for second in (x2, None):
        whole = empirical_ntk(model, x1, second, method=method, output_fn=case.output_fn)
        chunked = empirical_ntk(
            model, x1, second, method=method, chunk_size=2, output_fn=case.output_fn
        )
        assert_kernel_close(chunked, whole, 1e-12, f"{case.name}/{method} chunked")


def test_float32_models_match_reference(case):
    model = case.model().float()
    x1 = map_tensors(case.inputs(6, seed=5), lambda t: t.float() if t.is_floating_point() else t)
    R = reference_ntk(model, x1, output="full", output_fn=case.output_fn)
    for method in ("structured", "jacobian", "ntk_vp", "loop"):
        K = empirical_ntk(model, x1, method=method, output_fn=case.output_fn)
        assert K.dtype == torch.float32
        assert_kernel_close(K, R, 1e-5, f"{case.name}/{method} float32")


def test_structured_plan_covers_supported_layers(case):
    """A silent fallback would still be exact; this pins what is structured."""
    model = case.model()
    fm = FunctionalModel(model, output_fn=case.output_fn)
    plan = plan_structure(fm, fm.cast_input(case.inputs(4)))
    fallback = matching(case.fallback, fm.names)
    assert set(plan.structured_names) == matching(case.structured, fm.names) - fallback
    assert set(plan.fallback_names) == fallback
    assert set(plan.structured_names) | set(plan.fallback_names) == set(fm.names)


@pytest.mark.parametrize("method", ["structured", "jacobian", "ntk_vp"])
def test_per_layer_parts_sum_to_total(case, method):
    if case in ARCHITECTURES and method != "structured":
        pytest.skip("per-layer parts of the generic methods are covered by the basic cases")
    model = model_of(case)
    x1, x2 = case.inputs(4, seed=6), case.inputs(3, seed=7)
    for output in ("full", "trace"):
        parts = empirical_ntk(
            model, x1, x2, output=output, method=method, per_layer=True, output_fn=case.output_fn
        )
        total = empirical_ntk(model, x1, x2, output=output, method=method, output_fn=case.output_fn)
        names = FunctionalModel(model, output_fn=case.output_fn).names
        assert list(parts) == names
        assert_kernel_close(
            sum(parts.values()), total, 1e-12, f"{case.name}/{method}/{output} per-layer sum"
        )


def test_per_layer_part_equals_kernel_of_that_parameter_alone():
    case = CASES_BY_NAME["cnn_batchnorm"]
    model = case.model()
    x = case.inputs(4)
    parts = empirical_ntk(model, x, per_layer=True)
    for name in ("0.weight", "1.bias", "7.weight"):
        alone = reference_ntk(model, x, params=[name])
        assert_kernel_close(parts[name], alone, 1e-10, name)


def test_bias_free_linear_has_the_exact_kernel():
    """f(x) = W x  =>  Θ(x, x')[a, b] = (x·x') δ_ab."""
    model = nn.Linear(6, 4, bias=False).double()
    x1 = torch.randn(5, 6, dtype=torch.float64)
    x2 = torch.randn(3, 6, dtype=torch.float64)
    exact = torch.einsum("id,jd->ij", x1, x2)[:, :, None, None] * torch.eye(4, dtype=torch.float64)
    for method in METHODS:
        K = empirical_ntk(model, x1, x2, method=method)
        torch.testing.assert_close(K, exact, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            empirical_ntk(model, x1, x2, output="trace", method=method), x1 @ x2.T
        )


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_kernel_is_exactly_symmetric(method):
    case = CASES_BY_NAME["cnn_batchnorm"]
    model = case.model().float()
    x = case.inputs(7).float()
    K = empirical_ntk(model, x, method=method, chunk_size=3)
    assert torch.equal(K, K.permute(1, 0, 3, 2))
    T = empirical_ntk(model, x, output="trace", method=method)
    assert torch.equal(T, T.T)


def test_outputs_are_consistent_layouts():
    case = CASES_BY_NAME["mlp"]
    model = case.model()
    x1, x2 = case.inputs(4), case.inputs(3, seed=1)
    full = empirical_ntk(model, x1, x2)
    diag = empirical_ntk(model, x1, x2, output="diagonal")
    trace = empirical_ntk(model, x1, x2, output="trace")
    assert full.shape == (4, 3, 4, 4) and diag.shape == (4, 3, 4) and trace.shape == (4, 3)
    torch.testing.assert_close(diag, full.diagonal(dim1=2, dim2=3))
    torch.testing.assert_close(trace, diag.mean(-1))


# --------------------------------------------------------------- parameters
def test_params_by_names_module_prefix_and_predicate():
    case = CASES_BY_NAME["mlp"]
    model = case.model()
    x = case.inputs(4)
    last = reference_ntk(model, x, params=["4.weight", "4.bias"])
    torch.testing.assert_close(empirical_ntk(model, x, params="4"), last)
    torch.testing.assert_close(empirical_ntk(model, x, params=["4.weight", "4.bias"]), last)
    torch.testing.assert_close(
        empirical_ntk(model, x, params=lambda name, p: name.startswith("4.")), last
    )
    weights_only = empirical_ntk(model, x, params=lambda name, p: p.ndim == 2, per_layer=True)
    assert list(weights_only) == ["0.weight", "2.weight", "4.weight"]


def test_frozen_parameters_are_excluded():
    case = CASES_BY_NAME["frozen_backbone"]
    model = case.model()
    x = case.inputs(4)
    parts = empirical_ntk(model, x, per_layer=True)
    assert list(parts) == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="frozen"):
        empirical_ntk(model, x, params=["backbone.0.weight"])


# ---------------------------------------------------------------- precision
def test_dtype_float64_from_a_float32_model():
    case = CASES_BY_NAME["mlp"]
    model = case.model()
    x = case.inputs(4)
    R = reference_ntk(model, x)
    K = empirical_ntk(model.float(), x.float(), dtype=torch.float64)
    assert K.dtype == torch.float64
    # parameters were rounded to float32 once, the kernel is then computed in float64
    assert_kernel_close(K, R, 1e-6, "float64 from float32")


def test_bfloat16_model_is_computed_in_float32():
    case = CASES_BY_NAME["mlp"]
    model = case.model().to(torch.bfloat16)
    x = case.inputs(4).to(torch.bfloat16)
    K = empirical_ntk(model, x)
    assert K.dtype == torch.float32
    R = reference_ntk(model, x)
    assert_kernel_close(K, R, 1e-5, "bf16 model")


# ------------------------------------------------------------ no interference
@pytest.mark.parametrize("method", METHODS)
def test_model_buffers_grads_modes_and_rng_are_untouched(method):
    case = CASES_BY_NAME["cnn_batchnorm"]
    model = case.model().float()
    model.train()
    model[4].eval()  # a mixed mode, which must be restored as it was
    x = case.inputs(6).float()
    model(x).sum().backward()  # .grad populated
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    empirical_ntk(model, x, method=method)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model._forward_hooks and not model[0]._forward_hooks


def test_dropout_is_off_and_batchnorm_uses_running_stats():
    case = CASES_BY_NAME["cnn_batchnorm"]
    model = case.model()
    model.train()
    x = case.inputs(4)
    K1 = empirical_ntk(model, x)
    K2 = empirical_ntk(model, x)
    assert torch.equal(K1, K2)
    model.eval()
    assert_kernel_close(empirical_ntk(model, x), K1, 1e-12, "train-mode model == eval-mode model")


def test_compiled_module_is_unwrapped():
    case = CASES_BY_NAME["mlp"]
    model = case.model()
    compiled = torch.compile(model, backend="eager")
    x = case.inputs(4)
    torch.testing.assert_close(empirical_ntk(compiled, x), empirical_ntk(model, x))


def test_method_enum_and_strings_are_accepted():
    case = CASES_BY_NAME["mlp"]
    model, x = case.model(), case.inputs(3)
    torch.testing.assert_close(
        empirical_ntk(model, x, method=NTKMethod.JACOBIAN),
        empirical_ntk(model, x, method="jacobian"),
    )


# ------------------------------------------------------------------- errors
class _ScalarOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x):
        return self.fc(x).squeeze(-1)


class _NaNOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x) / (x[:, :1] != 0).to(x.dtype) - self.fc(x)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"x1": torch.empty(0, 3)},
            ValueError,
            r"`x1` to be a non-empty batch .* got shape \(0, 3\)",
        ),
        (
            {"x1": [[1.0, 2.0, 3.0]]},
            TypeError,
            "`x1` to be a torch.Tensor, or a mapping / tuple of tensors .* but got a list",
        ),
        ({"x1": "abc"}, TypeError, "`x1` to be a torch.Tensor, .* but got str"),
        (
            {"x2": torch.randn(2, 4)},
            ValueError,
            r"`x2` to have the per-example shape of `x1`, \(3,\), but got \(4,\)",
        ),
        (
            {"output": "diag"},
            ValueError,
            r"`output` to be one of \('full', 'diagonal', 'trace'\) but got 'diag'",
        ),
        ({"method": "fast"}, ValueError, "`method` to be one of .* but got 'fast'"),
        ({"chunk_size": 0}, ValueError, "`chunk_size` to be a positive int or None but got 0"),
        ({"per_layer": "yes"}, TypeError, "`per_layer` to be a bool"),
        ({"dtype": torch.int32}, TypeError, "`dtype` to be a floating torch.dtype"),
        (
            {"params": ["nope"]},
            ValueError,
            "`params` names 'nope', which matches no trainable parameter",
        ),
        ({"output_fn": 3}, TypeError, "`output_fn` to be callable"),
    ],
)
def test_bad_arguments_are_refused_clearly(kwargs, error, match):
    model = nn.Linear(3, 2)
    call = {"x1": torch.randn(4, 3), **kwargs}
    x1 = call.pop("x1")
    with pytest.raises(error, match=match):
        empirical_ntk(model, x1, **call)


def test_model_without_trainable_parameters():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(model, torch.randn(2, 3))


def test_non_logit_outputs_need_output_fn():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\) but got shape \(4,\)"):
        empirical_ntk(_ScalarOut(), x)
    K = empirical_ntk(_ScalarOut(), x, output_fn=lambda out: out[:, None])
    assert K.shape == (4, 4, 1, 1)
    with pytest.raises(
        TypeError, match=r"returned a dict with keys \['aux', 'logits'\].*output_fn"
    ):
        empirical_ntk(CASES_BY_NAME["dict_output"].model(), CASES_BY_NAME["dict_output"].inputs(2))


def test_non_finite_logits_are_reported():
    x = torch.randn(4, 3)
    x[2, 0] = 0.0
    with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) at rows \[2\]"):
        empirical_ntk(_NaNOut(), x)


def test_integer_inputs_to_a_float_model():
    with pytest.raises(TypeError, match=r"`x1` has dtype torch\.int64 and the model failed on it"):
        empirical_ntk(nn.Linear(3, 2), torch.ones(4, 3, dtype=torch.int64))


def test_float_and_integer_inputs_do_not_mix():
    model = CASES_BY_NAME["text_embedding_layernorm"].model()
    with pytest.raises(TypeError, match="both be floating or both be integer"):
        empirical_ntk(model, torch.ones(2, 7, dtype=torch.long), torch.ones(2, 7))


def test_lightning_is_not_imported():
    import subprocess
    import sys

    code = (
        "import sys, torch; from lightning_ntk import empirical_ntk; "
        "empirical_ntk(torch.nn.Linear(2, 2), torch.randn(3, 2)); "
        "bad = [m for m in ('lightning', 'pytorch_lightning') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_structure_plan_is_reused_and_reverified_when_the_model_changes(monkeypatch):
    from lightning_ntk.kernel import _plan

    calls = []
    verified = _plan._verified
    monkeypatch.setattr(_plan, "_verified", lambda *a: calls.append(1) or verified(*a))
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
    ).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    first = empirical_ntk(model, x, method="structured")
    empirical_ntk(model, x + 1.0, method="structured")
    assert len(calls) == 1  # same model, same structure: verified once
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())
    empirical_ntk(model, x, method="structured")
    assert len(calls) == 2  # a replaced parameter: verified again
    model[4] = nn.Linear(5, 3).double()  # a replaced layer
    changed = empirical_ntk(model, x, method="structured")
    assert len(calls) == 3
    assert_kernel_close(changed, reference_ntk(model, x), 1e-10, "after replacing a layer")
    assert not torch.allclose(changed, first)
