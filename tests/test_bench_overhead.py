"""benchmarks/bench_overhead.py runs against the current monitor (its instrumentation wraps
the monitor's own functions by name, so a renamed one breaks it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_times_every_part_of_a_short_run():
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_overhead.py", "--steps", "20", "--repeats", "1",
         "--width", "64"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for part in ("kernel", "set-up observation", "per batch", "inside the monitor's hooks"):
        assert part in proc.stdout, proc.stdout
