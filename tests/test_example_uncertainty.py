"""The uncertainty example runs offline, prints its table and passes its own check."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_uncertainty_example_prints_its_table():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "uncertainty.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["setup", "width", "predictor", "acc", "NLL", "ECE", "TV→deep"]
    body = lines[1:17]
    assert len(body) == 16
    for name in ("single network", "deep ensemble", "kernel ensemble", "GP-Laplace (NNGP)"):
        assert sum(name in line for line in body) == 4, name
    assert "OK: wider networks follow the kernel prediction more closely." in done.stdout
