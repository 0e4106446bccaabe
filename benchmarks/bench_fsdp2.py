"""The kernel of an FSDP2-sharded model against the same model unsharded, 2 gloo processes.

Usage::

    python benchmarks/bench_fsdp2.py [--width 1024] [--probe 32] [--classes 10] [--chunk-size 8]

An MLP (3 hidden layers of ``width``, ``classes`` outputs) and a probe of ``probe``
examples; on each of 2 CPU processes (one thread each), ``empirical_ntk(model, x)``
(``"full"`` layout, ``method="auto"``, ``chunk_size`` as given: blocks of example pairs
shared among the ranks), median of 3 calls after one warm-up:

* unsharded: the plain model on every rank, blocks shared (``distributed=True``);
* sharded: the model under ``fully_shard`` per layer and at the root, same inputs.

Each configuration runs in fresh processes, so each rank's peak resident memory
(``ru_maxrss``) is its own. Printed per rank: seconds per kernel, the peak resident
memory, the bytes of parameters it holds as shards (sharded) or whole, and the largest
difference between the two kernels (relative to the kernel's norm).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _timing import median_seconds

from lightning_ntk import empirical_ntk


def _model(width: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, width), nn.Tanh(),
        nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, classes),
    )  # fmt: skip


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, sharded: bool, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model(args.width, args.classes)
        if sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        held = sum(
            (p.to_local() if sharded else p).numel() * p.element_size()  # type: ignore[operator]
            for p in model.parameters()
        )
        x = torch.randn(args.probe, 32, generator=torch.Generator().manual_seed(1))
        kernel = {}

        def call() -> None:
            kernel["K"] = empirical_ntk(model, x, distributed=True, chunk_size=args.chunk_size)

        seconds = median_seconds(call)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
        out[rank] = (seconds, peak, held, kernel["K"])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--probe", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=None)
    args = parser.parse_args()
    world = 2
    params = sum(p.numel() for p in _model(args.width, args.classes).parameters())
    print(
        f"MLP width {args.width}, {params} parameters ({params * 4 / 2**20:.1f} MiB float32), "
        f"probe {args.probe}, {args.classes} classes, chunk_size {args.chunk_size}, {world} gloo "
        "processes, 1 thread each"
    )
    manager = mp.Manager()
    results = {}
    for sharded in (False, True):
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), args, sharded, out), nprocs=world, join=True)
        results[sharded] = dict(out)
    reference = results[False][0][3]
    for sharded in (False, True):
        name = "sharded  " if sharded else "unsharded"
        for rank in range(world):
            seconds, peak, held, K = results[sharded][rank]
            error = float((K - reference).norm() / reference.norm())
            print(
                f"{name} rank {rank}: {seconds:7.3f} s per kernel, peak RSS {peak:7.1f} MiB, "
                f"parameters held {held / 2**20:6.2f} MiB, kernel rel. difference {error:.1e}"
            )


if __name__ == "__main__":
    main()
