import math

import pytest
import torch
from torch import nn

from lightning_ntk import metrics
from lightning_ntk.kernel.reference import reference_ntk
from lightning_ntk.linearization import linearization_error, linearize
from lightning_ntk.metrics import (
    ArgmaxAgreement,
    LinearizationError,
    LogitNorm,
    ProbTV,
    Spectrum,
    TargetAlignment,
    kernel_alignment,
    kernel_distance,
    kernel_matrix,
    logit_norm,
    param_distance,
    prob_tv,
    relative_change,
    spectrum,
    target_alignment,
)

DT = torch.float64


def _psd(n, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, rank or n, generator=g, dtype=DT)
    return A @ A.T


def _full_kernel(N=6, C=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    return reference_ntk(model, torch.randn(N, 4, dtype=DT))


def test_public_names_are_exported():
    for name in metrics.__all__:
        assert getattr(metrics, name) is not None
    assert metrics.linearization_error is linearization_error


def test_drift_closed_forms():
    K = _full_kernel()
    assert relative_change(K, K) == 0
    torch.testing.assert_close(relative_change(2 * K, K), torch.tensor(1.0, dtype=DT))
    torch.testing.assert_close(relative_change(K, 2 * K), torch.tensor(0.5, dtype=DT))
    assert abs(kernel_distance(K, K)) < 1e-15
    assert abs(kernel_distance(7.5 * K, K)) < 1e-15  # invariant to positive scaling
    other = _full_kernel(seed=1)
    d = kernel_distance(other, K)
    torch.testing.assert_close(kernel_distance(3 * other, 0.2 * K), d)
    assert 0 < d < 1
    # orthogonal kernels: distance 1
    e1, e2 = torch.zeros(2, 2, dtype=DT), torch.zeros(2, 2, dtype=DT)
    e1[0, 0], e2[1, 1] = 1.0, 1.0
    torch.testing.assert_close(kernel_distance(e1, e2), torch.tensor(1.0, dtype=DT))
    assert torch.isnan(relative_change(K, torch.zeros_like(K)))


def test_alignment_closed_forms():
    K = _psd(7)
    torch.testing.assert_close(kernel_alignment(K, K), torch.tensor(1.0, dtype=DT))
    torch.testing.assert_close(kernel_alignment(K, 4 * K + 3.0), torch.tensor(1.0, dtype=DT))
    # a full (N, N, C, C) kernel is reduced to the mean of its class diagonal
    full = _full_kernel(N=7)
    trace = full.diagonal(dim1=2, dim2=3).mean(-1)
    torch.testing.assert_close(kernel_alignment(full, K), kernel_alignment(trace, K))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    Y = torch.nn.functional.one_hot(labels, 3).to(DT)
    torch.testing.assert_close(target_alignment(Y @ Y.T, labels), torch.tensor(1.0, dtype=DT))
    soft = 0.9 * Y + 0.1 / 3
    torch.testing.assert_close(target_alignment(soft @ soft.T, soft), torch.tensor(1.0, dtype=DT))
    # Y Yᵀ of one-hot labels does not depend on the number of classes
    torch.testing.assert_close(
        target_alignment(K, labels, num_classes=5), target_alignment(K, labels)
    )
    # a kernel that separates the two halves of a two-class problem exactly
    labels2 = torch.tensor([0, 0, 0, 1, 1, 1])
    block = torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).to(DT)
    torch.testing.assert_close(target_alignment(block, labels2), torch.tensor(1.0, dtype=DT))
    # independent hand computation on a 2x2 example: H K H = [[a,-a],[-a,a]] for any K
    K2 = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=DT)
    L2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    torch.testing.assert_close(kernel_alignment(K2, L2), torch.tensor(1.0, dtype=DT))


def test_kernel_matrix_and_spectrum_of_known_blocks():
    # K[i, j] = A[i, j] · B (Kronecker A ⊗ B): eigenvalues are products of eigenvalues
    A = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=DT)  # eig 3, 1
    B = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=DT)  # eig 4, 1
    K = A[:, :, None, None] * B[None, None]  # (2, 2, 2, 2)
    M = kernel_matrix(K)
    torch.testing.assert_close(M, torch.kron(A, B))
    s = spectrum(K)
    assert isinstance(s, Spectrum)
    torch.testing.assert_close(s.eigenvalues, torch.tensor([12.0, 4.0, 3.0, 1.0], dtype=DT))
    assert s.eigenvalues.dtype == DT
    assert s.eig_max == pytest.approx(12.0) and s.eig_min == pytest.approx(1.0)
    assert s.trace == pytest.approx(20.0)
    assert s.condition_number == pytest.approx(12.0)
    p = torch.tensor([12.0, 4.0, 3.0, 1.0]) / 20
    assert s.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    # identity: effective rank n, condition 1
    eye = spectrum(torch.eye(5, dtype=DT))
    assert eye.effective_rank == pytest.approx(5.0)
    assert eye.condition_number == pytest.approx(1.0)
    # diagonal layout: union of per-class spectra, equal to its block-diagonal matrix form
    diag = torch.stack([A, 2 * A], dim=-1)  # (2, 2, 2): class 0 → A, class 1 → 2A
    torch.testing.assert_close(spectrum(diag).eigenvalues, torch.tensor([6.0, 3, 2, 1], dtype=DT))
    torch.testing.assert_close(
        torch.linalg.eigvalsh(kernel_matrix(diag)).flip(0), spectrum(diag).eigenvalues
    )
    # a rank-deficient PSD kernel: condition number through eps, effective rank = rank
    low = spectrum(torch.ones(3, 3, dtype=DT))
    assert low.effective_rank == pytest.approx(1.0)
    assert low.condition_number > 1e10
    # sample-major: the matrix form of a real kernel is symmetric
    full = _full_kernel()
    torch.testing.assert_close(kernel_matrix(full), kernel_matrix(full).T)


def test_logits_and_params_closed_forms():
    logits = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]], dtype=DT)
    # row 0 centered: (-1, 0, 1), norm √2, in margin units ×√(3/2): √3; row 1: 0
    torch.testing.assert_close(logit_norm(logits), torch.tensor(math.sqrt(3) / 2, dtype=DT))
    torch.testing.assert_close(logit_norm(logits + 100.0), logit_norm(logits))
    p0 = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    pt = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([5.0])}
    torch.testing.assert_close(param_distance(pt, p0), torch.tensor(1.0))
    assert param_distance(p0, p0) == 0


def test_errors_name_the_argument_and_shapes():
    K = torch.zeros(3, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"same layout and shape but got \(3, 3\) and \(3, 4\)"):
        relative_change(K, torch.zeros(3, 4, dtype=DT))
    with pytest.raises(ValueError, match=r"Expected `K_t` to be a kernel of shape"):
        kernel_distance(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"Expected `K` to be a square kernel"):
        kernel_alignment(torch.zeros(3, 4, dtype=DT), K)
    with pytest.raises(ValueError, match="on the same examples but got 3 and 2"):
        kernel_alignment(K, torch.zeros(2, 2, dtype=DT))
    with pytest.raises(ValueError, match=r"one row per kernel example \(3\) but got 2"):
        target_alignment(K, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels in \[0, 2\) for `num_classes`=2 but got label 2"):
        target_alignment(K, torch.tensor([0, 1, 2]), num_classes=2)
    with pytest.raises(ValueError, match="integer labels of shape"):
        target_alignment(K, torch.zeros(3, 2, 1))
    with pytest.raises(ValueError, match="Expected a square kernel"):
        spectrum(torch.zeros(2, 3, 4, 4, dtype=DT))
    with pytest.raises(ValueError, match="Expected a symmetric kernel"):
        spectrum(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=DT))
    with pytest.raises(TypeError, match="floating tensor"):
        spectrum(torch.eye(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Expected `logits` to be of shape \(N, C\)"):
        logit_norm(torch.zeros(3))
    with pytest.raises(ValueError, match=r"only in `params_t`: \['c'\], only in `params_0`: \[\]"):
        param_distance({"w": torch.ones(2), "c": torch.ones(1)}, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"`params_t\['w'\]` to have the shape"):
        param_distance({"w": torch.ones(2)}, {"w": torch.ones(3)})


def test_target_alignment_streams_row_blocks():
    K = _full_kernel(N=10, C=3)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 1])
    expected = target_alignment(K, labels)
    metric = TargetAlignment(num_classes=3)
    for rows in torch.arange(10).split(3):
        metric.update(K[rows], labels[rows], labels)
    torch.testing.assert_close(metric.compute(), expected)
    # soft targets and the trace layout
    soft = torch.softmax(torch.randn(10, 3, dtype=DT), dim=1)
    trace = K.diagonal(dim1=2, dim2=3).mean(-1)
    metric = TargetAlignment(num_classes=3)
    for rows in torch.arange(10).split(4):
        metric.update(trace[rows], soft[rows], soft)
    torch.testing.assert_close(metric.compute(), target_alignment(trace, soft))
    # missing rows are detected
    metric = TargetAlignment(num_classes=3)
    metric.update(K[:4], labels[:4], labels)
    with pytest.raises(ValueError, match="do not form a square kernel"):
        metric.compute()
    with pytest.raises(ValueError, match="Expected argument `num_classes` to be a positive int"):
        TargetAlignment(num_classes=0)


def test_linearization_metrics_stream_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    x = torch.randn(12, 4, dtype=DT)
    lin = linearize(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    f, f_lin, f0 = model(x).detach(), lin(x), lin.initial_logits(x)
    streamed = {
        "err": LinearizationError(),
        "tv": ProbTV(),
        "agree": ArgmaxAgreement(),
        "norm": LogitNorm(),
    }
    for rows in torch.arange(12).split(5):
        streamed["err"].update(f[rows], f_lin[rows], f0[rows])
        streamed["tv"].update(f[rows], f_lin[rows])
        streamed["agree"].update(f[rows], f_lin[rows])
        streamed["norm"].update(f[rows])
    torch.testing.assert_close(streamed["err"].compute(), linearization_error(f, f_lin, f0))
    assert 0 < streamed["err"].compute() < 1
    torch.testing.assert_close(streamed["tv"].compute(), prob_tv(f, f_lin))
    torch.testing.assert_close(
        streamed["agree"].compute(),
        (f.argmax(1) == f_lin.argmax(1)).double().mean(),
    )
    torch.testing.assert_close(streamed["norm"].compute(), logit_norm(f))
    assert LinearizationError.full_state_update is False
    assert LinearizationError.higher_is_better is False
    assert TargetAlignment.higher_is_better is True
    with pytest.raises(ValueError, match=r"Expected `logits_lin` to have the shape"):
        streamed["tv"].update(f, f_lin[:3])
