"""NTKMonitor under Lightning's ModelParallelStrategy (FSDP2): two CPU (gloo) processes.

The test runs this file as a script; Lightning's launcher starts the other ranks by
running it again (the CUDA variant runs on two GPUs if there are two, else one rank).
Each rank shards the classifier with ``fully_shard`` on the ``"data_parallel"`` mesh and
runs three fits: with the monitor (a checkpoint at step 4), the same without it, and a
resume of the first from its step-4 checkpoint; it writes what the test compares to
``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from torch import nn

from tests._lightning_models import NAMESPACES, one_thread, run_rank_script  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


class _Run(NamedTuple):
    """Where the ranks run: the Trainer's ``accelerator`` and number of ``devices``."""

    accelerator: str
    devices: int


FIELDS = ("relative_change", "kernel_distance", "logit_norm", "param_distance", "eig_max")


def _sharded_module_class(namespace: str = "pytorch_lightning") -> type:
    """The tests' classifier, sharded per layer and at ``net`` on the data-parallel mesh."""
    from torch.distributed.fsdp import fully_shard

    from tests._lightning_models import module_class

    class ShardedClassifier(module_class(namespace)):
        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    return ShardedClassifier


def _fit(out: Path, run: _Run, monitored: bool, ckpt_path=None):
    """One fit of 8 steps on ``run.devices`` ranks: the trainer, the module, the monitor."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import ModelParallelStrategy

    from lightning_ntk import NTKMonitor
    from tests._lightning_models import trainer_kwargs

    pl.seed_everything(0, verbose=False)
    # width 13: uneven shards (7 + 6 rows) on two ranks; global batches of 48
    batch_size = 48 // run.devices
    model = _sharded_module_class()(width=13, batch_size=batch_size, shuffle=False, lr=0.2)
    callbacks: list = []
    monitor = None
    if monitored:
        monitor = NTKMonitor(n_probe=9, log_base=2, output="full", expect="lazy")
        callbacks.append(monitor)
        if ckpt_path is None:  # the first run keeps its state at step 4
            callbacks.append(
                ModelCheckpoint(
                    dirpath=out / "ckpt", filename="{step}", every_n_train_steps=4, save_top_k=-1
                )
            )
    strategy = ModelParallelStrategy(data_parallel_size=run.devices, tensor_parallel_size=1)
    kwargs = trainer_kwargs(
        max_steps=8, strategy=strategy, accelerator=run.accelerator, devices=run.devices
    )
    kwargs["enable_checkpointing"] = bool(callbacks[1:])
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model, monitor


def _single_process_reports() -> list:
    """The monitor's reports on the unsharded classifier in one CPU process, batches of 48."""
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor
    from tests._lightning_models import module_class, trainer_kwargs

    pl.seed_everything(0, verbose=False)
    model = module_class()(width=13, batch_size=48, shuffle=False, lr=0.2)
    monitor = NTKMonitor(n_probe=9, log_base=2, output="full", expect="lazy")
    pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=8)).fit(model)
    return monitor.history


def _whole_parameters(model: nn.Module) -> dict:
    return {n: p.full_tensor().detach().cpu().clone() for n, p in model.named_parameters()}


def _rank_main(out: Path, run: _Run) -> None:
    import pytorch_lightning as pl

    from lightning_ntk import empirical_ntk
    from tests._lightning_models import module_class

    trainer, model, monitor = _fit(out, run, monitored=True)
    rank = trainer.global_rank
    # the unsharded model at θ0 (the same seed and construction) on the monitor's probe, CPU
    pl.seed_everything(0, verbose=False)
    reference = module_class()(width=13)
    K_ref = empirical_ntk(reference, monitor.tracker.probe_x.cpu(), output="full")
    K0 = monitor.tracker.started_state.K0.cpu()
    sharded_types = sorted({type(p).__name__ for p in model.parameters()})
    monitored = _whole_parameters(model)

    _, plain, _ = _fit(out, run, monitored=False)
    unmonitored = _whole_parameters(plain)

    _, _, resumed = _fit(out, run, monitored=True, ckpt_path=out / "ckpt" / "step=4.ckpt")
    kept = resumed.tracker.started_state  # loaded whole, then this rank's shards again
    local = {f"model.{n}": tuple(p.to_local().shape) for n, p in model.named_parameters()}
    summary = {
        "parameter_types": sharded_types,
        "kernel_blocks_shared": monitor.tracker.distributed,
        "K0_relative_error": float((K0 - K_ref).norm() / K_ref.norm()),
        "K0_shape": list(K0.shape),
        "parameters_with_and_without_monitor": [
            float((monitored[n] - unmonitored[n]).abs().max()) for n in unmonitored
        ],
        "reports": [r.to_dict() for r in monitor.history],
        "resumed_reports": [r.to_dict() for r in resumed.history],
        "resumed_keeps_shards": sorted(kept.sharded) == sorted(local)
        and all(tuple(kept.theta0[n].shape) == local[n] for n in local),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(summary))


def _run_ranks(out: Path, run: _Run) -> list[dict]:
    """Run this file as the script of rank 0 (Lightning starts the others); their summaries."""
    return run_rank_script(
        __file__, [str(out), run.accelerator, str(run.devices)], out, run.devices
    )


def _check(ranks: list[dict], rel: float, bit_identical: bool) -> None:
    """What every run must show; ``rel``: the tolerance against the CPU single process."""
    rank0 = ranks[0]
    assert rank0["parameter_types"] == ["DTensor"]  # the monitor measured a sharded model
    assert rank0["kernel_blocks_shared"] == (len(ranks) > 1)
    for summary in ranks:
        # the same reports, metrics and verdicts on every rank
        assert summary["reports"] == rank0["reports"]
        assert summary["resumed_reports"] == rank0["resumed_reports"]
        # the unsharded model's kernel at θ0, on the same probe
        assert summary["K0_shape"] == [9, 9, 3, 3]
        assert summary["K0_relative_error"] <= 1e-5, summary["K0_relative_error"]
        # training undisturbed: the parameters of the same run without the monitor
        differences = summary["parameters_with_and_without_monitor"]
        assert max(differences) <= (0.0 if bit_identical else 1e-6), differences
        assert summary["resumed_keeps_shards"]
    reports = rank0["reports"]
    assert [r["step"] for r in reports] == [2, 4, 8]
    # the reports of one unsharded process training on the whole batches
    single = _single_process_reports()
    assert [r["verdict"] for r in reports] == [r.verdict for r in single]
    for got, expected in zip(reports, single):
        for field in FIELDS:
            assert got[field] == pytest.approx(getattr(expected, field), rel=rel), field
    # resumed at step 4 from the checkpoint: θ0 restored (no restart), the step-8 report
    # is the uninterrupted run's
    resumed = rank0["resumed_reports"]
    assert [r["step"] for r in resumed] == [2, 4, 8]
    assert not resumed[-1]["restarted"] and resumed[-1]["reference_step"] == 0
    for field in FIELDS:
        assert resumed[-1][field] == pytest.approx(reports[-1][field], rel=1e-5), field


@pytest.mark.slow
def test_model_parallel_fsdp2_two_cpu_processes(tmp_path):
    _check(_run_ranks(tmp_path, _Run("cpu", 2)), rel=1e-4, bit_identical=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_parallel_fsdp2_on_cuda(tmp_path):
    """The same on CUDA (NCCL), on two GPUs if there are two, else one rank."""
    devices = min(2, torch.cuda.device_count())
    _check(_run_ranks(tmp_path, _Run("gpu", devices)), rel=1e-3, bit_identical=False)


class _Mesh2D:
    """The strategy's ``(data_parallel=1, tensor_parallel=2)`` device mesh, as far as read."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: {"data_parallel": 1, "tensor_parallel": 2}[name])


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_tensor_parallelism_is_refused_at_setup(namespace):
    """A ModelParallelStrategy whose mesh has a tensor-parallel dimension of 2 is refused."""
    import importlib

    from tests.test_callback import monitor_cls

    pl = importlib.import_module(namespace)
    strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    strategy._device_mesh = _Mesh2D()  # as set up on two devices, before `configure_model`
    trainer = SimpleNamespace(strategy=strategy, world_size=2)
    with pytest.raises(
        ValueError,
        match=r"ModelParallelStrategy with FSDP2 alone, not tensor parallelism \(got "
        r"tensor_parallel_size=2\).*tensor_parallel_size=1\) with FSDP2's `fully_shard`",
    ):
        monitor_cls(namespace)().setup(trainer, nn.Linear(2, 2), "fit")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _rank_main(Path(sys.argv[1]), _Run(sys.argv[2], int(sys.argv[3])))
    # tear the gloo group down before exit: left to the interpreter's exit, its threads
    # sometimes abort the process ("terminate called without an active exception")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
