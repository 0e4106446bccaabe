"""The documentation site's build hooks (``docs/conf.py``): landing page and API coverage.

The strict build itself runs in CI (``.ci/run``); these tests check the hooks it relies on
without running Sphinx.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parent.parent / "docs" / "conf.py"


@pytest.fixture(scope="module")
def conf():
    spec = importlib.util.spec_from_file_location("docs_conf", CONF)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_writes_a_top_level_landing_page_to_the_home_page(conf, tmp_path):
    assert conf.root_doc == "docs/index"
    page = conf._write_landing_page(tmp_path, "docs/index.html", "lightning-ntk 0.1.0")
    assert page == tmp_path / "index.html"
    text = page.read_text(encoding="utf-8")
    assert 'http-equiv="refresh" content="0; url=docs/index.html"' in text
    assert '<a href="docs/index.html">' in text
    # a home page already at the top needs no redirect (and is not overwritten)
    (tmp_path / "other").mkdir()
    assert conf._write_landing_page(tmp_path / "other", "index.html", "x") is None
    assert not (tmp_path / "other" / "index.html").exists()


def test_the_landing_page_hook_is_registered_for_html_builds(conf):
    connected = []

    class App:
        def connect(self, event, handler):
            connected.append((event, handler))

    conf.setup(App())
    assert ("build-finished", conf._finish) in connected


def test_public_members_of_the_monitor_include_history_and_leave_out_lightning_hooks(conf):
    members = conf.public_members("lightning_ntk.NTKMonitor")
    assert "history" in members
    assert not {"on_train_start", "setup", "state_dict", "n_probe"} & set(members)
    tracker = conf.public_members("lightning_ntk.NTKTracker")
    assert {"start", "update", "scalars", "started"} <= set(tracker)
    assert "probe_x" not in tracker  # an argument, documented with the class
    report = conf.public_members("lightning_ntk.NTKReport")
    assert {"to_dict", "from_dict", "scalars"} <= set(report)


def test_an_undocumented_public_member_is_reported(conf):
    documented = {
        f"{path}.{name}" for path in conf.API_CLASSES for name in conf.public_members(path)
    }
    assert conf._check_api_members(documented) == []
    documented.discard("lightning_ntk.NTKMonitor.history")
    assert conf._check_api_members(documented) == ["lightning_ntk.NTKMonitor.history"]
