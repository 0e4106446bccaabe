"""Verdict benchmark: does the monitor's verdict match what training really does?

Two groups of scenarios on scikit-learn's digits (standardised; vectors for MLPs, 1×8×8
images for the BatchNorm CNN):

* **conditions** cross the theory's conditions: hard targets / label smoothing in an
  ``nn.CrossEntropyLoss`` / smoothing given only to ``F.cross_entropy`` / soft targets; no
  regularization / SGD weight decay / AdamW / L2 towards θ0; NTK vs standard
  parameterization; wide vs narrow; MLP vs BatchNorm CNN; learning rate 0, moderate, large;
* **recipes** are set-ups people train with, each through a Lightning ``Trainer`` with
  ``NTKMonitor``: AdamW CNN and MLP (weight decay 0.01), mixup inside ``training_step``,
  L2 written into the loss beside an ``nn.CrossEntropyLoss`` module, distillation (KL only;
  ``0.5·KL + 0.5·CE``), focal loss, class-weighted cross-entropy,
  ``accumulate_grad_batches``, warm-up + cosine schedule with label smoothing,
  ``precision="bf16-mixed"``, binary one-logit BCE, multi-label BCE, 20 % label noise.

Each scenario is run twice from the same seed, on the same batches:

1. **monitored** — ``T`` steps with an :class:`~lightning_ntk.NTKTracker` in a plain loop
   (or ``NTKMonitor`` in a ``Trainer``), which reads the set-up as the monitor does
   (declared / read from the optimizer and loss module / inferred from the training
   loss) and reports on its schedule;
2. **ground truth** — ``horizon × T`` steps (8× by default) without the monitor (for the
   conditions, with the *linearized* model trained side by side on the same batches, loss
   and optimizer; Lee et al. 2019). Measured on the probe: the logit norm (centered for
   softmax outputs) and its slope per doubling of steps over the last two doublings of
   the horizon, the kernel's relative change and ``‖f_t − f^lin_t‖_F / ‖f_t − f_0‖_F``.

Ground truth: the logits are ``diverging`` when they still grow by ≥ 0.5 per doubling at
the horizon (past 1.5× the optimum the targets allow, when there is one), else
``bounded``; bounded runs are further ``moves`` when the kernel's relative change or the
linearization gap reach 0.5 by the horizon, ``lazy`` when both stay below 0.2, ``drifts``
in between. Acceptance: no alarm (the report ``on_breakdown`` acts on) and no "logits
diverging" on a run whose logits stay bounded, and every hard-label, unregularized run
whose logits diverge flagged "logits diverging" by the first report at which the trend is
readable (two reports at steps ≥ 100 within the last two doublings).

The monitor's API is read as it is: settings it does not take (``task=``) are left out
(a binary model's one logit ``z`` is then given as ``[0, z]`` through ``output_fn``, as
the monitor asks), and a report's ``regime`` is shown where it has one.

Usage::

    python benchmarks/bench_verdicts.py            # all scenarios
    python benchmarks/bench_verdicts.py --quick    # 2× horizons, no width 2048
    python benchmarks/bench_verdicts.py --group recipes
    python benchmarks/bench_verdicts.py --only cnn-bn-lr0 mlp-ntk-512-hard

Ground-truth runs are cached in ``benchmarks/results/verdicts/`` (one file per scenario and
horizon; ``--fresh`` redoes them), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import jvp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from _verdict_training import (
    C,
    Scenario,
    Training,
    inputs,
    load_data,
    make_optimizer,
    probe_indices,
    targets,
    teacher_model,
)

from lightning_ntk import NTKTracker, empirical_ntk
from lightning_ntk.kernel._functional import FunctionalModel
from lightning_ntk.kernel.batch_statistics import BatchStatisticsModel, batch_ntk
from lightning_ntk.metrics import relative_change
from lightning_ntk.theory import optimal_logits

RESULTS = Path(__file__).resolve().parent / "results" / "verdicts"
SLOPE_DIVERGING, LAZY_MAX, MOVES_MIN = 0.5, 0.2, 0.5
HARD_UNREGULARIZED = "hard, no regularization"
# report fields kept in the results (read with getattr: the report's fields are in flux)
NUMBERS = ("relative_change", "logit_norm", "logit_gap", "linearization_error")

# The theory's conditions, crossed: targets × regularization × parameterization × width ×
# architecture × learning rate.
CONDITIONS = (
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


def recipe(name: str, **changes: Any) -> Scenario:
    """A set-up people train with: a standard-parameterization MLP (width 256, SGD lr 0.05)
    on hard labels, through a Lightning ``Trainer`` with ``NTKMonitor``, unless changed."""
    base: dict[str, Any] = {
        "model": "mlp-sp",
        "width": 256,
        "targets": "hard",
        "lr": 0.05,
        "lightning": True,
        "linearized": False,
        "sigma_w": 1.0,
        "sigma_b": 0.1,
    }
    return Scenario(name, **{**base, **changes})


# The set-ups people train with, the loss written as a user's ``training_step`` would.
RECIPES = (
    recipe("adamw-cnn-bn", model="cnn-bn", width=16, reg="adamw", lr=1e-3, lam=0.01),
    recipe("adamw-mlp", reg="adamw", lr=1e-3, lam=0.01),
    recipe("mixup", loss="mixup"),
    recipe("l2-in-loss", reg="l2-loss", lam=0.05),
    recipe("distill-kl", loss="kd"),
    recipe("distill-kl-ce", loss="kd-ce"),
    recipe("focal", loss="focal"),
    recipe("class-weighted", loss="weighted-ce"),
    recipe("grad-accumulation", accumulate=4),
    recipe("warmup-cosine-ls", targets="ls-module", lr=0.1, schedule="warmup-cosine"),
    recipe("bf16-mixed", precision="bf16-mixed"),
    recipe("binary-bce", loss="bce", task="binary"),
    recipe("multilabel-bce", loss="bce", task="multilabel"),
    recipe("label-noise", label_noise=0.2),
)
SCENARIOS = CONDITIONS + RECIPES


# ---------------------------------------------------------------------- ground truth


def measurement_function(model: nn.Module) -> FunctionalModel:
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return BatchStatisticsModel(model)
    return FunctionalModel(model)


def probe_kernel(model: nn.Module, probe_x: Tensor) -> Tensor:
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return batch_ntk(model, probe_x)
    return empirical_ntk(model, probe_x)


def logit_size(sc: Scenario, f: Tensor) -> float:
    """Mean over the probe of the logits' norm: centered for softmax outputs ``(N, C)``;
    as they are for sigmoid outputs (binary, multi-label), whose margins are the logits.

    Defined here, not by the package's metrics, so that cached ground truths keep their
    meaning whatever units the monitor reports in."""
    if sc.task == "multiclass":
        return centered_norm(f)
    return float(f.norm(dim=1).mean())


def centered_norm(f: Tensor) -> float:
    """``mean_i ‖f_i − mean_a f_ia‖_2`` of logits ``(N, C)``."""
    return float((f - f.mean(dim=1, keepdim=True)).norm(dim=1).mean())


def ground_truth(sc: Scenario, data: dict[str, Any]) -> dict[str, Any]:
    """Train ``horizon × T`` steps (and the linearized model alongside); measure the probe."""
    horizon = sc.horizon * sc.steps
    training = Training(sc, data, total_steps=horizon)
    model = training.model
    probe_x = inputs(sc, data["x"][probe_indices(sc, data)])
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
        if lin is None:
            training.optimizer_step()
        else:  # plain SGD / AdamW on one batch, the linearized model on the same batch
            x, y, _ = training.step()
            training.optimizer.step()
            lin_opt.zero_grad()
            params = [lin[n] for n in names]
            loss = training.batch_loss(lambda x: lin_logits(x, True), x, y, params, lin_theta0)
            loss.backward()
            lin_opt.step()
        if step in checkpoints:
            fm_t = measurement_function(model)
            with torch.no_grad():
                f = fm_t(fm_t.params, probe_x)
            row = {"step": step, "logit_norm": logit_size(sc, f)}
            if lin is not None:
                f_lin = lin_logits(probe_x, False).detach()
                row["lin_gap"] = float((f - f_lin).norm() / (f - f0).norm().clamp_min(1e-12))
            if step in (sc.steps, horizon):
                row["relative_change"] = float(relative_change(probe_kernel(model, probe_x), K0))
            rows.append(row)
    return {"rows": rows, **classify(sc, data, rows)}


def classify(sc: Scenario, data: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
    """The ground truth of a long run's checkpoints (see the module's docstring)."""
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
    return {
        "label": label,
        "logits": "diverging" if diverging else "bounded",
        "theory": theory_condition(sc),
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
    if sc.targets != "hard" or sc.loss in ("kd", "kd-ce"):
        return "non-degenerate targets"
    if sc.reg != "none":
        return "L2 / weight decay"
    if sc.loss == "mixup":
        return "degenerate targets (mixup), no regularization"
    return HARD_UNREGULARIZED


def _optimum_norm(sc: Scenario, data: dict[str, Any]) -> float:
    """Mean centered norm over the probe of the logits' optimum (``nan``: none known)."""
    probe = probe_indices(sc, data)
    if sc.loss == "kd":  # softmax(f/τ) = softmax(t/τ): the teacher's logits
        with torch.no_grad():
            return centered_norm(teacher_model(data)(data["x"][probe]))
    if sc.targets == "hard" or sc.loss != "ce":
        return math.nan
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


def accepted(cls: Any, **settings: Any) -> dict[str, Any]:
    """The settings ``cls`` takes (by its signature): the monitor's API is in flux."""
    names = inspect.signature(cls).parameters
    return {k: v for k, v in settings.items() if k in names}


def monitor_settings(cls: Any, sc: Scenario, data: dict[str, Any]) -> dict[str, Any]:
    """Probe, schedule, and the task where the monitor takes one."""
    probe = probe_indices(sc, data)
    settings: dict[str, Any] = {
        "probe_x": inputs(sc, data["x"][probe]),
        "probe_y": targets(sc, data, probe),
        "log_base": 2,
        "every_n_steps": sc.every_n_steps,
    }
    if sc.task != "multiclass":
        settings.update(accepted(cls, task=sc.task))
    if sc.task == "binary" and "task" not in settings:
        settings["output_fn"] = binary_as_two_classes  # what the monitor asks for without it
    return settings


def binary_as_two_classes(z: Tensor) -> Tensor:
    """One logit ``z (N, 1)`` as the two-class logits ``[0, z] (N, 2)``: BCE on ``z`` is
    cross-entropy on ``[0, z]``."""
    return torch.cat([torch.zeros_like(z), z], dim=1)


def monitored(sc: Scenario, data: dict[str, Any]) -> dict[str, Any]:
    """``T`` steps watched by the tracker (or by NTKMonitor in a Trainer).

    Never raises: a monitor that fails is reported as such, with its error and warnings.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = monitored_lightning(sc, data) if sc.lightning else monitored_loop(sc, data)
        except Exception as err:
            out = {"error": f"{type(err).__name__}: {err}", "reports": [], "predicted": "–"}
            out["setup_short"] = "–"
    out["warnings"] = sorted(
        {
            str(w.message)
            for w in caught
            if type(w.message).__module__.startswith("lightning_ntk")
            and "Breakdown" not in type(w.message).__name__
        }
    )
    return out


def monitored_loop(sc: Scenario, data: dict[str, Any]) -> dict[str, Any]:
    training = Training(sc, data, total_steps=sc.steps)
    kwargs: dict[str, Any] = {"optimizer": training.optimizer, "per_layer": False}
    if training.uses_loss_module:
        kwargs["loss"] = training.loss_module
    if sc.reg == "l2-init":
        kwargs["weight_decay"] = sc.lam  # the L2 term lives in the loss: declared
    settings = monitor_settings(NTKTracker, sc, data)
    tracker = NTKTracker(settings.pop("probe_x"), settings.pop("probe_y"), **settings, **kwargs)
    tracker.start(training.model)
    for step in range(1, sc.steps + 1):
        x, y, loss = training.step()
        if tracker.wants_observation:
            tracker.observe(training.model, x, y, loss, step=step)
        training.optimizer.step()
        if tracker.is_due(step):
            tracker.update(training.model, step)
    return _reports(tracker.history, tracker.setup)


def monitored_lightning(sc: Scenario, data: dict[str, Any]) -> dict[str, Any]:
    import logging

    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    training = Training(sc, data, total_steps=sc.steps)  # the same model, optimizer, batches

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from training.micro_batches(sc.steps)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = training.model
            if training.uses_loss_module:  # where a user keeps the loss: found by the monitor
                self.criterion = training.loss_module
            if training.teacher is not None:
                self.teacher = training.teacher  # frozen

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return training.batch_loss(self, x, y)

        def configure_optimizers(self):
            if training.scheduler is None:
                return training.optimizer
            schedule = {"scheduler": training.scheduler, "interval": "step"}
            return {"optimizer": training.optimizer, "lr_scheduler": schedule}

    monitor = NTKMonitor(**monitor_settings(NTKMonitor, sc, data))
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    trainer = pl.Trainer(
        max_steps=sc.steps,
        accumulate_grad_batches=sc.accumulate,
        precision=sc.precision,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
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
                "verdict": getattr(r, "verdict", ""),
                "regime": getattr(r, "regime", None),
                "alarm": is_alarm(r),
                "causes": list(getattr(r, "causes", [])),
                "message": getattr(r, "message", ""),
                **{k: getattr(r, k, math.nan) for k in NUMBERS},
            }
            for r in history
        ],
    }


def is_alarm(report: Any) -> bool:
    """Whether the monitor raises its alarm at this report (what ``on_breakdown`` acts on)."""
    alarm = getattr(report, "alarm", None)
    if isinstance(alarm, bool):
        return alarm
    return getattr(report, "verdict", None) in ("broken", "alarm")


def _setup_short(setup: Any) -> str:
    """``ε 0.1 inferred, λ 0 read``: each fact and the kind of its source."""
    sources = getattr(setup, "sources", {})

    def kind(key: str) -> str:
        source = sources.get(key, "unknown")
        for word in ("declared", "inferred", "read", "unknown"):
            if source.startswith(word) or (word == "inferred" and "inferred" in source):
                return word
        return "read"

    eps, lam = getattr(setup, "label_smoothing", None), getattr(setup, "weight_decay", None)
    eps_text = "?" if eps is None else f"{eps:.3g}"
    lam_text = "?" if lam is None else f"{lam:g}"
    return f"ε {eps_text} {kind('label_smoothing')}, λ {lam_text} {kind('weight_decay')}"


# ---------------------------------------------------------------------- scoring


def score(sc: Scenario, gt: dict[str, Any], mon: dict[str, Any]) -> dict[str, Any]:
    """False alarms and misses of a monitored run against its ground truth.

    A false alarm is an alarm on a run whose logits stay bounded, or the cause "logits
    diverging" on such a run; a miss is a hard-label, unregularized run whose logits
    diverge, already by ``T`` (slope ≥ 0.5 per doubling over ``[T/4, T]`` in the ground
    truth), and whose first "logits diverging" comes later than the first report at which
    the trend is readable (or never).
    """
    reports = mon["reports"]
    slope_at_T = _slope(
        [
            (math.log2(r["step"]), r["logit_norm"])
            for r in gt["rows"]
            if sc.steps / 4 <= r["step"] <= sc.steps
        ]
    )
    alarms = [r["step"] for r in reports if r["alarm"]]
    diverging = [r["step"] for r in reports if _says_diverging(r)]
    readable = _first_readable(reports)
    bounded = gt.get("logits", "diverging" if gt["label"] == "diverging" else "bounded")
    false_alarm = []
    if bounded == "bounded" and alarms:
        false_alarm.append(f"alarm at {alarms[0]}")
    if bounded == "bounded" and diverging:
        false_alarm.append(f"'logits diverging' at {diverging[0]}")
    missed = ""
    after_T = slope_at_T < SLOPE_DIVERGING  # the divergence starts after the monitored steps
    if gt["theory"] == HARD_UNREGULARIZED and bounded == "diverging" and not after_T:
        if readable is None or not diverging or diverging[0] > readable:
            missed = f"not flagged by step {readable}" if readable else "no readable trend"
    if mon.get("error"):
        missed = missed or "monitor failed"
    return {
        "alarms": alarms,
        "first_alarm": alarms[0] if alarms else None,
        "first_diverging": diverging[0] if diverging else None,
        "first_readable": readable,
        "slope_at_T": slope_at_T,
        "false_alarm": "; ".join(false_alarm),
        "missed": missed,
    }


def _says_diverging(report: dict[str, Any]) -> bool:
    regime = str(report.get("regime") or "")
    return "logits diverging" in report["causes"] or "diverg" in regime


def _first_readable(reports: list[dict]) -> Optional[int]:
    steps = [r["step"] for r in reports]
    for i, s in enumerate(steps):
        window = [t for t in steps[: i + 1] if t >= max(100, s / 4)]
        if len(window) >= 2:
            return s
    return None


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | theory | ground truth: logits (slope per doubling; rc at horizon) | "
        "set-up found | predicted | reports (step: state [causes]) | alarms at | "
        "trend readable at | false alarm / miss |"
    )
    lines = [head, "|" + "---|" * 9]
    for res in results:
        sc, gt, mon, sco = res["scenario"], res["gt"], res["monitored"], res["score"]
        timeline = mon.get("error") or ", ".join(
            f"{r['step']}: {_state(r)}" + (f" [{'; '.join(r['causes'])}]" if r["causes"] else "")
            for r in _thin(mon["reports"])
        )
        logits = gt.get("logits", "diverging" if gt["label"] == "diverging" else "bounded")
        truth = (
            f"**{logits}** ({sco['slope_at_T']:+.2f} at T, {gt['slope_at_horizon']:+.2f} at "
            f"{sc['horizon']}×T; {_fmt(gt['rc_at_horizon'])})"
        )
        alarm = " ".join(x for x in (sco["false_alarm"], sco["missed"]) if x) or "none"
        lines.append(
            f"| {sc['name']} (T={sc['steps']}, lr {sc['lr']:g}) | {gt['theory']} | {truth} | "
            f"{mon['setup_short']} | {mon['predicted']} | {timeline} | "
            f"{_steps(sco['alarms'])} | {sco['first_readable'] or '–'} | {alarm} |"
        )
    return "\n".join(lines)


def _state(report: dict[str, Any]) -> str:
    """The report's regime where the monitor gives one (with its verdict), else the verdict."""
    if report.get("regime"):
        return (
            f"{report['regime']} ({report['verdict']})" if report["verdict"] else report["regime"]
        )
    return report["verdict"]


def _steps(steps: list[int]) -> str:
    if not steps:
        return "–"
    if len(steps) > 3:
        return f"{steps[0]}, {steps[1]}, …, {steps[-1]}"
    return ", ".join(str(s) for s in steps)


def _thin(reports: list[dict]) -> list[dict]:
    """Reports where the state or its causes change, and the last one."""
    out: list[dict] = []
    for r in reports:
        key = (r["verdict"], r.get("regime"), r["causes"])
        if not out or key != (out[-1]["verdict"], out[-1].get("regime"), out[-1]["causes"]):
            out.append(r)
    if reports and out[-1] is not reports[-1]:
        out.append(reports[-1])
    return out


def _fmt(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.3g}"


# ---------------------------------------------------------------------- main


def cache_path(cache: Path, sc: Scenario) -> Path:
    """One file per scenario and horizon (the quick and the default runs keep theirs)."""
    return cache / f"{sc.name}.{sc.horizon}x.gt.json"


def run(
    scenarios: list[Scenario], fresh: bool, cache: Path, truth_only: bool = False
) -> list[dict[str, Any]]:
    data = load_data()
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    for sc in scenarios:
        path = cache_path(cache, sc)
        key = asdict(sc)
        t0 = time.perf_counter()
        gt = None
        if path.exists() and not fresh:
            stored = json.loads(path.read_text())
            if stored.get("scenario") == key:
                gt = stored["gt"]
        if gt is None:
            gt = ground_truth(sc, data)
            path.write_text(json.dumps({"scenario": key, "gt": gt}, indent=0) + "\n")
        t1 = time.perf_counter()
        if truth_only:
            print(
                f"{sc.name}: truth {gt['logits']} logits ({gt['label']}, slope "
                f"{gt['slope_at_horizon']:+.2f}) ({t1 - t0:.0f} s)",
                flush=True,
            )
            continue
        mon = monitored(sc, data)
        t2 = time.perf_counter()
        res = {"scenario": key, "gt": gt, "monitored": mon, "score": score(sc, gt, mon)}
        results.append(res)
        states = [(r["step"], _state(r), r["causes"]) for r in _thin(mon["reports"])]
        print(
            f"{sc.name}: truth {gt['logits']} logits ({gt['label']}), reports "
            f"{mon.get('error') or states}, score {res['score']} "
            f"(ground truth {t1 - t0:.0f} s, monitored {t2 - t1:.0f} s)",
            flush=True,
        )
        for message in mon["warnings"]:
            print(f"    warning: {message}", flush=True)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="horizon 2×T, no width 2048")
    parser.add_argument("--full", action="store_true", help="horizon 8×T also at width 2048")
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    parser.add_argument(
        "--group", choices=("conditions", "recipes"), help="only the theory's conditions / "
        "only the set-ups people train with"
    )  # fmt: skip
    parser.add_argument("--fresh", action="store_true", help="recompute cached ground truths")
    parser.add_argument("--json", type=Path, help="write all results to this file")
    parser.add_argument("--cache", type=Path, default=RESULTS)
    parser.add_argument("--truth-only", action="store_true", help="only the ground truths")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scenarios = list({"conditions": CONDITIONS, "recipes": RECIPES}.get(args.group, SCENARIOS))
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
    for title, group in (("conditions", CONDITIONS), ("recipes", RECIPES)):
        names = {s.name for s in group}
        part = [r for r in results if r["scenario"]["name"] in names]
        if part:
            print(f"\n{title}:\n")
            print(table(part))
    false_alarms = [r for r in results if r["score"]["false_alarm"]]
    misses = [r for r in results if r["score"]["missed"]]
    print(
        f"\n{len(results)} scenarios: {len(false_alarms)} with a false alarm, "
        f"{len(misses)} with a miss."
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 1 if false_alarms or misses else 0


if __name__ == "__main__":
    raise SystemExit(main())
