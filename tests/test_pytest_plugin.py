"""The pytest plugin, run in fresh pytest sessions through `pytester`.

The plugin is registered by the package's ``pytest11`` entry point, so the inner sessions
load it exactly as a user's would; the test files below must not list it in
``pytest_plugins`` as well (that would register it twice).
"""

import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]

# Options for every inner session: no cache files, and no hypothesis plugin, whose
# terminal summary imports (and assertion-rewrites) dozens of modules on every run.
INNER = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")

PASSING = """
import math

import pytest
import torch

from lightning_ntk.testing import NTKMLP


def test_options_reach_the_fixtures(ntk_widths, ntk_seeds):
    assert ntk_widths == (16, 64)
    assert ntk_seeds == (5,)


def test_probe_is_seeded(ntk_probe):
    x, y = ntk_probe(12, in_features=6, num_classes=3)
    x2, y2 = ntk_probe(12, in_features=6, num_classes=3)
    assert x.shape == (12, 6) and torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.bincount(y).tolist() == [4, 4, 4]


@pytest.mark.wide_limit
def test_sweep_uses_the_cli_widths(ntk_probe, ntk_width_sweep):
    data = ntk_probe(12, in_features=6, num_classes=3)
    result = ntk_width_sweep(
        lambda w: NTKMLP(6, w, 1, 3, weight_std=math.sqrt(2), bias_std=0.1),
        data, steps=10, lr=1.0, label_smoothing=0.1,
    )
    assert result.widths == (16, 64) and result.seeds == (5,)
    assert result.mean["relative_change"][1] < result.mean["relative_change"][0]


def test_unmarked():
    pass
"""

FAILING = """
import math

import torch

from lightning_ntk.testing import NTKMLP, assert_lazy_training, assert_ntk_close


def test_kernel_mismatch():
    K = torch.eye(3, dtype=torch.float64)
    K_ref = K.clone()
    K_ref[0, 2] = 0.25
    assert_ntk_close(K, K_ref, rtol=1e-6)


def test_not_lazy(ntk_probe):
    assert_lazy_training(
        lambda w: NTKMLP(6, w, 1, 3, weight_std=math.sqrt(2), bias_std=0.1),
        ntk_probe(12, in_features=6, num_classes=3),
        width=16, steps=20, lr=2.0, seeds=(0,), max_relative_change=1e-4,
    )
"""


@pytest.fixture(autouse=True)
def _no_inherited_addopts(monkeypatch):
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)


@pytest.fixture(scope="module")
def warm_torch():
    """Run the inner files' workload once in this process before the in-process runs.

    An in-process run drops every module it imported when it ends; torch registers
    operator libraries on import and cannot import them twice. Loading them here first
    keeps them in the snapshot that each run restores.
    """
    import math

    import torch

    from lightning_ntk.testing import (
        NTKMLP,
        assert_lazy_training,
        assert_ntk_close,
        make_classification_data,
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: avoid oversubscribing a shared CPU
    data = make_classification_data(12, 6, 3, seed=0)
    with pytest.raises(AssertionError):
        assert_lazy_training(
            lambda w: NTKMLP(6, w, 1, 3, weight_std=math.sqrt(2), bias_std=0.1), data,
            width=16, steps=2, lr=1.0, seeds=(0,), max_relative_change=0.0, label_smoothing=0.1,
        )  # fmt: skip
    with pytest.raises(AssertionError):
        assert_ntk_close(torch.eye(2), torch.ones(2, 2))
    yield
    torch.set_num_threads(threads)


def test_fixtures_marker_and_options_in_a_passing_file(pytester, warm_torch):
    pytester.makepyfile(test_user=PASSING)
    result = pytester.runpytest("--ntk-widths=16,64", "--ntk-seeds=5", "--strict-markers", *INNER)
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["lightning_ntk: widths 16,64, seeds 5"])
    selected = pytester.runpytest("--ntk-widths=16,64", "--ntk-seeds=5", "-m", "wide_limit", *INNER)
    selected.assert_outcomes(passed=1, deselected=3)


def test_ini_options_and_defaults(pytester):
    pytester.makeini("[pytest]\nntk_widths = 8,32\n")
    pytester.makepyfile(
        test_ini="def test_values(ntk_widths, ntk_seeds):\n"
        "    assert ntk_widths == (8, 32) and ntk_seeds == (0, 1, 2)\n"
    )
    pytester.runpytest(*INNER).assert_outcomes(passed=1)


def test_failure_output_holds_the_diagnostic_report(pytester, warm_torch):
    pytester.makepyfile(test_user=FAILING)
    result = pytester.runpytest(*INNER)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: kernels differ: 1 of 9 entries outside*rtol=1e-06*",
            "*worst entries:*",
            "*(0, 2)*0*0.25*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: width sweep (steps=20*",
            "*rel. change*",
            "*[[]FAILED[]] width 16: relative_change = * <= 0.0001*",
        ]
    )


def test_bad_option_values_are_usage_errors(pytester):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest("--ntk-widths=64,zero", *INNER)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ntk-widths*comma-separated list of ints*"])
    result = pytester.runpytest("--ntk-widths=0,8", *INNER)
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_plugin_can_be_disabled_and_loaded_explicitly(pytester):
    pytester.makepyfile(test_x="def test_x(ntk_seeds):\n    assert ntk_seeds == (0, 1, 2)\n")
    disabled = pytester.runpytest("-p", "no:lightning_ntk", *INNER)
    disabled.assert_outcomes(errors=1)
    disabled.stdout.fnmatch_lines(["*fixture 'ntk_seeds' not found*"])
    explicit = pytester.runpytest(
        "-p", "no:lightning_ntk", "-p", "lightning_ntk.testing.pytest_plugin", *INNER
    )
    explicit.assert_outcomes(passed=1)


def test_entry_point_registers_the_plugin_once_in_a_fresh_interpreter(pytester):
    pytester.makepyfile(
        test_once="""
def test_registered_once(pytestconfig):
    import lightning_ntk.testing.pytest_plugin as plugin
    manager = pytestconfig.pluginmanager
    assert manager.get_plugin("lightning_ntk") is plugin
    assert [p for p in manager.get_plugins() if p is plugin] == [plugin]
"""
    )
    result = pytester.runpytest_subprocess(*INNER)
    result.assert_outcomes(passed=1)


def test_importing_the_plugin_is_light():
    code = (
        "import sys, lightning_ntk.testing.pytest_plugin; "
        "heavy = [m for m in ('torch', 'lightning', 'pytorch_lightning') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
