"""Scenarios of the verdict benchmark and how each one trains (data, model, loss, optimizer).

One :class:`Training` holds a scenario's model, optimizer, learning-rate schedule, loss and
batch stream; built twice from the same seed it follows the same trajectory, so the
monitored run and the ground-truth run of ``bench_verdicts.py`` see the same batches.

The loss of a batch (:meth:`Training.batch_loss`) is what a user's ``training_step``
returns: cross-entropy with hard labels, label smoothing or soft targets; mixup of the
batch with one-hot labels; distillation from a fixed teacher network (KL only, or
``0.5·KL + 0.5·CE``); focal loss; class-weighted cross-entropy; binary (one logit) and
multi-label BCE; an L2 term written into the loss. Set-ups that only a ``Trainer`` knows
(gradient accumulation, ``bf16-mixed`` autocast, a warm-up + cosine schedule) are
reproduced by :meth:`Training.optimizer_step` for the ground truth.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ntk.testing import NTKMLP

N_PROBE, BATCH, C = 16, 64, 10
BINARY_CLASSES = (3, 8)  # the binary task: digit 8 (target 1) against digit 3 (target 0)
MIXUP_ALPHA = 0.4  # mixing weights λ ~ Beta(α, α)
FOCAL_GAMMA = 2.0
KD_TEMPERATURE = 2.0
CLASS_WEIGHTS = torch.linspace(0.5, 2.0, C)  # class-weighted cross-entropy
WARMUP_FRACTION = 1 / 16  # linear warm-up over this fraction of the run, then cosine to 0

# losses: "ce" (cross-entropy as `targets` says), "mixup", "kd", "kd-ce", "focal",
# "weighted-ce", "bce" (binary / multi-label, by `task`)
LOSSES = ("ce", "mixup", "kd", "kd-ce", "focal", "weighted-ce", "bce")


@dataclass(frozen=True)
class Scenario:
    """One training set-up.

    Attributes:
        name: short identifier.
        model: ``"mlp-ntk"`` (NTKMLP, σ_w = √2, σ_b = 0.1), ``"mlp-sp"`` (plain
            ``nn.Linear``) or ``"cnn-bn"`` (two conv + BatchNorm2d blocks).
        width: hidden width (channels for the CNN).
        targets: ``"hard"``, ``"ls-module"`` (``nn.CrossEntropyLoss(label_smoothing)``,
            found by the monitor), ``"ls-functional"`` (``F.cross_entropy(...,
            label_smoothing)``, inferred from the loss), ``"soft"`` (non-degenerate soft
            targets).
        reg: ``"none"``, ``"sgd-wd"`` (SGD weight decay), ``"adamw"`` (AdamW decoupled
            decay), ``"l2-init"`` (``(λ/2)‖θ − θ0‖²`` in the loss, declared to the monitor),
            ``"l2-loss"`` (``(λ/2)‖θ‖²`` written in the loss and not declared).
        lr: learning rate (the peak of the schedule).
        steps: monitored optimizer steps ``T``.
        horizon: ground-truth horizon in multiples of ``T``.
        every_n_steps: report interval on top of ``log_base=2``; ``None``: log-spaced only.
        lam: λ of the regularization.
        eps: label smoothing ε.
        lightning: run the monitored phase through a Lightning ``Trainer``.
        linearized: train the linearized model side by side in the ground truth.
        sigma_w: ``σ_w`` of the MLP's weights (NTK parameterization: output scale).
        sigma_b: ``σ_b`` of its biases (0: no biases).
        loss: one of :data:`LOSSES` (what ``training_step`` computes).
        task: ``"multiclass"``, ``"binary"`` (one logit, digits 3 and 8) or
            ``"multilabel"`` (three logits: odd, ≥ 5, multiple of 3).
        accumulate: ``accumulate_grad_batches`` (micro-batches of ``64 / accumulate``).
        precision: the ``Trainer``'s precision, ``"32-true"`` or ``"bf16-mixed"``.
        schedule: ``"constant"`` or ``"warmup-cosine"`` (over the run's own length).
        label_noise: fraction of training labels replaced by uniformly drawn classes.
    """

    name: str
    model: str
    width: int
    targets: str
    reg: str = "none"
    lr: float = 1.0
    steps: int = 256
    horizon: int = 8
    every_n_steps: Optional[int] = None
    lam: float = 0.0
    eps: float = 0.1
    lightning: bool = False
    linearized: bool = True
    sigma_w: float = math.sqrt(2)
    sigma_b: float = 0.1
    loss: str = "ce"
    task: str = "multiclass"
    accumulate: int = 1
    precision: str = "32-true"
    schedule: str = "constant"
    label_noise: float = 0.0

    @property
    def num_outputs(self) -> int:
        """Logits of the model: 1 (binary), 3 (multi-label) or ``C``."""
        return {"binary": 1, "multilabel": 3}.get(self.task, C)


# ---------------------------------------------------------------------- data


def load_data() -> dict[str, Any]:
    """Standardised digits; the probe (16 points, 2 per class for 8 classes) from training."""
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    x = torch.as_tensor(x_all, dtype=torch.float32)
    y = torch.as_tensor(y_all, dtype=torch.long)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    # soft targets: 0.8 on the label, 0.2 spread by a fixed random positive profile
    profile = torch.softmax(torch.randn(len(x), C, generator=g), dim=1)
    soft = 0.8 * F.one_hot(y, C).float() + 0.2 * profile
    probe = torch.cat([(y == c).nonzero().flatten()[:2] for c in range(C)])[:N_PROBE]
    # multi-label targets: (odd, ≥ 5, multiple of 3), multi-hot (N, 3)
    multihot = torch.stack([y % 2 == 1, y >= 5, y % 3 == 0], dim=1).float()
    return {"x": x, "y": y, "soft": soft, "probe": probe, "multihot": multihot, "cache": {}}


def train_indices(sc: Scenario, data: dict[str, Any]) -> Tensor:
    """Indices of the training examples of the scenario's task."""
    if sc.task == "binary":
        return torch.isin(data["y"], torch.tensor(BINARY_CLASSES)).nonzero().flatten()
    return torch.arange(len(data["x"]))


def probe_indices(sc: Scenario, data: dict[str, Any]) -> Tensor:
    """The probe: 16 training points (8 of each class for the binary task)."""
    if sc.task == "binary":
        y = data["y"]
        return torch.cat([(y == c).nonzero().flatten()[: N_PROBE // 2] for c in BINARY_CLASSES])
    return data["probe"]


def labels(sc: Scenario, data: dict[str, Any]) -> Tensor:
    """The training labels, with ``label_noise`` of them redrawn uniformly (fixed seed)."""
    if not sc.label_noise:
        return data["y"]
    key = ("noisy", sc.label_noise)
    if key not in data["cache"]:
        g = torch.Generator().manual_seed(7)
        y = data["y"].clone()
        flip = torch.rand(len(y), generator=g) < sc.label_noise
        y[flip] = torch.randint(C, (int(flip.sum()),), generator=g)
        data["cache"][key] = y
    return data["cache"][key]


def inputs(sc: Scenario, x: Tensor) -> Tensor:
    return x.reshape(-1, 1, 8, 8) if sc.model == "cnn-bn" else x


def targets(sc: Scenario, data: dict[str, Any], idx: Tensor) -> Tensor:
    """What the batch carries: labels ``(B,)``, soft ``(B, C)`` or multi-hot ``(B, 3)``."""
    if sc.targets == "soft":
        return data["soft"][idx]
    if sc.task == "binary":
        return (data["y"][idx] == BINARY_CLASSES[1]).long()
    if sc.task == "multilabel":
        return data["multihot"][idx]
    return labels(sc, data)[idx]


def teacher_model(data: dict[str, Any]) -> nn.Module:
    """A fixed teacher: a small MLP trained for 300 steps (seed 1234), frozen."""
    if "teacher" not in data["cache"]:
        torch.manual_seed(1234)
        teacher = NTKMLP(64, 64, 1, C, parameterization="standard", bias_std=0.1)
        optimizer = torch.optim.SGD(teacher.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1235)
        for _ in range(300):
            idx = torch.randint(len(data["x"]), (BATCH,), generator=g)
            optimizer.zero_grad()
            F.cross_entropy(teacher(data["x"][idx]), data["y"][idx]).backward()
            optimizer.step()
        data["cache"]["teacher"] = teacher.eval().requires_grad_(False)
    return data["cache"]["teacher"]


# ---------------------------------------------------------------------- model and training


def build_model(sc: Scenario) -> nn.Module:
    if sc.model == "cnn-bn":
        w = sc.width
        return nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * w, sc.num_outputs),
        )
    param = "ntk" if sc.model == "mlp-ntk" else "standard"
    return NTKMLP(
        64,
        sc.width,
        2,
        sc.num_outputs,
        parameterization=param,
        weight_std=sc.sigma_w,
        bias_std=sc.sigma_b,
    )


def make_optimizer(sc: Scenario, params: list[Tensor]) -> torch.optim.Optimizer:
    if sc.reg == "adamw":
        return torch.optim.AdamW(params, lr=sc.lr, weight_decay=sc.lam)
    wd = sc.lam if sc.reg == "sgd-wd" else 0.0
    return torch.optim.SGD(params, lr=sc.lr, weight_decay=wd)


def make_schedule(
    sc: Scenario, optimizer: torch.optim.Optimizer, total_steps: int
) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """Linear warm-up then cosine decay to 0 at ``total_steps`` (the run's own length)."""
    if sc.schedule == "constant":
        return None
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Training:
    """Model, optimizer, schedule, loss and batches of a scenario (same seed → same run).

    Args:
        sc: the scenario.
        data: :func:`load_data`.
        total_steps: optimizer steps of this run (the length of its schedule).
        seed: the seed of the model's initialisation and of the batch stream.
    """

    def __init__(self, sc: Scenario, data: dict[str, Any], total_steps: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.sc, self.data = sc, data
        self.model = build_model(sc)
        self.theta0 = [p.detach().clone() for p in self.model.parameters()]
        if sc.loss == "weighted-ce":
            self.loss_module: nn.Module = nn.CrossEntropyLoss(weight=CLASS_WEIGHTS)
        elif sc.loss == "bce":
            self.loss_module = nn.BCEWithLogitsLoss()
        else:
            self.loss_module = nn.CrossEntropyLoss(
                label_smoothing=sc.eps if sc.targets == "ls-module" else 0.0
            )
        self.optimizer = make_optimizer(sc, list(self.model.parameters()))
        self.scheduler = make_schedule(sc, self.optimizer, total_steps)
        self.batches = torch.Generator().manual_seed(seed + 1)
        self.mixing = np.random.default_rng(seed + 2)  # mixup's λ and permutations
        self.train_idx = train_indices(sc, data)
        self.teacher = teacher_model(data) if sc.loss in ("kd", "kd-ce") else None

    @property
    def uses_loss_module(self) -> bool:
        """Whether the loss goes through :attr:`loss_module` (a user would register it)."""
        sc = self.sc
        return sc.loss in ("mixup", "kd-ce", "weighted-ce", "bce") or (
            sc.loss == "ce" and sc.targets in ("hard", "ls-module")
        )

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next micro-batch ``(x, y)`` (``64 / accumulate`` examples)."""
        size = BATCH // self.sc.accumulate
        idx = self.train_idx[torch.randint(len(self.train_idx), (size,), generator=self.batches)]
        return inputs(self.sc, self.data["x"][idx]), targets(self.sc, self.data, idx)

    def batch_loss(
        self,
        forward: Callable[[Tensor], Tensor],
        x: Tensor,
        y: Tensor,
        params: Optional[list[Tensor]] = None,
        theta0: Optional[list[Tensor]] = None,
    ) -> Tensor:
        """The loss ``training_step`` returns for the batch ``(x, y)``.

        Args:
            forward: ``x -> logits``, the model (or its linearization).
            x: the batch's inputs.
            y: its targets.
            params: the parameters an L2 term in the loss reads (default: the model's).
            theta0: their initial values (for ``l2-init``; default: the model's).
        """
        sc = self.sc
        params = list(self.model.parameters()) if params is None else params
        theta0 = self.theta0 if theta0 is None else theta0
        if sc.loss == "mixup":
            lam = float(self.mixing.beta(MIXUP_ALPHA, MIXUP_ALPHA))
            perm = torch.as_tensor(self.mixing.permutation(len(x)))
            logits = forward(lam * x + (1 - lam) * x[perm])
            loss = lam * self.loss_module(logits, y) + (1 - lam) * self.loss_module(logits, y[perm])
        else:
            loss = self._plain_loss(forward(x), y, x)
        if sc.reg == "l2-init":
            loss = loss + 0.5 * sc.lam * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, theta0))
        elif sc.reg == "l2-loss":
            loss = loss + 0.5 * sc.lam * sum((p**2).sum() for p in params)
        return loss

    def _plain_loss(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        sc = self.sc
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(x)
            tau = KD_TEMPERATURE
            kl = F.kl_div(
                F.log_softmax(logits / tau, dim=1),
                F.log_softmax(teacher / tau, dim=1),
                reduction="batchmean",
                log_target=True,
            ) * (tau**2)
            return kl if sc.loss == "kd" else 0.5 * kl + 0.5 * self.loss_module(logits, y)
        if sc.loss == "focal":
            logp = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
            return (-((1 - logp.exp()) ** FOCAL_GAMMA) * logp).mean()
        if sc.loss == "bce":
            z = logits.squeeze(1) if sc.task == "binary" else logits
            return self.loss_module(z, y.to(z.dtype))
        if sc.targets in ("hard", "ls-module") or sc.loss == "weighted-ce":
            return self.loss_module(logits, y)
        if sc.targets == "ls-functional":
            return F.cross_entropy(logits, y, label_smoothing=sc.eps)
        return F.cross_entropy(logits, y)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast a ``Trainer`` with this precision runs ``training_step`` in."""
        if self.sc.precision == "bf16-mixed":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> tuple[Tensor, Tensor, Tensor]:
        """Forward and backward of one batch (no accumulation); returns it and its loss."""
        x, y = self.next_batch()
        self.optimizer.zero_grad()
        with self.autocast():
            loss = self.batch_loss(self.model, x, y)
        loss.backward()
        return x, y, loss

    def optimizer_step(self) -> None:
        """One optimizer step as a ``Trainer`` runs it: accumulation, autocast, schedule."""
        self.optimizer.zero_grad()
        for _ in range(self.sc.accumulate):
            x, y = self.next_batch()
            with self.autocast():
                loss = self.batch_loss(self.model, x, y)
            (loss / self.sc.accumulate).backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def micro_batches(self, steps: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batch stream of ``steps`` optimizer steps (``accumulate`` batches each)."""
        for _ in range(steps * self.sc.accumulate):
            yield self.next_batch()
