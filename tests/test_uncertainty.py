"""Kernel-predicted ensembles, deep ensembles and the Laplace GP classifier.

Exactness anchors: the batched solutions agree with ``kernel_solution`` / ``kernel_flow``
draw by draw; a linear model (its NTK is exact at any width) trained by gradient descent
lands on the kernel flow and fixed point; the GP-Laplace mode and predictive covariance
agree with dense formulas of Rasmussen & Williams.
"""

import math

import pytest
import torch
from torch import nn

from lightning_ntk.testing._analytic import NTKMLP, analytic_nngp, analytic_ntk
from lightning_ntk.theory import LinearizedTraining, kernel_flow, kernel_solution
from lightning_ntk.uncertainty import (
    EnsemblePrediction,
    GPLaplacePrediction,
    deep_ensemble,
    gp_laplace_classifier,
    kernel_ensemble,
    kernel_solutions,
)

DT = torch.float64
N, M, C, D = 12, 5, 3, 4


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=DT)
    x_test = torch.randn(M, D, generator=g, dtype=DT)
    y = torch.arange(N) % C
    return x, y, x_test


@pytest.fixture(scope="module")
def kernels(data):
    x, _, x_test = data
    return analytic_ntk(x, depth=1), analytic_ntk(x_test, x, depth=1)


@pytest.fixture(autouse=True)
def one_thread():
    # many tiny float64 steps: extra threads only add contention on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _draws(S, rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(S, rows, C, generator=g, dtype=DT)


# ------------------------------------------------------------------ kernel_solutions


@pytest.mark.parametrize(
    "weight_decay, smoothing, reduction",
    [(0.05, 0.0, "mean"), (0.5, 0.1, "sum"), (0.0, 0.2, "mean")],
)
def test_kernel_solutions_match_kernel_solution_per_draw(
    data, kernels, weight_decay, smoothing, reduction
):
    _, y, _ = data
    K, K_test = kernels
    f0, f0_test = _draws(4, N), _draws(4, M, seed=2)
    batch = kernel_solutions(
        K,
        f0,
        y,
        weight_decay=weight_decay,
        label_smoothing=smoothing,
        ntk_test=K_test,
        logits0_test=f0_test,
        reduction=reduction,
        tol=1e-11,
    )
    assert batch.converged and batch.residual <= 1e-11
    assert batch.train_logits.shape == (4, N, C) and batch.test_logits.shape == (4, M, C)
    for s in range(4):
        single = kernel_solution(
            K,
            f0[s],
            y,
            weight_decay=weight_decay,
            label_smoothing=smoothing,
            ntk_test=K_test,
            logits0_test=f0_test[s],
            reduction=reduction,
        )
        torch.testing.assert_close(batch.train_logits[s], single.train_logits, atol=1e-8, rtol=0)
        torch.testing.assert_close(batch.test_logits[s], single.test_logits, atol=1e-8, rtol=0)


def test_kernel_solutions_flow_matches_kernel_flow(data, kernels):
    _, y, _ = data
    K, K_test = kernels
    f0, f0_test = _draws(3, N), _draws(3, M, seed=2)
    batch = kernel_solutions(
        K, f0, y, weight_decay=0.01, ntk_test=K_test, logits0_test=f0_test, steps=25, lr=3.0
    )
    for s in range(3):
        train, test = kernel_flow(
            K,
            f0[s],
            y,
            lr=3.0,
            steps=25,
            weight_decay=0.01,
            ntk_test=K_test,
            logits0_test=f0_test[s],
        )
        torch.testing.assert_close(batch.train_logits[s], train[-1], atol=1e-10, rtol=0)
        torch.testing.assert_close(batch.test_logits[s], test[-1], atol=1e-10, rtol=0)


def test_linear_model_training_lands_on_kernel_prediction(data):
    # depth 0: f = (σ_w/√d) W x, whose NTK σ_w² x·x'/d is exact; GD on it is the kernel flow.
    x, y, x_test = data
    K, K_test = analytic_ntk(x, depth=0), analytic_ntk(x_test, x, depth=0)

    def linear():
        return NTKMLP(D, 1, 0, C).to(DT)

    lam = 0.1
    for steps in (20, 120):
        ens = deep_ensemble(
            linear, x, y, x_test, steps=steps, lr=4.0, weight_decay=lam, num_members=3
        )
        flow = kernel_solutions(
            K,
            ens.member_train_logits0,
            y,
            weight_decay=lam,
            ntk_test=K_test,
            logits0_test=ens.member_logits0,
            steps=steps,
            lr=4.0,
        )
        torch.testing.assert_close(ens.member_train_logits, flow.train_logits, atol=1e-9, rtol=0)
        torch.testing.assert_close(ens.member_logits, flow.test_logits, atol=1e-9, rtol=0)
    fixed = kernel_solutions(
        K,
        ens.member_train_logits0,
        y,
        weight_decay=lam,
        ntk_test=K_test,
        logits0_test=ens.member_logits0,
    )
    # every mode contracts by at least 1 − η λ = 0.6 per step: 120 steps reach the fixed point
    torch.testing.assert_close(ens.member_train_logits, fixed.train_logits, atol=1e-7, rtol=0)
    torch.testing.assert_close(ens.member_logits, fixed.test_logits, atol=1e-7, rtol=0)


# ------------------------------------------------------------------ kernel_ensemble


@pytest.fixture(scope="module")
def ensemble(data):
    x, y, x_test = data
    return kernel_ensemble(
        x, y, x_test, model=NTKMLP(D, 8, 1, C), weight_decay=0.05, num_draws=32, seed=3
    )


def test_ensemble_statistics_shapes_and_invariants(ensemble):
    e = ensemble
    S = 32
    assert isinstance(e, EnsemblePrediction)
    assert e.member_logits.shape == (S, M, C) and e.member_logits.dtype == DT
    assert e.member_logits0.shape == (S, M, C) and e.member_train_logits.shape == (S, N, C)
    for name in ("logit_mean", "probs"):
        assert getattr(e, name).shape == (M, C), name
    for name in ("logit_variance", "variance", "entropy", "expected_entropy", "mutual_information"):
        assert getattr(e, name).shape == (M,), name
    assert e.logit_cov.shape == (M, C, C)
    assert e.converged and e.residual <= 1e-9
    torch.testing.assert_close(e.probs.sum(-1), torch.ones(M, dtype=DT))
    torch.testing.assert_close(e.probs, e.member_probs.mean(0))
    torch.testing.assert_close(e.logit_mean, e.member_logits.mean(0))
    torch.testing.assert_close(e.logit_cov, e.logit_cov.transpose(1, 2), atol=0, rtol=0)
    assert float(torch.linalg.eigvalsh(e.logit_cov).min()) >= -1e-12
    full = e.covariance()
    assert full.shape == (M * C, M * C)
    torch.testing.assert_close(full, full.T, atol=0, rtol=0)
    assert float(torch.linalg.eigvalsh(full).min()) >= -1e-10
    blocks = full.view(M, C, M, C).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    torch.testing.assert_close(blocks, e.logit_cov)
    torch.testing.assert_close(e.logit_variance, e.logit_cov.diagonal(dim1=1, dim2=2).mean(-1))
    assert bool((e.mutual_information >= 0).all()) and bool((e.variance > 0).all())
    assert bool((e.entropy <= math.log(C) + 1e-12).all())
    torch.testing.assert_close(e.mutual_information, e.entropy - e.expected_entropy)


def test_ensemble_members_are_kernel_solutions_of_their_draws(data, ensemble):
    x, y, x_test = data
    solved = kernel_solutions(
        analytic_ntk(x, depth=1),
        ensemble.member_train_logits0,
        y,
        weight_decay=0.05,
        ntk_test=analytic_ntk(x_test, x, depth=1),
        logits0_test=ensemble.member_logits0,
    )
    torch.testing.assert_close(solved.test_logits, ensemble.member_logits)


def test_initial_draws_follow_the_nngp(data):
    x, y, x_test = data
    e = kernel_ensemble(
        x, y, x_test, model=NTKMLP(D, 8, 2, C), label_smoothing=0.1, num_draws=4000, seed=0
    )
    f0 = e.member_logits0  # (S, M, C): independent classes, covariance Σ(X_test, X_test)
    empirical = torch.einsum("smc,snc->mn", f0, f0) / (f0.shape[0] * C)
    sigma = analytic_nngp(x_test, depth=2)
    assert float((empirical - sigma).abs().max() / sigma.diagonal().max()) < 0.06


def test_unregularized_ensemble_matches_its_gaussian_closed_form(data):
    # λ = 0: f*(x) = f0(x) + Θ(x, X) Θ⁻¹ (log Y − f0(X)) P, affine in the Gaussian f0, so
    # the trained test logits are Gaussian with mean A log Y P (A = Θ(x, X) Θ⁻¹) and
    # per-point covariance Σ(x, x) I + (A Σ_XX Aᵀ − 2 Σ(x, X) Aᵀ)[x, x] P.
    x, y, x_test = data
    eps, S = 0.1, 20000
    e = kernel_ensemble(
        x, y, x_test, model=NTKMLP(D, 8, 1, C), label_smoothing=eps, num_draws=S, seed=0
    )
    K, K_test = analytic_ntk(x, depth=1), analytic_ntk(x_test, x, depth=1)
    sigma = analytic_nngp(torch.cat([x, x_test]), depth=1)
    s_xx, s_tx, s_tt = sigma[:N, :N], sigma[N:, :N], sigma[N:, N:]
    A = torch.linalg.solve(K, K_test.T).T  # (M, N)
    P = torch.eye(C, dtype=DT) - 1 / C
    log_y = ((1 - eps) * nn.functional.one_hot(y, C).double() + eps / C).log()
    mean = A @ log_y @ P
    scale = (A @ s_xx @ A.T - 2 * s_tx @ A.T).diagonal()
    cov = s_tt.diagonal()[:, None, None] * torch.eye(C, dtype=DT) + scale[:, None, None] * P
    spread = cov.diagonal(dim1=1, dim2=2).max().sqrt()
    assert float((e.logit_mean - mean).abs().max()) < 5 * spread / math.sqrt(S)
    assert float((e.logit_cov - cov).abs().max()) < 0.05 * float(cov.abs().max())


def test_ensemble_is_deterministic_and_leaves_global_rng(data):
    x, y, x_test = data
    net = NTKMLP(D, 8, 1, C)
    state = torch.random.get_rng_state()
    a = kernel_ensemble(x, y, x_test, model=net, label_smoothing=0.1, num_draws=4, seed=7)
    b = kernel_ensemble(x, y, x_test, model=net, label_smoothing=0.1, num_draws=4, seed=7)
    c = kernel_ensemble(x, y, x_test, model=net, label_smoothing=0.1, num_draws=4, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.member_logits, b.member_logits)
    assert not torch.allclose(a.member_logits, c.member_logits)


def test_empirical_kernels_for_any_model(data):
    x, y, x_test = data

    def make():
        return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C)).to(DT)

    state = torch.random.get_rng_state()
    e = kernel_ensemble(
        x, y, x_test, model=make, weight_decay=0.1, num_draws=8, num_inits=3, seed=0
    )
    again = kernel_ensemble(
        x, y, x_test, model=make, weight_decay=0.1, num_draws=8, num_inits=3, seed=0
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert e.member_logits.shape == (8, M, C) and e.converged
    assert torch.equal(e.member_logits, again.member_logits)


def test_empirical_kernels_approach_analytic_ones_for_a_wide_ntkmlp(data):
    x, y, x_test = data
    analytic = kernel_ensemble(
        x, y, x_test, model=NTKMLP(D, 8, 1, C), weight_decay=0.1, num_draws=2000, seed=0
    )
    empirical = kernel_ensemble(
        x,
        y,
        x_test,
        model=lambda: NTKMLP(D, 2048, 1, C).to(DT),
        kernel="empirical",
        weight_decay=0.1,
        num_draws=2000,
        num_inits=8,
        seed=0,
    )
    tv = 0.5 * (analytic.probs - empirical.probs).abs().sum(-1)
    assert float(tv.max()) < 0.05


# ------------------------------------------------------------------ deep_ensemble


def test_deep_ensemble_statistics_and_determinism(data):
    x, y, x_test = data

    def make():
        return NTKMLP(D, 32, 1, C).to(DT)

    state = torch.random.get_rng_state()
    kwargs = dict(steps=5, lr=1.0, num_members=3, label_smoothing=0.1, batch_size=5, seed=1)
    a = deep_ensemble(make, x, y, x_test, **kwargs)
    b = deep_ensemble(make, x, y, x_test, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.member_logits, b.member_logits)
    assert a.member_logits.shape == (3, M, C) and a.member_train_logits.shape == (3, N, C)
    assert not torch.allclose(a.member_logits[0], a.member_logits[1])  # different seeds
    assert not torch.allclose(a.member_logits, a.member_logits0)  # it trained


# ------------------------------------------------------------------ GP-Laplace


@pytest.fixture(scope="module")
def separable():
    g = torch.Generator().manual_seed(0)
    means = 4 * torch.eye(C, D, dtype=DT)
    y = torch.arange(24) % C
    x = means[y] + 0.3 * torch.randn(24, D, generator=g, dtype=DT)
    y_test = torch.arange(9) % C
    x_test = means[y_test] + 0.3 * torch.randn(9, D, generator=g, dtype=DT)
    return x, y, x_test, y_test


def _gp_inputs(x, x_test):
    k = dict(depth=1, bias_std=0.1)
    return (
        analytic_nngp(x, **k),
        analytic_nngp(x_test, x, **k),
        analytic_nngp(x_test, **k).diagonal(),
    )


def test_gp_laplace_classifies_a_separable_problem(separable):
    x, y, x_test, y_test = separable
    K, K_test, k_diag = _gp_inputs(x, x_test)
    result = gp_laplace_classifier(K, y, K_test, k_diag, num_samples=4000)
    assert isinstance(result, GPLaplacePrediction)
    assert result.probs.shape == (9, C) and result.latent_cov.shape == (9, C, C)
    assert torch.equal(result.probs.argmax(-1), y_test)
    assert float(result.probs[torch.arange(9), y_test].min()) > 0.5
    torch.testing.assert_close(result.probs.sum(-1), torch.ones(9, dtype=DT))
    probit = gp_laplace_classifier(K, y, K_test, k_diag, averaging="probit", num_classes=C)
    assert float((probit.probs - result.probs).abs().max()) < 0.05
    # far from the data the latent variance is larger than at the training clusters
    far = torch.full((1, D), -6.0, dtype=DT)
    _, K_far, k_far = _gp_inputs(x, far)
    far_result = gp_laplace_classifier(K, y, K_far, k_far)
    assert float(far_result.latent_cov[0].diagonal().mean()) > float(
        result.latent_cov.diagonal(dim1=1, dim2=2).mean()
    )


def test_gp_laplace_mode_and_covariance_match_dense_formulas(separable):
    x, y, x_test, _ = separable
    x, y = x[:9], y[:9]
    K, K_test, k_diag = _gp_inputs(x, x_test)
    result = gp_laplace_classifier(K, y, K_test, k_diag, label_smoothing=0.05, num_samples=10)
    # the mode solves f = K (Y − p(f)): the kernel fixed point with λ = 1, summed loss
    mode = kernel_solution(
        K, torch.zeros(9, C, dtype=DT), y, weight_decay=1.0, label_smoothing=0.05, reduction="sum"
    )
    torch.testing.assert_close(result.train_latent, mode.train_logits, atol=1e-8, rtol=0)
    # Σ* = k** I − Q*ᵀ W (I + K W)⁻¹ Q*, sample-major dense (9·C, 9·C) matrices
    p = torch.softmax(result.train_latent, -1)
    W = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
    K_full = torch.kron(K, torch.eye(C, dtype=DT))
    middle = W @ torch.linalg.inv(torch.eye(9 * C, dtype=DT) + K_full @ W)
    for t in range(x_test.shape[0]):
        Q = torch.kron(K_test[t][:, None], torch.eye(C, dtype=DT))  # (9·C, C)
        expected = k_diag[t] * torch.eye(C, dtype=DT) - Q.T @ middle @ Q
        torch.testing.assert_close(result.latent_cov[t], expected, atol=1e-9, rtol=0)
    Y = 0.95 * nn.functional.one_hot(y, C).double() + 0.05 / C
    torch.testing.assert_close(result.latent_mean, K_test @ (Y - p), atol=1e-9, rtol=0)


# ------------------------------------------------------------------ errors


def test_bad_input_raises_clear_errors(data, kernels):
    x, y, x_test = data
    K, K_test = kernels
    net = NTKMLP(D, 8, 1, C)
    with pytest.raises(ValueError, match="no finite fixed point"):
        kernel_ensemble(x, y, x_test, model=net)
    with pytest.raises(ValueError, match="no finite fixed point"):
        kernel_solutions(K, _draws(2, N), y)
    hard_flow = kernel_solutions(K, _draws(2, N), y, steps=3, lr=1.0)  # finite time is fine
    assert bool(torch.isfinite(hard_flow.train_logits).all())
    with pytest.raises(ValueError, match="`kernel` to be one of"):
        kernel_ensemble(x, y, x_test, model=net, weight_decay=0.1, kernel="nngp")
    with pytest.raises(ValueError, match="`num_draws` to be an int >= 2"):
        kernel_ensemble(x, y, x_test, model=net, weight_decay=0.1, num_draws=1)
    with pytest.raises(ValueError, match="per-example shape"):
        kernel_ensemble(x, y, x_test[:, :2], model=net, weight_decay=0.1)
    with pytest.raises(ValueError, match="one row per training input"):
        kernel_ensemble(x, y[:-1], x_test, model=net, weight_decay=0.1)
    with pytest.raises(TypeError, match="callable returning a freshly initialised"):
        kernel_ensemble(x, y, x_test, model=nn.Linear(D, C), weight_decay=0.1)
    with pytest.raises(ValueError, match=r"`ntk` = Θ\(X, X\) of shape \(12, 12\)"):
        kernel_solutions(K[:-1, :-1], _draws(2, N), y, weight_decay=0.1)
    with pytest.raises(ValueError, match="`lr` to be a positive float"):
        kernel_solutions(K, _draws(2, N), y, steps=3)
    with pytest.raises(ValueError, match="`lr` to be a positive float"):
        deep_ensemble(lambda: NTKMLP(D, 4, 1, C), x, y, x_test, steps=1, lr=0.0)
    with pytest.raises(TypeError, match="`model_fn` to be a callable"):
        deep_ensemble(net, x, y, x_test, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="`averaging` to be one of"):
        gp_laplace_classifier(K, y, K_test, torch.ones(M, dtype=DT), averaging="exact")
    with pytest.raises(ValueError, match="`num_classes` to be an int >= 2"):
        gp_laplace_classifier(K, y, K_test, torch.ones(M, dtype=DT), num_classes=1)
    with pytest.raises(ValueError, match=r"`kernel_test_diag` to be of shape \(5,\)"):
        gp_laplace_classifier(K, y, K_test, torch.ones(4, dtype=DT))


def test_ensembles_take_the_same_training_object_as_the_theory(data, kernels):
    x, y, x_test = data
    K, K_test = kernels
    net = NTKMLP(D, 8, 1, C)
    training = LinearizedTraining(weight_decay=0.1, label_smoothing=0.05)
    f0, f0_test = _draws(3, N), _draws(3, M, seed=2)
    batch = kernel_solutions(K, f0, y, training, ntk_test=K_test, logits0_test=f0_test)
    assert batch.train_logits.shape == (3, N, C) and batch.test_logits.shape == (3, M, C)
    single = kernel_solution(K, f0[1], y, training, ntk_test=K_test, logits0_test=f0_test[1])
    torch.testing.assert_close(batch.train_logits[1], single.train_logits, atol=1e-7, rtol=0)
    torch.testing.assert_close(batch.test_logits[1], single.test_logits, atol=1e-7, rtol=0)
    by_object = kernel_ensemble(x, y, x_test, training, model=net, num_draws=4, seed=3)
    by_keywords = kernel_ensemble(
        x, y, x_test, model=net, weight_decay=0.1, label_smoothing=0.05, num_draws=4, seed=3
    )
    torch.testing.assert_close(by_object.member_logits, by_keywords.member_logits, atol=0, rtol=0)
    zero = LinearizedTraining(weight_decay=0.1, decay_to="zero")
    with pytest.raises(ValueError, match="Expected `decay_to` to be 'init' for kernel_solutions"):
        kernel_solutions(K, f0, y, zero)
    with pytest.raises(ValueError, match="Expected `decay_to` to be 'init' for kernel_ensemble"):
        kernel_ensemble(x, y, x_test, zero, model=net)
    with pytest.raises(TypeError, match="got `training` and its settings lr"):
        kernel_ensemble(x, y, x_test, training, model=net, lr=0.1)
