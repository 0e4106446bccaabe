"""A small CNN with BatchNorm and dropout, monitored by NTKMonitor (offline, CPU).

Data: generated CIFAR-shaped tensors (3×32×32, 10 classes; each class is a fixed random
pattern plus noise), so nothing is downloaded. The monitor evaluates the network
functionally as training differentiates it — BatchNorm normalises with the probe's own
batch statistics, dropout is off (``normalization="running"`` would measure the eval-mode
function instead) — and never touches the training state (weights, BatchNorm buffers,
RNG streams).

It logs per-layer drift as ``ntk/layer/<module>/relative_change`` for the layers that
move most; the script prints them at the end.

    python examples/cnn_batchnorm.py          # ~200 steps
    python examples/cnn_batchnorm.py --fast   # a few steps (CI)
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ntk import NTKMonitor


def cifar_shaped_data(n: int = 1024, num_classes: int = 10, seed: int = 0):
    """``(x (n, 3, 32, 32), y (n,))``: class patterns plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, 3, 32, 32, generator=g)
    y = torch.randint(num_classes, (n,), generator=g)
    x = 0.5 * patterns[y] + torch.randn(n, 3, 32, 32, generator=g)
    return x, y


class SmallCNN(pl.LightningModule):
    def __init__(self, channels: int = 16, dropout: float = 0.2, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * c * 8 * 8, 10))
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, weight_decay=5e-4)


def main(fast: bool = False) -> None:
    pl.seed_everything(0)
    x, y = cifar_shaped_data(256 if fast else 1024)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    monitor = NTKMonitor(n_probe=10 if fast else 20, every_n_steps=50)
    trainer = pl.Trainer(
        max_steps=4 if fast else 200,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=not fast,
        log_every_n_steps=10,
    )
    model = SmallCNN(channels=8 if fast else 16)
    trainer.fit(model, loader)

    # Check and show what the monitor saw.
    report = monitor.history[-1]
    assert model.features[1].num_batches_tracked.item() == trainer.global_step  # BN trained
    print(f"step {report.step}: verdict {report.verdict}; {report.message}")
    layers = {
        name: value
        for name, value in monitor.tracker.scalars(report).items()
        if name.startswith("ntk/layer/") and name.endswith("/relative_change")
    }
    for name, value in sorted(layers.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<45} {value:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps only (for CI)")
    main(parser.parse_args().fast)
