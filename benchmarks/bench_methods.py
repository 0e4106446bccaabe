"""Is ``method="auto"`` within 1.2x of the fastest exact method? One table, one run.

Cases: MLP, CNN, a BatchNorm ResNet-style block, an embedding + LayerNorm text model, at
several probe sizes N and class counts C, full and trace layouts. Every method is timed
side by side (median of repeats after a warm-up) on the same inputs.

Usage::

    python benchmarks/bench_methods.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _timing import median_seconds

from lightning_ntk import empirical_ntk

METHODS = ["structured", "jacobian", "ntk_vp"]


class ResBlock(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))))
        return self.head(h.mean(dim=(2, 3)))


class TextModel(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.norm(self.embed(tokens))))
        return self.head(h.mean(dim=1))


def mlp(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, classes)
    )


def cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 6 * 6, classes),
    )  # fmt: skip


def cases(quick: bool):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out = []
    for n in (16, 64) if not quick else (16,):
        for c in (10, 100) if not quick else (10,):
            images = torch.randn(n, 3, 16, 16, generator=g)
            tokens = torch.randint(0, 1000, (n, 16), generator=g)
            out.append(("mlp", n, c, mlp(c), torch.randn(n, 64, generator=g)))
            out.append(("cnn", n, c, cnn(c), images))
            out.append(("resblock", n, c, ResBlock(classes=c), images))
            out.append(("text", n, c, TextModel(classes=c), tokens))
    return out


def time_methods(model: nn.Module, x: torch.Tensor, output: str, repeats: int) -> dict:
    """Median seconds of each exact method (ntk_vp only where it is not hopeless) and auto."""
    n = x.shape[0]
    c = model(x[:1]).shape[1]
    p = sum(q.numel() for q in model.parameters())
    times = {}
    for method in [*METHODS, "auto"]:
        if method == "ntk_vp" and n * c > 1000:
            continue  # N·C vjp/jvp pairs: minutes, and never the fastest at this size
        if method == "jacobian" and n * c * p > 2**28:
            continue  # the Jacobian block alone would exceed 1 GiB
        times[method] = median_seconds(
            lambda m=method: empirical_ntk(model, x, output=output, method=m), repeats
        )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one N and C only")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; seconds, median of {args.repeats}")
    names = " ".join(f"{m:>10s}" for m in METHODS)
    print(f"{'case':9s} {'N':>4s} {'C':>4s} {'layout':6s} {names} {'auto':>10s} {'auto/best':>9s}")
    worst = 0.0
    for name, n, c, model, x in cases(args.quick):
        for output in ("full", "trace"):
            times = time_methods(model, x, output, args.repeats)
            auto = times.pop("auto")
            best = min(times.values())
            worst = max(worst, auto / best)
            cells = " ".join(f"{times[m]:10.4f}" if m in times else f"{'-':>10s}" for m in METHODS)
            row = f"{name:9s} {n:4d} {c:4d} {output:6s} {cells} {auto:10.4f} {auto / best:9.2f}"
            print(row, flush=True)
    print(f"\nworst auto / fastest ratio: {worst:.2f}")


if __name__ == "__main__":
    main()
