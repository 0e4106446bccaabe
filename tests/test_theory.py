"""The kernel-predicted dynamics against explicit training of the linearized model.

Gradient descent on ``f_lin`` is exactly the kernel flow (``f_lin`` is linear in ``θ``, so
its kernel never changes); these tests train ``f_lin`` by autograd on ``θ`` and compare.
"""

import math

import pytest
import torch
from torch import nn

from lightning_ntk.kernel.reference import reference_ntk
from lightning_ntk.linearization import linearize
from lightning_ntk.metrics import logit_norm
from lightning_ntk.theory import (
    KernelSolution,
    RegimePrediction,
    kernel_flow,
    kernel_solution,
    predict_regime,
    weight_decay_shift,
)

DT = torch.float64
N, C, D, H = 8, 3, 32, 32


@pytest.fixture(autouse=True)
def one_thread():
    # thousands of tiny float64 steps: extra threads only add contention on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).to(DT)
    X = torch.randn(N, D, dtype=DT)
    X_test = torch.randn(5, D, dtype=DT)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    lin = linearize(model)
    K = reference_ntk(model, X)  # (N, N, C, C)
    K_test = reference_ntk(model, X_test, X)  # (5, N, C, C)
    eig_max = torch.linalg.eigvalsh(K.permute(0, 2, 1, 3).reshape(N * C, N * C)).max()
    return {
        "model": model,
        "lin": lin,
        "X": X,
        "X_test": X_test,
        "y": y,
        "K": K,
        "K_test": K_test,
        "f0": lin.initial_logits(X),
        "f0_test": lin.initial_logits(X_test),
        "lr": float(2.0 * N / eig_max),  # stable: η λ_max(Θ0/N) ‖D‖ ≤ 2 · 1/2
    }


def _train_linearized(pb, steps, *, weight_decay=0.0, decay_to="init", smoothing=0.0, sum_=False):
    """Full-batch GD on θ with f_lin; returns train and test logit trajectories."""
    lin, X, X_test, y = pb["lin"], pb["X"], pb["X_test"], pb["y"]
    theta = {n: t.clone().requires_grad_() for n, t in lin.params0.items()}
    ref = lin.params0 if decay_to == "init" else {n: torch.zeros_like(t) for n, t in theta.items()}
    reduction = "sum" if sum_ else "mean"
    train, test = [lin(X, theta).detach()], [lin(X_test, theta).detach()]
    for _ in range(steps):
        f = lin(X, theta)
        loss = nn.functional.cross_entropy(f, y, label_smoothing=smoothing, reduction=reduction)
        penalty = sum((theta[n] - ref[n]).square().sum() for n in theta)
        grads = torch.autograd.grad(loss + weight_decay / 2 * penalty, list(theta.values()))
        with torch.no_grad():
            for t, g in zip(theta.values(), grads):
                t -= pb["lr"] * g
        train.append(lin(X, theta).detach())
        test.append(lin(X_test, theta).detach())
    return torch.stack(train), torch.stack(test)


def _flow(pb, steps, **kwargs):
    return kernel_flow(
        pb["K"],
        pb["f0"],
        pb["y"],
        lr=pb["lr"],
        steps=steps,
        ntk_test=pb["K_test"],
        logits0_test=pb["f0_test"],
        model=pb["model"],
        x=pb["X"],
        x_test=pb["X_test"],
        **kwargs,
    )


def _solution(pb, **kwargs):
    return kernel_solution(
        pb["K"],
        pb["f0"],
        pb["y"],
        ntk_test=pb["K_test"],
        logits0_test=pb["f0_test"],
        model=pb["model"],
        x=pb["X"],
        x_test=pb["X_test"],
        **kwargs,
    )


CASES = {
    "l2-to-init": {"weight_decay": 0.3, "decay_to": "init"},
    "weight-decay-to-zero": {"weight_decay": 0.3, "decay_to": "zero"},
    "smoothing-no-decay": {"label_smoothing": 0.2},
    "hard-no-decay": {},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_linearized_gd_is_the_kernel_flow_step_by_step(problem, case):
    kwargs = CASES[case]
    train, test = _train_linearized(
        problem,
        25,
        weight_decay=kwargs.get("weight_decay", 0.0),
        decay_to=kwargs.get("decay_to", "init"),
        smoothing=kwargs.get("label_smoothing", 0.0),
    )
    flow_train, flow_test = _flow(problem, 25, **kwargs)
    assert flow_train.shape == (26, N, C) and flow_test.shape == (26, 5, C)
    assert (flow_train[-1] - flow_train[0]).abs().max() > 0.1  # the logits moved
    torch.testing.assert_close(flow_train, train, rtol=0, atol=1e-11)
    torch.testing.assert_close(flow_test, test, rtol=0, atol=1e-11)


def test_summed_loss_uses_the_unscaled_kernel(problem):
    train, _ = _train_linearized(problem, 10, smoothing=0.1, sum_=True)
    flow = kernel_flow(
        problem["K"],
        problem["f0"],
        problem["y"],
        lr=problem["lr"],
        steps=10,
        label_smoothing=0.1,
        reduction="sum",
    )
    # the summed loss is N times steeper: with the same lr it is a different trajectory
    torch.testing.assert_close(flow, train, rtol=0, atol=1e-10)
    assert not torch.allclose(flow, _flow(problem, 10, label_smoothing=0.1)[0])


@pytest.mark.parametrize("case", ["l2-to-init", "weight-decay-to-zero"])
def test_regularized_training_converges_to_kernel_solution(problem, case):
    kwargs = CASES[case]
    solution = _solution(problem, **kwargs)
    assert isinstance(solution, KernelSolution)
    assert solution.converged and solution.residual < 1e-10 and 0 < solution.iterations < 20
    train, test = _train_linearized(
        problem, 200, weight_decay=kwargs["weight_decay"], decay_to=kwargs["decay_to"]
    )
    torch.testing.assert_close(train[-1], solution.train_logits, rtol=0, atol=1e-8)
    torch.testing.assert_close(test[-1], solution.test_logits, rtol=0, atol=1e-8)
    assert (solution.train_logits - problem["f0"]).abs().max() > 0.1


def test_plain_weight_decay_matches_torch_sgd(problem):
    """``decay_to="zero"`` is what ``SGD(weight_decay=λ)`` does to the linearized model."""
    lin, X, y = problem["lin"], problem["X"], problem["y"]
    theta = [t.clone().requires_grad_() for t in lin.params0.values()]
    opt = torch.optim.SGD(theta, lr=problem["lr"], weight_decay=0.1)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(lin(X, dict(zip(lin.names, theta))), y).backward()
        opt.step()
    flow, _ = _flow(problem, 20, weight_decay=0.1, decay_to="zero")
    torch.testing.assert_close(lin(X, dict(zip(lin.names, theta))).detach(), flow[-1])
    shift = weight_decay_shift(problem["model"], X)
    torch.testing.assert_close(shift, lin.tangent_logits(X, lin.params0))
    # J0 θ0 of a network with biases differs from f0 − f(0) in general, but it is a jvp:
    p0 = dict(problem["model"].named_parameters())
    _, jvp = torch.func.jvp(
        lambda p: torch.func.functional_call(problem["model"], p, (X,)), (p0,), (p0,)
    )
    torch.testing.assert_close(shift, jvp.detach())


def test_smoothing_without_decay_converges_to_interpolating_solution(problem):
    solution = _solution(problem, label_smoothing=0.2)
    assert solution.iterations == 0 and solution.converged
    target = torch.full((N, C), 0.2 / C, dtype=DT)
    target[torch.arange(N), problem["y"]] += 0.8
    torch.testing.assert_close(torch.softmax(solution.train_logits, 1), target)
    # f* − f0 lies in the span of the kernel with row-sum-zero coefficients
    assert solution.coefficients.sum(dim=1).abs().max() < 1e-12
    train, test = _flow(problem, 3000, label_smoothing=0.2)
    torch.testing.assert_close(train[-1], solution.train_logits, rtol=0, atol=1e-8)
    torch.testing.assert_close(test[-1], solution.test_logits, rtol=0, atol=1e-8)
    # and the explicitly trained linearized model is on its way there
    explicit, _ = _train_linearized(problem, 100, smoothing=0.2)
    torch.testing.assert_close(explicit[-1], train[100], rtol=0, atol=1e-10)
    gap = (explicit[-1] - solution.train_logits).abs().max()
    assert gap < 0.3 * (train[0] - solution.train_logits).abs().max()


def test_hard_labels_without_decay_diverge_logarithmically(problem):
    flow = kernel_flow(problem["K"], problem["f0"], problem["y"], lr=problem["lr"], steps=6400)
    norms = [float(logit_norm(flow[s])) for s in (100, 400, 1600, 6400)]
    increments = [b - a for a, b in zip(norms, norms[1:])]
    assert all(inc > 0.5 for inc in increments), norms  # keeps growing at every ×4
    # logarithmic: about the same increment for every ×4 of the steps
    assert max(increments) / min(increments) < 1.5, norms
    for lazy in ({"label_smoothing": 0.2}, {"weight_decay": 0.1}):
        flow = kernel_flow(
            problem["K"], problem["f0"], problem["y"], lr=problem["lr"], steps=6400, **lazy
        )
        change = (flow[6400] - flow[1600]).abs().max()
        assert change < 1e-6, (lazy, change)
        assert float(logit_norm(flow[6400])) < norms[-1]
    with pytest.raises(ValueError, match="no finite fixed point"):
        kernel_solution(problem["K"], problem["f0"], problem["y"])


def test_trace_layout_reads_as_kernel_times_identity():
    torch.manual_seed(0)
    model = nn.Linear(5, C, bias=False).to(DT)  # Θ(x, x') = (x · x') I_C exactly
    X = torch.randn(4, 5, dtype=DT)
    y = torch.tensor([0, 1, 2, 1])
    full = reference_ntk(model, X)
    trace = reference_ntk(model, X, output="trace")
    torch.testing.assert_close(full, (X @ X.T)[:, :, None, None] * torch.eye(C, dtype=DT))
    f0 = model(X).detach()
    a = kernel_solution(full, f0, y, weight_decay=0.5)
    b = kernel_solution(trace, f0, y, weight_decay=0.5)
    c = kernel_solution(reference_ntk(model, X, output="diagonal"), f0, y, weight_decay=0.5)
    torch.testing.assert_close(a.train_logits, b.train_logits)
    torch.testing.assert_close(a.train_logits, c.train_logits)


def test_solution_reports_non_convergence_and_bad_input(problem):
    K, f0, y = problem["K"], problem["f0"], problem["y"]
    with pytest.raises(RuntimeError, match="did not converge"):
        kernel_solution(K, f0, y, weight_decay=1e-4, max_iter=1)
    result = kernel_solution(K, f0, y, weight_decay=1e-4, max_iter=1, raise_on_failure=False)
    assert not result.converged and result.residual > 1e-10 and result.iterations == 1
    with pytest.raises(ValueError, match=r"Expected `ntk` = Θ0\(X, X\) of shape \(8, 8, 3, 3\)"):
        kernel_solution(K[:4], f0, y, weight_decay=0.1)
    with pytest.raises(ValueError, match="Expected `weight_decay` to be a non-negative float"):
        kernel_solution(K, f0, y, weight_decay=-1.0)
    with pytest.raises(ValueError, match=r"Expected `label_smoothing` to be a float in \[0, 1\)"):
        kernel_solution(K, f0, y, label_smoothing=1.0)
    with pytest.raises(ValueError, match="each row of soft `targets` to sum to 1"):
        kernel_solution(K, f0, torch.full((N, C), 0.5, dtype=DT), weight_decay=0.1)
    with pytest.raises(ValueError, match='decay_to="zero" needs `shift`'):
        kernel_solution(K, f0, y, weight_decay=0.1, decay_to="zero")
    with pytest.raises(ValueError, match="`ntk_test` and `logits0_test` together"):
        kernel_solution(K, f0, y, weight_decay=0.1, ntk_test=problem["K_test"])
    with pytest.raises(ValueError, match="Expected `decay_to` to be one of"):
        kernel_flow(K, f0, y, lr=0.1, steps=1, decay_to="origin")
    with pytest.raises(ValueError, match="Expected `steps` to be a non-negative int"):
        kernel_flow(K, f0, y, lr=0.1, steps=-1)
    assert kernel_flow(K, f0, y, lr=0.1, steps=0).shape == (1, N, C)


# ---------------------------------------------------------------------- predict_regime


def _params():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    weights = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return model, weights, vectors


def test_regime_from_optimizer_and_loss():
    model, weights, vectors = _params()
    hard = predict_regime(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(hard, RegimePrediction)
    assert hard.regime == "diverging" and not hard.bounded
    assert "hard one-hot" in hard.reason and "λ = 0" in hard.reason
    assert hard.weight_decay == 0.0 and hard.min_target_prob == 0.0

    decayed = predict_regime(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3),
        loss=nn.CrossEntropyLoss(),
    )
    assert decayed.regime == "bounded" and decayed.weight_decay == pytest.approx(1e-3)
    assert not decayed.decoupled_decay and "L2 regularisation" in decayed.reason

    adamw = predict_regime(optimizer=torch.optim.AdamW(model.parameters()))
    assert adamw.bounded and adamw.decoupled_decay and adamw.weight_decay == pytest.approx(0.01)
    assert "not an L2 term" in adamw.reason
    adam = torch.optim.Adam(model.parameters(), weight_decay=0.1, decoupled_weight_decay=True)
    assert predict_regime(optimizer=adam).decoupled_decay

    groups = torch.optim.SGD(
        [{"params": weights, "weight_decay": 5e-4}, {"params": vectors, "weight_decay": 0.0}],
        lr=0.1,
    )
    excluded = predict_regime(optimizer=groups)
    same_length = torch.optim.SGD(  # groups of equal length, tensors of different shapes
        [{"params": weights[:1], "weight_decay": 5e-4}, {"params": vectors[:1]}], lr=0.1
    )
    assert "biases / norm" in predict_regime(optimizer=same_length).reason
    assert excluded.bounded and excluded.weight_decay == pytest.approx(5e-4)
    assert "biases / norm parameters without decay" in excluded.reason
    partial = torch.optim.SGD(
        [
            {"params": weights[:1], "weight_decay": 5e-4},
            {"params": weights[1:] + vectors, "weight_decay": 0.0},
        ],
        lr=0.1,
    )
    undecayed = predict_regime(optimizer=partial)
    assert undecayed.regime == "diverging" and undecayed.weight_decay == 0.0
    assert "minimum" in undecayed.reason

    smoothed = predict_regime(loss=nn.CrossEntropyLoss(label_smoothing=0.1), num_classes=10)
    assert smoothed.bounded and smoothed.min_target_prob == pytest.approx(0.01)
    assert "label smoothing ε=0.1" in smoothed.reason
    unknown_c = predict_regime(label_smoothing=0.1)
    assert unknown_c.bounded and math.isnan(unknown_c.min_target_prob)


def test_regime_from_targets():
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05]])
    assert predict_regime(targets=soft).min_target_prob == pytest.approx(0.05)
    assert predict_regime(targets=soft).bounded
    degenerate = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    assert predict_regime(targets=degenerate).regime == "diverging"
    labels = predict_regime(targets=torch.tensor([0, 2, 1]), label_smoothing=0.3, num_classes=3)
    assert labels.min_target_prob == pytest.approx(0.1)
    # smoothing on top of soft targets: (1 − ε) min + ε / C
    both = predict_regime(targets=degenerate, label_smoothing=0.2)
    assert both.min_target_prob == pytest.approx(0.1) and both.bounded


def test_regime_rejects_invalid_or_conflicting_input():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="Expected `weight_decay` to be a non-negative"):
        predict_regime(weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"label_smoothing` to be a float in \[0, 1\)"):
        predict_regime(label_smoothing=1.0)
    with pytest.raises(ValueError, match="contradicts the optimizer's weight decay"):
        predict_regime(
            weight_decay=0.1, optimizer=torch.optim.SGD(model.parameters(), lr=1, weight_decay=0)
        )
    with pytest.raises(ValueError, match=r"contradicts the loss's label_smoothing=0\.1"):
        predict_regime(label_smoothing=0.2, loss=nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(ValueError, match="each row of soft `targets` to sum to 1"):
        predict_regime(targets=torch.tensor([[0.5, 0.6]]), task="multiclass")
    with pytest.raises(ValueError, match="probabilities >= 0"):
        predict_regime(targets=torch.tensor([[1.5, -0.5]]))
    with pytest.raises(ValueError, match="`num_classes`=3 columns"):
        predict_regime(targets=torch.tensor([[0.5, 0.5]]), num_classes=3)
    with pytest.raises(TypeError, match=r"NLLLoss or nn\.BCEWithLogitsLoss"):
        predict_regime(loss=nn.MSELoss())
    with pytest.raises(TypeError, match="with `param_groups`"):
        predict_regime(optimizer=object())
