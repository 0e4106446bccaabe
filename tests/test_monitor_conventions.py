"""Lightning conventions of NTKMonitor: the keys it writes, ``prefix``, ``verbose``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests._lightning_models import module_class, one_thread, trainer_kwargs  # noqa: F401

README = Path(__file__).resolve().parent.parent / "README.md"


def _fit(monitors, logger, max_steps=8):
    import pytorch_lightning as pl

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=monitors, **trainer_kwargs(max_steps=max_steps, logger=logger))
    trainer.fit(module_class("pytorch_lightning")())
    return trainer


def _tensorboard_tags(log_dir: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    written = set()
    for kind in ("scalars", "histograms", "images"):
        written |= set(tags[kind])
    for tag in tags["tensors"]:
        if tag != "custom_scalars__config__":
            written.add(tag.removesuffix("/text_summary"))
    return written


def _readme_keys() -> list[str]:
    """The ``ntk/...`` keys of the README's "What it logs" section."""
    text = README.read_text()
    section = text[text.index("## What it logs") :]
    section = section[: section.index("\n## ", 1)]
    return sorted(set(re.findall(r"`(ntk/[^`]+)`", section)))


def test_readme_lists_every_key_the_monitor_writes(tmp_path):
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    _fit([NTKMonitor(n_probe=9, log_base=2)], logger)
    logger.experiment.flush()
    written = {tag for tag in _tensorboard_tags(logger.log_dir) if tag.startswith("ntk/")}
    patterns = {
        key: re.compile(re.escape(key).replace("<module>", "[^/]+") + "$") for key in _readme_keys()
    }
    unlisted = {tag for tag in written if not any(p.match(tag) for p in patterns.values())}
    assert not unlisted, f"keys written but missing from the README table: {sorted(unlisted)}"
    unused = {key for key, p in patterns.items() if not any(p.match(tag) for tag in written)}
    assert not unused, f"README keys the monitor does not write: {sorted(unused)}"


def test_two_monitors_with_different_prefixes_log_disjoint_keys(tmp_path):
    import csv

    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    cheap = NTKMonitor(n_probe=6, output="trace", every_n_steps=2, log_base=None, prefix="cheap/")
    full = NTKMonitor(n_probe=9, log_base=2)
    csv_logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    tb_logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    trainer = _fit([cheap, full], [csv_logger, tb_logger])
    assert cheap.state_key != full.state_key
    assert [r.step for r in cheap.history] == [2, 4, 6, 8]
    assert [r.step for r in full.history] == [2, 4, 8]

    rows = list(csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv")))
    columns = set(rows[0])
    cheap_keys = {c for c in columns if c.startswith("cheap/")}
    full_keys = {c for c in columns if c.startswith("ntk/")}
    assert "cheap/relative_change" in cheap_keys and "ntk/relative_change" in full_keys
    assert {k.removeprefix("cheap/") for k in cheap_keys} <= {
        k.removeprefix("ntk/") for k in full_keys
    }
    # one row per step and logger call: no step has two values for one key
    for key in ("cheap/relative_change", "ntk/relative_change"):
        steps = [int(r["step"]) for r in rows if r[key]]
        assert len(steps) == len(set(steps)), (key, steps)
    cheap_rc = {
        int(r["step"]): float(r["cheap/relative_change"])
        for r in rows
        if r["cheap/relative_change"]
    }
    assert cheap_rc == pytest.approx({r.step: r.relative_change for r in cheap.history})

    metrics = trainer.callback_metrics
    assert float(metrics["cheap/relative_change"]) == pytest.approx(
        cheap.history[-1].relative_change
    )
    assert float(metrics["ntk/relative_change"]) == pytest.approx(full.history[-1].relative_change)
    assert {"cheap/lazy", "ntk/lazy", "cheap/relative_change"} <= set(trainer.progress_bar_metrics)

    tb_logger.experiment.flush()
    tags = _tensorboard_tags(tb_logger.log_dir)
    for name in ("kernel", "spectrum", "diagnosis", "relative_change"):
        assert f"cheap/{name}" in tags and f"ntk/{name}" in tags
    assert not {t for t in tags if not t.startswith(("cheap/", "ntk/", "epoch"))}


def test_prefix_is_checked_and_kept_out_of_the_default_state_key():
    from lightning_ntk import NTKMonitor

    with pytest.raises(TypeError, match="Expected `prefix` to be a non-empty str but got 3"):
        NTKMonitor(prefix=3)
    with pytest.raises(TypeError, match="Expected `verbose` to be a bool"):
        NTKMonitor(verbose="yes")
    default = NTKMonitor()
    assert "prefix" not in default.state_key  # checkpoints of earlier versions still load
    assert "'prefix': 'a/'" in NTKMonitor(prefix="a/").state_key


def test_prog_bar_false_keeps_the_progress_bar_clean():
    from lightning_ntk import NTKMonitor

    monitor = NTKMonitor(n_probe=6, every_n_steps=2, log_base=None, prog_bar=False)
    trainer = _fit([monitor], False, max_steps=4)
    assert not [k for k in trainer.progress_bar_metrics if k.startswith("ntk/")]
    assert "ntk/lazy" in trainer.callback_metrics


@pytest.mark.parametrize("verbose", [True, False])
def test_verbose_prints_one_line_per_report(verbose, caplog):
    import logging

    from lightning_ntk import NTKMonitor

    monitor = NTKMonitor(n_probe=6, every_n_steps=2, log_base=None, verbose=verbose)
    with caplog.at_level(logging.INFO):
        _fit([monitor], False, max_steps=4)
    lines = [r.getMessage() for r in caplog.records if "NTKMonitor (ntk/) step" in r.getMessage()]
    if verbose:
        assert len(lines) == 2 and lines[0].startswith("NTKMonitor (ntk/) step 2: ")
        assert monitor.history[0].verdict in lines[0]
    else:
        assert lines == []


def test_messages_name_only_arguments_of_the_monitor():
    import dataclasses

    from lightning_ntk import NTKMonitor
    from lightning_ntk.monitor._setup import Setup
    from lightning_ntk.monitor._verdict import LogitContext, Thresholds, diagnose

    arguments = {f.name for f in dataclasses.fields(NTKMonitor)}
    growing = diagnose(
        relative_change=0.0,
        linearization_error=0.0,
        slope=0.7,
        finite=True,
        thresholds=Thresholds(),
        predicted_regime="unknown",
        context=LogitContext(logit_norm=5.0, step=800),
    )
    texts = [Setup().prediction()["reason"], Setup(task="binary").prediction()["reason"]]
    texts.append(growing.message)
    named = {name for text in texts for name in re.findall(r"`([a-z_]+)`", text)}
    assert named and named <= arguments, sorted(named - arguments)


def test_task_is_a_setting_stated_in_the_set_up():
    from lightning_ntk import NTKMonitor

    with pytest.raises(ValueError, match=r"Expected `task` to be one of \('multiclass'"):
        NTKMonitor(task="softmax")
    monitor = NTKMonitor(n_probe=6, every_n_steps=2, log_base=None, task="multiclass")
    _fit([monitor], False, max_steps=4)
    assert monitor.history[-1].setup.startswith("task multiclass (declared)")
