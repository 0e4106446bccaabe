"""Train a digits classifier with ``LightningCLI``; the NTK monitor comes from the YAML config.

    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml
    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml \\
        --trainer.max_steps 4          # a smoke run

The callback is ``lightning_ntk.lightning.NTKMonitor`` (the ``lightning.pytorch`` twin of
``lightning_ntk.NTKMonitor``) with its arguments under ``init_args`` — see config.yaml.
Any argument of the callback can be overridden on the command line, e.g.
``--trainer.callbacks.init_args.n_probe 16``.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from lightning.pytorch.cli import LightningCLI
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsMLP(L.LightningModule):
    """A two-hidden-layer MLP for the 8×8 digits.

    Args:
        width: hidden width.
        lr: SGD learning rate.
        weight_decay: SGD weight decay (read by the monitor for the predicted regime).
        label_smoothing: label smoothing of the cross-entropy (read by the monitor).
    """

    def __init__(
        self,
        width: int = 512,
        lr: float = 0.05,
        weight_decay: float = 0.0,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )


class DigitsData(L.LightningDataModule):
    """scikit-learn's bundled digits, standardised (no download).

    Args:
        batch_size: training batch size.
    """

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        self.train_set = TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


def main(args=None) -> None:
    cli = LightningCLI(DigitsMLP, DigitsData, args=args, save_config_kwargs={"overwrite": True})
    # Show what the monitor concluded (and fail loudly if it never reported).
    if cli.subcommand == "fit":
        monitor = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "NTKMonitor")
        report = monitor.history[-1]
        print(f"step {report.step}: verdict {report.verdict}; {report.message}")


if __name__ == "__main__":
    main()
