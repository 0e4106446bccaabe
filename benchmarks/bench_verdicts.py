"""Verdict benchmark: does the monitor's verdict match what training really does?

Scenarios on scikit-learn's digits (standardised; vectors for MLPs, 1×8×8 images for the
BatchNorm CNN) cross the conditions of the theory: hard targets / label smoothing in an
``nn.CrossEntropyLoss`` / smoothing given only to ``F.cross_entropy`` / soft targets;
no regularization / SGD weight decay / AdamW / L2 towards θ0; NTK vs standard
parameterization; wide vs narrow; MLP vs BatchNorm CNN; learning rate 0, moderate, large.

Each scenario is run twice from the same seed, on the same batches:

1. **monitored** — ``T`` steps with an :class:`~lightning_ntk.NTKTracker` in a plain loop
   (one scenario through a Lightning ``Trainer`` with ``NTKMonitor``), which reads the
   set-up as the monitor does (declared / read from the optimizer and loss module /
   inferred from the training loss) and reports on its schedule;
2. **ground truth** — ``horizon × T`` steps (8× by default) without the monitor, and the
   *linearized* model trained side by side with the same batches, loss and optimizer
   (Lee et al. 2019). Measured on the probe: the centered logit norm and its slope per
   doubling of steps over the last two doublings of the horizon, the kernel's relative
   change and ``‖f_t − f^lin_t‖_F / ‖f_t − f_0‖_F`` at ``T`` and at the horizon.

Ground truth: ``diverging`` when the logits still grow by ≥ 0.5 per doubling at the
horizon (past the optimum the targets allow, when there is one); else ``moves`` when the
kernel's relative change or the linearization gap reach 0.5 by the horizon; ``lazy``
when both stay below 0.2; ``drifts`` in between. Acceptance: no ``broken`` verdict on a
``lazy`` scenario, no "logits diverging" where the logits do not diverge, and every
hard-target, unregularized scenario flagged "logits diverging" by the first report at
which the trend is readable (two reports at steps ≥ 100 within the last two doublings).

Usage::

    python benchmarks/bench_verdicts.py            # all scenarios (a few minutes)
    python benchmarks/bench_verdicts.py --quick    # smaller horizons, no width 2048
    python benchmarks/bench_verdicts.py --only cnn-bn-lr0 mlp-ntk-512-hard

Ground-truth runs are cached in ``benchmarks/results/verdicts/`` (``--fresh`` redoes them),
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_ntk import NTKTracker, empirical_ntk
from lightning_ntk.kernel._functional import FunctionalModel
from lightning_ntk.kernel.batch_statistics import BatchStatisticsModel, batch_ntk
from lightning_ntk.metrics import logit_norm, relative_change
from lightning_ntk.testing import NTKMLP
from lightning_ntk.theory import optimal_logits

RESULTS = Path(__file__).resolve().parent / "results" / "verdicts"
N_PROBE, BATCH, C = 16, 64, 10
SLOPE_DIVERGING, LAZY_MAX, MOVES_MIN = 0.5, 0.2, 0.5


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
            decay), ``"l2-init"`` (``(λ/2)‖θ − θ0‖²`` in the loss, declared to the monitor).
        lr: learning rate.
        steps: monitored steps ``T``.
        horizon: ground-truth horizon in multiples of ``T``.
        every_n_steps: report interval on top of ``log_base=2``; ``None``: log-spaced only.
        lam: λ of the regularization.
        eps: label smoothing ε.
        lightning: run the monitored phase through a Lightning ``Trainer``.
        linearized: train the linearized model side by side in the ground truth.
        sigma_w: ``σ_w`` of the MLP's weights (NTK parameterization: output scale).
        sigma_b: ``σ_b`` of its biases (0: no biases).
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


SCENARIOS = (
    Scenario("mlp-ntk-512-hard", "mlp-ntk", 512, "hard"),
    Scenario("mlp-ntk-512-ls-module", "mlp-ntk", 512, "ls-module", lr=0.5),
    Scenario("mlp-ntk-512-ls-functional", "mlp-ntk", 512, "ls-functional", lr=0.5),
    Scenario("mlp-ntk-512-soft", "mlp-ntk", 512, "soft", lr=0.5),
    Scenario("mlp-ntk-512-hard-l2init", "mlp-ntk", 512, "hard", "l2-init", lam=0.01),
    Scenario("mlp-ntk-512-hard-sgdwd", "mlp-ntk", 512, "hard", "sgd-wd", lam=3e-3),
    Scenario("mlp-sp-512-hard-adamw", "mlp-sp", 512, "hard", "adamw", lr=1e-3, lam=0.05),
    Scenario("mlp-sp-512-ls-functional", "mlp-sp", 512, "ls-functional", lr=0.05),
    Scenario("mlp-sp-512-hard", "mlp-sp", 512, "hard", lr=0.05),
    Scenario("mlp-ntk-64-ls-module", "mlp-ntk", 64, "ls-module"),
    Scenario("mlp-ntk-64-hard-lr8", "mlp-ntk", 64, "hard", lr=8.0),
    Scenario("cnn-bn-lr0", "cnn-bn", 16, "hard", lr=0.0),
    Scenario("cnn-bn-ls-module", "cnn-bn", 16, "ls-module", lr=0.05),
    Scenario("cnn-bn-hard", "cnn-bn", 16, "hard", lr=0.05),
    Scenario(
        "lightning-mlp-ntk-512-ls-functional",
        "mlp-ntk",
        512,
        "ls-functional",
        lr=0.5,
        lightning=True,
    ),
    Scenario(
        "mlp-ntk-2048-ls-module",
        "mlp-ntk",
        2048,
        "ls-module",
        steps=800,
        every_n_steps=50,
        horizon=2,
        linearized=False,
        sigma_w=1.0,
        sigma_b=0.0,
    ),
    Scenario(
        "mlp-ntk-2048-hard",
        "mlp-ntk",
        2048,
        "hard",
        steps=800,
        every_n_steps=50,
        horizon=2,
        linearized=False,
        sigma_w=1.0,
        sigma_b=0.0,
    ),
)


# ---------------------------------------------------------------------- data and models


def load_data() -> dict[str, Tensor]:
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
    return {"x": x, "y": y, "soft": soft, "probe": probe}


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
            nn.Linear(4 * w, C),
        )
    param = "ntk" if sc.model == "mlp-ntk" else "standard"
    return NTKMLP(
        64, sc.width, 2, C, parameterization=param, weight_std=sc.sigma_w, bias_std=sc.sigma_b
    )


def inputs(sc: Scenario, x: Tensor) -> Tensor:
    return x.reshape(-1, 1, 8, 8) if sc.model == "cnn-bn" else x


def targets(sc: Scenario, data: dict[str, Tensor], idx: Tensor) -> Tensor:
    return data["soft"][idx] if sc.targets == "soft" else data["y"][idx]


class Training:
    """Model, optimizer, loss and batches of a scenario (same seed → same trajectory)."""

    def __init__(self, sc: Scenario, data: dict[str, Tensor], seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.sc, self.data = sc, data
        self.model = build_model(sc)
        self.theta0 = [p.detach().clone() for p in self.model.parameters()]
        self.loss_module = nn.CrossEntropyLoss(
            label_smoothing=sc.eps if sc.targets == "ls-module" else 0.0
        )
        self.optimizer = make_optimizer(sc, list(self.model.parameters()))
        self.batches = torch.Generator().manual_seed(seed + 1)
        self.train_idx = torch.arange(len(data["x"]))

    def next_batch(self) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self.train_idx), (BATCH,), generator=self.batches)
        return inputs(self.sc, self.data["x"][idx]), targets(self.sc, self.data, idx)

    def loss(self, logits: Tensor, y: Tensor, params: list[Tensor], theta0: list[Tensor]) -> Tensor:
        """The training loss of a batch (cross-entropy variant, plus L2 to θ0 if any)."""
        sc = self.sc
        if sc.targets in ("hard", "ls-module"):
            loss = self.loss_module(logits, y)
        elif sc.targets == "ls-functional":
            loss = F.cross_entropy(logits, y, label_smoothing=sc.eps)
        else:
            loss = F.cross_entropy(logits, y)
        if sc.reg == "l2-init":
            loss = loss + 0.5 * sc.lam * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, theta0))
        return loss

    def step(self) -> tuple[Tensor, Tensor, Tensor]:
        """One optimizer step; returns the batch and its (pre-step) loss."""
        x, y = self.next_batch()
        self.optimizer.zero_grad()
        loss = self.loss(self.model(x), y, list(self.model.parameters()), self.theta0)
        loss.backward()
        return x, y, loss


def make_optimizer(sc: Scenario, params: list[Tensor]) -> torch.optim.Optimizer:
    if sc.reg == "adamw":
        return torch.optim.AdamW(params, lr=sc.lr, weight_decay=sc.lam)
    wd = sc.lam if sc.reg == "sgd-wd" else 0.0
    return torch.optim.SGD(params, lr=sc.lr, weight_decay=wd)


def tracker_setup(sc: Scenario, training: Training) -> dict[str, Any]:
    """What a user would hand the tracker: optimizer, loss module if any, declared L2."""
    kwargs: dict[str, Any] = {"optimizer": training.optimizer}
    if sc.targets in ("hard", "ls-module"):
        kwargs["loss"] = training.loss_module
    if sc.reg == "l2-init":
        kwargs["weight_decay"] = sc.lam  # the L2 term lives in the loss: declared
    return kwargs


# ---------------------------------------------------------------------- ground truth


def measurement_function(model: nn.Module) -> FunctionalModel:
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return BatchStatisticsModel(model)
    return FunctionalModel(model)


def probe_kernel(model: nn.Module, probe_x: Tensor) -> Tensor:
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return batch_ntk(model, probe_x)
    return empirical_ntk(model, probe_x)


def ground_truth(sc: Scenario, data: dict[str, Tensor]) -> dict[str, Any]:
    """Train ``horizon × T`` steps (and the linearized model alongside); measure the probe."""
    training = Training(sc, data)
    model = training.model
    probe_x = inputs(sc, data["x"][data["probe"]])
    horizon = sc.horizon * sc.steps
    fm = measurement_function(model)
    names = fm.names
    theta0 = {n: t.clone() for n, t in fm.params.items()}
    with torch.no_grad():
        f0 = fm(theta0, probe_x)
    K0 = probe_kernel(model, probe_x)
    lin = None
    if sc.linearized:
        lin = {n: t.clone().requires_grad_(True) for n, t in theta0.items()}
        lin_theta0 = [theta0[n] for n in names]
        lin_opt = make_optimizer(sc, list(lin.values()))
        train_fm = measurement_function(model)  # batch statistics: the function SGD sees

    def lin_logits(x: Tensor, grad: bool) -> Tensor:
        tangent = {n: lin[n] - theta0[n] for n in names}
        with torch.set_grad_enabled(grad):
            f_b, Jt = jvp(lambda p: train_fm(p, x), (theta0,), (tangent,))
        return f_b + Jt

    checkpoints = sorted({sc.steps, horizon} | {2**k for k in range(2, 20) if 2**k < horizon})
    rows = []
    for step in range(1, horizon + 1):
        x, y, _ = training.step()
        training.optimizer.step()
        if lin is not None:
            lin_opt.zero_grad()
            params = [lin[n] for n in names]
            loss = training.loss(lin_logits(x, True), y, params, lin_theta0)
            loss.backward()
            lin_opt.step()
        if step in checkpoints:
            fm_t = measurement_function(model)
            with torch.no_grad():
                f = fm_t(fm_t.params, probe_x)
            row = {"step": step, "logit_norm": float(logit_norm(f))}
            if lin is not None:
                f_lin = lin_logits(probe_x, False).detach()
                row["lin_gap"] = float((f - f_lin).norm() / (f - f0).norm().clamp_min(1e-12))
            if step in (sc.steps, horizon):
                row["relative_change"] = float(relative_change(probe_kernel(model, probe_x), K0))
            rows.append(row)
    return {"rows": rows, **classify(sc, data, rows)}


def classify(sc: Scenario, data: dict[str, Tensor], rows: list[dict]) -> dict[str, Any]:
    horizon = rows[-1]["step"]
    late = [(math.log2(r["step"]), r["logit_norm"]) for r in rows if r["step"] >= horizon / 4]
    slope = _slope(late)
    optimum = _optimum_norm(sc, data)
    past_optimum = not math.isfinite(optimum) or rows[-1]["logit_norm"] >= 1.5 * optimum
    diverging = slope >= SLOPE_DIVERGING and past_optimum
    at = {r["step"]: r for r in rows}
    rc_h = at[horizon].get("relative_change", math.nan)
    gap_h = at[horizon].get("lin_gap", math.nan)
    movement = max(v for v in (rc_h, gap_h) if math.isfinite(v))
    if diverging:
        label = "diverging"
    elif movement >= MOVES_MIN:
        label = "moves"
    elif movement < LAZY_MAX:
        label = "lazy"
    else:
        label = "drifts"
    theory = theory_condition(sc)
    return {
        "label": label,
        "theory": theory,
        "slope_at_horizon": slope,
        "optimum_norm": optimum,
        "logit_norm_at_horizon": rows[-1]["logit_norm"],
        "rc_at_T": at[sc.steps].get("relative_change", math.nan),
        "rc_at_horizon": rc_h,
        "lin_gap_at_T": at[sc.steps].get("lin_gap", math.nan),
        "lin_gap_at_horizon": gap_h,
    }


def theory_condition(sc: Scenario) -> str:
    if sc.lr == 0:
        return "frozen"
    if sc.targets != "hard":
        return "non-degenerate targets"
    if sc.reg != "none":
        return "L2 / weight decay"
    return "hard, no regularization"


def _optimum_norm(sc: Scenario, data: dict[str, Tensor]) -> float:
    if sc.targets == "hard":
        return math.nan
    probe = data["probe"]
    if sc.targets == "soft":
        f_star = optimal_logits(data["soft"][probe])
    else:
        f_star = optimal_logits(data["y"][probe], label_smoothing=sc.eps, num_classes=C)
    return float(f_star.norm(dim=1).mean())


def _slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return math.nan
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / var if var > 0 else math.nan


# ---------------------------------------------------------------------- monitored run


def monitored(sc: Scenario, data: dict[str, Tensor]) -> dict[str, Any]:
    """``T`` steps watched by the tracker (or by NTKMonitor in a Trainer)."""
    if sc.lightning:
        return monitored_lightning(sc, data)
    training = Training(sc, data)
    probe_x = inputs(sc, data["x"][data["probe"]])
    probe_y = targets(sc, data, data["probe"])
    tracker = NTKTracker(
        probe_x,
        probe_y,
        log_base=2,
        every_n_steps=sc.every_n_steps,
        per_layer=False,
        **tracker_setup(sc, training),
    )
    tracker.start(training.model)
    for step in range(1, sc.steps + 1):
        x, y, loss = training.step()
        if tracker.wants_observation:
            tracker.observe(training.model, x, y, loss, step=step)
        training.optimizer.step()
        if tracker.is_due(step):
            tracker.update(training.model, step)
    return _reports(tracker.history, tracker.setup)


def monitored_lightning(sc: Scenario, data: dict[str, Tensor]) -> dict[str, Any]:
    import logging

    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    training = Training(sc, data)  # the same model, optimizer and batches

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(sc.steps):
                yield training.next_batch()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = training.model

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y, label_smoothing=sc.eps)

        def configure_optimizers(self):
            return training.optimizer

    probe_x = inputs(sc, data["x"][data["probe"]])
    probe_y = targets(sc, data, data["probe"])
    monitor = NTKMonitor(
        probe_x=probe_x, probe_y=probe_y, log_base=2, every_n_steps=sc.every_n_steps
    )
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    trainer = pl.Trainer(
        max_steps=sc.steps,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = torch.utils.data.DataLoader(Batches(), batch_size=None)
        trainer.fit(Module(), loader)
    return _reports(monitor.history, monitor.tracker.setup)


def _reports(history: list[Any], setup: Any) -> dict[str, Any]:
    return {
        "setup": setup.describe(),
        "setup_short": _setup_short(setup),
        "predicted": history[-1].predicted_regime if history else "none",
        "reports": [
            {
                "step": r.step,
                "verdict": r.verdict,
                "causes": list(r.causes),
                "relative_change": r.relative_change,
                "logit_norm": r.logit_norm,
                "logit_gap": getattr(r, "logit_gap", math.nan),
                "linearization_error": r.linearization_error,
                "message": r.message,
            }
            for r in history
        ],
    }


def _setup_short(setup: Any) -> str:
    """``ε 0.1 inferred, λ 0 read``: each fact and the kind of its source."""

    def kind(key: str) -> str:
        source = setup.sources.get(key, "unknown")
        for word in ("declared", "inferred", "read", "unknown"):
            if source.startswith(word) or (word == "inferred" and "inferred" in source):
                return word
        return "read"

    eps = "?" if setup.label_smoothing is None else f"{setup.label_smoothing:.3g}"
    lam = "?" if setup.weight_decay is None else f"{setup.weight_decay:g}"
    return f"ε {eps} {kind('label_smoothing')}, λ {lam} {kind('weight_decay')}"


# ---------------------------------------------------------------------- scoring


def score(sc: Scenario, gt: dict[str, Any], mon: dict[str, Any]) -> dict[str, Any]:
    reports = mon["reports"]
    broken = [r["step"] for r in reports if r["verdict"] == "broken"]
    diverging = [r["step"] for r in reports if "logits diverging" in r["causes"]]
    readable = _first_readable(reports)
    false_alarm = []
    if gt["label"] == "lazy" and broken:
        false_alarm.append(f"broken at {broken[0]}")
    if gt["label"] != "diverging" and diverging:
        false_alarm.append(f"'logits diverging' at {diverging[0]}")
    missed = ""
    if gt["theory"] == "hard, no regularization" and gt["label"] == "diverging":
        if readable is None or not diverging or diverging[0] > readable:
            missed = f"not flagged by step {readable}"
    return {
        "first_broken": broken[0] if broken else None,
        "first_diverging": diverging[0] if diverging else None,
        "first_readable": readable,
        "false_alarm": "; ".join(false_alarm),
        "missed": missed,
    }


def _first_readable(reports: list[dict]) -> Optional[int]:
    steps = [r["step"] for r in reports]
    for i, s in enumerate(steps):
        window = [t for t in steps[: i + 1] if t >= max(100, s / 4)]
        if len(window) >= 2:
            return s
    return None


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | theory | ground truth (logit slope, rc, lin. gap at horizon) | "
        "set-up found | predicted | verdicts (step: verdict [causes]) | first broken | "
        "false alarm / miss |"
    )
    lines = [head, "|" + "---|" * 8]
    for res in results:
        sc, gt, mon, sco = res["scenario"], res["gt"], res["monitored"], res["score"]
        verdicts = ", ".join(
            f"{r['step']}: {r['verdict']}" + (f" [{'; '.join(r['causes'])}]" if r["causes"] else "")
            for r in _thin(mon["reports"])
        )
        truth = (
            f"**{gt['label']}** ({gt['slope_at_horizon']:+.2f}/doubling, "
            f"{_fmt(gt['rc_at_horizon'])}, {_fmt(gt['lin_gap_at_horizon'])}; "
            f"{sc['horizon']}×T)"
        )
        alarm = " ".join(x for x in (sco["false_alarm"], sco["missed"]) if x) or "none"
        lines.append(
            f"| {sc['name']} (T={sc['steps']}, lr {sc['lr']:g}) | {gt['theory']} | {truth} | "
            f"{mon['setup_short']} | {mon['predicted']} | {verdicts} | "
            f"{sco['first_broken'] or '–'} | {alarm} |"
        )
    return "\n".join(lines)


def _thin(reports: list[dict]) -> list[dict]:
    """Reports where the verdict or its causes change, and the last one."""
    out = []
    for r in reports:
        if not out or (r["verdict"], r["causes"]) != (out[-1]["verdict"], out[-1]["causes"]):
            out.append(r)
    if reports and out[-1] is not reports[-1]:
        out.append(reports[-1])
    return out


def _fmt(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.3g}"


# ---------------------------------------------------------------------- main


def run(
    scenarios: list[Scenario], fresh: bool, cache: Path, truth_only: bool = False
) -> list[dict[str, Any]]:
    data = load_data()
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    for sc in scenarios:
        path = cache / f"{sc.name}.gt.json"
        key = asdict(sc)
        t0 = time.perf_counter()
        gt = None
        if path.exists() and not fresh:
            stored = json.loads(path.read_text())
            if stored.get("scenario") == key:
                gt = stored["gt"]
        if gt is None:
            gt = ground_truth(sc, data)
            path.write_text(json.dumps({"scenario": key, "gt": gt}))
        t1 = time.perf_counter()
        if truth_only:
            print(f"{sc.name}: truth {gt['label']} ({t1 - t0:.0f} s)", flush=True)
            continue
        mon = monitored(sc, data)
        t2 = time.perf_counter()
        res = {"scenario": key, "gt": gt, "monitored": mon, "score": score(sc, gt, mon)}
        results.append(res)
        print(
            f"{sc.name}: truth {gt['label']}, verdicts "
            f"{[(r['step'], r['verdict'], r['causes']) for r in _thin(mon['reports'])]}, "
            f"score {res['score']} (ground truth {t1 - t0:.0f} s, monitored {t2 - t1:.0f} s)",
            flush=True,
        )
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="horizon 2×T, no width 2048")
    parser.add_argument("--full", action="store_true", help="horizon 8×T also at width 2048")
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    parser.add_argument("--fresh", action="store_true", help="recompute cached ground truths")
    parser.add_argument("--json", type=Path, help="write all results to this file")
    parser.add_argument("--cache", type=Path, default=RESULTS)
    parser.add_argument("--truth-only", action="store_true", help="only the ground truths")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scenarios = list(SCENARIOS)
    if args.only:
        unknown = set(args.only) - {s.name for s in scenarios}
        if unknown:
            parser.error(f"unknown scenarios {sorted(unknown)}")
        scenarios = [s for s in scenarios if s.name in args.only]
    if args.quick:
        scenarios = [replace(s, horizon=2) for s in scenarios if s.width < 2048]
    if args.full:
        scenarios = [replace(s, horizon=8) for s in scenarios]
    results = run(scenarios, args.fresh, args.cache, args.truth_only)
    if args.truth_only:
        return 0
    print()
    print(table(results))
    alarms = [r for r in results if r["score"]["false_alarm"] or r["score"]["missed"]]
    print(f"\n{len(results)} scenarios, {len(alarms)} with a false alarm or a miss.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 1 if alarms else 0


if __name__ == "__main__":
    raise SystemExit(main())
