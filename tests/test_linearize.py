import copy

import pytest
import torch
from torch import nn

from lightning_ntk.linearization import (
    LinearizedModel,
    argmax_agreement,
    linearization_error,
    linearize,
    prob_tv,
)

DT = torch.float64


def _mlp(seed=0, d=4, h=6, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).to(DT)


def _perturbed(lin: LinearizedModel, scale: float, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        n: p + scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in lin.params0.items()
    }


class ScaledBilinear(nn.Module):
    """f(x; u, v) = v · x uᵀ: quadratic in θ = (u, v)."""

    def __init__(self, d=5, c=3):
        super().__init__()
        self.u = nn.Parameter(torch.randn(c, d, dtype=DT))
        self.v = nn.Parameter(torch.tensor(1.3, dtype=DT))

    def forward(self, x):
        return self.v * (x @ self.u.T)


def test_linear_in_theta_model_has_zero_error():
    model = _mlp()
    x = torch.randn(7, 4, dtype=DT)
    lin = linearize(model, params="2")  # the last layer: f is affine in it
    theta = _perturbed(lin, 0.7)
    exact = model[2](model[1](model[0](x)))
    with torch.no_grad():
        model[2].weight.copy_(theta["2.weight"])
        model[2].bias.copy_(theta["2.bias"])
        f = model(x)
    f_lin = lin(x)
    f0 = lin.initial_logits(x)
    assert not torch.allclose(f, exact)  # the model really moved
    torch.testing.assert_close(f_lin, f, rtol=0, atol=1e-13)
    assert linearization_error(f, f_lin, f0) < 1e-13


def test_quadratic_model_matches_closed_form():
    torch.manual_seed(0)
    model = ScaledBilinear()
    x = torch.randn(6, 5, dtype=DT)
    lin = linearize(model)
    u0, v0 = lin.params0["u"], lin.params0["v"]
    du, dv = 0.3 * torch.randn_like(u0), torch.tensor(-0.4, dtype=DT)
    theta = {"u": u0 + du, "v": v0 + dv}
    f0 = v0 * x @ u0.T
    expected_lin = f0 + dv * x @ u0.T + v0 * x @ du.T
    f = (v0 + dv) * x @ (u0 + du).T
    f_lin = lin(x, theta)
    torch.testing.assert_close(f_lin, expected_lin, rtol=1e-13, atol=1e-13)
    # f − f_lin = dv · x duᵀ exactly
    torch.testing.assert_close(f - f_lin, dv * x @ du.T, rtol=1e-12, atol=1e-13)
    expected_err = (dv * x @ du.T).norm() / (f - f0).norm()
    torch.testing.assert_close(linearization_error(f, f_lin, f0), expected_err)


def test_equals_model_at_theta0_and_first_order_taylor():
    model = _mlp()
    x = torch.randn(5, 4, dtype=DT)
    lin = linearize(model)
    f0 = model(x).detach()
    torch.testing.assert_close(lin(x), f0, rtol=0, atol=1e-15)
    torch.testing.assert_close(lin.initial_logits(x), f0, rtol=0, atol=0)
    direction = {n: d - lin.params0[n] for n, d in _perturbed(lin, 1.0, seed=3).items()}
    theta1 = {n: lin.params0[n] + direction[n] for n in lin.names}
    Jv = lin(x, theta1) - f0
    both = lin.logits_and_initial(x, theta1)  # one jvp for the two
    torch.testing.assert_close(both[0], Jv + f0, rtol=0, atol=0)
    torch.testing.assert_close(both[1], lin.initial_logits(x), rtol=0, atol=1e-15)

    def f_at(t):
        theta = {n: lin.params0[n] + t * direction[n] for n in lin.names}
        return torch.func.functional_call(model, theta, (x,)).detach()

    # central finite difference of f along the direction: J0 v up to O(t²)
    fd_errors = [((f_at(t) - f_at(-t)) / (2 * t) - Jv).abs().max() for t in (1e-3, 1e-4)]
    assert fd_errors[1] < 1e-6 * Jv.abs().max()
    assert 80 < fd_errors[0] / fd_errors[1] < 120
    # the remainder f − f_lin is second order: dividing t by 10 divides it by ~100
    gaps = []
    for t in (1e-2, 1e-3):
        theta = {n: lin.params0[n] + t * direction[n] for n in lin.names}
        gaps.append((f_at(t) - lin(x, theta)).norm())
    assert 80 < gaps[0] / gaps[1] < 120


def test_model_is_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)
    ).to(DT)
    model.train()
    x = torch.randn(10, 4, dtype=DT)
    model(x).sum().backward()  # populates .grad and running stats
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    lin = linearize(model)
    theta = _perturbed(lin, 0.1)
    out1 = lin(x, theta)
    out2 = lin(x, theta)
    lin.initial_logits(x)
    lin.tangent_logits(x, lin.params0)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)  # dropout off
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_live_parameters_are_read_at_call_time_and_snapshot_is_a_copy():
    model = _mlp()
    x = torch.randn(5, 4, dtype=DT)
    lin = linearize(model)
    before = {n: t.clone() for n, t in lin.params0.items()}
    theta = _perturbed(lin, 0.2)
    expected = lin(x, theta)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(theta[name])
    torch.testing.assert_close(lin(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(lin(x, model), expected, rtol=0, atol=0)
    for n in before:
        assert torch.equal(lin.params0[n], before[n])
    assert lin.names == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_params0_override_and_cpu_store():
    model = _mlp()
    x = torch.randn(5, 4, dtype=DT)
    other = _mlp(seed=5)
    lin = linearize(model, dict(other.named_parameters()), store_on="cpu")
    assert all(t.device.type == "cpu" for t in lin.params0.values())
    torch.testing.assert_close(lin.initial_logits(x), other(x).detach())
    # around another point, the linearization differs from the model at θ0(model)
    assert not torch.allclose(lin(x, model), model(x))


def test_batchnorm_buffers_initial_or_current():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).to(DT)
    x = torch.randn(8, 4, dtype=DT)
    fixed = linearize(model)
    live = linearize(model, buffers="current")
    f0 = fixed(x)
    model.train()
    model(3 * x + 1)  # moves the running statistics
    torch.testing.assert_close(fixed(x), f0, rtol=0, atol=0)
    assert not torch.allclose(live(x), f0)
    torch.testing.assert_close(live(x), model.eval()(x).detach())


def test_embedding_model_with_integer_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(12, 3)).to(DT)
    tokens = torch.randint(0, 11, (6, 3))
    lin = linearize(model)
    torch.testing.assert_close(lin(tokens), model(tokens).detach())
    theta = _perturbed(lin, 1e-4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(theta[name])
    # second order remainder: tiny against the first-order change
    f, f_lin, f0 = model(tokens).detach(), lin(tokens), lin.initial_logits(tokens)
    assert linearization_error(f, f_lin, f0) < 1e-3


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": torch.tanh(self.body(x)), "aux": x.sum()}


def test_dict_output_with_output_fn():
    torch.manual_seed(0)
    model = DictOutput().to(DT)
    x = torch.randn(5, 4, dtype=DT)
    lin = linearize(model, output_fn=lambda out: out["logits"])
    torch.testing.assert_close(lin(x), model(x)["logits"].detach())
    with pytest.raises(TypeError, match="output_fn"):
        linearize(model)(x)


def test_gradients_flow_to_explicit_params():
    model = _mlp()
    x = torch.randn(5, 4, dtype=DT)
    lin = linearize(model)
    theta = {n: t.clone().requires_grad_() for n, t in lin.params0.items()}
    lin(x, theta).square().sum().backward()
    # at θ = θ0 the gradient of Σ f_lin² is J0ᵀ 2 f0, the model's own gradient
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(theta[name].grad, p.grad)


def test_bad_params_are_refused():
    model = _mlp()
    lin = linearize(model)
    x = torch.randn(2, 4, dtype=DT)
    with pytest.raises(ValueError, match=r"lacks the parameters \['2.bias'\]"):
        lin(x, {n: t for n, t in lin.params0.items() if n != "2.bias"})
    bad = dict(lin.params0)
    bad["2.bias"] = torch.zeros(5, dtype=DT)
    with pytest.raises(ValueError, match=r"to have shape \(3,\) but got \(5,\)"):
        lin(x, bad)
    with pytest.raises(TypeError, match="Expected `params` to be None, a mapping"):
        lin(x, [1, 2])
    with pytest.raises(ValueError, match="Expected `buffers` to be one of"):
        linearize(model, buffers="latest")
    with pytest.raises(ValueError, match="`params0` lacks"):
        linearize(model, {"0.weight": model[0].weight})


def test_distances_closed_forms_and_shapes():
    logits = torch.tensor([[0.0, 0.0], [5.0, -5.0], [1.0, 2.0]], dtype=DT)
    same = logits.clone()
    assert prob_tv(logits, same) == 0
    assert argmax_agreement(logits, same) == 1
    flipped = logits.flip(-1)
    # row 0 unchanged; rows 1 and 2 swap their two probabilities
    p = torch.softmax(logits, -1)
    expected_tv = ((p[1, 0] - p[1, 1]).abs() + (p[2, 0] - p[2, 1]).abs()) / 3
    torch.testing.assert_close(prob_tv(logits, flipped), expected_tv)
    # row 0 is a tie (argmax 0 both ways); rows 1 and 2 flip
    torch.testing.assert_close(argmax_agreement(logits, flipped), torch.tensor(1 / 3, dtype=DT))
    # an unmoved network: error 0 / eps -> 0, not NaN
    assert linearization_error(logits, logits, logits) == 0
    f0 = torch.zeros(3, 2, dtype=DT)
    torch.testing.assert_close(linearization_error(logits, f0, f0), torch.tensor(1.0, dtype=DT))
    with pytest.raises(ValueError, match=r"Expected `logits_lin` to have the shape of `logits`"):
        prob_tv(logits, logits[:2])
    with pytest.raises(ValueError, match=r"Expected `logits0` to be logits of shape \(N, C\)"):
        linearization_error(logits, logits, logits.flatten())
    with pytest.raises(ValueError, match="Expected `eps` to be a positive float"):
        linearization_error(logits, logits, logits, eps=0)


def test_package_attribute_stays_the_function_after_submodule_import():
    import lightning_ntk
    import lightning_ntk.linearization
    from lightning_ntk import linearize as exported

    assert exported is lightning_ntk.linearization.linearize

    model = _mlp()
    assert isinstance(exported(model), LinearizedModel)
    assert isinstance(lightning_ntk.linearize(model, params="2"), LinearizedModel)


def test_a_batch_the_model_cannot_take_gets_the_model_s_own_error_naming_x():
    """Not four routes' copies of one shape error: the plain forward's, naming ``x``."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    lin = linearize(model)
    with pytest.raises(ValueError, match=r"`x` of shape \(5, 7\).*expects inputs \(\.\.\., 4\)"):
        lin(torch.randn(5, 7))
    with pytest.raises(TypeError, match=r"`x` has dtype torch\.int64"):
        lin(torch.randint(0, 3, (5, 4)))
