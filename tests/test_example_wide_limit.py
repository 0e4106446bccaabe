"""Run examples/test_wide_limit.py as a user would, in its own pytest process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "test_wide_limit.py"


@pytest.mark.slow
def test_wide_limit_example_passes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny networks: one thread each
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", str(EXAMPLE), "-q", "-p", "no:cacheprovider"]
    command += ["--ntk-widths=32,128,512", "--ntk-seeds=0,1", "-W", "ignore::DeprecationWarning"]
    done = subprocess.run(
        command, cwd=EXAMPLE.parents[1], env=env, capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "4 passed" in output, output
