"""Do the optimizer kernels predict few-shot fine-tuning? And what do they cost?

Malladi et al., "A Kernel-Based View of Language Model Fine-Tuning" (ICML 2023): prompt-based
fine-tuning of a pretrained model behaves like a kernel method, with the SGD kernel
``J Jᵀ`` for SGD and the asymmetric SignGD kernel ``J(x) sign(J(x'))ᵀ`` for Adam. This
benchmark tests that on a small transformer classifier, offline, in two parts.

1. **Validation.** A BERT-style classifier (token and position embeddings, two attention
   blocks, mean pooling, a head; ``C = 3``) is pretrained on a synthetic task: which of
   three token groups (``token % 3``) is most frequent in the sequence. It is then
   fine-tuned few-shot (``--shots`` examples per class, ``--seeds`` draws of the training
   set), every parameter, head kept, on a related task (``--task``): which group is
   *least* frequent (``least``: the same counts, the other answer, so the pretrained model
   is right on none of it), or which group is most frequent among the tokens of the first
   half of the vocabulary (``half_vocab``: the pretrained answer is often right).
   Full-batch fine-tuning runs once with SGD (lr 0.03) and once with Adam (lr 1e-3), 300
   steps each, cross-entropy with label smoothing ``ε = 0.1``. At the pretrained
   parameters ``θ0`` each kernel (``sgd``, ``signgd``, ``asymmetric_signgd``, ``adam`` with
   the Adam state after its first step on the training set) predicts the held-out logits
   with two solvers:

   * ``ce``: the kernel cross-entropy solution of :func:`lightning_ntk.theory.kernel_solution`,
     ``f*(x) = f0(x) + Θ(x, X) α`` with ``softmax(f0(X) + Θ(X, X) α) = Y_ε``: the end point
     of training the linearized model to convergence on the smoothed targets (it does not
     depend on the kernel's scale);
   * ``regression``: kernel regression of the one-hot targets from ``f0``,
     ``f0(x) + Θ(x, X) Θ(X, X)⁺ (Y − f0(X))``, the least-squares solver of Malladi et al.

   Per kernel × solver × optimizer: the held-out accuracy of the kernel prediction, that of
   the fine-tuned model, and their *agreement* (the fraction of held-out examples where
   both predict the same class). The pretrained model's own predictions (``f0``) are a
   row of their own: the agreement any kernel gets for free. A *lazy check* follows SGD
   fine-tuning step by step with :func:`lightning_ntk.theory.kernel_flow` (the SGD
   kernel's exact prediction of the same full-batch run while it stays linear) and reports
   the relative error of the predicted held-out logit change at several steps; *Adam's
   lazy check* does the same with Adam run on the linearized model
   ``f(x; θ0) + J0(x)(θ − θ0)`` (:func:`lightning_ntk.linearize`), what Adam fine-tuning
   does in the kernel regime with no kernel formula assumed. The two linearized runs'
   end points are rows of the table too (``linearized model``).

   ``--regime lazy`` puts fine-tuning in the kernel regime: the model is scaled by
   :class:`LazyScaled` (``f(x; θ0) + α (f(x; θ) − f(x; θ0))``, ``α = 100``, the lazy
   scaling of Chizat et al.), the learning rates are divided by ``α²`` (SGD) and ``α``
   (Adam), so each step moves the logits about as much as before with a linearization
   error ``α`` times smaller, and the runs take 1000 steps. The kernels' predictions do
   not change (``α`` scales every kernel, and both solvers ignore the scale).
2. **Cost side by side with the reference recipe** (princeton-nlp/LM-Kernel-FT): the
   kernel ``Θ(X_eval, X_train)`` by ``empirical_ntk(kernel=...)`` (its ``auto`` choice, and
   the method of the recipe's route named explicitly) against the recipe, written here:
   ``jacrev`` of the model over the whole training batch, then ``vmap(vmap(jvp))`` over
   its Jacobian rows (signed for ``asymmetric_signgd``) for a block of evaluation
   examples; for ``signgd`` ``jacrev`` on both sides and an ``einsum`` of the signs.
   Median time of alternating runs in one process, peak resident memory of each call in
   its own subprocess (``--memory``, Linux), and the largest entrywise difference of the
   two kernels relative to the largest entry. The recipe takes ``sign`` of every entry;
   the package counts entries within round-off of zero as zero (``row_signs``), which
   matters for parameters whose gradient is zero in exact arithmetic (attention key
   biases): a second column compares against the recipe with that convention.

Usage::

    python benchmarks/bench_finetune_kernels.py [--task least] [--shots 16] [--seeds 3] [--memory]
    python benchmarks/bench_finetune_kernels.py --regime lazy --no-cost   # the kernel regime
    python benchmarks/bench_finetune_kernels.py --quick      # seconds: the pipeline's sanity
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _timing import status_kib

from lightning_ntk import empirical_ntk, linearize
from lightning_ntk.kernel import last_call_info
from lightning_ntk.theory import kernel_flow, kernel_solution

VOCAB, LENGTH, CLASSES = 24, 8, 3
KERNELS = ("sgd", "signgd", "asymmetric_signgd", "adam")
OPTIMIZERS = ("sgd", "adam")
SMOOTHING = 0.1
_SMOOTHED = torch.full((CLASSES,), SMOOTHING / CLASSES) + (1 - SMOOTHING) * torch.eye(CLASSES)[0]
MIN_LOSS = float(-(_SMOOTHED * _SMOOTHED.log()).sum())  # the training loss at its minimum


# ---------------------------------------------------------------------- model and data


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and an MLP, with residuals."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, h: Tensor) -> Tensor:
        N, T, D = h.shape
        x = self.norm1(h)
        split = lambda t: t.reshape(N, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))  # (N, H, T, D/H)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads), dim=-1)
        h = h + self.o((weights @ v).transpose(1, 2).reshape(N, T, D))
        return h + self.mlp(self.norm2(h))


class Classifier(nn.Module):
    """Token ids ``(N, T)`` → logits ``(N, C)``: embeddings, two blocks, mean pool, head."""

    def __init__(self, width: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Parameter(0.1 * torch.randn(LENGTH, width))
        self.blocks = nn.Sequential(Block(width, heads), Block(width, heads))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.tokens(ids) + self.positions)).mean(dim=1))


class LazyScaled(nn.Module):
    """``f_α(x; θ) = f(x; θ0) + α (f(x; θ) − f(x; θ0))``: the lazy scaling of Chizat et al.

    The same pretrained predictions at ``θ0``, the kernel ``α² Θ`` (the sign kernels ``α``
    times theirs), and a linearization error ``α`` times smaller for the same change of the
    logits: gradient descent with learning rate ``η / α²`` (Adam: ``η / α``) follows the
    kernel flow of the unscaled model's learning rate ``η`` ever more closely as ``α``
    grows ("On Lazy Training in Differentiable Programming", NeurIPS 2019). ``f(x; θ0)``
    is a frozen copy of the model, outside the parameters.
    """

    def __init__(self, model: nn.Module, alpha: float) -> None:
        super().__init__()
        self.model, self.alpha = model, alpha
        reference = copy.deepcopy(model).requires_grad_(False)
        self._reference = (reference,)  # a tuple: not a submodule, so not a parameter

    def forward(self, ids: Tensor) -> Tensor:
        f0 = self._reference[0](ids)
        return f0 + self.alpha * (self.model(ids) - f0)


TASKS = ("least", "half_vocab")  # the fine-tuning tasks


def make_data(n: int, task: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Token ids ``(n, T)`` and labels; the token group is ``token % 3``, ties go to the
    higher group.

    ``"pretrain"``: the most frequent group; ``"least"``: the least frequent group;
    ``"half_vocab"``: the most frequent group among the tokens of the first half of the
    vocabulary (``token < 12``), the others ignored.
    """
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    counted = (ids < VOCAB // 2).float() if task == "half_vocab" else torch.ones(n, LENGTH)
    groups = nn.functional.one_hot(ids % CLASSES, CLASSES).float()  # (n, T, C)
    counts = (groups * counted[..., None]).sum(dim=1)  # (n, C)
    score = -counts if task == "least" else counts
    return ids, (score + 0.1 * torch.arange(CLASSES)).argmax(dim=1)


def few_shot(shots: int, seed: int, task: str) -> tuple[Tensor, Tensor]:
    """``shots`` examples of each class of ``task``, drawn with ``seed``."""
    ids, labels = make_data(40 * shots * CLASSES, task, torch.Generator().manual_seed(seed))
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:shots] for c in range(CLASSES)])
    return ids[keep], labels[keep]


def pretrain(width: int, steps: int) -> Classifier:
    """The classifier trained ``steps`` AdamW steps (batch 64) on the pretraining task."""
    torch.manual_seed(0)
    model = Classifier(width)
    generator = torch.Generator().manual_seed(0)
    x, y = make_data(4096, "pretrain", generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y, label_smoothing=SMOOTHING)


@torch.no_grad()
def logits(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).double()


def finetune(
    model: nn.Module, x: Tensor, y: Tensor, name: str, lr: float, steps: int,
    x_test: Tensor, record: tuple[int, ...] = (),
) -> tuple[nn.Module, dict[int, Tensor]]:  # fmt: skip
    """A copy of ``model`` after ``steps`` full-batch steps of ``name`` (``"sgd"``/``"adam"``),
    and its held-out logits ``{step: (M, C)}`` at the steps in ``record``."""
    tuned = copy.deepcopy(model)
    optimizer_class = torch.optim.SGD if name == "sgd" else torch.optim.Adam
    optimizer = optimizer_class(tuned.parameters(), lr=lr)
    recorded = {}
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss_of(tuned, x, y).backward()
        optimizer.step()
        if step in record:
            recorded[step] = logits(tuned, x_test)
    return tuned, recorded


def finetune_linearized(
    model: nn.Module, x: Tensor, y: Tensor, name: str, lr: float, steps: int,
    x_test: Tensor, record: tuple[int, ...],
) -> dict[int, Tensor]:  # fmt: skip
    """The held-out logits ``{step: (M, C)}`` of the same run as :func:`finetune` on the
    linearized model ``f_lin(x; θ) = f(x; θ0) + J0(x)(θ − θ0)`` (for Adam: what Adam
    fine-tuning does in the kernel regime, with no kernel formula assumed)."""
    linear = linearize(model)
    theta = {n: p.detach().clone().requires_grad_() for n, p in linear.params0.items()}
    optimizer_class = torch.optim.SGD if name == "sgd" else torch.optim.Adam
    optimizer = optimizer_class(theta.values(), lr=lr)
    recorded = {}
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(x, theta), y, label_smoothing=SMOOTHING)
        loss.backward()
        optimizer.step()
        if step in record:
            with torch.no_grad():
                recorded[step] = linear(x_test, theta).double()
    return recorded


def adam_after_first_step(
    model: nn.Module, x: Tensor, y: Tensor
) -> tuple[nn.Module, torch.optim.Adam]:
    """A copy of ``model`` at its own parameters and an Adam that has taken one step on it.

    The step's state (``v̂ = g²`` of the full-batch gradient at ``θ0``) stays; the
    parameters are put back to ``θ0``, so the Adam kernel is taken at the pretrained point.
    """
    at_theta0 = copy.deepcopy(model)
    optimizer = torch.optim.Adam(at_theta0.parameters())
    loss_of(at_theta0, x, y).backward()
    optimizer.step()
    with torch.no_grad():
        for p, p0 in zip(at_theta0.parameters(), model.parameters()):
            p.copy_(p0)
            p.grad = None
    return at_theta0, optimizer


# ---------------------------------------------------------------------- validation


def matrix(K: Tensor) -> Tensor:
    """``(N1, N2, C, C)`` → ``(N1·C, N2·C)``, sample-major, float64."""
    N1, N2, C, _ = K.shape
    return K.double().permute(0, 2, 1, 3).reshape(N1 * C, N2 * C)


def kernel_predictions(
    model: nn.Module, x: Tensor, y: Tensor, x_test: Tensor, kind: str, optimizer=None
) -> dict[str, Tensor]:
    """Held-out logits ``(M, C)`` predicted with ``kind``'s kernel at ``model``'s parameters.

    ``"ce"``: the kernel cross-entropy solution with smoothed targets
    (:func:`kernel_solution`, ``λ = 0``); ``"regression"``: kernel regression of the
    one-hot targets from ``f0``, ``f0(x) + Θ(x, X) Θ(X, X)⁺ (Y − f0(X))`` (least squares,
    minimum norm), LM-Kernel-FT's solver.
    """
    options = dict(kernel=kind, optimizer=optimizer, dtype=torch.float64)
    train = empirical_ntk(model, x, **options)  # (N, N, C, C)
    test = empirical_ntk(model, x_test, x, **options)  # (M, N, C, C)
    f0, f0_test = logits(model, x), logits(model, x_test)
    solution = kernel_solution(  # raises if the fixed point is not reached
        train, f0, y, label_smoothing=SMOOTHING, ntk_test=test, logits0_test=f0_test
    )
    assert solution.test_logits is not None
    residual = (nn.functional.one_hot(y, CLASSES).double() - f0).reshape(-1, 1)  # (N·C, 1)
    alpha = torch.linalg.lstsq(matrix(train), residual, driver="gelsd").solution
    regression = f0_test + (matrix(test) @ alpha).reshape(-1, CLASSES)
    return {"ce": solution.test_logits, "regression": regression}


@dataclass
class Settings:
    """What one validation run does (``--quick`` shrinks every size)."""

    task: str = "least"
    width: int = 32
    pretrain_steps: int = 400
    shots: int = 16
    seeds: int = 3
    held_out: int = 600
    steps: int = 300
    lr: tuple[float, float] = (0.03, 1e-3)  # SGD, Adam
    record: tuple[int, ...] = (1, 3, 10, 30, 100, 300)  # steps of the lazy check
    kernels: tuple[str, ...] = KERNELS
    alpha: float = 1.0  # the lazy scaling of the fine-tuned model (LazyScaled), 1: none


QUICK = Settings(
    width=16, pretrain_steps=30, shots=4, seeds=1, held_out=60, steps=10, lr=(0.01, 1e-4),
    record=(1, 10), kernels=("sgd", "asymmetric_signgd"),
)  # fmt: skip


REGIMES = ("rich", "lazy")
LAZY_ALPHA, LAZY_STEPS = 100.0, 1000


def lazy(settings: Settings, alpha: float = LAZY_ALPHA, steps: int = LAZY_STEPS) -> Settings:
    """``settings`` moved into the kernel regime (``--regime lazy``).

    The model is scaled by :class:`LazyScaled`; SGD runs with lr ``η / α²`` and Adam with
    lr ``η / α`` (``η``: ``settings``' learning rates), so each step moves the logits about
    as much as without the scaling, with a linearization error ``α`` times smaller; ``steps``
    steps (1000: both runs come close to the training loss's minimum).
    """
    sgd_lr, adam_lr = settings.lr
    return replace(
        settings,
        steps=steps,
        lr=(sgd_lr / alpha**2, adam_lr / alpha),
        record=tuple(sorted({*settings.record, steps})),
        alpha=alpha,
    )


def lazy_check(
    model: nn.Module, x: Tensor, y: Tensor, x_test: Tensor, runs: dict[float, dict[int, Tensor]]
) -> tuple[dict[float, dict[int, dict[str, float]]], dict[float, dict[int, Tensor]]]:
    """The SGD kernel's flow of full-batch SGD runs against the runs, step by step.

    Args:
        model: the pretrained model (``θ0``).
        x: training inputs.
        y: training labels.
        x_test: held-out inputs.
        runs: ``{learning rate: {step: held-out logits (M, C)}}`` of SGD runs from ``θ0``.

    Returns:
        Per learning rate and recorded step: ``‖f_flow − f_SGD‖ / ‖f_SGD − f0‖`` on the
        held-out set (the relative error of the predicted logit change), the argmax
        agreement, and the rms logit change ``‖f_SGD − f0‖ / √M``; and the flow's held-out
        logits ``(M, C)`` at the same learning rates and steps.
    """
    train = empirical_ntk(model, x, dtype=torch.float64)
    test = empirical_ntk(model, x_test, x, dtype=torch.float64)
    f0, f0_test = logits(model, x), logits(model, x_test)
    out, flows = {}, {}
    for lr, recorded in runs.items():
        _, flow_test = kernel_flow(
            train, f0, y, label_smoothing=SMOOTHING, lr=lr, steps=max(recorded),
            ntk_test=test, logits0_test=f0_test,
        )  # fmt: skip
        flows[lr] = {step: flow_test[step] for step in recorded}
        out[lr] = compare_runs(recorded, flows[lr], f0_test)
    return out, flows


LINEARIZED = "linearized model"  # the rows of the linearized model's runs


def validation(settings: Settings) -> dict:
    """Accuracies and agreements per kernel × optimizer, over the seeds (lists of values)."""
    assert settings.steps in settings.record, "the lazy checks compare the last step"
    model: nn.Module = pretrain(settings.width, settings.pretrain_steps)
    if settings.alpha != 1.0:
        model = LazyScaled(model, settings.alpha)
    x_test, y_test = make_data(
        settings.held_out, settings.task, torch.Generator().manual_seed(10_000)
    )
    f0_test = logits(model, x_test)
    accuracy = lambda f: float((f.argmax(1) == y_test).double().mean())  # noqa: E731
    agree = lambda f, g: float((f.argmax(1) == g.argmax(1)).double().mean())  # noqa: E731
    out: dict = {"pretrained": accuracy(f0_test), "tuned": {}, "accuracy": {}, "agreement": {},
                 "optimizers_agree": [], "lazy": [], "adam_lazy": [], "distance": {},
                 "train_loss": {}, "flow_vs_solution": []}  # fmt: skip
    for seed in range(settings.seeds):
        x, y = few_shot(settings.shots, seed, settings.task)
        runs = {
            name: finetune(model, x, y, name, lr, settings.steps, x_test, settings.record)
            for name, lr in zip(OPTIMIZERS, settings.lr)
        }
        tuned = {name: logits(m, x_test) for name, (m, _) in runs.items()}
        for name, (m, _) in runs.items():
            out["distance"].setdefault(name, []).append(parameter_distance(m, model))
            with torch.no_grad():
                out["train_loss"].setdefault(name, []).append(float(loss_of(m, x, y)))
        predictions = {
            ("f0 (no fine-tuning)", "ce"): f0_test,
            ("f0 (no fine-tuning)", "regression"): f0_test,
        }
        for kind in settings.kernels:
            at, optimizer = (model, None)
            if kind == "adam":
                at, optimizer = adam_after_first_step(model, x, y)
            for solver, f in kernel_predictions(at, x, y, x_test, kind, optimizer).items():
                predictions[(kind, solver)] = f
        lr = settings.lr[0]
        sgd_runs = {lr: runs["sgd"][1]}
        for smaller in (lr / 100, lr / 10):  # one step: the linearization's error ∝ lr
            sgd_runs[smaller] = finetune(model, x, y, "sgd", smaller, 1, x_test, (1,))[1]
        lazy, flows = lazy_check(model, x, y, x_test, sgd_runs)
        out["lazy"].append(lazy)
        linear_adam = finetune_linearized(
            model, x, y, "adam", settings.lr[1], settings.steps, x_test, settings.record
        )
        out["adam_lazy"].append(compare_runs(runs["adam"][1], linear_adam, f0_test))
        predictions[(LINEARIZED, "SGD run")] = flows[lr][settings.steps]
        predictions[(LINEARIZED, "Adam run")] = linear_adam[settings.steps]
        for name, f in tuned.items():
            out["tuned"].setdefault(name, []).append(accuracy(f))
        for key, f in predictions.items():
            out["accuracy"].setdefault(key, []).append(accuracy(f))
            for name, g in tuned.items():
                out["agreement"].setdefault((*key, name), []).append(agree(f, g))
        out["optimizers_agree"].append(agree(tuned["sgd"], tuned["adam"]))
        if "sgd" in settings.kernels:  # how far the run is from the kernel's end point
            flow, solution = predictions[(LINEARIZED, "SGD run")], predictions[("sgd", "ce")]
            out["flow_vs_solution"].append(agree(flow, solution))
    return out


def compare_runs(
    actual: dict[int, Tensor], predicted: dict[int, Tensor], f0_test: Tensor
) -> dict[int, dict[str, float]]:
    """Per recorded step, the figures of :func:`lazy_check` for a ``predicted`` run."""
    out = {}
    for step, f in actual.items():
        change = float((f - f0_test).norm())
        out[step] = {
            "relative_error": float((predicted[step] - f).norm()) / max(change, 1e-12),
            "agreement": float((predicted[step].argmax(1) == f.argmax(1)).double().mean()),
            "logit_change": change / math.sqrt(len(f0_test)),
        }
    return out


def parameter_distance(tuned: nn.Module, model: nn.Module) -> float:
    """``‖θ − θ0‖ / ‖θ0‖`` over all parameters."""
    theta = torch.cat([p.detach().flatten() for p in tuned.parameters()])
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    return float((theta - theta0).norm() / theta0.norm())


def _mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def validation_table(result: dict) -> str:
    """The markdown tables of :func:`validation`'s result."""
    lines = [
        "| kernel | solver | kernel accuracy | agreement with SGD FT | agreement with Adam FT |",
        "|---|---|---|---|---|",
    ]
    for (kind, solver), acc in result["accuracy"].items():
        if kind.startswith("f0") and solver != "ce":
            continue
        agree = [_mean(result["agreement"][(kind, solver, name)]) for name in OPTIMIZERS]
        shown = "—" if kind.startswith("f0") else solver
        lines.append(f"| {kind} | {shown} | {_mean(acc)} | {agree[0]} | {agree[1]} |")
    tuned = ", ".join(f"{name} {_mean(acc)}" for name, acc in result["tuned"].items())
    lines += [
        "",
        f"fine-tuned accuracy: {tuned}; pretrained (zero-shot) {result['pretrained']:.3f}; "
        f"SGD FT and Adam FT agree on {_mean(result['optimizers_agree'])}; parameter "
        "distance ‖θ − θ0‖/‖θ0‖: "
        + ", ".join(f"{name} {_mean(d)}" for name, d in result["distance"].items())
        + "; training loss: "
        + ", ".join(f"{name} {_mean(v)}" for name, v in result["train_loss"].items())
        + f" (the smoothed targets' entropy, its minimum: {MIN_LOSS:.3f}); the SGD kernel's "
        f"flow over the SGD run and its `ce` solution agree on "
        f"{_mean(result['flow_vs_solution'] or [math.nan])}",
        "",
        "lazy check: the SGD kernel's flow against the SGD run, held-out",
        "",
        "| step | relative error of the logit change | agreement | rms logit change |",
        "|---|---|---|---|",
    ]
    lazy = result["lazy"]
    lr, *smaller = lazy[0]
    lines += _check_rows([seed[lr] for seed in lazy])
    one_step = [
        f"lr {rate:g}: {_mean([seed[rate][1]['relative_error'] for seed in lazy])}"
        for rate in [*smaller, lr]
    ]
    lines += [
        "",
        "relative error after one step, " + ", ".join(one_step),
        "",
        "Adam's lazy check: Adam on the linearized model against the Adam run, held-out",
        "",
        "| step | relative error of the logit change | agreement | rms logit change |",
        "|---|---|---|---|",
        *_check_rows(result["adam_lazy"]),
    ]
    return "\n".join(lines)


def _check_rows(seeds: list[dict[int, dict[str, float]]]) -> list[str]:
    """Table rows of a step-by-step check, mean ± sd over the seeds."""
    rows = []
    for step in seeds[0]:
        cells = [
            _mean([seed[step][key] for seed in seeds])
            for key in ("relative_error", "agreement", "logit_change")
        ]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return rows


# ---------------------------------------------------------------------- the reference recipe


def _signs(J: dict[str, Tensor], round_off_zero: bool) -> dict[str, Tensor]:
    """``sign`` of Jacobian rows ``{name: (N, C, *shape)}``; optionally the package's rule
    (``|J| ≤ 8 eps max_p |J_a(x)|`` is zero)."""
    if not round_off_zero:
        return {name: j.sign() for name, j in J.items()}
    scale = torch.stack([j.flatten(2).abs().amax(-1) for j in J.values()]).amax(0)  # (N, C)
    out = {}
    for name, j in J.items():
        bound = 8 * torch.finfo(j.dtype).eps * scale.reshape(*scale.shape, *[1] * (j.dim() - 2))
        out[name] = torch.where(j.abs() > bound, j.sign(), torch.zeros_like(j))
    return out


def recipe_ntk(
    model: nn.Module, x1: Tensor, x2: Tensor, kind: str, round_off_zero: bool = False
) -> Tensor:
    """``Θ(x1, x2)`` ``(N1, N2, C, C)`` the way LM-Kernel-FT computes it.

    ``jacrev`` of the logits over the whole batch ``x2`` (the training set, the recipe's
    "outer" batch), signed for the sign kernels; then ``vmap(vmap(jvp))`` of the model on
    ``x1`` along each of the ``N2·C`` Jacobian rows (``sgd``, ``asymmetric_signgd``), or
    ``jacrev`` on ``x1`` too and an ``einsum`` of the signs (``signgd``).
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (p, buffers), (x,))

    J2 = jacrev(f)(params, x2)  # {name: (N2, C, *shape)}
    if kind == "signgd":
        S1, S2 = _signs(jacrev(f)(params, x1), round_off_zero), _signs(J2, round_off_zero)
        return sum(  # type: ignore[return-value]
            torch.einsum("iap,jbp->ijab", S1[n].flatten(2), S2[n].flatten(2)) for n in params
        )
    tangents = _signs(J2, round_off_zero) if kind == "asymmetric_signgd" else J2

    def column(tangent: dict[str, Tensor]) -> Tensor:
        return jvp(lambda p: f(p, x1), (params,), (tangent,))[1]  # (N1, C)

    block = vmap(vmap(column))(tangents)  # (N2, C, N1, C)
    return block.permute(2, 0, 3, 1)


ROUTE = {"sgd": "ntk_vp", "signgd": "jacobian", "asymmetric_signgd": "ntk_vp"}


def cost_inputs(n_eval: int, n_train: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        make_data(n_eval, "pretrain", generator)[0],
        make_data(n_train, "pretrain", generator)[0],
    )


def cost_calls(
    model: nn.Module, x1: Tensor, x2: Tensor, kind: str
) -> dict[str, Callable[[], Tensor]]:
    return {
        "auto": lambda: empirical_ntk(model, x1, x2, kernel=kind),
        ROUTE[kind]: lambda: empirical_ntk(model, x1, x2, kernel=kind, method=ROUTE[kind]),
        "recipe": lambda: recipe_ntk(model, x1, x2, kind),
    }


def relative_difference(K: Tensor, reference: Tensor) -> float:
    """``max |K − K_ref| / max |K_ref|``."""
    return float((K.double() - reference.double()).abs().max() / reference.double().abs().max())


def cost_table(model: nn.Module, n_eval: int, n_train: int, repeats: int) -> list[dict]:
    x1, x2 = cost_inputs(n_eval, n_train)
    rows = []
    for kind in ROUTE:
        calls = cost_calls(model, x1, x2, kind)
        kernels = {path: call() for path, call in calls.items()}  # warm-up, and the values
        calls["auto"]()
        chosen = last_call_info().method  # type: ignore[union-attr]
        times: dict[str, list[float]] = {path: [] for path in calls}
        for _ in range(repeats):  # alternate, so a busy machine slows every path alike
            for path, call in calls.items():
                start = time.perf_counter()
                call()
                times[path].append(time.perf_counter() - start)
        seconds = {path: statistics.median(t) for path, t in times.items()}
        rounded = recipe_ntk(model, x1, x2, kind, round_off_zero=True)
        rows.append({
            "kernel": kind,
            "auto_method": str(getattr(chosen, "value", chosen)),
            "auto_s": seconds["auto"],
            f"{ROUTE[kind]}_s": seconds[ROUTE[kind]],
            "recipe_s": seconds["recipe"],
            "recipe_over_auto": seconds["recipe"] / seconds["auto"],
            "max_rel_diff": relative_difference(kernels["auto"], kernels["recipe"]),
            "max_rel_diff_round_off_zero": relative_difference(kernels["auto"], rounded),
        })  # fmt: skip
    return rows


def peak_memory(
    state_file: str, width: int, n_eval: int, n_train: int, kind: str, path: str
) -> int:
    """Bytes of peak resident memory one kernel call adds (run in this process, Linux)."""
    model = Classifier(width).eval()
    model.load_state_dict(torch.load(state_file))
    x1, x2 = cost_inputs(n_eval, n_train)
    call = cost_calls(model, x1, x2, kind)[path]
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak (VmHWM) starts again from the current resident size
    before = status_kib("VmRSS")
    call()
    return (status_kib("VmHWM") - before) * 1024


def memory_table(model: nn.Module, width: int, n_eval: int, n_train: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        state_file = os.path.join(folder, "model.pt")
        torch.save(model.state_dict(), state_file)
        for kind in ROUTE:
            row: dict = {"kernel": kind}
            for path in ("auto", ROUTE[kind], "recipe"):
                child = [sys.executable, __file__, "--child", state_file, str(width),
                         str(n_eval), str(n_train), kind, path]  # fmt: skip
                out = subprocess.run(child, capture_output=True, text=True, check=True)
                row[f"{path}_MiB"] = round(int(out.stdout.strip()) / 2**20, 1)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def fmt(v: object) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a sanity run")
    parser.add_argument("--shots", type=int, default=Settings.shots, help="examples per class")
    parser.add_argument("--seeds", type=int, default=Settings.seeds)
    parser.add_argument("--task", choices=TASKS, default=Settings.task, help="fine-tuning task")
    parser.add_argument(
        "--regime", choices=REGIMES, default="rich",
        help="lazy: the model scaled into the kernel regime (LazyScaled)",
    )  # fmt: skip
    parser.add_argument("--no-cost", action="store_true", help="the validation only")
    parser.add_argument("--eval", type=int, default=96, help="evaluation batch of the cost part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="peak memory per path")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small model: more threads only add contention
    # PyTorch's forward-mode decompositions warn as torch.func.jvp loads them (the recipe)
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    if args.child:
        state_file, width, n_eval, n_train, kind, path = args.child
        print(peak_memory(state_file, int(width), int(n_eval), int(n_train), kind, path))
        return
    settings = QUICK if args.quick else Settings(args.task, shots=args.shots, seeds=args.seeds)
    if args.regime == "lazy":
        settings = lazy(settings, steps=settings.steps if args.quick else LAZY_STEPS)
    start = time.perf_counter()
    result = validation(settings)
    print(f"torch {torch.__version__}, 1 thread; {settings}")
    print(validation_table(result), flush=True)
    if args.no_cost:
        return
    model = pretrain(settings.width, settings.pretrain_steps)
    n_train = settings.shots * CLASSES
    n_eval = 12 if args.quick else args.eval
    print(f"\ncost of Θ(X_eval, X_train), N_eval={n_eval}, N_train={n_train}, float32, seconds:")
    print(markdown(cost_table(model, n_eval, n_train, 1 if args.quick else args.repeats)))
    if args.memory:
        print("\npeak resident memory each call adds (own subprocess), MiB:")
        print(markdown(memory_table(model, settings.width, n_eval, n_train)))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
