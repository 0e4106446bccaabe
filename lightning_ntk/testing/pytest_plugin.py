"""pytest plugin: fixtures and a marker for testing wide-limit (kernel-regime) behaviour.

Installed with the package and registered through the ``pytest11`` entry point
``lightning_ntk``, so it is active in every pytest run of an environment that has
``lightning-ntk`` installed; do not also list it in ``pytest_plugins`` (that would
register the same module twice). Disable it with ``-p no:lightning_ntk``. Importing it
imports neither torch nor Lightning; the fixtures import :mod:`lightning_ntk.testing` when
first used.

Marker:

* ``@pytest.mark.wide_limit``: a test of wide-network behaviour (width sweeps, kernel
  convergence); typically slower than a unit test. Select with ``-m wide_limit`` or skip
  with ``-m "not wide_limit"``.

Command-line options (and ini keys of the same name with ``_`` for ``-``):

* ``--ntk-widths=64,256,1024``: the widths the sweep fixtures use (default ``64,256,1024``).
* ``--ntk-seeds=0,1,2``: the initialisation seeds (default ``0,1,2``); the first one
  also seeds :func:`ntk_probe`.

Fixtures:

* ``ntk_widths`` → ``tuple[int, ...]``, ``ntk_seeds`` → ``tuple[int, ...]``: the values above.
* ``ntk_probe`` → ``make(num_examples=16, in_features=8, num_classes=4, *, dtype=float32,
  separation=1.0)`` returning a seeded classification batch ``(x (N, d), y (N,))`` from
  :func:`lightning_ntk.testing.make_classification_data`; the global RNG is not touched.
* ``ntk_width_sweep`` → ``sweep(model_factory, data, **kwargs)``:
  :func:`lightning_ntk.testing.width_sweep` with ``widths`` and ``seeds`` bound to the
  options (a test may still pass its own).

Example::

    @pytest.mark.wide_limit
    def test_my_model_is_lazy(ntk_probe, ntk_width_sweep):
        data = ntk_probe(32, in_features=10, num_classes=3)
        result = ntk_width_sweep(lambda w: MyNet(width=w), data, steps=40, lr=1.0,
                                 label_smoothing=0.1)
        assert result.slopes["relative_change"].slope < -0.25, result.report()
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pytest

DEFAULT_WIDTHS = (64, 256, 1024)
DEFAULT_SEEDS = (0, 1, 2)

_MARKER = "wide_limit: a test of wide-network (kernel-regime) behaviour, e.g. a width sweep"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--ntk-widths`` and ``--ntk-seeds`` (and their ini keys)."""
    group = parser.getgroup("lightning_ntk", "wide-limit testing (lightning_ntk)")
    group.addoption(
        "--ntk-widths",
        type=_positive_ints,
        default=None,
        metavar="W1,W2,...",
        help=f"widths for the ntk_width_sweep fixture (default {_join(DEFAULT_WIDTHS)}).",
    )
    group.addoption(
        "--ntk-seeds",
        type=_ints,
        default=None,
        metavar="S1,S2,...",
        help=f"seeds for the ntk fixtures (default {_join(DEFAULT_SEEDS)}).",
    )
    parser.addini("ntk_widths", "widths for the ntk_width_sweep fixture (comma list).", default="")
    parser.addini("ntk_seeds", "seeds for the ntk fixtures (comma list).", default="")


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``wide_limit`` marker; a bad ini value stops the run here, once."""
    config.addinivalue_line("markers", _MARKER)
    _widths(config)
    _seeds(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """One header line when widths or seeds were set on the command line or in the ini."""
    if config.getoption("ntk_widths") is None and config.getoption("ntk_seeds") is None:
        if not (config.getini("ntk_widths") or config.getini("ntk_seeds")):
            return []
    return [f"lightning_ntk: widths {_join(_widths(config))}, seeds {_join(_seeds(config))}"]


@pytest.fixture(scope="session")
def ntk_widths(pytestconfig: pytest.Config) -> tuple[int, ...]:
    """The widths from ``--ntk-widths`` (or the ini key), default ``(64, 256, 1024)``."""
    return _widths(pytestconfig)


@pytest.fixture(scope="session")
def ntk_seeds(pytestconfig: pytest.Config) -> tuple[int, ...]:
    """The seeds from ``--ntk-seeds`` (or the ini key), default ``(0, 1, 2)``."""
    return _seeds(pytestconfig)


@pytest.fixture
def ntk_probe(ntk_seeds: tuple[int, ...]) -> Callable[..., Any]:
    """``make(num_examples=16, in_features=8, num_classes=4, **kw) -> (x, y)``, seeded."""
    from ._sweep import make_classification_data

    def make(
        num_examples: int = 16, in_features: int = 8, num_classes: int = 4, **kwargs: Any
    ) -> Any:
        kwargs.setdefault("seed", ntk_seeds[0])
        return make_classification_data(num_examples, in_features, num_classes, **kwargs)

    return make


@pytest.fixture
def ntk_width_sweep(ntk_widths: tuple[int, ...], ntk_seeds: tuple[int, ...]) -> Callable[..., Any]:
    """:func:`lightning_ntk.testing.width_sweep` with ``widths`` / ``seeds`` bound."""
    from ._sweep import width_sweep

    def sweep(model_factory: Callable[[int], Any], data: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("widths", ntk_widths)
        kwargs.setdefault("seeds", ntk_seeds)
        return width_sweep(model_factory, data=data, **kwargs)

    return sweep


# ---------------------------------------------------------------------------- helpers


def _widths(config: pytest.Config) -> tuple[int, ...]:
    return _resolve(config, "ntk_widths", _positive_ints, DEFAULT_WIDTHS)


def _seeds(config: pytest.Config) -> tuple[int, ...]:
    return _resolve(config, "ntk_seeds", _ints, DEFAULT_SEEDS)


def _resolve(
    config: pytest.Config, name: str, parse: Callable[[str], tuple[int, ...]], default: tuple
) -> tuple[int, ...]:
    value = config.getoption(name)
    if value is not None:
        return value
    ini = config.getini(name)
    if ini:
        try:
            return parse(str(ini))
        except argparse.ArgumentTypeError as err:
            raise pytest.UsageError(f"ini option {name}: {err}") from None
    return default


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of ints such as 0,1,2 but got {text!r}"
        )
    return values


def _positive_ints(text: str) -> tuple[int, ...]:
    values = _ints(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive ints such as 64,256 but got {text!r}"
        )
    return values


def _join(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))
