"""LoRA fine-tuning of a small transformer classifier: kernels over parameter subsets.

A BERT-style classifier (token and position embeddings, two attention blocks, mean
pooling, a classification head), written here and "pretrained" for a few steps on one
synthetic task (which of three token groups is most frequent). Fine-tuning on a second
task (the group of the first token) then freezes every pretrained weight
(``requires_grad_(False)``), adds LoRA adapters ``W x + (α/r) B A x`` to the query and
value projections (``A`` random, ``B`` zero, as in Hu et al. 2021) and trains the adapters
and a new head with AdamW.

It prints the kernel on a probe batch over

* the trainable parameters (``params=None``): the adapters and the head, as trained;
* the LoRA ``B`` matrices only (``params=`` a predicate on the names);
* the head only (``params="head"``): the last-layer kernel ``(φ(x)·φ(x') + 1) I_C``;
* all parameters, the frozen ones included: the kernel of full fine-tuning (frozen
  parameters never enter a kernel, so they are unfrozen for that one call);

and fine-tunes with an ``NTKTracker`` measuring the kernel of the optimizer in use
(``kernel="optimizer"``: AdamW's, its preconditioner frozen at the first report).
Offline, CPU, about 10 s (``--fast``: a few seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from lightning_ntk import NTKTracker, empirical_ntk

VOCAB, LENGTH, WIDTH, HEADS, CLASSES, RANK = 24, 8, 32, 2, 3, 4
LORA_TARGETS = ("q", "v")  # the projections LoRA adapts (the LoRA paper's choice)


class Attention(nn.Module):
    """Multi-head self-attention with separate query, key, value and output projections."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        N, T, D = h.shape
        split = lambda t: t.reshape(N, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))  # (N, H, T, D/H)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads), dim=-1)
        return self.o((weights @ v).transpose(1, 2).reshape(N, T, D))


class Block(nn.Module):
    """Pre-norm transformer block: attention and an MLP, each with a residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class Classifier(nn.Module):
    """Token ids ``(N, T)`` → logits ``(N, C)``: embeddings, two blocks, mean pool, head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Parameter(0.1 * torch.randn(LENGTH, WIDTH))
        self.blocks = nn.Sequential(Block(WIDTH, HEADS), Block(WIDTH, HEADS))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The pooled features ``φ(x)`` ``(N, WIDTH)`` the head reads."""
        return self.norm(self.blocks(self.tokens(ids) + self.positions)).mean(dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids))


class LoRALinear(nn.Module):
    """``base(x) + (α/r) B A x`` with ``base`` frozen, ``A (r, in)`` random, ``B (out, r)`` zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        fan_in = base.in_features
        self.lora_A = nn.Parameter(torch.randn(rank, fan_in) / math.sqrt(fan_in))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


def add_lora(model: Classifier, rank: int) -> None:
    """Freeze ``model`` and adapt the attention projections; a new, trainable head."""
    model.requires_grad_(False)
    for block in model.blocks:
        for name in LORA_TARGETS:
            setattr(block.attn, name, LoRALinear(getattr(block.attn, name), rank))
    model.head = nn.Linear(WIDTH, CLASSES)  # the new task's head, trained


def make_data(n: int, task: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(n, T)`` and labels: the most frequent token group, or the first token's."""
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    group = ids % CLASSES  # (n, T)
    if task == "pretrain":
        counts = nn.functional.one_hot(group, CLASSES).sum(dim=1).float()  # (n, C)
        counts += 0.1 * torch.arange(CLASSES)  # break ties the same way everywhere
        return ids, counts.argmax(dim=1)
    return ids, group[:, 0]


def train(model: nn.Module, x, y, steps: int, optimizer, tracker=None) -> float:
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(x), (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if tracker is not None and tracker.is_due(step):
            report = tracker.update(model, step)
            print(
                f"  step {step:3d}: relative_change {report.relative_change:.3f}, "
                f"linearization_error {report.linearization_error:.3f}, regime {report.regime}"
            )
    return float(loss.detach())


@contextlib.contextmanager
def all_trainable(model: nn.Module) -> Iterator[None]:
    """Every parameter trainable inside the block (frozen ones frozen again after)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def trace(K: torch.Tensor) -> float:
    """``Σ_i Σ_a K[i, i, a, a]`` of a full-layout kernel ``(N, N, C, C)``."""
    return float(K.diagonal(dim1=0, dim2=1).diagonal(dim1=0, dim2=1).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: a second thread only adds contention
    pretrain_steps, finetune_steps = (20, 12) if args.fast else (150, 60)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    model = Classifier()
    x_pre, y_pre = make_data(512, "pretrain", generator)
    loss = train(model, x_pre, y_pre, pretrain_steps, torch.optim.AdamW(model.parameters(), 3e-3))
    print(f"pretrained {pretrain_steps} steps, loss {loss:.3f}")

    add_lora(model, RANK)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"LoRA: {n_trainable} of {n_all} parameters trainable ({', '.join(trainable[:3])}, ...)")
    x, y = make_data(512, "finetune", generator)
    probe_x, probe_y = x[:12], y[:12]

    def kernels(when: str) -> None:
        K = empirical_ntk(model, probe_x)  # the trainable parameters: adapters and head
        parts = {
            "LoRA A": empirical_ntk(model, probe_x, params=lambda n, p: n.endswith("lora_A")),
            "LoRA B": empirical_ntk(model, probe_x, params=lambda n, p: n.endswith("lora_B")),
            "head": empirical_ntk(model, probe_x, params="head"),
        }
        with all_trainable(model):
            full = empirical_ntk(model, probe_x)  # the kernel of full fine-tuning
        print(f"kernel traces {when}: trainable {trace(K):.3g}, full fine-tuning {trace(full):.3g}")
        for name, part in parts.items():
            print(f"  {name:6s} {trace(part):.3g}")
        # the NTK sums over parameters: disjoint subsets add up to the whole
        torch.testing.assert_close(sum(parts.values()), K, rtol=1e-4, atol=1e-4 * trace(K))
        # the head's kernel is the last-layer kernel (φ(x)·φ(x') + 1) I_C
        phi = model.features(probe_x).detach()
        last_layer = (phi @ phi.T + 1.0)[:, :, None, None] * torch.eye(CLASSES)
        torch.testing.assert_close(parts["head"], last_layer, rtol=1e-4, atol=1e-4)
        assert trace(full) > trace(K)  # more parameters, a larger kernel (PSD parts add)

    kernels("before fine-tuning")  # B = 0: the A matrices' part is exactly zero
    assert trace(empirical_ntk(model, probe_x, params=lambda n, p: n.endswith("lora_A"))) == 0.0

    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=3e-3)
    tracker = NTKTracker(
        probe_x,
        probe_y,
        optimizer=optimizer,
        kernel="optimizer",  # AdamW's kernel, its preconditioner frozen at the first report
        every_n_steps=max(1, finetune_steps // 4),
        log_base=None,
    )
    tracker.start(model)
    print("fine-tuning the adapters and the head with AdamW, kernel measured:")
    loss = train(model, x, y, finetune_steps, optimizer, tracker)
    print(f"  ({tracker.history[-1].kernel}); loss {loss:.3f}")
    kernels("after fine-tuning")

    values = [getattr(r, f) for r in tracker.history for f in ("relative_change", "eig_max")]
    assert tracker.history and all(math.isfinite(v) for v in values)
    print("OK: kernels over the LoRA parameter subsets add up; the Adam kernel monitored")


if __name__ == "__main__":
    main()
