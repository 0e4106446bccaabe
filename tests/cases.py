"""The registry of model cases every kernel method is tested on.

Each case builds a small, seeded model in float64 and its probe inputs; ``structured``
lists the parameters the structured method must handle without falling back (so a
silent fallback, which would still be exact, is caught as a regression).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn


@dataclass
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    make_x: Callable[[int, torch.Generator], Tensor]
    output_fn: Optional[Callable] = None
    structured: set[str] = field(default_factory=set)
    fallback: set[str] = field(default_factory=set)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        model = self.build()
        model(self.make_x(2, torch.Generator().manual_seed(99)))  # materialise lazy modules
        return model.double()

    def inputs(self, n: int, seed: int = 0) -> Tensor:
        x = self.make_x(n, torch.Generator().manual_seed(seed))
        return x.double() if x.is_floating_point() else x


def _randn(*shape: int) -> Callable[[int, torch.Generator], Tensor]:
    return lambda n, g: torch.randn(n, *shape, generator=g)


def _tokens(vocab: int, length: int) -> Callable[[int, torch.Generator], Tensor]:
    return lambda n, g: torch.randint(0, vocab, (n, length), generator=g)


class _CNNBatchNorm(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(4, 6, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 3 * 3, 5),
        )
        bn = self[1]
        with torch.no_grad():  # non-trivial running statistics, as after training
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)


class _TextClassifier(nn.Module):
    """Embedding + LayerNorm + per-token Linear, mean-pooled."""

    def __init__(self, vocab: int = 13, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.norm(self.embed(tokens))))  # (N, T, D)
        return self.head(h.mean(dim=1))


class _TiedWeights(nn.Module):
    """Input embedding tied to the output layer, and one block applied twice."""

    def __init__(self, vocab: int = 9, dim: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight
        self.final = nn.Linear(vocab, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens).mean(dim=1)
        h = torch.tanh(self.block(torch.tanh(self.block(h))))
        return self.final(self.out(h))


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.GELU())
        self.head = nn.Linear(8, 3)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class _DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 7), nn.Softplus())
        self.classifier = nn.Linear(7, 3)
        self.aux = nn.Linear(7, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.body(x)
        return {"logits": self.classifier(h), "aux": self.aux(h)}


class _CustomScale(nn.Module):
    """A parameter used outside any supported module (a learned output temperature)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.log_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.log_scale.exp()


class _OutsideCall(nn.Module):
    """A Linear whose weight is also used directly, outside the module's own call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x)) + x @ self.fc.weight.T
        return self.head(h)


CASES = [
    ModelCase(
        "mlp",
        lambda: nn.Sequential(
            nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
        ),
        _randn(5),
        structured={"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"},
    ),
    ModelCase(
        "cnn_batchnorm",
        _CNNBatchNorm,
        _randn(3, 8, 8),
        structured={
            "0.weight",
            "0.bias",
            "1.weight",
            "1.bias",
            "4.weight",
            "4.bias",
            "7.weight",
            "7.bias",
        },
    ),
    ModelCase(
        "conv1d",
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, padding="same", dilation=2),
            nn.ReLU(),
            nn.Conv1d(4, 4, 3, stride=2, groups=2, bias=False),
            nn.GroupNorm(2, 4),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        _randn(2, 11),
        structured={"0.weight", "0.bias", "2.weight", "3.weight", "3.bias", "5.weight", "5.bias"},
    ),
    ModelCase(
        "conv3d",
        lambda: nn.Sequential(
            nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)),
            nn.BatchNorm3d(3),
            nn.Tanh(),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        _randn(2, 4, 5, 4),
        structured={"0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"},
    ),
    ModelCase(
        "text_embedding_layernorm",
        _TextClassifier,
        _tokens(13, 7),
        structured={
            "embed.weight",
            "norm.weight",
            "norm.bias",
            "mix.weight",
            "mix.bias",
            "head.weight",
            "head.bias",
        },
    ),
    ModelCase(
        "tied_and_reused",
        _TiedWeights,
        _tokens(9, 4),
        structured={"final.weight", "final.bias"},
        fallback={"embed.weight", "block.weight", "block.bias"},
    ),
    ModelCase(
        "frozen_backbone",
        _Frozen,
        _randn(6),
        structured={"head.weight", "head.bias"},
    ),
    ModelCase(
        "dict_output",
        _DictOutput,
        _randn(4),
        output_fn=lambda out: out["logits"],
        structured={
            "body.0.weight",
            "body.0.bias",
            "classifier.weight",
            "classifier.bias",
            "aux.weight",
            "aux.bias",
        },
    ),
    ModelCase(
        "custom_parameter",
        _CustomScale,
        _randn(4),
        structured={"fc.weight", "fc.bias"},
        fallback={"log_scale"},
    ),
    ModelCase(
        "used_outside_call",
        _OutsideCall,
        _randn(4),
        structured={"fc.bias", "head.weight", "head.bias"},
        fallback={"fc.weight"},
    ),
    ModelCase(
        "bias_free_linear",
        lambda: nn.Linear(6, 4, bias=False),
        _randn(6),
        structured={"weight"},
    ),
]

CASES_BY_NAME = {case.name: case for case in CASES}
