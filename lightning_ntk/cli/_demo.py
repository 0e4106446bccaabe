"""``lightning-ntk demo``: the paper's headline on real data, watched by ``NTKMonitor``.

One network, four set-ups, each trained by a Lightning ``Trainer`` with SGD on
scikit-learn's bundled digits (1,797 8×8 images, 10 classes, standardised; a fixed
test split of 297 images) with :class:`~lightning_ntk.NTKMonitor` and a
``TensorBoardLogger`` attached:

1. hard one-hot targets, no regularization — the theory predicts diverging logits (the
   monitor's one alarm);
2. L2 regularization ``(λ/2)‖θ − θ0‖²`` — bounded logits, lazy at this width;
3. label smoothing ``ε`` — bounded logits, lazy at this width;
4. the set-up of (3) at a narrow width — bounded logits, but far from the wide limit: not
   lazy (feature learning, information rather than an alarm).

The networks are :class:`~lightning_ntk.testing.NTKMLP` (by default one hidden ReLU layer
of width 4096, or 64 for run 4; NTK parameterization, ``σ_w = √2``, ``σ_b = 0.1``),
whose kernel freezes as the width grows. Measured results for seeds 0–2 and the reasons
for these sizes: ``docs/demo.md``.

Regularization towards ``θ0`` rather than plain weight decay towards 0: in the NTK
parameterization ``‖θ0‖`` is ``√P``, so decay towards 0 strong enough to bound the logits
within the run (``lr·λ·steps ≳ 1``) also shrinks ``θ0`` itself and moves the kernel by
~100 % (see ``docs/demo.md``). The L2 strength is declared to the monitor with
``weight_decay=λ`` since the optimizer carries none.

Results: a table on stdout, TensorBoard logs under ``OUT/runs/<run>/seed_<seed>`` and
the figure ``OUT/ntk_demo.png`` (built from those logs by :mod:`lightning_ntk.cli._report`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

__all__ = ["DemoConfig", "RunResult", "RunSpec", "load_digits_split", "run_demo"]

_LIGHTNING_INFO_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)
N_TEST = 297  # fixed test split of the 1,797 digits
SPLIT_SEED = 0  # the split never changes with --seed


@dataclass(frozen=True)
class RunSpec:
    """One training set-up of the demo.

    Attributes:
        name: directory name of its logs (``runs/<name>/seed_<seed>``).
        title: short human description for the table and the figure.
        width: hidden width of the MLP.
        l2: ``λ`` of the loss term ``(λ/2)‖θ − θ0‖²``.
        label_smoothing: ``ε`` of ``nn.CrossEntropyLoss``.
    """

    name: str
    title: str
    width: int
    l2: float = 0.0
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and training hyper-parameters of the demo (defaults: the full demo).

    Attributes:
        width: hidden width of the wide networks (runs 1–3).
        narrow_width: hidden width of run 4.
        depth: hidden layers.
        lr: SGD learning rate (NTK parameterization tolerates ``O(1)`` rates).
        batch_size: minibatch size.
        steps: optimizer steps per run.
        n_probe: probe examples the monitor draws (stratified) from the training data.
        every_n_steps: monitor interval on top of its log-spaced schedule (4, 16, 64, …).
        l2: ``λ`` of run 2.
        label_smoothing: ``ε`` of runs 3 and 4.
        runs: the runs to train instead of the four above (see :meth:`with_runs`).
    """

    width: int = 4096
    narrow_width: int = 64
    depth: int = 1
    lr: float = 4.0
    batch_size: int = 64
    steps: int = 512
    n_probe: int = 40
    every_n_steps: int = 64
    l2: float = 0.003
    label_smoothing: float = 0.1
    runs: tuple[RunSpec, ...] = field(default=(), compare=False)

    @classmethod
    def fast(cls) -> DemoConfig:
        """A seconds-long smoke configuration (too short for meaningful verdicts)."""
        return cls(width=32, narrow_width=8, steps=8, n_probe=10, every_n_steps=4)

    def specs(self) -> tuple[RunSpec, ...]:
        """The four runs (or ``runs`` when given)."""
        if self.runs:
            return self.runs
        eps = self.label_smoothing
        return (
            RunSpec("1_hard_labels", "hard labels, no regularization", self.width),
            RunSpec("2_l2_regularization", f"L2 to init, λ={self.l2:g}", self.width, l2=self.l2),
            RunSpec("3_label_smoothing", f"label smoothing ε={eps:g}", self.width, 0.0, eps),
            RunSpec("4_narrow", f"label smoothing ε={eps:g}, narrow", self.narrow_width, 0.0, eps),
        )

    def with_runs(self, *runs: RunSpec) -> DemoConfig:
        """A copy that trains only ``runs``."""
        return replace(self, runs=tuple(runs))


@dataclass
class RunResult:
    """What one demo run produced.

    Attributes:
        spec: the set-up.
        report: the monitor's last :class:`~lightning_ntk.NTKReport`.
        history: every report, oldest first.
        test_accuracy: accuracy on the fixed test split.
        logdir: its TensorBoard directory.
        seconds: wall-clock time of the run.
        diagnosis: the monitor's account of the run (each regime with its steps).
    """

    spec: RunSpec
    report: Any
    history: list[Any]
    test_accuracy: float
    logdir: Path
    seconds: float
    diagnosis: str = ""


def load_digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardised digits ``(x_train (1500, 64), y_train, x_test (297, 64), y_test)``.

    Features are standardised with the training split's mean and standard deviation;
    the split is the same for every seed.
    """
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    x = torch.as_tensor(x_all, dtype=torch.float32)
    y = torch.as_tensor(y_all, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = order[:N_TEST], order[N_TEST:]
    mean = x[train].mean(dim=0)
    std = x[train].std(dim=0).clamp_min(1e-6)  # a few border pixels are constant
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def run_demo(
    config: DemoConfig,
    *,
    out: Path,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> list[RunResult]:
    """Train every run of ``config``, print the table, write logs and the figure.

    Args:
        config: sizes and hyper-parameters.
        out: output directory; logs go to ``out/runs``, the figure to ``out/ntk_demo.png``.
        device: a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).
        seed: seed of the initialisation and the data order.
        progress: show Lightning's progress bars (the command shows them only when its
            output is a terminal); each run ends with one line either way.

    Returns:
        One :class:`RunResult` per run, in order.
    """
    from ._report import load_run, plot_runs

    out = Path(out)
    data = load_digits_split()
    print(
        f"lightning-ntk demo: digits ({len(data[0])} train / {len(data[2])} test), "
        f"MLP {config.depth}×{config.width} (narrow: {config.narrow_width}), NTK "
        f"parameterization, SGD lr {config.lr:g}, batch {config.batch_size}, "
        f"{config.steps} steps, {config.n_probe} probe points, seed {seed}, {device}."
    )
    results = []
    print()
    for spec in config.specs():
        if progress:  # names the progress bar that follows
            print(f"[{spec.name}] {spec.title}, width {spec.width}", flush=True)
        result = _train(spec, config, data, out / "runs", device, seed, progress)
        results.append(result)
        print(
            f"[{spec.name}] {spec.title}, width {spec.width}: {config.steps} steps in "
            f"{result.seconds:.1f} s, verdict {result.report.verdict}",
            flush=True,
        )

    print()
    print(format_table(results))
    runs = [load_run(r.logdir, label=f"{r.spec.name}: {r.spec.title}") for r in results]
    figure = out / "ntk_demo.png"
    plot_runs(runs, figure, title=f"lightning-ntk demo (digits, seed {seed})")
    print(f"\nTensorBoard logs: {out / 'runs'}  (tensorboard --logdir {out / 'runs'})")
    print(f"Figure: {figure}")
    return results


def format_table(results: list[RunResult]) -> str:
    """The results table, then each run's last message and its regimes over time.

    Columns: set-up, predicted logits, verdict, drift, linearization error, logit growth,
    test accuracy.
    """
    header = (
        f"{'run':<21} {'width':>5} {'predicted':>9} {'verdict':>8} {'rel.change':>10} "
        f"{'lin.error':>9} {'logit growth':>12} {'test acc':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        rep = r.report
        lines.append(
            f"{r.spec.name:<21} {r.spec.width:>5} {rep.predicted_regime:>9} {rep.verdict:>8} "
            f"{rep.relative_change:>10.3f} {rep.linearization_error:>9.3f} "
            f"{rep.logit_growth:>12.2f} {r.test_accuracy:>8.3f}"
        )
    lines.append("")
    for r in results:
        causes = ", ".join(r.report.causes) or "none"
        lines.append(f"{r.spec.name} (step {r.report.step}; causes: {causes}):")
        lines.append(f"    {r.report.message}")
        lines.append(f"    The run: {r.diagnosis}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------- one run


def _train(
    spec: RunSpec,
    config: DemoConfig,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    runs_dir: Path,
    device: str,
    seed: int,
    progress: bool,
) -> RunResult:
    from pytorch_lightning.loggers import TensorBoardLogger

    from .. import NTKMonitor
    from ..testing import NTKMLP

    x_train, y_train, x_test, y_test = data
    logdir = runs_dir / spec.name / f"seed_{seed}"
    if logdir.exists():  # a re-run replaces its own logs instead of appending to them
        shutil.rmtree(logdir)

    start = time.perf_counter()
    torch.manual_seed(seed)
    network = NTKMLP(
        x_train.shape[1],
        spec.width,
        config.depth,
        10,
        parameterization="ntk",
        weight_std=math.sqrt(2.0),
        bias_std=0.1,
    )
    module = DigitsClassifier(network, config.lr, spec.l2, spec.label_smoothing)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train),
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    monitor = NTKMonitor(
        n_probe=config.n_probe,
        every_n_steps=config.every_n_steps,
        weight_decay=spec.l2,  # the L2 term lives in the loss, not in the optimizer
        seed=0,  # the same probe for every run and seed
    )
    accelerator, devices = _accelerator(device)
    with _quiet_lightning_info():
        trainer = pl.Trainer(
            max_steps=config.steps,
            accelerator=accelerator,
            devices=devices,
            logger=TensorBoardLogger(str(runs_dir), name=spec.name, version=f"seed_{seed}"),
            callbacks=[monitor],
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            log_every_n_steps=max(1, config.steps // 32),
            num_sanity_val_steps=0,
        )
    with warnings.catch_warnings(), _quiet_lightning_info():
        warnings.showwarning = _breakdown_on_one_line(warnings.showwarning)  # restored on exit
        # digits fit in memory: worker processes would only slow the demo down
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
        trainer.fit(module, loader)
    accuracy = module.accuracy(x_test, y_test)
    return RunResult(
        spec=spec,
        report=monitor.history[-1],
        history=list(monitor.history),
        test_accuracy=accuracy,
        logdir=logdir,
        seconds=time.perf_counter() - start,
        diagnosis=monitor.diagnosis,
    )


def _breakdown_on_one_line(show: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` printing the monitor's breakdown warning as one line."""
    from ..exceptions import LinearizationBreakdownWarning

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, LinearizationBreakdownWarning):
            print(message, file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


@contextlib.contextmanager
def _quiet_lightning_info() -> Iterator[None]:
    """Hide Lightning's start-up info lines (hardware summary, tips) for the demo's runs."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_INFO_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _accelerator(device: str) -> tuple[str, Any]:
    kind, _, index = device.partition(":")
    if kind == "cuda":
        return "gpu", [int(index)] if index else 1
    return kind, 1


class DigitsClassifier(pl.LightningModule):
    """A LightningModule: cross-entropy (optionally smoothed) plus ``(λ/2)‖θ − θ0‖²``, SGD.

    Args:
        network: the classifier ``(N, 64) → (N, 10)`` logits.
        lr: SGD learning rate.
        l2: ``λ`` of the L2 term towards the parameters at the start of training.
        label_smoothing: ``ε`` of ``nn.CrossEntropyLoss`` (read by the monitor).
    """

    def __init__(self, network: nn.Module, lr: float, l2: float, label_smoothing: float) -> None:
        super().__init__()
        self.network = network
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.lr = lr
        self.l2 = l2
        # a list from the start: its value changes no plain attribute of the module, so
        # the kernel engine's plan for the model stays valid when training starts
        self._theta0: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, 10)``."""
        return self.network(x)

    def on_train_start(self) -> None:
        """Snapshot ``θ0`` (on the training device) for the L2 term."""
        self._theta0 = [p.detach().clone() for p in self.network.parameters()]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Mean cross-entropy of the batch plus the L2 term."""
        x, y = batch
        loss = self.loss(self(x), y)
        if self.l2 > 0:
            assert self._theta0, "on_train_start takes θ0"
            sq = sum(
                ((p - p0) ** 2).sum() for p, p0 in zip(self.network.parameters(), self._theta0)
            )
            loss = loss + 0.5 * self.l2 * sq
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD (the theory is about gradient descent)."""
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Accuracy on ``(x, y)``, evaluated in eval mode on the module's device."""
        was_training = self.training
        self.eval()
        logits = self(x.to(self.device))
        self.train(was_training)
        return float((logits.argmax(dim=1).cpu() == y).float().mean())
