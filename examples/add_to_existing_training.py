"""Add NTK monitoring to an existing Lightning training script: one line.

The script below is an ordinary digits classifier (scikit-learn's bundled 8×8 digits,
an MLP, Adam, a validation loop). The only change for monitoring is the line marked
``# <- the one added line``: ``NTKMonitor()`` draws a probe set from the training data,
logs ``ntk/*`` curves to every logger (TensorBoard here) and warns when training leaves
the kernel regime, with the reason.

    python examples/add_to_existing_training.py            # ~300 steps
    python examples/add_to_existing_training.py --fast     # a few steps (CI)
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ntk import NTKMonitor


class DigitsClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 256, lr: float = 1e-3, label_smoothing: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digits_loaders(batch_size: int = 64):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-6), dtype=torch.float32)
    y = torch.tensor(y)
    train, val = TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True),
        DataLoader(val, batch_size=256),
    )


def main(fast: bool = False) -> None:
    pl.seed_everything(0)
    train_loader, val_loader = digits_loaders()
    trainer = pl.Trainer(
        max_steps=6 if fast else 300,
        limit_val_batches=1 if fast else None,
        callbacks=[NTKMonitor()],  # <- the one added line
        enable_checkpointing=False,
        enable_progress_bar=not fast,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsClassifier(), train_loader, val_loader)

    # Everything below only checks that the example works (CI runs it).
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, NTKMonitor))
    report = monitor.history[-1]
    assert "ntk/relative_change" in trainer.callback_metrics
    print(
        f"step {report.step}: verdict {report.verdict} "
        f"(relative_change {report.relative_change:.3f}, predicted {report.predicted_regime})"
    )
    print(report.message)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps only (for CI)")
    main(parser.parse_args().fast)
