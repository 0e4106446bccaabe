"""The set-up as a Lightning run computes it: mixed precision, dropout, a one-logit head."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests._lightning_models import blobs, one_thread, trainer_kwargs  # noqa: F401


def _module(outputs: int = 3, dropout: float = 0.0, call: str = "self", smoothing: float = 0.0):
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Linear(6, 32), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            self.net = nn.Sequential(*layers, nn.Linear(32, outputs))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            if call == "self":
                logits = self(x)
            elif call == "net":  # a wrapped model, as a Hugging Face model is called
                logits = self.net(x)
            else:  # the layers one by one: no module call returns the logits
                logits = x
                for layer in self.net:
                    logits = layer(logits)
            if outputs == 1:
                return F.binary_cross_entropy_with_logits(logits.squeeze(1), y)
            return F.cross_entropy(logits, y, label_smoothing=smoothing)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.2)

        def train_dataloader(self) -> DataLoader:
            x, y = blobs(96, 6, 3)
            if outputs == 1:
                y = (y == 0).float()
            return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

    return Module()


def _fit(module, **kwargs):
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    pl.seed_everything(0, verbose=False)
    monitor = NTKMonitor(n_probe=9, log_base=2)
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_steps=12, **kwargs)).fit(module)
    return monitor.history[-1]


def test_bf16_mixed_hard_labels_are_identified_as_diverging():
    last = _fit(_module(), precision="bf16-mixed")
    assert "label smoothing 0 (inferred from the training loss" in last.setup, last.setup
    assert last.predicted_regime == "diverging"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dropout_is_observed_through_the_training_steps_own_logits(smoothing):
    last = _fit(_module(dropout=0.3, smoothing=smoothing))
    assert f"label smoothing {smoothing:g} (inferred from the training loss" in last.setup, (
        last.setup
    )
    assert last.predicted_regime == ("diverging" if smoothing == 0 else "bounded")


def test_dropout_the_observation_cannot_reproduce_is_named_and_left_unknown():
    last = _fit(_module(dropout=0.3, call="layers"))  # no module call returns the logits
    assert "label smoothing unknown" in last.setup and "dropout is active" in last.setup, last.setup
    assert last.predicted_regime == "unknown"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_wrapped_model_s_own_logits_are_observed_through_dropout(smoothing):
    """``training_step`` calls ``self.net(x)``, not ``self(x)`` (a Hugging Face model)."""
    last = _fit(_module(dropout=0.3, call="net", smoothing=smoothing))
    assert f"label smoothing {smoothing:g} (inferred from the training loss" in last.setup, (
        last.setup
    )
    assert last.predicted_regime == ("diverging" if smoothing == 0 else "bounded")


def test_a_hugging_face_output_s_logits_are_observed():
    """A wrapped model whose output carries ``logits`` and ``loss`` (``ModelOutput``)."""
    import types

    import pytorch_lightning as pl

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3))
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor, labels: Any = None) -> Any:
            logits = self.head(self.body(x))
            loss = None if labels is None else F.cross_entropy(logits, labels)
            return types.SimpleNamespace(logits=logits, loss=loss)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = Wrapped()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).logits

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return self.model(x, labels=y).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.2)

        def train_dataloader(self) -> DataLoader:
            x, y = blobs(96, 6, 3)
            return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

    last = _fit(Module())
    assert "label smoothing 0 (inferred from the training loss" in last.setup, last.setup
    assert last.predicted_regime == "diverging"


def test_a_one_logit_head_with_bce_is_a_binary_run():
    last = _fit(_module(outputs=1))
    assert last.setup.startswith("task binary (inferred from the training loss"), last.setup
    assert "float 0/1 probe labels" in last.setup
    assert last.predicted_regime == "diverging"
