"""The verdict benchmark's scoring, its reading of the monitor's API, and its recipes."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_verdicts", BENCHMARKS / "bench_verdicts.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def _rows(norms: dict[int, float]) -> list[dict]:
    rows = [{"step": s, "logit_norm": v} for s, v in norms.items()]
    rows[-1]["relative_change"] = 0.3
    return rows


def test_ground_truth_reads_the_late_slope(bench):
    sc = bench.recipe("x")
    steps = [2**k for k in range(2, 12)]
    growing = {s: 1.0 * math.log2(s) for s in steps}  # +1 per doubling, for ever
    settling = {s: 5.0 - 4.0 / s for s in steps}  # levels off at 5
    data = bench.load_data()
    assert bench.classify(sc, data, _rows(growing))["logits"] == "diverging"
    truth = bench.classify(sc, data, _rows(settling))
    assert truth["logits"] == "bounded"
    assert truth["label"] == "drifts"  # bounded, kernel moved 0.3 at the horizon


def _report(step: int, verdict: str, causes=(), **extra) -> dict:
    return {"step": step, "verdict": verdict, "causes": list(causes), "alarm": False, **extra}


GROWING = {s: 1.0 * math.log2(s) for s in (64, 128, 256, 512, 1024, 2048)}


def _score(bench, gt_logits: str, reports: list[dict], theory: Optional[str] = None, norms=None):
    sc = bench.recipe("x")  # T = 256
    theory = theory or bench.theory_condition(sc)
    rows = _rows(norms or GROWING)
    gt = {"logits": gt_logits, "label": "moves", "theory": theory, "rows": rows}
    return bench.score(sc, gt, {"reports": reports})


def test_an_alarm_on_bounded_logits_is_a_false_alarm(bench):
    reports = [_report(2, "lazy"), _report(128, "drifting"), _report(256, "broken")]
    reports[-1]["alarm"] = True
    scored = _score(bench, "bounded", reports)
    assert scored["false_alarm"] == "alarm at 256"
    assert scored["alarms"] == [256]
    assert _score(bench, "diverging", reports, theory="L2 / weight decay")["false_alarm"] == ""


def test_divergence_flagged_after_the_trend_is_readable_is_a_miss(bench):
    steps = [2, 4, 8, 16, 32, 64, 128, 256, 512]
    late = [_report(s, "drifting", ["logits diverging"] if s >= 512 else []) for s in steps]
    on_time = [_report(s, "drifting", ["logits diverging"] if s >= 256 else []) for s in steps]
    assert bench._first_readable(late) == 256
    assert _score(bench, "diverging", late)["missed"] == "not flagged by step 256"
    assert _score(bench, "diverging", on_time)["missed"] == ""
    # a regime naming the divergence counts as the flag
    regime = [
        _report(s, "drifting", regime="logits diverging" if s >= 256 else "lazy") for s in steps
    ]
    assert _score(bench, "diverging", regime)["missed"] == ""
    # logits flat up to T = 256 that diverge later: nothing to flag yet
    later = {64: 4.0, 128: 4.2, 256: 4.3, 512: 4.6, 1024: 5.3, 2048: 7.7}
    assert _score(bench, "diverging", late, norms=later)["missed"] == ""


def test_settings_the_monitor_does_not_take_are_left_out(bench):
    @dataclass
    class Old:
        probe_x: object = None
        log_base: float = 4.0

    @dataclass
    class New(Old):
        task: str = "multiclass"

    assert bench.accepted(Old, task="binary", log_base=2) == {"log_base": 2}
    assert bench.accepted(New, task="binary", log_base=2) == {"task": "binary", "log_base": 2}
    data = bench.load_data()
    binary = bench.recipe("b", loss="bce", task="binary")
    assert bench.monitor_settings(Old, binary, data)["output_fn"] is bench.binary_as_two_classes
    assert "output_fn" not in bench.monitor_settings(New, binary, data)


def test_an_alarm_is_what_the_monitor_acts_on(bench):
    assert bench.is_alarm(SimpleNamespace(verdict="broken"))
    assert not bench.is_alarm(SimpleNamespace(verdict="drifting"))
    assert not bench.is_alarm(SimpleNamespace(verdict="broken", alarm=False))
    assert bench.is_alarm(SimpleNamespace(verdict="lazy", alarm=True))


@pytest.mark.parametrize("name", ["binary-bce", "bf16-mixed", "grad-accumulation"])
def test_a_recipe_runs_through_the_trainer_with_the_monitor(bench, name):
    sc = replace(next(s for s in bench.RECIPES if s.name == name), steps=8)
    out = bench.monitored(sc, bench.load_data())
    assert "error" not in out, out.get("error")
    assert [r["step"] for r in out["reports"]] == [2, 4, 8]
