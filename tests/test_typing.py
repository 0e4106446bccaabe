"""The package is typed (py.typed): a type checker sees the real signatures.

Runs mypy on two small user scripts, one that uses the API correctly and one that passes
a string where an int is expected; skipped where mypy is not installed (the ``dev`` extra).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
import torch
from lightning_ntk import NTKMonitor, Thresholds, empirical_ntk
from lightning_ntk.lightning import NTKMonitor as LightningNTKMonitor

monitor = NTKMonitor(n_probe=8, output="trace", prefix="cheap/", verbose=True)
other = LightningNTKMonitor(thresholds=Thresholds(relative_change=(0.1, 0.5)))
K = empirical_ntk(torch.nn.Linear(3, 2), torch.randn(4, 3))
n: int = monitor.n_probe
"""

BAD = """
from lightning_ntk import NTKMonitor
from lightning_ntk.lightning import NTKMonitor as LightningNTKMonitor

NTKMonitor(n_probe="sixteen")
LightningNTKMonitor(verbose="yes")
"""


@pytest.mark.slow
def test_mypy_sees_the_signatures(tmp_path):
    pytest.importorskip("mypy", reason="needs mypy (the `dev` extra)")
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "bad.py").write_text(BAD)
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # this checkout, not an installed copy
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir",
         str(tmp_path / "cache"), "--follow-imports=silent", "good.py", "bad.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if e.startswith("good.py")], result.stdout
    bad = "\n".join(e for e in errors if e.startswith("bad.py"))
    assert 'Argument "n_probe" to "NTKMonitor" has incompatible type "str"' in bad, result.stdout
    assert 'Argument "verbose" to "NTKMonitor" has incompatible type "str"' in bad, result.stdout
