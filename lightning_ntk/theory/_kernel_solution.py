"""Kernel-predicted solution and flow of the linearized model; see :mod:`lightning_ntk.theory`.

The conventions (``G``, ``s``, ``decay_to``, ``reduction``, the fixed points) are stated
in the docstring of :mod:`lightning_ntk.theory`, which re-exports these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..kernel._functional import OutputFn, ParamSelector
from . import _solve
from ._checks import check_tensor, checked_targets
from ._training import LinearizedTraining, resolve_training


@dataclass(frozen=True)
class KernelSolution:
    """Trained logits of the linearized model predicted by its NTK.

    Attributes:
        train_logits: ``f*(X)``, float64 ``(N, C)``.
        test_logits: ``f*(X_test)``, float64 ``(M, C)``, or ``None``.
        coefficients: ``α``, float64 ``(N, C)``, with ``f* = f0 − s + Θ0 α`` (matrix form
            over sample-major ``(i, a)``; ``s = 0`` unless ``decay_to="zero"``).
        iterations: Newton iterations (0 for the direct solve when ``λ = 0``).
        converged: whether the residual met ``tol``.
        residual: ``max |F(f*)|`` of the fixed-point equation (``λ > 0``) or
            ``max |p(f*) − Y|`` (``λ = 0``).
    """

    train_logits: Tensor
    test_logits: Optional[Tensor]
    coefficients: Tensor
    iterations: int
    converged: bool
    residual: float


def kernel_solution(
    ntk: Tensor,
    logits0: Tensor,
    targets: Tensor,
    training: Optional[LinearizedTraining] = None,
    *,
    ntk_test: Optional[Tensor] = None,
    logits0_test: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    shift_test: Optional[Tensor] = None,
    model: Optional[nn.Module] = None,
    x: Optional[Tensor] = None,
    x_test: Optional[Tensor] = None,
    tol: float = 1e-10,
    max_iter: int = 100,
    raise_on_failure: bool = True,
    **settings: Any,
) -> KernelSolution:
    """Kernel-predicted trained logits of the linearized model (module docstring).

    Args:
        ntk: ``Θ0(X, X)`` at initialisation, ``empirical_ntk(model, X, output="full")``
            ``(N, N, C, C)``; ``"diagonal"`` ``(N, N, C)`` and ``"trace"`` ``(N, N)``
            (read as ``K ⊗ I_C``) are accepted too.
        logits0: ``f(X; θ0)``, ``(N, C)``.
        targets: integer labels ``(N,)`` or soft targets ``(N, C)``.
        training: the loss (:class:`LinearizedTraining`: ``weight_decay``,
            ``label_smoothing``, ``decay_to``, ``reduction``); its ``steps`` must be
            ``None`` (:func:`kernel_flow` follows a finite number of steps).
        ntk_test: ``Θ0(X_test, X)``, ``empirical_ntk(model, X_test, X)``, ``(M, N, C, C)``
            (or the matching diagonal / trace layout).
        logits0_test: ``f(X_test; θ0)``, ``(M, C)``; required with ``ntk_test``.
        shift: ``s = J0(X) θ0`` ``(N, C)`` for ``decay_to="zero"``; or pass ``model`` and
            ``x`` to compute it (:func:`weight_decay_shift`, over all trainable parameters:
            pass ``shift`` yourself if the kernel spans a subset).
        shift_test: ``J0(X_test) θ0`` ``(M, C)``; or ``model`` and ``x_test``.
        model: the network at ``θ0``, only to compute the shifts.
        x: training inputs, with ``model``.
        x_test: test inputs, with ``model``.
        tol: convergence tolerance: ``λ > 0``, on ``max |F|`` or on the relative Newton
            step (see :func:`lightning_ntk.theory._solve.solve_regularized`); ``λ = 0``, on
            ``max |p(f*) − Y|`` (never below 1e-8).
        max_iter: Newton iterations at most.
        raise_on_failure: raise ``RuntimeError`` when the residual misses ``tol``
            (default); ``False`` returns the result with ``converged=False``.
        **settings: the fields of :class:`LinearizedTraining` as keywords instead of
            ``training`` (``weight_decay=0.1`` is ``LinearizedTraining(weight_decay=0.1)``).

    Returns:
        A :class:`KernelSolution` (float64, on the kernel's device).

    Raises:
        ValueError: bad shapes or options, ``steps`` given, or ``λ = 0`` with a zero
            target probability (hard labels): then there is no finite fixed point.
        TypeError: ``training`` and ``settings`` both, or an unknown setting.
        RuntimeError: no convergence (with ``raise_on_failure=True``).
    """
    training = resolve_training(training, settings, "kernel_solution")
    if training.finite_time:
        raise ValueError(
            f"kernel_solution gives the trained (fixed-point) logits but got "
            f"`steps`={training.steps}: use kernel_flow for a finite number of steps."
        )
    lam = training.weight_decay
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Expected `max_iter` to be a positive int but got {max_iter!r}.")
    problem = _Problem.build(
        ntk, logits0, targets, training.label_smoothing, ntk_test, logits0_test
    )
    C, N = problem.C, problem.N
    if lam == 0:
        if float(problem.y.min()) <= 0:
            raise ValueError(
                "There is no finite fixed point: with `weight_decay`=0 and a target "
                "probability of 0 (hard one-hot labels, no label smoothing) the "
                "cross-entropy optimum needs infinite logits, which grow without bound "
                "during training. Pass weight_decay > 0 or label_smoothing > 0, or use "
                "kernel_flow for a finite number of steps."
            )
        f, alpha, residual = _solve.solve_interpolating(problem.M, problem.f0, problem.y, C)
        iterations, converged = 0, residual <= max(tol, 1e-8)
        offset_test = problem.f0_test
    else:
        s, s_test = _shifts(training.decay_to, problem, shift, shift_test, model, x, x_test)
        scale = training.kernel_scale(N)
        result = _solve.solve_regularized(
            problem.M / scale, problem.f0 - s, problem.y, lam, C, tol=tol, max_iter=max_iter
        )
        f, iterations, converged, residual = (
            result.f,
            result.iterations,
            result.converged,
            result.residual,
        )
        alpha = -(_solve.softmax_rows(f, C) - problem.y) / (lam * scale)
        offset_test = None
        if s_test is not None and problem.f0_test is not None:
            offset_test = problem.f0_test - s_test
    if not converged and raise_on_failure:
        raise RuntimeError(
            f"kernel_solution did not converge: residual {residual:.3g} > tol {tol:g} after "
            f"{iterations} iterations"
            + (
                " (the targets are not reachable in the span of the kernel: Θ0 is singular)"
                if lam == 0
                else "; raise `max_iter` or loosen `tol`"
            )
            + ". Pass raise_on_failure=False to get the unconverged result."
        )
    test_logits = None
    if problem.M_test is not None:
        assert offset_test is not None  # set with M_test
        test_logits = (offset_test + problem.M_test @ alpha).view(-1, C)
    return KernelSolution(
        train_logits=f.view(N, C),
        test_logits=test_logits,
        coefficients=alpha.view(N, C),
        iterations=iterations,
        converged=converged,
        residual=residual,
    )


def kernel_flow(
    ntk: Tensor,
    logits0: Tensor,
    targets: Tensor,
    training: Optional[LinearizedTraining] = None,
    *,
    ntk_test: Optional[Tensor] = None,
    logits0_test: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    shift_test: Optional[Tensor] = None,
    model: Optional[nn.Module] = None,
    x: Optional[Tensor] = None,
    x_test: Optional[Tensor] = None,
    **settings: Any,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Logits of full-batch gradient descent on the linearized model, step by step.

    ``f_{k+1} = f_k − η [G (p(f_k) − Y) + λ (f_k − f0 + s)]`` with ``G = Θ0 / N``
    (``reduction="mean"``) or ``Θ0`` (``"sum"``); test logits move with ``G(X_test, X)``.
    This is *exactly* the logits of ``θ ← θ − η ∇_θ [loss + (λ/2)‖θ − θ_ref‖²]`` on
    ``f_lin`` (``θ_ref = θ0`` for ``decay_to="init"``, 0 for ``"zero"``), since ``f_lin``
    is linear in ``θ`` and the kernel never changes.

    Args:
        ntk: ``Θ0(X, X)``, as in :func:`kernel_solution`.
        logits0: ``f(X; θ0)``, ``(N, C)``.
        targets: integer labels ``(N,)`` or soft targets ``(N, C)``.
        training: the loss and the steps (:class:`LinearizedTraining`); ``steps`` and
            ``lr`` are required.
        ntk_test: ``Θ0(X_test, X)`` to follow test logits too.
        logits0_test: ``f(X_test; θ0)``, with ``ntk_test``.
        shift: ``J0(X) θ0`` for ``decay_to="zero"``.
        shift_test: ``J0(X_test) θ0`` for ``decay_to="zero"``.
        model: the network at ``θ0``, only to compute the shifts.
        x: training inputs, with ``model``.
        x_test: test inputs, with ``model``.
        **settings: the fields of :class:`LinearizedTraining` as keywords instead of
            ``training`` (``lr=0.1, steps=100``).

    Returns:
        The float64 trajectory ``(steps + 1, N, C)`` (index 0 is ``f0``); with
        ``ntk_test``, the tuple ``(train, test)`` with test ``(steps + 1, M, C)``.

    Raises:
        ValueError: bad shapes or options, or no ``steps`` and ``lr``.
        TypeError: ``training`` and ``settings`` both, or an unknown setting.
    """
    training = resolve_training(training, settings, "kernel_flow")
    if training.steps is None or training.lr is None:
        raise ValueError(
            "Expected `steps` and `lr` for kernel_flow (the number of gradient steps and "
            "their learning rate) but got neither; kernel_solution gives the trained logits."
        )
    lam, eta, steps = training.weight_decay, training.lr, training.steps
    problem = _Problem.build(
        ntk, logits0, targets, training.label_smoothing, ntk_test, logits0_test
    )
    zeros = torch.zeros_like(problem.f0)
    s, s_test = zeros, None if problem.f0_test is None else torch.zeros_like(problem.f0_test)
    if lam > 0:
        s, s_test = _shifts(training.decay_to, problem, shift, shift_test, model, x, x_test)
    scale = training.kernel_scale(problem.N)
    M_test = None if problem.M_test is None else problem.M_test / scale
    train, test = _solve.flow(
        problem.M / scale,
        problem.f0,
        problem.y,
        problem.C,
        lr=eta,
        steps=steps,
        lam=lam,
        shift=s,
        G_test=M_test,
        f0_test=problem.f0_test,
        shift_test=s_test,
    )
    train = train.view(steps + 1, problem.N, problem.C)
    if test is None:
        return train
    return train, test.view(steps + 1, -1, problem.C)


def weight_decay_shift(
    model: nn.Module,
    x: Tensor,
    *,
    params: ParamSelector = None,
    output_fn: OutputFn = None,
) -> Tensor:
    """``s(x) = J0(x) θ0`` (one jvp), the offset of plain weight decay towards 0.

    Args:
        model: the network at ``θ0``.
        x: inputs ``(N, ...)``.
        params: parameter selection, as in :func:`lightning_ntk.empirical_ntk`.
        output_fn: maps the model's raw output to ``(N, C)`` logits.

    Returns:
        float64 ``(N, C)``.
    """
    from ..linearization import linearize

    lin = linearize(model, params=params, output_fn=output_fn, dtype=torch.float64)
    with torch.no_grad():
        return lin.tangent_logits(x, lin.params0)


# ---------------------------------------------------------------------- helpers


@dataclass
class _Problem:
    """Validated, flattened float64 inputs of :func:`kernel_solution` / :func:`kernel_flow`."""

    M: Tensor  # (N·C, N·C)
    f0: Tensor  # (N·C,)
    y: Tensor  # (N·C,)
    N: int
    C: int
    M_test: Optional[Tensor] = None  # (M·C, N·C)
    f0_test: Optional[Tensor] = None  # (M·C,)

    @classmethod
    def build(
        cls,
        ntk: Tensor,
        logits0: Tensor,
        targets: Tensor,
        label_smoothing: float,
        ntk_test: Optional[Tensor],
        logits0_test: Optional[Tensor],
    ) -> _Problem:
        check_tensor(logits0, "logits0")
        if logits0.ndim != 2:
            raise ValueError(
                f"Expected `logits0` to be of shape (N, C) but got {tuple(logits0.shape)}."
            )
        N, C = logits0.shape
        _check_kernel(ntk, "ntk", N, N, C, "Θ0(X, X)")
        eps = label_smoothing  # validated by LinearizedTraining
        Y = checked_targets(targets, N, C)
        Y = (1 - eps) * Y + eps / C
        device = ntk.device
        problem = cls(
            M=_solve.kernel_as_matrix(ntk, C),
            f0=logits0.double().reshape(-1).to(device),
            y=Y.reshape(-1).to(device),
            N=N,
            C=C,
        )
        if (ntk_test is None) != (logits0_test is None):
            raise ValueError(
                "Expected `ntk_test` and `logits0_test` together (Θ0(X_test, X) and "
                "f(X_test; θ0)) but got only one of them."
            )
        if ntk_test is not None:
            assert logits0_test is not None  # checked just above: both or neither
            check_tensor(logits0_test, "logits0_test")
            if logits0_test.ndim != 2 or logits0_test.shape[1] != C:
                raise ValueError(
                    f"Expected `logits0_test` to be of shape (M, {C}) but got "
                    f"{tuple(logits0_test.shape)}."
                )
            _check_kernel(ntk_test, "ntk_test", logits0_test.shape[0], N, C, "Θ0(X_test, X)")
            problem.M_test = _solve.kernel_as_matrix(ntk_test, C)
            problem.f0_test = logits0_test.double().reshape(-1).to(device)
        return problem


def _shifts(
    decay_to: str,
    problem: _Problem,
    shift: Optional[Tensor],
    shift_test: Optional[Tensor],
    model: Optional[nn.Module],
    x: Optional[Tensor],
    x_test: Optional[Tensor],
) -> tuple[Tensor, Optional[Tensor]]:
    """``(s, s_test)`` flattened: zeros for ``"init"``; ``J0 θ0`` for ``"zero"``."""
    f0_test = problem.f0_test
    if decay_to == "init":
        zeros_test = torch.zeros_like(f0_test) if f0_test is not None else None
        return torch.zeros_like(problem.f0), zeros_test
    if shift is None:
        if model is None or x is None:
            raise ValueError(
                'decay_to="zero" needs `shift` = J0(X) θ0 of shape (N, C) '
                "(see weight_decay_shift), or `model` and `x` to compute it."
            )
        shift = weight_decay_shift(model, x)
    if f0_test is not None and shift_test is None:
        if model is None or x_test is None:
            raise ValueError(
                'decay_to="zero" with test points needs `shift_test` = J0(X_test) θ0, or '
                "`model` and `x_test` to compute it."
            )
        shift_test = weight_decay_shift(model, x_test)
    s = _flat_like(shift, "shift", problem.f0, problem.C)
    s_test = None
    if f0_test is not None:
        assert shift_test is not None  # computed above when not given
        s_test = _flat_like(shift_test, "shift_test", f0_test, problem.C)
    return s, s_test


def _flat_like(t: Tensor, name: str, like: Tensor, C: int) -> Tensor:
    check_tensor(t, name)
    expected = (like.numel() // C, C)
    if tuple(t.shape) != expected:
        raise ValueError(f"Expected `{name}` to be of shape {expected} but got {tuple(t.shape)}.")
    return t.double().reshape(-1).to(like.device)


def _check_kernel(K: Tensor, name: str, N1: int, N2: int, C: int, what: str) -> None:
    check_tensor(K, name)
    accepted = {4: (N1, N2, C, C), 3: (N1, N2, C), 2: (N1, N2)}
    if K.ndim not in accepted or tuple(K.shape) != accepted[K.ndim]:
        raise ValueError(
            f"Expected `{name}` = {what} of shape {accepted[4]} (full layout; or "
            f"{accepted[3]} diagonal, {accepted[2]} trace) to match the logits, but got "
            f"{tuple(K.shape)}."
        )
