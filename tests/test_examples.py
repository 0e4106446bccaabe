"""Smoke-run every example in ``examples/`` (offline, CPU, a few steps each)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# How each example is smoke-run, and a line its output must contain.
COMMANDS: dict[str, tuple[list[str], str]] = {
    "add_to_existing_training.py": (
        [str(EXAMPLES / "add_to_existing_training.py"), "--fast"],
        "verdict",
    ),
    "cnn_batchnorm.py": ([str(EXAMPLES / "cnn_batchnorm.py"), "--fast"], "ntk/layer/"),
    "uncertainty.py": ([str(EXAMPLES / "uncertainty.py")], "OK: wider networks"),
    "lora_classifier.py": (
        [str(EXAMPLES / "lora_classifier.py"), "--fast"],
        "OK: kernels over the LoRA parameter subsets add up",
    ),
    # prints "skipping" and exits 0 where transformers is not installed
    "huggingface_text_classifier.py": (
        [str(EXAMPLES / "huggingface_text_classifier.py")],
        "OK: every ntk metric finite" if importlib.util.find_spec("transformers") else "skipping",
    ),
    "lightning_cli": (
        [
            str(EXAMPLES / "lightning_cli" / "train.py"),
            "fit",
            "--config",
            str(EXAMPLES / "lightning_cli" / "config.yaml"),
            "--trainer.max_steps",
            "4",
            "--trainer.enable_progress_bar",
            "false",
            "--data.batch_size",
            "32",
        ],
        "verdict",
    ),
}
# Optional dependencies of each example: missing ones skip its smoke run, with the extra.
REQUIRES: dict[str, dict[str, str]] = {
    "add_to_existing_training.py": {"sklearn": "demo"},
    "uncertainty.py": {"sklearn": "demo"},
    "lightning_cli": {"sklearn": "demo", "lightning": "lightning", "jsonargparse": "cli"},
}
WRITES_TENSORBOARD = {"add_to_existing_training.py", "cnn_batchnorm.py", "lightning_cli"}
# Tested where they are defined (the callback and testing-toolkit test suites).
TESTED_ELSEWHERE = {"plain_pytorch_loop.py", "test_wide_limit.py"}


def test_every_example_has_a_smoke_run():
    entries = {
        p.name
        for p in EXAMPLES.iterdir()
        if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith(("_", "."))
    }
    untested = entries - set(COMMANDS) - TESTED_ELSEWHERE
    assert not untested, f"examples without a smoke run in tests/test_examples.py: {untested}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_example_runs(name, tmp_path):
    for module, extra in REQUIRES.get(name, {}).items():
        pytest.importorskip(module, reason=f"{name} needs {module} (the `{extra}` extra)")
    args, expected = COMMANDS[name]
    # the package of this checkout, whatever an editable install elsewhere points to
    path = os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,  # logs (lightning_logs/) land in the temporary directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    assert expected in result.stdout
    if name in WRITES_TENSORBOARD:
        assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard logs written"
