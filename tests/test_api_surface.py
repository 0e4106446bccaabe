"""The public surface: names, ``dir()``, the version, ``plot()`` of the metric classes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import lightning_ntk
from lightning_ntk import metrics, monitor, testing
from lightning_ntk.cli import main

HELPERS = {"Any", "TYPE_CHECKING", "annotations", "importlib", "ModuleType"}


@pytest.mark.parametrize("package", [lightning_ntk, metrics, monitor, testing])
def test_dir_shows_public_names_only(package):
    names = dir(package)
    assert not HELPERS & set(names), sorted(HELPERS & set(names))
    assert set(package.__all__) <= set(names)  # lazy names included before first use
    for name in package.__all__:
        assert getattr(package, name) is not None


def test_lazy_names_listed_before_use():
    code = (
        "import sys, lightning_ntk, lightning_ntk.metrics as m; "
        "assert 'NTKMonitor' in dir(lightning_ntk) and 'ProbTV' in dir(m); "
        "assert 'torchmetrics' not in sys.modules and 'pytorch_lightning' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_thresholds_is_public():
    assert lightning_ntk.Thresholds is monitor.Thresholds
    assert "Thresholds" in lightning_ntk.__all__ and "Thresholds" in monitor.__all__


def test_version_single_sourced(capsys):
    assert re.fullmatch(r"\d+\.\d+\.\d+(\S*)", lightning_ntk.__version__)
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-ntk {lightning_ntk.__version__}"


@pytest.mark.parametrize(
    "name, args",
    [
        ("ProbTV", 2),
        ("ArgmaxAgreement", 2),
        ("LogitNorm", 1),
        ("LinearizationError", 3),
        ("TargetAlignment", None),
    ],
)
def test_every_metric_class_plots(name, args):
    pytest.importorskip("matplotlib", reason="plot() needs matplotlib (the `plot` extra)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    if name == "TargetAlignment":
        metric = metrics.TargetAlignment(num_classes=3)
        x = torch.randn(6, 4)
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        update = (x @ x.T, y, y)
    else:
        metric = getattr(metrics, name)()
        update = tuple(torch.randn(5, 3) for _ in range(args))
    metric.update(*update)
    fig, ax = metric.plot()  # the current value
    assert ax.get_ylabel() == name
    values = [metric.compute() for _ in range(3)]
    fig2, _ = metric.plot(values)  # a series
    plt.close(fig)
    plt.close(fig2)
