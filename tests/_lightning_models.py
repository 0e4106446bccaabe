"""Small Lightning models and data for the tracker / callback tests, in both namespaces."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one thread (restored after): tiny models train faster so, and do
    not stall when the machine is busy. Test modules import it to make it apply."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(
    n: int = 48, d: int = 6, classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable Gaussian blobs: ``(n, d)`` float inputs and ``(n,)`` labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centers = 3.0 * torch.randn(classes, d, generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    return x, y


class DictDataset(Dataset):
    """Items are ``{"features": x, "label": y}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "label": self.y[i]}


def mlp(d: int = 6, width: int = 16, classes: int = 3, bn_dropout: bool = False) -> nn.Module:
    if bn_dropout:
        return nn.Sequential(
            nn.Linear(d, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(width, classes),
        )
    return nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, classes))


def module_class(namespace: str = "pytorch_lightning") -> type:
    """A LightningModule class of ``namespace`` wrapping :func:`mlp`."""
    pl = importlib.import_module(namespace)

    class Classifier(pl.LightningModule):
        def __init__(
            self,
            d: int = 6,
            width: int = 16,
            classes: int = 3,
            lr: float = 0.5,
            weight_decay: float = 0.0,
            label_smoothing: float = 0.0,
            bn_dropout: bool = False,
            dict_batches: bool = False,
            n: int = 48,
            batch_size: int = 16,
            momentum: float = 0.0,
            shuffle: bool = True,
        ) -> None:
            super().__init__()
            self.net = mlp(d, width, classes, bn_dropout)
            self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
            self.lr, self.weight_decay, self.momentum, self.shuffle = (
                lr,
                weight_decay,
                momentum,
                shuffle,
            )
            self.dict_batches, self.n, self.batch_size, self.d, self.classes = (
                dict_batches,
                n,
                batch_size,
                d,
                classes,
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if isinstance(batch, dict):
                x, y = batch["features"], batch["label"]
            else:
                x, y = batch
            return self.loss_fn(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(
                self.parameters(),
                lr=self.lr,
                weight_decay=self.weight_decay,
                momentum=self.momentum,
            )

        def train_dataloader(self) -> DataLoader:
            x, y = blobs(self.n, self.d, self.classes)
            data = DictDataset(x, y) if self.dict_batches else TensorDataset(x, y)
            return DataLoader(data, batch_size=self.batch_size, shuffle=self.shuffle)

    Classifier.__qualname__ = Classifier.__name__ = f"Classifier_{namespace.replace('.', '_')}"
    return Classifier


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Quiet, CPU-only Trainer arguments for tests."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        logger=False,
        max_steps=8,
    )
    kwargs.update(overrides)
    return kwargs


def nan_batch_module(nan_row: int, functional_loss: bool = False) -> type:
    """The test module whose training set (48 blobs, batches of 16 in order) holds one NaN.

    ``nan_row`` places it (row 20: the second batch); ``functional_loss`` trains with
    ``F.cross_entropy`` instead of the module's loss, so the smoothing is only inferred.
    """
    base = module_class("pytorch_lightning")

    class Model(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()
            if functional_loss:
                del self.loss_fn

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if not functional_loss:
                return super().training_step(batch, batch_idx)
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def train_dataloader(self) -> Any:
            x, y = blobs(48, 6, 3)
            x[nan_row, 2] = math.nan
            return torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False
            )

    return Model


def run_rank_script(script: str, args: list[str], out: Path, ranks: int) -> list[dict]:
    """Run ``script`` as rank 0 of a Lightning multi-process run; each rank's summary.

    Lightning starts the other ranks; each writes ``out/rank{r}.json``. The script runs
    from the repository root with one thread per process and four minutes at most.
    """
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, script, *args],
        cwd=root,
        env=env,
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
