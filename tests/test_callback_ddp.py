"""NTKMonitor under DDP with two CPU (gloo) processes.

The test runs this file as a script; Lightning's launcher starts the second rank by
running it again. Each rank writes its reports to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests._lightning_models import one_thread, run_rank_script  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _fit(strategy: str, devices: int, batch_size: int, thresholds=None, on_breakdown="warn"):
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor
    from tests._lightning_models import module_class, trainer_kwargs

    pl.seed_everything(0, verbose=False)
    model = module_class("pytorch_lightning")(batch_size=batch_size, shuffle=False, lr=0.2)
    monitor = NTKMonitor(
        n_probe=9, log_base=2, thresholds=thresholds, expect="lazy", on_breakdown=on_breakdown
    )
    trainer = pl.Trainer(
        callbacks=monitor, **trainer_kwargs(max_steps=8, strategy=strategy, devices=devices)
    )
    trainer.fit(model)
    return trainer, monitor


def _summary(trainer, monitor) -> dict:
    return {
        "global_step": trainer.global_step,
        "kernel_blocks_shared": monitor.tracker.distributed,
        "reports": [r.to_dict() for r in monitor.history],
    }


@pytest.mark.slow
def test_ddp_two_processes_agree_with_a_single_process(tmp_path):
    _, single = _fit("auto", 1, batch_size=48)
    rc = {r.step: r.relative_change for r in single.history}
    assert sorted(rc) == [2, 4, 8]
    # break between steps 2 and 4, so that "stop" must stop both ranks after step 4
    break_at = (rc[2] + rc[4]) / 2
    ranks = run_rank_script(__file__, [str(tmp_path), repr(break_at)], tmp_path, 2)
    assert ranks[0] == ranks[1]  # same reports, verdicts and stopping step on every rank
    assert ranks[0]["kernel_blocks_shared"]  # each rank computed its share of the kernel
    reports = ranks[0]["reports"]
    assert [r["step"] for r in reports] == [2, 4]
    assert [r["verdict"] for r in reports][-1] == "broken"
    assert all(r["verdict"] != "broken" for r in reports[:-1])
    assert ranks[0]["global_step"] == 4  # "stop" stopped both ranks together
    for got, expected in zip(reports, single.history):
        for key in ("relative_change", "kernel_distance", "logit_norm", "param_distance"):
            assert got[key] == pytest.approx(getattr(expected, key), rel=1e-4), key


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    out, break_at = Path(sys.argv[1]), float(sys.argv[2])
    trainer, monitor = _fit(
        "ddp",
        2,
        batch_size=24,
        thresholds={"relative_change": (1e-9, break_at)},
        on_breakdown="stop",
    )
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(_summary(trainer, monitor)))
    # tear the gloo group down before exit: left to the interpreter's exit, its threads
    # sometimes abort the process ("terminate called without an active exception")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
