"""The kernels of SignGD, asymmetric SignGD and Adam against their float64 definitions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from lightning_ntk import empirical_ntk, reference_ntk
from lightning_ntk.kernel import _run as run_module
from lightning_ntk.kernel import last_call_info
from lightning_ntk.kernel.ntk_vp import NTKVPMethod

from .cases import ARCHITECTURES, CASES, CASES_BY_NAME, ModelCase
from .test_kernel import assert_kernel_close

KERNELS = ["signgd", "asymmetric_signgd", "adam"]
# ("structured" never computes them: tested in test_unsupported_methods_are_never_tried)
METHODS = ["jacobian", "ntk_vp", "loop", "auto"]


def adam_with_state(model: nn.Module, seed: int = 0, **kwargs) -> torch.optim.Adam:
    """An Adam over the trainable parameters with a seeded state, as after three steps."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], **kwargs)
    generator = torch.Generator().manual_seed(seed)
    for group in optimizer.param_groups:
        for p in group["params"]:
            v = torch.rand(p.shape, generator=generator, dtype=torch.float64) + 0.1
            optimizer.state[p] = {
                "step": torch.tensor(3.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": (1e-2 * v).to(p.dtype),
            }
    return optimizer


_MODELS: dict[str, tuple[nn.Module, torch.optim.Adam]] = {}


def model_of(case: ModelCase) -> tuple[nn.Module, torch.optim.Adam]:
    if case.name not in _MODELS:
        model = case.model()
        _MODELS[case.name] = (model, adam_with_state(model))
    return _MODELS[case.name]


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request) -> ModelCase:
    return request.param


@pytest.fixture(scope="module")
def references():
    """Float64 references per case and kernel: ``{(case, kernel, x2 given): full}``."""
    cache = {}

    def get(case, kernel, second_given):
        key = (case.name, kernel, second_given)
        if key not in cache:
            model, optimizer = model_of(case)
            x1, x2 = case.inputs(4, seed=1), case.inputs(3, seed=2)
            cache[key] = reference_ntk(
                model, x1, x2 if second_given else None, output_fn=case.output_fn,
                kernel=kernel, optimizer=optimizer if kernel == "adam" else None,
            )  # fmt: skip
        return cache[key]

    return get


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_reference_float64(case, method, kernel, references):
    if case in ARCHITECTURES and (method, kernel) != ("auto", "signgd"):
        # signgd is the kernel round-off can break (e.g. attention key biases)
        pytest.skip("each method's optimizer kernels are covered by the basic cases")
    model, optimizer = model_of(case)
    x1, x2 = case.inputs(4, seed=1), case.inputs(3, seed=2)
    for second in (x2, None):
        K = empirical_ntk(
            model, x1, second, method=method, output_fn=case.output_fn, kernel=kernel,
            optimizer=optimizer if kernel == "adam" else None,
        )  # fmt: skip
        which = "set" if second is not None else "None"
        expected = references(case, kernel, second is not None)
        assert_kernel_close(K, expected, 1e-10, f"{case.name}/{method}/{kernel}/x2={which}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "loop"])
def test_layouts_chunks_and_per_layer(method, kernel):
    case = CASES_BY_NAME["cnn_batchnorm"]
    model, optimizer = model_of(case)
    extra = {"kernel": kernel, "optimizer": optimizer if kernel == "adam" else None}
    x1, x2 = case.inputs(5, seed=3), case.inputs(3, seed=4)
    for second in (x2, None):
        R = reference_ntk(model, x1, second, **extra)
        diagonal = R.diagonal(dim1=2, dim2=3)
        expected = {"full": R, "diagonal": diagonal, "trace": diagonal.mean(-1)}
        for output, reference in expected.items():
            what = f"{method}/{kernel}/{output}/x2 {'set' if second is not None else 'None'}"
            K = empirical_ntk(model, x1, second, output=output, method=method, **extra)
            assert_kernel_close(K, reference, 1e-10, what)
        what = f"{method}/{kernel}/x2 {'set' if second is not None else 'None'}"
        chunked = empirical_ntk(model, x1, second, method=method, chunk_size=2, **extra)
        assert_kernel_close(chunked, R, 1e-10, what + " chunked")
        parts = empirical_ntk(model, x1, second, method=method, per_layer=True, **extra)
        assert list(parts) == [n for n, p in model.named_parameters() if p.requires_grad]
        assert_kernel_close(sum(parts.values()), R, 1e-10, what + " per-layer sum")
        alone = reference_ntk(model, x1, second, params=["7.weight"], **extra)
        assert_kernel_close(parts["7.weight"], alone, 1e-10, what + " 7.weight alone")


@pytest.mark.parametrize("kernel", KERNELS)
def test_parameter_subsets(kernel):
    case = CASES_BY_NAME["mlp"]
    model, optimizer = model_of(case)
    extra = {"kernel": kernel, "optimizer": optimizer if kernel == "adam" else None}
    x1, x2 = case.inputs(4), case.inputs(3, seed=1)
    last = reference_ntk(model, x1, x2, params=["4.weight", "4.bias"], **extra)
    assert not torch.allclose(last, reference_ntk(model, x1, x2, **extra))
    for method in ("jacobian", "ntk_vp", "auto"):
        K = empirical_ntk(model, x1, x2, params="4", method=method, **extra)
        assert_kernel_close(K, last, 1e-10, f"{kernel}/{method} params='4'")


def test_signgd_kernels_of_a_bias_free_linear_model():
    """f(x) = W x: J_a(x) = e_a ⊗ x, so sign(J_a(x)) = e_a ⊗ sign(x) and
    Θ_signgd[a, b] = δ_ab sign(x)·sign(x'), Θ_asym[a, b] = δ_ab x·sign(x')."""
    model = nn.Linear(6, 4, bias=False).double()
    x1 = torch.randn(5, 6, dtype=torch.float64)
    x2 = torch.randn(3, 6, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    signgd = (x1.sign() @ x2.sign().T)[:, :, None, None] * eye
    asymmetric = (x1 @ x2.sign().T)[:, :, None, None] * eye
    for method in ("auto", "jacobian", "ntk_vp", "loop"):
        K = empirical_ntk(model, x1, x2, method=method, kernel="signgd")
        torch.testing.assert_close(K, signgd, rtol=1e-12, atol=1e-12)
        A = empirical_ntk(model, x1, x2, method=method, kernel="asymmetric_signgd")
        torch.testing.assert_close(A, asymmetric, rtol=1e-12, atol=1e-12)
        # x2=None: J(x1) sign(J(x1))ᵀ, as computed, not symmetrised
        A11 = empirical_ntk(model, x1, method=method, kernel="asymmetric_signgd", chunk_size=2)
        torch.testing.assert_close(
            A11, (x1 @ x1.sign().T)[:, :, None, None] * eye, rtol=1e-12, atol=1e-12
        )
        assert not torch.allclose(A11, A11.permute(1, 0, 3, 2))


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_after_its_first_step_is_j_d_jt(optimizer_class, amsgrad):
    """After one step from a zero state, v̂ = g² exactly, so d = 1 / (|g| + ε)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x_train, x1, x2 = (torch.randn(n, 3, dtype=torch.float64) for n in (8, 4, 3))
    optimizer = optimizer_class(model.parameters(), lr=1e-3, eps=1e-3, amsgrad=amsgrad)
    model(x_train).logsumexp(-1).sum().backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # (P,)
    optimizer.step()
    d = 1.0 / (gradient.abs() + 1e-3)  # (P,)

    params = {name: p.detach() for name, p in model.named_parameters()}

    def jacobian(x):  # (N, C, P)
        jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
        return torch.cat([j.reshape(*j.shape[:2], -1) for j in jac.values()], dim=2)

    J1, J2 = jacobian(x1), jacobian(x2)
    expected = torch.einsum("iap,p,jbp->ijab", J1, d, J2)  # J1 diag(d) J2ᵀ
    for method in ("auto", "jacobian", "ntk_vp", "loop"):
        K = empirical_ntk(model, x1, x2, method=method, kernel="adam", optimizer=optimizer)
        torch.testing.assert_close(K, expected, rtol=1e-10, atol=0.0)
    assert not torch.allclose(expected, empirical_ntk(model, x1, x2), rtol=1e-3)


def test_unsupported_methods_are_never_tried(monkeypatch):
    case = CASES_BY_NAME["mlp"]
    model, _ = model_of(case)
    x = case.inputs(4)

    def refuse(*args, **kwargs):
        raise AssertionError("tried a method that does not compute this kernel")

    monkeypatch.setattr(run_module, "plan_structure", refuse)
    monkeypatch.setattr(NTKVPMethod, "block", refuse)
    empirical_ntk(model, x, kernel="signgd")
    assert last_call_info().method == "jacobian"
    assert not last_call_info().fallbacks
    empirical_ntk(model, x, kernel="signgd", method="ntk_vp")
    assert last_call_info().method == "loop"
    assert last_call_info().fallbacks == ("ntk_vp: does not compute this kernel (not tried)",)
    empirical_ntk(model, x, kernel="asymmetric_signgd", method="structured")
    assert last_call_info().method == "jacobian"


def test_errors_are_clear():
    case = CASES_BY_NAME["mlp"]
    model, optimizer = model_of(case)
    x = case.inputs(3)
    with pytest.raises(ValueError, match=r"Expected `kernel` to be one of .* but got 'sign'"):
        empirical_ntk(model, x, kernel="sign")
    with pytest.raises(ValueError, match=r"kernel='adam' needs the Adam optimizer"):
        empirical_ntk(model, x, kernel="adam")
    with pytest.raises(ValueError, match=r"`optimizer` is read only by kernel='adam'"):
        empirical_ntk(model, x, kernel="signgd", optimizer=optimizer)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"torch.optim.Adam or AdamW .* but got SGD"):
        empirical_ntk(model, x, kernel="adam", optimizer=sgd)
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"no state for parameter '0.weight' yet"):
        empirical_ntk(model, x, kernel="adam", optimizer=fresh)
    head_only = adam_with_state(model[4])
    with pytest.raises(ValueError, match=r"'0.weight' is not among the parameters of `opt"):
        empirical_ntk(model, x, kernel="adam", optimizer=head_only)
    K = empirical_ntk(model, x, kernel="adam", optimizer=head_only, params="4")
    R = reference_ntk(model, x, kernel="adam", optimizer=optimizer, params="4")
    assert not torch.allclose(K, R)  # its own state, not the other optimizer's
    with pytest.raises(ValueError, match=r"method='structured' does not compute kernel='adam'"):
        empirical_ntk(
            model, x, kernel="adam", optimizer=optimizer, method="structured", fallback=False
        )


def test_the_docs_page_snippet_runs():
    page = Path(__file__).resolve().parent.parent / "docs" / "optimizer_kernels.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(page), "exec"), {})


class _KeyBiasAttention(nn.Module):
    """Softmax attention: ``k.bias`` adds ``q_i·b`` to every score of row ``i``, so the
    logits do not depend on it and its Jacobian is zero in exact arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 2)

    def forward(self, x):  # (N, T, 3) -> (N, 2)
        scores = self.q(x) @ self.k(x).transpose(1, 2)  # (N, T, T)
        return (scores.softmax(-1) @ self.v(x)).mean(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_off_entries_have_no_sign(dtype):
    torch.manual_seed(0)
    model = _KeyBiasAttention().to(dtype)
    x1, x2 = torch.randn(4, 5, 3, dtype=dtype), torch.randn(3, 5, 3, dtype=dtype)
    sgd = empirical_ntk(model, x1, x2, params=["k.bias"])
    assert sgd.abs().max() < 1e3 * torch.finfo(dtype).eps * empirical_ntk(model, x1, x2).max()
    for method in ("jacobian", "ntk_vp", "loop"):
        for kernel in ("signgd", "asymmetric_signgd"):
            parts = empirical_ntk(model, x1, x2, method=method, kernel=kernel, per_layer=True)
            assert torch.equal(parts["k.bias"], torch.zeros_like(parts["k.bias"])), method
        R = reference_ntk(model, x1, x2, kernel="signgd")
        K = empirical_ntk(model, x1, x2, method=method, kernel="signgd")
        assert torch.equal(K.double(), R), method  # integer counts: equal, not close
