"""The ``lightning-ntk`` command: demo (smoke mode), report, and errors on bad options."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from lightning_ntk.cli import main
from lightning_ntk.cli._report import NoNTKDataError, load_run, load_runs, summarize

RUN_NAMES = ("1_hard_labels", "2_l2_regularization", "3_label_smoothing", "4_narrow")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    """Run ``lightning-ntk demo --fast`` once; return (exit code, stdout, output dir)."""
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the `demo` extra)")
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib (the `demo` extra)")
    out = tmp_path_factory.mktemp("demo")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--fast", "--no-progress", "--seed", "1", "--out", str(out)])
    return code, buffer.getvalue(), out


def _table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) == 8 and fields[0] in RUN_NAMES and fields[1].isdigit():
            rows[fields[0]] = fields
    return rows


@pytest.mark.slow
def test_demo_fast_prints_table_with_the_theorys_predictions(demo_output):
    code, stdout, _ = demo_output
    assert code == 0
    rows = _table_rows(stdout)
    assert sorted(rows) == list(RUN_NAMES)
    predicted = {name: row[2] for name, row in rows.items()}
    assert predicted == {
        "1_hard_labels": "diverging",
        "2_l2_regularization": "bounded",
        "3_label_smoothing": "bounded",
        "4_narrow": "bounded",
    }
    for row in rows.values():
        assert row[3] in ("lazy", "drifting", "broken")
        accuracy = float(row[7])
        assert 0.0 <= accuracy <= 1.0
    # one diagnosis sentence per run, after the table
    for name in RUN_NAMES:
        assert re.search(rf"^{name} \(step \d+; causes: .*\):\n    \S", stdout, re.MULTILINE)


@pytest.mark.slow
def test_demo_fast_writes_tensorboard_logs_and_figure(demo_output):
    _, _, out = demo_output
    figure = out / "ntk_demo.png"
    assert figure.read_bytes()[:8] == PNG_MAGIC
    for name in RUN_NAMES:
        events = list((out / "runs" / name / "seed_1").glob("events.out.tfevents.*"))
        assert events, f"no event file for {name}"


@pytest.mark.slow
def test_report_rebuilds_figure_and_verdicts_from_demo_logs(demo_output, tmp_path, capsys):
    _, stdout, out = demo_output
    figure = tmp_path / "figures" / "report.png"
    assert main(["report", str(out / "runs"), "--out", str(figure)]) == 0
    assert figure.read_bytes()[:8] == PNG_MAGIC
    summary = capsys.readouterr().out
    verdicts = {name: row[3] for name, row in _table_rows(stdout).items()}
    for name in RUN_NAMES:  # the verdict read back from ntk/lazy is the monitor's
        assert f"{name}/seed_1: {verdicts[name]} at step" in summary


def _write_events(logdir: Path, scalars: dict[str, list[tuple[int, float]]], text=None):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    if text is not None:
        for step, message in text:
            writer.add_text("ntk/diagnosis", message, step)
    writer.close()


def test_load_run_reads_ntk_scalars_and_the_last_diagnosis(tmp_path):
    _write_events(
        tmp_path / "run",
        {
            "ntk/relative_change": [(1, 0.25), (2, 0.5), (4, 0.75)],
            "ntk/lazy": [(1, 1.0), (2, 0.5), (4, 0.0)],
            "train/loss": [(1, 2.0)],
        },
        text=[(2, "drifting at step 2"), (4, "broken at step 4")],
    )
    run = load_run(tmp_path / "run")
    assert run.scalars["ntk/relative_change"] == ([1, 2, 4], [0.25, 0.5, 0.75])
    assert "train/loss" not in run.scalars
    assert run.verdict == "broken"
    assert run.diagnosis == (4, "broken at step 4")
    assert "run: broken at step 4" in summarize([run])


def test_report_plots_a_plain_loop_log_with_its_logged_thresholds(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the report's figure needs matplotlib (`plot` extra)")
    from lightning_ntk.cli._report import _thresholds

    points = [(s, 0.01 * s) for s in (1, 2, 4, 8, 128, 256)]
    _write_events(
        tmp_path / "logs" / "a",
        {
            "ntk/relative_change": points,
            "ntk/linearization_error": points,
            "ntk/logit_norm": points,
            "ntk/lazy": [(256, 0.5)],
            "ntk/threshold/relative_change_drift": [(256, 0.25)],
            "ntk/threshold/relative_change_break": [(256, 0.75)],
        },
    )
    runs = load_runs(tmp_path / "logs")
    assert [r.label for r in runs] == ["a"]
    assert _thresholds(runs)["relative_change"] == (0.25, 0.75)
    assert main(["report", str(tmp_path / "logs")]) == 0
    assert (tmp_path / "logs" / "ntk_report.png").read_bytes()[:8] == PNG_MAGIC
    assert "a: drifting at step 256" in capsys.readouterr().out


def test_report_reads_thresholds_from_the_layout_under_a_prefix(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    from lightning_ntk import Thresholds
    from lightning_ntk.cli._report import _thresholds
    from lightning_ntk.monitor.loggers import write_layout

    logdir = tmp_path / "logs" / "run"
    writer = SummaryWriter(str(logdir))
    write_layout(writer, Thresholds(relative_change=(0.3, 0.9)), prefix="cheap/")
    write_layout(writer, Thresholds(relative_change=(0.2, 0.8)), prefix="ntk/")
    for step in (1, 2, 4):
        writer.add_scalar("cheap/relative_change", 0.1 * step, step)
        writer.add_scalar("cheap/lazy", 1.0, step)
        writer.add_scalar("ntk/relative_change", 0.2 * step, step)
    writer.close()
    (run,) = load_runs(tmp_path / "logs", prefix="cheap/")
    assert run.scalars["ntk/relative_change"][1] == pytest.approx([0.1, 0.2, 0.4])
    assert run.thresholds["relative_change"] == (0.3, 0.9)
    assert _thresholds([run])["relative_change"] == (0.3, 0.9)
    assert _thresholds([run])["linearization_error"] == Thresholds().linearization_error
    assert main(["report", str(tmp_path / "logs"), "--prefix", "cheap/"]) == 0
    assert "run: lazy at step 4" in capsys.readouterr().out


def test_report_with_core_dependencies_prints_the_summary_and_names_the_extra(tmp_path):
    _write_events(
        tmp_path / "logs" / "a", {"ntk/relative_change": [(4, 0.5)], "ntk/lazy": [(4, 1.0)]}
    )
    code = (
        "import sys; sys.modules['matplotlib'] = None  # as if not installed\n"
        "from lightning_ntk.cli import main\n"
        f"sys.exit(main(['report', {str(tmp_path / 'logs')!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("a: lazy at step 4")
    assert (
        lines[-1] == 'Figure: not drawn: it needs matplotlib (pip install "lightning-ntk[plot]").'
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs" / "ntk_report.png").exists()


def test_report_without_event_files_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "Expected TensorBoard event files" in capsys.readouterr().err
    with pytest.raises(NoNTKDataError, match="found none"):
        load_runs(tmp_path)


def test_report_without_ntk_scalars_fails_clearly(tmp_path, capsys):
    _write_events(tmp_path / "other", {"train/loss": [(1, 1.0)]})
    assert main(["report", str(tmp_path)]) == 1
    assert "none with ntk/ scalars" in capsys.readouterr().err
    with pytest.raises(NoNTKDataError, match="Expected ntk/ scalars"):
        load_run(tmp_path / "other")


def test_report_on_a_missing_directory_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "Expected LOGDIR to be an existing directory" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:0"])
def test_demo_rejects_an_unknown_device(device, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--fast", "--device", device, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert (
        f"Expected --device to be one of auto, cpu, cuda, mps or 'cuda:N' but got '{device}'"
        in (capsys.readouterr().err)
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_rejects_cuda_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--fast", "--device", "cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_demo_rejects_an_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--fast", "--out", str(blocker / "out")])
    assert exit_info.value.code == 2
    assert "Expected --out to be a writable directory" in capsys.readouterr().err


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("lightning-ntk") == "lightning_ntk.cli:main"


def test_digits_split_is_fixed_and_standardised_on_the_training_split():
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the `demo` extra)")
    from lightning_ntk.cli._demo import load_digits_split

    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_train.shape == (1500, 64) and x_test.shape == (297, 64)
    assert y_train.shape == (1500,) and set(y_test.tolist()) <= set(range(10))
    varying = x_train.std(dim=0) > 0
    assert torch.allclose(x_train.mean(dim=0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(x_train.std(dim=0)[varying], torch.ones(int(varying.sum())), atol=1e-5)
    again = load_digits_split()
    assert all(torch.equal(a, b) for a, b in zip((x_train, y_train, x_test, y_test), again))


def test_demo_l2_term_is_half_lambda_times_squared_distance_to_theta0():
    from torch import nn

    from lightning_ntk.cli._demo import DigitsClassifier

    torch.manual_seed(0)
    network = nn.Linear(3, 2, dtype=torch.float64)
    module = DigitsClassifier(network, lr=0.1, l2=0.25, label_smoothing=0.0)
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    module.on_train_start()
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
    with torch.no_grad():
        network.weight.add_(1.0)  # ‖θ − θ0‖² = 6
    ce = nn.functional.cross_entropy(network(batch[0]), batch[1])
    loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, ce + 0.5 * 0.25 * 6.0)


def test_demo_rejects_a_non_positive_thread_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--fast", "--threads", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "Expected --threads to be a positive int but got 0" in capsys.readouterr().err


def test_demo_prints_breakdown_warnings_on_one_line_and_passes_others_on(capsys):
    import warnings

    from lightning_ntk.cli._demo import _breakdown_on_one_line
    from lightning_ntk.exceptions import LinearizationBreakdownWarning

    passed_on = []
    show = _breakdown_on_one_line(lambda *args: passed_on.append(args[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        warnings.warn("Step 3: logits diverging.", LinearizationBreakdownWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == "NTKMonitor: Step 3: logits diverging.\n"
    assert passed_on == [UserWarning]


def test_demo_redirected_writes_one_line_per_run_and_no_progress_bars(tmp_path, capfd):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (the `demo` extra)")
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib (the `demo` extra)")
    assert main(["demo", "--fast", "--out", str(tmp_path)]) == 0  # output is not a terminal
    out, err = capfd.readouterr()
    run_lines = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split("]")[0][1:] for line in run_lines] == list(RUN_NAMES)
    assert all(" steps in " in line and "verdict" in line for line in run_lines)
    assert "it/s" not in out + err and "\r" not in out + err  # no progress bar
