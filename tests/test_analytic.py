"""Infinite-width kernels (`analytic_ntk`, `analytic_nngp`) and the `NTKMLP` that reaches them."""

import math

import pytest
import torch
from torch import nn

from lightning_ntk import empirical_ntk
from lightning_ntk.testing import (
    NTKMLP,
    analytic_nngp,
    analytic_ntk,
    assert_converges_to_analytic,
    assert_ntk_close,
)
from lightning_ntk.testing._analytic import _EXPECTATIONS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Small matrices: one thread avoids oversubscribing a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def x():
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# ------------------------------------------------------------------ closed forms, exact cases


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("sw, sb", [(1.0, 0.0), (1.3, 0.4)])
def test_identity_network_kernels_are_closed_form(x, depth, sw, sb):
    # Identity activation: Σ^{l+1} = σ_w² Σ^l + σ_b², Σ̇ = σ_w², Θ^{l+1} = σ_w² Θ^l + Σ^{l+1}.
    gram = x @ x.T / x.shape[1]
    sigma = sw**2 * gram + sb**2
    theta = sigma.clone()
    for _ in range(depth):
        sigma = sw**2 * sigma + sb**2
        theta = sw**2 * theta + sigma
    kw = {"depth": depth, "activation": "identity", "weight_std": sw, "bias_std": sb}
    assert_ntk_close(analytic_nngp(x, **kw), sigma, rtol=1e-12, atol=1e-12)
    assert_ntk_close(analytic_ntk(x, **kw), theta, rtol=1e-12, atol=1e-12)


def test_identity_without_bias_is_a_power_of_the_weight_variance(x):
    gram = x @ x.T / x.shape[1]
    L, sw = 2, 1.5
    kw = {"depth": L, "activation": "identity", "weight_std": sw}
    torch.testing.assert_close(analytic_nngp(x, **kw), sw ** (2 * (L + 1)) * gram)
    torch.testing.assert_close(analytic_ntk(x, **kw), (L + 1) * sw ** (2 * (L + 1)) * gram)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_standard_kernel_of_one_identity_layer_is_the_input_covariance(x, parameterization):
    # Θ̃² = E_{Σ¹}[uv] = Σ¹ = σ_w² x·x'/d + σ_b²; the NTK parameterization adds Θ¹ σ_w² = Σ¹ σ_w².
    sw, sb = 1.2, 0.5
    sigma1 = sw**2 * x @ x.T / x.shape[1] + sb**2
    kw = {"depth": 1, "activation": "identity", "weight_std": sw, "bias_std": sb}
    expected = sigma1 if parameterization == "standard" else sigma1 * sw**2 + sw**2 * sigma1 + sb**2
    torch.testing.assert_close(analytic_ntk(x, parameterization=parameterization, **kw), expected)
    # The NNGP does not depend on the parameterization.
    torch.testing.assert_close(
        analytic_nngp(x, parameterization=parameterization, **kw), sw**2 * sigma1 + sb**2
    )


@pytest.mark.parametrize("sw, sb", [(1.0, 0.0), (0.7, 0.3)])
def test_depth_zero_network_has_exactly_the_linear_kernel(x, sw, sb):
    # Θ(x, x') = σ_w² x·x'/d + σ_b² holds exactly for any finite linear network.
    torch.manual_seed(0)
    model = NTKMLP(5, width=3, depth=0, out_features=4, weight_std=sw, bias_std=sb).double()
    expected = sw**2 * x @ x.T / 5 + sb**2
    K = empirical_ntk(model, x, output="full")
    assert_ntk_close(K, expected[:, :, None, None] * torch.eye(4), rtol=1e-12, atol=1e-12)
    assert_ntk_close(analytic_ntk(x, depth=0, weight_std=sw, bias_std=sb), expected, rtol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_gaussian_expectations_match_monte_carlo(activation):
    a, b, c = 1.3, 0.7, 0.4
    cov = torch.tensor([[a, c], [c, b]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    u, v = (
        torch.randn(400_000, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    ).T
    if activation == "relu":
        phi, dphi = torch.relu, lambda t: (t > 0).double()
    else:
        phi, dphi = torch.erf, lambda t: 2 / math.sqrt(math.pi) * torch.exp(-t * t)
    e_phi, e_dphi = _EXPECTATIONS[activation](
        *(torch.tensor(t, dtype=torch.float64) for t in (c, a, b))
    )
    # Monte-Carlo standard errors are below 1e-3 here; 5e-3 is > 5 of them.
    assert float(e_phi) == pytest.approx(float((phi(u) * phi(v)).mean()), abs=5e-3)
    assert float(e_dphi) == pytest.approx(float((dphi(u) * dphi(v)).mean()), abs=5e-3)


def test_relu_kernel_on_a_single_point_halves_the_variance():
    # ρ = 1 ⇒ E[relu(u)²] = Σ/2 and E[1{u>0}] = 1/2: Σ² = σ_w² Σ¹/2, Θ² = Σ¹ σ_w²/2 + Σ².
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    sigma1 = 2.0**2 * 25.0 / 2  # σ_w² x·x/d = 50
    assert float(analytic_nngp(x, depth=1, weight_std=2.0)) == pytest.approx(100.0)
    assert float(analytic_ntk(x, depth=1, weight_std=2.0)) == pytest.approx(sigma1 * 2 + 100.0)


def test_relu_kernel_of_a_zero_input_is_the_bias_variance():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    K = analytic_ntk(x, depth=2, bias_std=0.5)
    assert torch.isfinite(K).all()
    assert float(analytic_nngp(x, depth=2, bias_std=0.0)[0, 0]) == 0.0


def test_kernels_are_symmetric_psd_and_accept_two_batches(x):
    x2 = x[:3] * 2
    for fn in (analytic_ntk, analytic_nngp):
        for activation in ("relu", "erf"):
            K = fn(x, depth=2, activation=activation, bias_std=0.2)
            assert K.dtype == torch.float64 and K.shape == (6, 6)
            torch.testing.assert_close(K, K.T)
            assert torch.linalg.eigvalsh(K).min() > -1e-10
            cross = fn(x, x2, depth=2, activation=activation, bias_std=0.2)
            assert cross.shape == (6, 3)
            torch.testing.assert_close(
                cross, fn(torch.cat([x, x2]), depth=2, activation=activation, bias_std=0.2)[:6, 6:]
            )


# ------------------------------------------------------------------ NTKMLP


@pytest.mark.parametrize("activation", ["relu", "erf", "identity"])
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_output_covariance_of_a_wide_layer_is_the_nngp(x, activation, parameterization):
    # With one hidden layer, h¹ is exactly Gaussian with covariance Σ¹, so the C logits,
    # i.i.d. given the hidden layer, have covariance Σ² up to the hidden-layer average
    # (relative O(1/√width)). Their sample covariance S = f fᵀ/C has
    # E(S_ij − Σ_ij)² = (Σ_ii Σ_jj + Σ_ij²)/C; the check allows 3 such standard errors
    # plus 2/√width (observed 3-7% over seeds 0-4, against a bound of about 13%).
    torch.manual_seed(0)
    width, C = 4096, 4000
    kw = {"activation": activation, "weight_std": 1.4, "bias_std": 0.3}
    model = NTKMLP(5, width, 1, C, parameterization=parameterization, **kw)
    with torch.no_grad():
        f = model(x.float()).double()
    nngp = analytic_nngp(x, depth=1, **kw)
    diag = nngp.diagonal()
    standard_error = torch.sqrt(((diag[:, None] * diag[None, :] + nngp**2) / C).sum())
    tolerance = 3 * standard_error / torch.linalg.norm(nngp) + 2 / math.sqrt(width)
    error = torch.linalg.norm(f @ f.T / C - nngp) / torch.linalg.norm(nngp)
    assert error < tolerance
    assert tolerance < 0.2  # the check still has teeth


def test_ntk_mlp_is_built_from_plain_linear_layers():
    model = NTKMLP(4, width=16, depth=2, out_features=3, bias_std=0.1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, 4), (16, 16), (3, 16)]
    assert all(m.bias is not None and m.bias.shape == m.weight.shape[:1] for m in linears)
    assert model(torch.randn(7, 4)).shape == (7, 3)
    # every parameter is held by a stock nn.Linear: the structured kernel covers them all
    from lightning_ntk.kernel._functional import FunctionalModel
    from lightning_ntk.kernel.structured import plan_structure

    plan = plan_structure(FunctionalModel(model), torch.randn(3, 4))
    assert plan.fallback_names == [] and len(plan.structured_names) == 6
    assert not any("bias" in n for n, _ in NTKMLP(4, 16, 2, 3, bias_std=0.0).named_parameters())
    standard = NTKMLP(4, 16, 2, 3, parameterization="standard", bias_std=0.1)
    assert [type(m) for m in standard.layers] == [nn.Linear] * 3


def test_ntk_mlp_initialisation_scales():
    torch.manual_seed(0)
    ntk = NTKMLP(400, 400, 1, 400, weight_std=2.0, bias_std=0.5)
    assert ntk.layers[0].linear.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert ntk.layers[0].linear.bias.std().item() == pytest.approx(1.0, rel=0.1)
    assert ntk.layers[0].scale == pytest.approx(2.0 / 20)
    std = NTKMLP(400, 400, 1, 400, parameterization="standard", weight_std=2.0, bias_std=0.5)
    assert std.layers[0].weight.std().item() == pytest.approx(0.1, rel=0.02)
    assert std.layers[1].bias.std().item() == pytest.approx(0.5, rel=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("activation, parameterization", [("relu", "ntk"), ("erf", "standard")])
def test_empirical_ntk_at_width_4096_matches_the_limit(activation, parameterization):
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    kw = {
        "activation": activation,
        "parameterization": parameterization,
        "weight_std": 1.5,
        "bias_std": 0.3,
    }
    model = NTKMLP(5, 4096, 2, 2, **kw)
    K = empirical_ntk(model, x, output="trace").double()
    if parameterization == "standard":
        K = K / 4096
    K_inf = analytic_ntk(x, depth=2, **kw)
    # Fluctuations are O(1/√4096) ≈ 1.6% times an O(1) constant. Over seeds 0-5 the
    # Frobenius error was 1.9-5.0% (relu) and 1.8-3.5% (erf), the worst diagonal entry
    # 1-9.5%; the bounds leave room for any seed.
    assert float(torch.linalg.norm(K - K_inf) / torch.linalg.norm(K_inf)) < 0.08
    assert float((K.diagonal() / K_inf.diagonal() - 1).abs().max()) < 0.15


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_empirical_ntk_error_decays_like_inverse_sqrt_width(parameterization):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))

    def factory(width):
        return NTKMLP(
            4,
            width,
            2,
            3,
            activation="relu",
            parameterization=parameterization,
            weight_std=1.5,
            bias_std=0.3,
        )

    # The relative error e(n) = ‖K_n − K_∞‖/‖K_∞‖ is O(n^{-1/2}). Fitted on the mean over 4
    # seeds at widths 64..1024, five disjoint groups of seeds gave slopes -0.42..-0.52 (NTK)
    # and -0.38..-0.48 (standard): mean about -0.46, sd about 0.04. The window -0.5 ± 0.2
    # is 3-4 sd wide on the near side and still excludes no convergence (0) and a 1/n
    # rate (-1).
    result = assert_converges_to_analytic(
        factory, [64, 128, 256, 512, 1024], x, seeds=(0, 1, 2, 3), slope_tol=0.2
    )
    assert result.slope.slope < 0
    assert result.mean_errors[-1] < result.mean_errors[0]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": -1}, "`depth`"),
        ({"depth": 1.5}, "`depth`"),
        ({"depth": 1, "activation": "tanh"}, "`activation`"),
        ({"depth": 1, "parameterization": "mup"}, "`parameterization`"),
        ({"depth": 1, "weight_std": 0.0}, "`weight_std`"),
        ({"depth": 1, "bias_std": -1.0}, "`bias_std`"),
        ({"depth": 0, "parameterization": "standard"}, "depth.*standard"),
    ],
)
def test_analytic_ntk_rejects_bad_arguments(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        analytic_ntk(x, **kwargs)


def test_analytic_kernels_reject_bad_inputs(x):
    with pytest.raises(TypeError, match="`x1`"):
        analytic_ntk([[1.0]], depth=1)
    with pytest.raises(ValueError, match=r"`x2`.*5 features"):
        analytic_nngp(x, torch.randn(2, 3), depth=1)
    with pytest.raises(ValueError, match="`x1`"):
        analytic_ntk(torch.randn(4), depth=1)


def test_ntk_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`width`"):
        NTKMLP(3, 0, 1, 2)
    with pytest.raises(ValueError, match="`activation`"):
        NTKMLP(3, 4, 1, 2, activation="gelu")
    with pytest.raises(ValueError, match="`parameterization`"):
        NTKMLP(3, 4, 1, 2, parameterization="mean_field")


def test_ntk_mlp_layer_computes_the_ntk_parameterized_affine_map():
    torch.manual_seed(0)
    model = NTKMLP(5, 7, 0, 3, weight_std=1.5, bias_std=0.3).double()
    layer = model.layers[0]
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = 1.5 / 5**0.5 * x @ layer.linear.weight.T + 0.3 * layer.linear.bias
    torch.testing.assert_close(model(x), expected)
