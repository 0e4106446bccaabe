"""Smoke test of the installed wheel, run by .ci/run in a fresh virtual environment.

    python .ci/wheel_smoke_test.py VENV

Run from outside the repository, so that only the installed package can be imported.
Checks: the import comes from the wheel (with ``py.typed``), the version, a monitor on a
few training steps with TensorBoard logs, the CLI's ``--help`` and ``--version``, and
``lightning-ntk report`` with the core dependencies only (no matplotlib).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path


def main(venv: Path) -> None:
    """Run every check against the package installed in `venv`."""
    import lightning_ntk

    package = Path(lightning_ntk.__file__).resolve().parent
    assert venv.resolve() in package.parents, f"imported {package}, not the wheel in {venv}"
    assert (package / "py.typed").is_file(), "py.typed is missing from the wheel"
    assert metadata.version("lightning-ntk") == lightning_ntk.__version__
    assert metadata.metadata("lightning-ntk")["License-Expression"] == "Apache-2.0"
    assert "Any" not in dir(lightning_ntk) and "NTKMonitor" in dir(lightning_ntk)
    print(f"lightning_ntk {lightning_ntk.__version__} from {package}")

    logdir = Path(tempfile.mkdtemp()) / "logs"
    monitor = _train(logdir)
    assert [r.step for r in monitor.history] == [2, 4, 6], monitor.history
    print(f"monitor: {len(monitor.history)} reports, last verdict {monitor.history[-1].verdict}")

    cli = [str(venv / "bin" / "lightning-ntk")]
    help_text = _run([*cli, "--help"]).stdout
    assert "demo" in help_text and "report" in help_text, help_text
    version = _run([*cli, "--version"]).stdout.strip()
    assert version == f"lightning-ntk {lightning_ntk.__version__}", version
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        report = _run([*cli, "report", str(logdir)]).stdout
        assert "at step 6" in report, report
        assert report.strip().splitlines()[-1].startswith("Figure: not drawn"), report
    else:
        raise AssertionError("matplotlib is not a core dependency; the venv should lack it")
    print("CLI: --help, --version and report (summary without matplotlib) work")


def _train(logdir: Path):
    import pytorch_lightning as pl
    import torch
    from torch import nn

    from lightning_ntk import NTKMonitor

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
            self.loss = nn.CrossEntropyLoss(label_smoothing=0.1)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x, y = torch.randn(48, 4), torch.arange(48) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    monitor = NTKMonitor(n_probe=6, every_n_steps=2, log_base=None)
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=pl.loggers.TensorBoardLogger(str(logdir), name="smoke"),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(), loader)
    return monitor


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]))
