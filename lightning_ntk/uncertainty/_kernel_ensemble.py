"""Kernel-predicted ensembles over random initialisation; see :mod:`lightning_ntk.uncertainty`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union, cast

import torch
from torch import Tensor, nn

from ..testing._analytic import NTKMLP
from ..theory import _softmax_gp
from ..theory._checks import check_labels_fit, check_tensor
from ..theory._training import LinearizedTraining, resolve_training
from ._common import (
    EnsemblePrediction,
    build_model,
    check_inputs,
    check_option,
    check_positive_int,
    check_targets_rows,
    targets_matrix,
)

_KERNELS = ("auto", "analytic", "empirical")


@dataclass(frozen=True)
class KernelSolutions:
    """Trained logits of the linearized model for ``S`` initial functions at once.

    Attributes:
        train_logits: ``f*_s(X)``, ``(S, N, C)``.
        test_logits: ``f*_s(X_test)``, ``(S, M, C)``, or ``None``.
        iterations: Newton iterations of the slowest draw (0 for a direct solve or a flow).
        converged: whether every draw met the tolerance (always ``True`` for a flow).
        residual: largest fixed-point residual over the draws (0 for a flow).
    """

    train_logits: Tensor
    test_logits: Optional[Tensor]
    iterations: int
    converged: bool
    residual: float


def kernel_solutions(
    ntk: Tensor,
    logits0: Tensor,
    targets: Tensor,
    training: Optional[LinearizedTraining] = None,
    *,
    ntk_test: Optional[Tensor] = None,
    logits0_test: Optional[Tensor] = None,
    tol: float = 1e-9,
    max_iter: int = 100,
    raise_on_failure: bool = True,
    **settings: Any,
) -> KernelSolutions:
    """Trained logits of many initial functions under one class-shared kernel ``Θ ⊗ I_C``.

    The batched form of :func:`lightning_ntk.theory.kernel_solution` for the
    infinite-width structure (every class sees the same scalar kernel): the fixed points
    of the module docstring for every draw, or, with ``steps`` and ``lr``, the logits
    after ``steps`` steps of full-batch gradient descent on the linearized model
    (:func:`lightning_ntk.theory.kernel_flow`), with regularisation towards the
    initialisation. ``λ > 0`` is solved by Newton's method with the structure of
    Rasmussen & Williams' Algorithm 3.3 (``C`` Cholesky factors of ``N × N`` per step
    and draw); ``λ = 0`` is the linear solve ``α = Θ⁻¹ (log Y − f0) (I − 11ᵀ/C)``.

    Args:
        ntk: ``Θ(X, X)``, ``(N, N)`` (trace layout).
        logits0: initial logits ``f0(X)``, ``(S, N, C)`` (or ``(N, C)`` for one draw).
        targets: integer labels ``(N,)`` or soft targets ``(N, C)``.
        training: the loss and, for a flow, the steps
            (:class:`~lightning_ntk.theory.LinearizedTraining`; ``decay_to="init"``):
            ``steps=None`` for the fixed point.
        ntk_test: ``Θ(X_test, X)``, ``(M, N)``.
        logits0_test: ``f0(X_test)``, ``(S, M, C)``; required with ``ntk_test``.
        tol: tolerance on the fixed-point residual.
        max_iter: Newton iterations at most.
        raise_on_failure: raise ``RuntimeError`` when a draw misses ``tol``.
        **settings: the fields of ``LinearizedTraining`` as keywords instead of
            ``training`` (``weight_decay=0.1``).

    Returns:
        :class:`KernelSolutions`, float64.

    Raises:
        ValueError: bad shapes or options; ``decay_to="zero"``; ``λ = 0`` with a zero
            target probability and no ``steps`` (hard labels have no finite fixed point).
        TypeError: ``training`` and ``settings`` both, or an unknown setting.
        RuntimeError: no convergence (with ``raise_on_failure=True``).
    """
    training = _batched_training(training, settings, "kernel_solutions")
    lam = training.weight_decay
    check_positive_int(max_iter, "max_iter")
    K, f0, Y, K_test, f0_test = _check_problem(
        ntk, logits0, targets, training.label_smoothing, ntk_test, logits0_test
    )
    N = K.shape[0]
    scale = training.kernel_scale(N)
    G = K / scale
    G_test = None if K_test is None else K_test / scale
    if training.steps is not None and training.lr is not None:
        train, test = _softmax_gp.flow(
            G, f0, Y, lr=training.lr, steps=training.steps, lam=lam, G_test=G_test, f0_test=f0_test
        )
        return KernelSolutions(train, test, 0, True, 0.0)
    if lam == 0:
        if float(Y.min()) <= 0:
            raise ValueError(
                "There is no finite fixed point: with `weight_decay`=0 and a target "
                "probability of 0 (hard one-hot labels, no label smoothing) the trained "
                "logits grow without bound. Pass weight_decay > 0 or label_smoothing > 0, "
                "or `steps` and `lr` for a finite training time."
            )
        train, alpha = _interpolate(K, f0, Y)
        test = None
        if K_test is not None:
            assert f0_test is not None  # validated together with K_test
            test = f0_test + torch.einsum("mn,snc->smc", K_test, alpha)
        residual = float((torch.softmax(train, -1) - Y).abs().max())
        iterations, converged = 0, residual <= max(tol, 1e-8)
    else:
        mode = _softmax_gp.find_mode(G / lam, f0, Y, tol=tol, max_iter=max_iter)
        train = f0 + mode.g
        test = None
        if G_test is not None:
            assert f0_test is not None  # validated together with G_test
            test = f0_test + torch.einsum("mn,snc->smc", G_test / lam, mode.a)
        iterations, residual = mode.iterations, mode.residual
        converged = residual <= tol
    if not converged and raise_on_failure:
        raise RuntimeError(
            f"kernel_solutions did not converge: residual {residual:.3g} > tol {tol:g} after "
            f"{iterations} iterations"
            + (" (Θ is singular)" if lam == 0 else "; raise `max_iter` or loosen `tol`")
            + ". Pass raise_on_failure=False to get the unconverged result."
        )
    return KernelSolutions(train, test, iterations, converged, residual)


def kernel_ensemble(
    x_train: Tensor,
    targets: Tensor,
    x_test: Tensor,
    training: Optional[LinearizedTraining] = None,
    *,
    model: Union[nn.Module, Callable[[], nn.Module]],
    kernel: str = "auto",
    num_draws: int = 64,
    num_inits: int = 8,
    seed: int = 0,
    tol: float = 1e-9,
    max_iter: int = 100,
    **settings: Any,
) -> EnsemblePrediction:
    """Distribution over random initialisation of the trained logits, from the kernels.

    ``f0 ~ N(0, Σ ⊗ I_C)`` jointly on ``[X; X_test]`` (``S = num_draws`` draws from a
    private ``torch.Generator``), each mapped to its trained logits by
    :func:`kernel_solutions` with the NTK ``Θ``. Two sources of ``(Σ, Θ)``:

    * ``"analytic"``: ``model`` is an :class:`~lightning_ntk.testing.NTKMLP`; ``Σ`` and
      ``Θ`` are its infinite-width NNGP and NTK (times the width for the standard
      parameterization).
    * ``"empirical"``: ``model`` is a callable returning a freshly initialised network;
      ``num_inits`` networks are built (the global RNG is forked, left as found), ``Θ`` is
      the mean of their trace NTKs and ``Σ = (1/(R C)) Σ_{r,a} f_a^r f_a^{rᵀ}`` the
      second moment of their initial logits.

    Args:
        x_train: training inputs ``(N, ...)``.
        targets: integer labels ``(N,)`` or soft targets ``(N, C)``.
        x_test: test inputs ``(M, ...)``.
        training: the loss and, for a flow, the steps
            (:class:`~lightning_ntk.theory.LinearizedTraining`; ``decay_to="init"``):
            ``steps=None`` for the trained (fixed-point) logits.
        model: an ``NTKMLP`` (or a callable returning one) or, for ``"empirical"``, a
            callable returning a freshly initialised ``nn.Module`` producing ``(N, C)``.
        kernel: ``"auto"`` (analytic for an ``NTKMLP`` instance, else empirical),
            ``"analytic"`` or ``"empirical"``.
        num_draws: ``S ≥ 2`` initial functions.
        num_inits: real initialisations for ``"empirical"``.
        seed: seed of the private generator.
        tol: fixed-point tolerance.
        max_iter: Newton iterations at most.
        **settings: the fields of ``LinearizedTraining`` as keywords instead of
            ``training`` (``weight_decay=0.02``).

    Returns:
        :class:`EnsemblePrediction` over the ``M`` test points.

    Raises:
        ValueError / TypeError: bad input, before any heavy work (e.g. hard labels with
            ``λ = 0`` and no ``steps``).
    """
    training = _batched_training(training, settings, "kernel_ensemble")
    check_option(kernel, "kernel", _KERNELS)
    check_positive_int(num_draws, "num_draws", minimum=2)
    check_positive_int(num_inits, "num_inits")
    x_train, x_test = check_inputs(x_train, x_test)
    check_targets_rows(targets, x_train.shape[0])
    hard = not targets.is_floating_point() or float(targets.min()) <= 0
    degenerate = hard and training.label_smoothing == 0  # a target probability of 0
    if not training.finite_time and training.weight_decay == 0 and degenerate:
        raise ValueError(
            "There is no finite fixed point: hard one-hot `targets` with `weight_decay`=0 "
            "and `label_smoothing`=0 need infinite logits. Pass weight_decay > 0 or "
            "label_smoothing > 0, or `steps` and `lr` for a finite training time."
        )
    generator = torch.Generator().manual_seed(int(seed))
    N = x_train.shape[0]
    x_all = torch.cat([x_train, x_test])
    ntk, nngp, C = _prior_kernels(model, kernel, x_all, num_inits, generator)
    check_labels_fit(targets, C, "the output of `model`")
    root = _psd_root(nngp)  # (N + M, r)
    z = torch.randn(num_draws, root.shape[1], C, generator=generator, dtype=torch.float64)
    f0 = torch.einsum("nr,src->snc", root, z)  # (S, N + M, C)
    solution = kernel_solutions(
        ntk[:N, :N],
        f0[:, :N],
        targets,
        training,
        ntk_test=ntk[N:, :N],
        logits0_test=f0[:, N:],
        tol=tol,
        max_iter=max_iter,
    )
    assert solution.test_logits is not None  # test points were passed
    return EnsemblePrediction.from_member_logits(
        solution.test_logits,
        member_logits0=f0[:, N:],
        member_train_logits0=f0[:, :N],
        member_train_logits=solution.train_logits,
        converged=solution.converged,
        residual=solution.residual,
    )


# ---------------------------------------------------------------------- helpers


def _batched_training(
    training: Optional[LinearizedTraining], settings: dict[str, Any], caller: str
) -> LinearizedTraining:
    """The training of a batched solve: regularised towards the initialisation only."""
    training = resolve_training(training, settings, caller)
    if training.decay_to != "init":
        raise ValueError(
            f"Expected `decay_to` to be 'init' for {caller} (regularisation towards the "
            f"initialisation) but got {training.decay_to!r}; kernel_solution handles "
            "decay_to='zero' one initialisation at a time."
        )
    return training


def _interpolate(K: Tensor, f0: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """``λ = 0``: ``α = K⁻¹ (log Y − f0) P`` (``P = I − 11ᵀ/C``), ``f = f0 + K α``.

    ``softmax(f_i) = Y_i`` holds iff ``f_i = log Y_i + κ_i 1``; rows of ``α`` sum to 0
    (the loss gradient ``p − Y`` does), which fixes ``κ``. ``K`` singular: least squares.
    """
    rhs = Y.log() - f0  # (S, N, C)
    rhs = rhs - rhs.mean(-1, keepdim=True)
    S, N, C = f0.shape
    flat = rhs.permute(1, 0, 2).reshape(N, S * C)
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) == 0:
        alpha = torch.cholesky_solve(flat, L)
    else:
        driver = "gelsd" if K.device.type == "cpu" else None
        alpha = torch.linalg.lstsq(K, flat, driver=driver).solution
    alpha = alpha.reshape(N, S, C).permute(1, 0, 2)  # (S, N, C)
    return f0 + torch.einsum("nm,smc->snc", K, alpha), alpha


def _prior_kernels(
    model: Any, kernel: str, x_all: Tensor, num_inits: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    """``(Θ, Σ, C)``: NTK and NNGP ``(N + M, N + M)`` float64, and the number of logits."""
    if kernel == "auto":
        kernel = "analytic" if isinstance(model, NTKMLP) else "empirical"
    if isinstance(model, nn.Module) and not isinstance(model, NTKMLP):
        raise TypeError(
            f"Expected `model` to be an NTKMLP (analytic kernels) or a callable returning a "
            f"freshly initialised network (empirical kernels) but got the module "
            f"{type(model).__name__}; pass e.g. `lambda: {type(model).__name__}(...)`."
        )
    if not callable(model):
        raise TypeError(
            "Expected `model` to be an NTKMLP or a callable returning an nn.Module but got "
            f"{type(model).__name__}."
        )
    if kernel == "analytic":
        net = model if isinstance(model, NTKMLP) else build_model(model, generator)
        if not isinstance(net, NTKMLP):
            raise TypeError(
                "Expected `model` to be (or build) an NTKMLP for kernel='analytic' but got "
                f"{type(net).__name__}; use kernel='empirical'."
            )
        x = x_all.reshape(x_all.shape[0], -1).double()
        if x.shape[1] != net.in_features:
            raise ValueError(
                f"Expected inputs with the model's {net.in_features} features but got {x.shape[1]}."
            )
        ntk = net.analytic_ntk(x)
        if net.parameterization == "standard":
            ntk = ntk * net.width
        last = net.layers[-1]
        head: Any = getattr(last, "linear", last)
        C = int(head.out_features)
        return ntk, net.analytic_nngp(x), C
    from ..kernel import empirical_ntk

    kernel_sum: Any = 0.0  # sums of (N + M, N + M) tensors
    second_moment: Any = 0.0
    C = 0
    for _ in range(num_inits):
        net = build_model(model, generator)
        dtype = next(net.parameters()).dtype
        with torch.no_grad():
            f = net(x_all.to(dtype)).double()  # (N + M, C)
        if f.ndim != 2:
            raise ValueError(
                f"Expected the model to return logits of shape (N, C) but got {tuple(f.shape)}."
            )
        C = f.shape[1]
        ntk_i = cast(Tensor, empirical_ntk(net, x_all.to(dtype), output="trace"))
        kernel_sum = kernel_sum + ntk_i.double()
        second_moment = second_moment + f @ f.T / C
    return kernel_sum / num_inits, second_moment / num_inits, C


def _psd_root(cov: Tensor) -> Tensor:
    """``R`` with ``R Rᵀ = cov`` (negative round-off eigenvalues dropped), ``(n, r)``."""
    cov = (cov + cov.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    keep = eigenvalues > eigenvalues.max() * 1e-12
    return eigenvectors[:, keep] * eigenvalues[keep].sqrt()


def _check_problem(
    ntk: Tensor,
    logits0: Tensor,
    targets: Tensor,
    label_smoothing: float,
    ntk_test: Optional[Tensor],
    logits0_test: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Validated float64 ``(K, f0 (S, N, C), Y, K_test, f0_test (S, M, C))``."""
    check_tensor(logits0, "logits0")
    if logits0.ndim not in (2, 3):
        raise ValueError(
            f"Expected `logits0` to be of shape (S, N, C) or (N, C) but got {tuple(logits0.shape)}."
        )
    f0 = logits0.double() if logits0.ndim == 3 else logits0.double()[None]
    S, N, C = f0.shape
    check_tensor(ntk, "ntk")
    if tuple(ntk.shape) != (N, N):
        raise ValueError(
            f"Expected `ntk` = Θ(X, X) of shape ({N}, {N}) (trace layout, shared by the "
            f"classes) to match `logits0` but got {tuple(ntk.shape)}."
        )
    eps = label_smoothing  # validated by LinearizedTraining
    Y = (1 - eps) * targets_matrix(targets, N, C, "`logits0`") + eps / C
    if (ntk_test is None) != (logits0_test is None):
        raise ValueError(
            "Expected `ntk_test` and `logits0_test` together but got only one of them."
        )
    K_test = f0_test = None
    if ntk_test is not None:
        assert logits0_test is not None  # checked just above: both or neither
        check_tensor(ntk_test, "ntk_test")
        check_tensor(logits0_test, "logits0_test")
        f0_test = logits0_test.double() if logits0_test.ndim == 3 else logits0_test.double()[None]
        M = f0_test.shape[1] if f0_test.ndim == 3 else -1
        if f0_test.ndim != 3 or f0_test.shape[0] != S or f0_test.shape[2] != C:
            raise ValueError(
                f"Expected `logits0_test` of shape ({S}, M, {C}) but got "
                f"{tuple(logits0_test.shape)}."
            )
        if tuple(ntk_test.shape) != (M, N):
            raise ValueError(
                f"Expected `ntk_test` = Θ(X_test, X) of shape ({M}, {N}) but got "
                f"{tuple(ntk_test.shape)}."
            )
        K_test = ntk_test.double()
    return ntk.double(), f0, Y.to(f0.device), K_test, f0_test
