"""NTKMonitor configured from YAML through LightningCLI, in both namespaces."""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (the `cli` extra)")

from tests._lightning_models import NAMESPACES, module_class, one_thread  # noqa: F401

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: {class_path}
      init_args:
        n_probe: 9
        every_n_steps: 3
        log_base: null
        output: trace
        on_breakdown: warn
        thresholds:
          relative_change: [0.2, 0.9]
model:
  width: 8
"""

CLASS_PATHS = {
    "pytorch_lightning": "lightning_ntk.NTKMonitor",
    "lightning.pytorch": "lightning_ntk.lightning.NTKMonitor",
}


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_monitor_from_yaml(namespace, tmp_path):
    cli_module = importlib.import_module(f"{namespace}.cli")
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(class_path=CLASS_PATHS[namespace]))
    cli = cli_module.LightningCLI(
        module_class(namespace),
        args=["fit", "--config", str(path)],
        save_config_callback=None,
    )
    monitors = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "NTKMonitor"]
    assert len(monitors) == 1
    monitor = monitors[0]
    expected_module = {"pytorch_lightning": "lightning_ntk.monitor.callback"}.get(
        namespace, "lightning_ntk.lightning"
    )
    assert type(monitor).__module__ == expected_module
    assert isinstance(monitor, importlib.import_module(namespace).Callback)
    assert monitor.tracker.thresholds.relative_change == (0.2, 0.9)
    assert monitor.tracker.output == "trace"
    assert [r.step for r in monitor.history] == [3]
    assert monitor.tracker.last_kernel.shape == (9, 9)
