"""CUDA timings: MLP 784-1024-1024-10 (N=256) and a ResNet-18-style CNN (N=128, C=10).

Prints time, peak GPU memory and achieved TFLOP/s of the structured MLP path against a
large float32 matmul on the same device (TF32 off, as the kernel runs). Run by
``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_ntk import recipe_ntk, structured_mlp_flops

from lightning_ntk import empirical_ntk


def cuda_seconds(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet18(classes: int = 10) -> nn.Module:
    layers, c_in = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(8192, 8192, device=dev)
    mm = 2 * 8192**3 / cuda_seconds(lambda: a @ a) / 1e12
    print(f"float32 matmul 8192^3: {mm:.1f} TFLOP/s")

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                        nn.Linear(1024, 10)).to(dev)  # fmt: skip
    for n in (32, 256):
        x = torch.randn(n, 784, device=dev)
        for method in ("structured", "jacobian"):
            torch.cuda.reset_peak_memory_stats()
            t = cuda_seconds(lambda m=method, x=x: empirical_ntk(mlp, x, method=m, chunk_size=128))
            peak = torch.cuda.max_memory_allocated() / 2**20
            extra = ""
            if method == "structured":
                extra = f"  {structured_mlp_flops(n) / t / 1e12:.2f} TFLOP/s"
            print(f"mlp N={n:4d} {method:10s} {t * 1e3:9.2f} ms  peak {peak:8.0f} MiB{extra}")
        if n == 32:
            t = cuda_seconds(lambda x=x: recipe_ntk(mlp, x, x), repeats=3)
            print(f"mlp N={n:4d} {'recipe':10s} {t * 1e3:9.2f} ms")

    net = resnet18().to(dev).eval()
    x = torch.randn(128, 3, 32, 32, device=dev)
    for method in ("structured", "jacobian"):
        torch.cuda.reset_peak_memory_stats()
        try:
            t = cuda_seconds(lambda m=method: empirical_ntk(net, x, method=m, chunk_size=32), 3)
            peak = torch.cuda.max_memory_allocated() / 2**20
            print(f"resnet18 N=128 C=10 {method:10s} {t:8.2f} s  peak {peak:8.0f} MiB")
        except torch.OutOfMemoryError:
            print(f"resnet18 N=128 C=10 {method:10s} out of memory")


if __name__ == "__main__":
    main()
