"""The registry of model cases every kernel method is tested on.

Each case builds a small, seeded model in float64 and its probe inputs (a tensor, or a
mapping of tensors for Hugging Face models); ``structured`` lists the parameters the
structured method must handle without falling back (so a silent fallback, which would
still be exact, is caught as a regression) and ``fallback`` those it must hand to
per-example Jacobians; both may hold ``fnmatch`` patterns (``structured`` then means
the matches not in ``fallback``).

``CASES`` also hold the models that break a cached plan (a layer run a data-dependent
number of times, with probes that do and do not trigger it), ``nn.EmbeddingBag`` (dense
and with sparse gradients), sparse embeddings and a ``torch.compile``d model.

``ARCHITECTURES`` are the architectures people train (Transformer encoders with their
fused fast path, a ViT, LSTM / GRU, tied embeddings, weight / spectral norm, depthwise
conv + squeeze-excitation, SDPA attention, a Hugging Face BERT classifier when
``transformers`` is installed) and the models whose layers see batch-free inputs
(position-index buffers, ``arange``, a learned positional parameter, a layer called on
a constant), which the structured method must not factorise per example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from lightning_ntk.kernel._inputs import call, map_tensors


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
        call(model, self.make_x(2, torch.Generator().manual_seed(99)))  # lazy modules
        return model.double()

    def inputs(self, n: int, seed: int = 0) -> Any:
        x = self.make_x(n, torch.Generator().manual_seed(seed))
        return map_tensors(x, lambda t: t.double() if t.is_floating_point() else t)


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


class _DataDependentDepth(nn.Module):
    """A layer run a second time on the examples whose first feature is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x))
        deeper = x[:, 0] > 0
        if bool(deeper.any()):  # fc runs twice in this forward pass
            h = torch.where(deeper[:, None], torch.tanh(self.fc(h)), h)
        return self.head(h)


class _SharedBlockLoop(nn.Module):
    """A weight-shared block applied as many times as the batch's deepest example needs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.block = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        steps = 1 + (x[:, 0] > 0).long() + (x[:, 1] > 1).long()  # 1 to 3 per example
        for k in range(int(steps.max())):  # a data-dependent number of calls
            h = torch.where((steps > k)[:, None], torch.tanh(self.block(h)), h)
        return self.head(h)


def _shallow_then_deep(n: int, g: torch.Generator) -> Tensor:
    """Probes whose first four examples take the shallow path and the others deeper ones.

    For :class:`_SharedBlockLoop`: one step for the first four, then two and three
    alternately.
    """
    x = torch.randn(n, 4, generator=g)
    index = torch.arange(n)
    x[:, 0] = torch.where(index < 4, -x[:, 0].abs(), x[:, 0].abs() + 0.1)
    x[:, 1] = torch.where((index >= 4) & (index % 2 == 1), x[:, 1].abs() + 1.1, -x[:, 1].abs())
    return x


class _BagOfWords(nn.Module):
    """``nn.EmbeddingBag`` (mean of the token vectors) and a linear classifier."""

    def __init__(self, sparse: bool = False, vocab: int = 12, dim: int = 5) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean", sparse=sparse)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bag(tokens)))


class _SparseEmbeddings(nn.Module):
    """``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)`` side by side."""

    def __init__(self, vocab: int = 12, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, sparse=True)
        self.bag = nn.EmbeddingBag(vocab, dim, mode="sum", sparse=True)
        self.head = nn.Linear(2 * dim, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.cat([self.embed(tokens).mean(dim=1), self.bag(tokens)], dim=1)
        return self.head(torch.tanh(h))


class _NTKLinear(nn.Module):
    """An NTK-parameterized layer: ``F.linear(x, w · σ_w/√K, b · σ_b)``."""

    def __init__(self, features: int, out: int, sigma_w: float = 1.4, sigma_b: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, features))
        self.bias = nn.Parameter(torch.randn(out))
        self.sigma_w, self.sigma_b = sigma_w / features**0.5, sigma_b

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.sigma_w, self.sigma_b * self.bias)


def _ntk_functional_mlp() -> nn.Module:
    return nn.Sequential(
        _NTKLinear(5, 16), nn.Tanh(), _NTKLinear(16, 16), nn.ReLU(), _NTKLinear(16, 4)
    )


class _FunctionalCNN(nn.Module):
    """Convolutions and a head written as calls: ``F.conv2d`` (scaled, strided, grouped),
    ``F.conv1d`` with ``padding="same"`` and dilation, ``F.linear`` with ``w / c``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b1 = nn.Parameter(0.1 * torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(6, 2, 3, 3))
        self.w3 = nn.Parameter(torch.randn(3, 6, 3))
        self.b3 = nn.Parameter(0.1 * torch.randn(3))
        self.head = nn.Parameter(torch.randn(5, 3 * 9))
        self.register_buffer("gain", torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(F.conv2d(x, self.w1 * self.gain, self.b1, padding=1))  # (N, 4, 8, 8)
        h = torch.relu(F.conv2d(h, self.w2 / 6.0, stride=2, groups=2))  # (N, 6, 3, 3)
        h = F.conv1d(h.flatten(2), self.w3, self.b3, padding="same", dilation=2)  # (N, 3, 9)
        return F.linear(torch.tanh(h).flatten(1), self.head / 27**0.5)


class _LinearAndCallTied(nn.Module):
    """An ``nn.Linear`` whose weight ``F.linear`` uses again, elsewhere in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x))
        return self.head(torch.tanh(F.linear(h, self.fc.weight * 0.5)))


class _CallTwice(nn.Module):
    """One weight used by two ``F.linear`` calls (one of them scaled)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.b = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(F.linear(x, self.w, self.b))
        return self.head(torch.tanh(F.linear(h, 0.5 * self.w, self.b)))


class _CallDataDependentDepth(nn.Module):
    """``F.linear`` on one weight run a second time on the examples with a positive feature."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(F.linear(x, self.w / 2.0))
        deeper = x[:, 0] > 0
        if bool(deeper.any()):
            h = torch.where(deeper[:, None], torch.tanh(F.linear(h, self.w / 2.0)), h)
        return self.head(h)


class _LearnedGain(nn.Module):
    """``F.linear(x, w * g)`` with ``g`` a learned scalar: ``w``'s factors scale by ``g``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.b = nn.Parameter(torch.randn(3))
        self.gain = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w * self.gain, self.b)


class _MatmulLayers(nn.Module):
    """Layers as products: ``x @ (w1 / √K).T + b1``, ``torch.matmul(h, w2.t())``, ``h @ w3``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 5))
        self.b1 = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(6, 6))
        self.w3 = nn.Parameter(torch.randn(6, 3))  # stored (K, D)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ (self.w1 / 5**0.5).T + self.b1)  # (N, T, 6)
        h = torch.relu(torch.matmul(h, self.w2.t()))
        return (h @ self.w3).mean(dim=1)


def _compiled_mlp() -> nn.Module:
    """A ``torch.compile``d MLP (the eager backend: compiling for real is slow on CPU)."""
    mlp = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    return torch.compile(mlp, backend="eager")


# ------------------------------------------------------------- architectures people train
class _Transformer(nn.Module):
    """Token embedding + ``nn.TransformerEncoder`` (fused fast path in eval mode)."""

    def __init__(self, norm_first: bool = False, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(
            dim, 2, 16, dropout=0.1, batch_first=True, norm_first=norm_first,
            activation="gelu" if norm_first else "relu",
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class _ViT(nn.Module):
    """Patch embedding, cls token and positional ``nn.Parameter``s, a Transformer layer."""

    def __init__(self, dim: int = 8, patch: int = 4, image: int = 8) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, dim, patch, stride=patch)
        count = (image // patch) ** 2
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.1 * torch.randn(1, count + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, images: Tensor) -> Tensor:
        h = self.patches(images).flatten(2).transpose(1, 2)  # (N, T, D)
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1) + self.pos
        return self.head(self.norm(self.encoder(h)[:, 0]))


class _RNNClassifier(nn.Module):
    """Embedding + LSTM / GRU, the last hidden state classified."""

    def __init__(self, kind: str, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = getattr(nn, kind)(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


class _TiedGRU(nn.Module):
    """A GRU language-model head whose output layer is tied to the input embedding."""

    def __init__(self, vocab: int = 7, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.out(out[:, -1])


def _weight_norm_mlp() -> nn.Module:
    return nn.Sequential(
        parametrizations.weight_norm(nn.Linear(5, 8)), nn.Tanh(),
        parametrizations.weight_norm(nn.Linear(8, 3), dim=1),
    )  # fmt: skip


def _spectral_norm_mlp() -> nn.Module:
    return nn.Sequential(
        parametrizations.spectral_norm(nn.Linear(5, 8)), nn.Tanh(), nn.Linear(8, 3)
    )


class _DepthwiseSE(nn.Module):
    """Pointwise, depthwise conv + BatchNorm + SiLU, squeeze-and-excitation, head."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, channels, 1)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.squeeze = nn.Linear(channels, 2)
        self.excite = nn.Linear(2, channels)
        self.head = nn.Linear(channels, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.bn(self.depthwise(self.expand(x))))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean(dim=(2, 3))))))
        h = h * gate[:, :, None, None]
        return self.head(h.mean(dim=(2, 3)))


class _PositionBuffer(nn.Module):
    """Position embeddings looked up from a ``(1, T)`` index buffer (as Hugging Face BERT)."""

    def __init__(self, vocab: int = 9, length: int = 5, dim: int = 6) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)
        self.register_buffer("position_ids", torch.arange(length)[None], persistent=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tokens(tokens) + self.positions(self.position_ids[:, : tokens.shape[1]])
        return self.head(torch.tanh(self.norm(h)).mean(dim=1))


class _PositionArange(nn.Module):
    """``nn.Embedding(T, d)(arange(T)[None])`` added to token embeddings."""

    def __init__(self, vocab: int = 9, length: int = 5, dim: int = 6) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        h = torch.tanh(self.mix(self.tokens(tokens) + self.positions(positions)))
        return self.head(h.mean(dim=1))


class _BatchFree(nn.Module):
    """A learned positional ``nn.Parameter`` and a Linear called on a constant buffer."""

    def __init__(self, features: int = 4, length: int = 3, dim: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(features, dim)
        self.pos = nn.Parameter(0.3 * torch.randn(1, length, dim))
        self.register_buffer("const", torch.linspace(-1, 1, 2 * length).view(1, length, 2))
        self.from_const = nn.Linear(2, dim)  # its input has no batch dimension
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x) + self.pos + self.from_const(self.const))
        return self.head(h.mean(dim=1))


class _SDPAttention(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention`` (flash kernel on CPU)."""

    def __init__(self, features: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(features, 3 * dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)  # (N, h, T, d)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(h.transpose(1, 2).flatten(2).mean(dim=1))


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=23, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def _bert_inputs(n: int, g: torch.Generator) -> dict[str, Tensor]:
    length = 6
    ids = torch.randint(1, 23, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask  # padding token 0 after each sequence
    types = (torch.arange(length)[None] >= 3).long().expand(n, -1).clone()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


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
    ModelCase(  # the plan (first four examples) sees one call; later probes run fc twice
        "data_dependent_depth",
        _DataDependentDepth,
        _shallow_then_deep,
        structured={"fc.weight", "fc.bias", "head.weight", "head.bias"},
    ),
    ModelCase(
        "shared_block_loop",
        _SharedBlockLoop,
        _shallow_then_deep,
        structured={"inp.weight", "inp.bias", "block.weight", "block.bias", "head.*"},
    ),
    ModelCase(
        "embedding_bag",
        _BagOfWords,
        _tokens(12, 5),
        structured={"head.weight", "head.bias"},
        fallback={"bag.weight"},
    ),
    ModelCase(
        "embedding_bag_sparse",
        lambda: _BagOfWords(sparse=True),
        _tokens(12, 5),
        structured={"head.weight", "head.bias"},
        fallback={"bag.weight"},
    ),
    ModelCase(
        "sparse_embeddings",
        _SparseEmbeddings,
        _tokens(12, 4),
        structured={"embed.weight", "head.weight", "head.bias"},
        fallback={"bag.weight"},
    ),
    ModelCase(
        "ntk_functional_mlp",
        _ntk_functional_mlp,
        _randn(5),
        structured={"*"},
    ),
    ModelCase(
        "functional_cnn",
        _FunctionalCNN,
        _randn(3, 8, 8),
        structured={"*"},
    ),
    ModelCase(  # fc.weight also used by F.linear outside fc: Jacobians
        "linear_and_call_tied",
        _LinearAndCallTied,
        _randn(4),
        structured={"fc.bias", "head.weight", "head.bias"},
        fallback={"fc.weight"},
    ),
    ModelCase(
        "call_twice",
        _CallTwice,
        _randn(4),
        structured={"head.weight", "head.bias"},
        fallback={"w", "b"},
    ),
    ModelCase(  # the plan (first four examples) sees one call; later probes run it twice
        "call_data_dependent_depth",
        _CallDataDependentDepth,
        _shallow_then_deep,
        structured={"*"},
    ),
    ModelCase(
        "call_learned_gain",
        _LearnedGain,
        _randn(4),
        structured={"w", "b"},
        fallback={"gain"},
    ),
    ModelCase(  # the bias added after the product is not part of the call: Jacobians
        "matmul_layers",
        _MatmulLayers,
        _randn(2, 5),
        structured={"w1", "w2", "w3"},
        fallback={"b1"},
    ),
    ModelCase(
        "compiled",
        _compiled_mlp,
        _randn(5),
        structured={"*"},
    ),
]

ARCHITECTURES = [
    ModelCase(
        "transformer_encoder",
        _Transformer,
        _tokens(11, 5),
        structured={"*"},
        fallback={"*self_attn*"},
    ),
    ModelCase(
        "transformer_norm_first",
        lambda: _Transformer(norm_first=True),
        _tokens(11, 5),
        structured={"*"},
        fallback={"*self_attn*"},
    ),
    ModelCase(
        "vit",
        _ViT,
        _randn(3, 8, 8),
        structured={"*"},
        fallback={"cls", "pos", "*self_attn*"},
    ),
    ModelCase(
        "lstm",
        lambda: _RNNClassifier("LSTM"),
        _tokens(11, 4),
        structured={"embed.weight", "head.weight", "head.bias"},
        fallback={"rnn.*"},
    ),
    ModelCase(
        "gru",
        lambda: _RNNClassifier("GRU"),
        _tokens(11, 4),
        structured={"embed.weight", "head.weight", "head.bias"},
        fallback={"rnn.*"},
    ),
    ModelCase(
        "gru_tied_embeddings",
        _TiedGRU,
        _tokens(7, 4),
        structured={"out.bias"},
        fallback={"embed.weight", "rnn.*"},
    ),
    ModelCase(
        "weight_norm",
        _weight_norm_mlp,
        _randn(5),
        structured={"0.bias", "2.bias"},
        fallback={"*original*"},
    ),
    ModelCase(
        "spectral_norm",
        _spectral_norm_mlp,
        _randn(5),
        structured={"0.bias", "2.weight", "2.bias"},
        fallback={"*original*"},
    ),
    ModelCase(
        "depthwise_se",
        _DepthwiseSE,
        _randn(3, 5, 5),
        structured={"*"},
    ),
    ModelCase(
        "position_buffer",
        _PositionBuffer,
        _tokens(9, 5),
        structured={"tokens.weight", "norm.weight", "norm.bias", "head.weight", "head.bias"},
        fallback={"positions.weight"},
    ),
    ModelCase(
        "position_arange",
        _PositionArange,
        _tokens(9, 5),
        structured={"tokens.weight", "mix.weight", "mix.bias", "head.weight", "head.bias"},
        fallback={"positions.weight"},
    ),
    ModelCase(
        "batch_free_inputs",
        _BatchFree,
        _randn(3, 4),
        structured={"inp.weight", "inp.bias", "head.weight", "head.bias"},
        fallback={"pos", "from_const.weight", "from_const.bias"},
    ),
    ModelCase(
        "sdpa_attention",
        _SDPAttention,
        _randn(4, 4),
        structured={"qkv.weight", "qkv.bias", "head.weight", "head.bias"},
    ),
]
if transformers_available():
    ARCHITECTURES.append(
        ModelCase(
            "hf_bert",
            _tiny_bert,
            _bert_inputs,
            output_fn=lambda out: out.logits,
            structured={"*"},
            fallback={"*position_embeddings*"},  # position ids from a (1, T) buffer
        )
    )
CASES += ARCHITECTURES

CASES_BY_NAME = {case.name: case for case in CASES}


# ------------------------------------------ architectures that broke an engine path once
class _SharedDepth(nn.Module):
    """One block registered under several names (``nn.ModuleList([block] * 3)``, ALBERT-style).

    The block's parameters have several names, one attribute slot each: a functional call
    that swaps a slot once per name leaves its own tensor in the model.
    """

    def __init__(self, dim: int = 5, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        block = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.layers = nn.ModuleList([block] * depth)
        self.last = block  # the same block under one more name
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(self.norm(h))


class _RBFNetwork(nn.Module):
    """Gaussian units on learned centres through ``torch.cdist``, whose backward ``vmap``
    batches wrongly (and which has no forward-mode derivative)."""

    def __init__(self) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(6, 4))
        self.log_gamma = nn.Parameter(torch.tensor(-0.5))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        distances = torch.cdist(x, self.centres)  # (N, 6)
        return self.head(torch.exp(-self.log_gamma.exp() * distances**2))


class _AttentionGivenBatchFirst(nn.Module):
    """``nn.MultiheadAttention`` (sequence-first) fed ``(N, T, D)``: it attends across examples.

    Its logits for one example depend on the others in the batch; the kernel is that of
    each example alone (a batch of one), as the reference defines it.
    """

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(3, dim)
        self.attn = nn.MultiheadAttention(dim, 2)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)  # (N, T, D), read by the attention as (T, N, D)
        out, _ = self.attn(h, h, h)
        return self.head(out.mean(dim=1))


MORE_ARCHITECTURES = [
    ModelCase(
        "rbf_cdist",
        _RBFNetwork,
        _randn(4),
        structured={"head.*"},
        fallback={"centres", "log_gamma"},
    ),
    ModelCase(
        "block_registered_twice",
        _SharedDepth,
        _randn(4),
        structured={"inp.*", "norm.*", "head.*"},
        fallback={"layers.0.0.*"},
    ),
]
ARCHITECTURES += MORE_ARCHITECTURES
# Not among ARCHITECTURES: its batch's logits are not per-example, so the linearized model
# of a batch (the batch function's) is not the per-example Jacobian those tests compare.
BATCH_MIXING = ModelCase(
    "attention_given_batch_first",
    _AttentionGivenBatchFirst,
    _randn(4, 3),
    structured={"head.bias"},  # the head's input rows mix examples: only its bias
    fallback={"inp.*", "attn.*", "head.weight"},
)
CASES += [*MORE_ARCHITECTURES, BATCH_MIXING]
CASES_BY_NAME.update({case.name: case for case in [*MORE_ARCHITECTURES, BATCH_MIXING]})
