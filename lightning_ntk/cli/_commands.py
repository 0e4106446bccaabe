"""The subcommands of ``lightning-ntk``: argument parsing, checks and dispatch."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["build_parser", "main"]

DEVICES = ("auto", "cpu", "cuda", "mps")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-ntk`` (subcommands ``demo`` and ``report``)."""
    parser = argparse.ArgumentParser(
        prog="lightning-ntk",
        description="Watch the empirical NTK of a classifier while it trains.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,report}")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="train on scikit-learn digits under the paper's conditions and show the verdicts",
        description=(
            "Train one wide NTK-parameterized MLP on scikit-learn's bundled digits with hard "
            "labels, with L2 regularization, with label smoothing, and a narrow one, each with "
            "NTKMonitor attached; print the verdicts and write OUT/runs (TensorBoard) and "
            "OUT/ntk_demo.png."
        ),
    )
    demo.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N' or 'mps' (default: auto)",
    )
    demo.add_argument("--seed", type=int, default=0, help="initialisation and data order seed")
    demo.add_argument(
        "--out", type=Path, default=Path("."), help="output directory (default: current)"
    )
    demo.add_argument(
        "--fast", action="store_true", help="a seconds-long smoke run (small, short: no verdicts)"
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help=(
            "CPU threads for torch (default 1: the demo's networks are small, and extra "
            "threads only slow them down on a busy machine)"
        ),
    )
    demo.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars (they are shown only when the output is a terminal)",
    )

    report = sub.add_parser(
        "report",
        help="plot and summarise the ntk/ curves of TensorBoard or CSV logs",
        description=(
            "Rebuild the drift figure and a text summary from the TensorBoard or CSVLogger "
            "logs NTKMonitor wrote (every run below LOGDIR with ntk/ scalars; a run resumed "
            "into a new version_N directory is shown as one run)."
        ),
    )
    demo.set_defaults(subparser=demo)
    report.set_defaults(subparser=report)
    report.add_argument("logdir", type=Path, help="a TensorBoard or CSVLogger log directory")
    report.add_argument(
        "--out",
        type=Path,
        default=None,
        help="figure path (default: LOGDIR/ntk_report.png; the figure needs matplotlib)",
    )
    report.add_argument(
        "--prefix",
        default="ntk/",
        help="prefix of the monitor's scalars, NTKMonitor(prefix=...) (default: ntk/)",
    )
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``lightning-ntk`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args.subparser, args)
    return _report(args.subparser, args)


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    device = _check_device(parser, args.device)
    if args.threads < 1:
        parser.error(f"Expected --threads to be a positive int but got {args.threads}.")
    _check_writable_dir(parser, args.out, "--out")
    import torch

    from ._demo import DemoConfig, run_demo

    config = DemoConfig.fast() if args.fast else DemoConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run_demo(
            config,
            out=args.out,
            device=device,
            seed=args.seed,
            # bars only on a terminal: redirected, each run writes one line
            progress=not args.no_progress and sys.stdout.isatty(),
        )
    finally:
        torch.set_num_threads(threads)
    return 0


def _report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    logdir: Path = args.logdir
    if not logdir.is_dir():
        parser.error(f"Expected LOGDIR to be an existing directory but got '{logdir}'.")
    out = args.out if args.out is not None else logdir / "ntk_report.png"
    _check_writable_dir(parser, out.parent, "--out")
    from ._report import NoNTKDataError, load_runs, plot_runs, summarize

    try:
        runs = load_runs(logdir, prefix=args.prefix)
    except NoNTKDataError as err:
        print(f"lightning-ntk report: error: {err}", file=sys.stderr)
        return 1
    print(summarize(runs), flush=True)
    if not _has_matplotlib():
        print('\nFigure: not drawn: it needs matplotlib (pip install "lightning-ntk[plot]").')
        return 0
    plot_runs(runs, out)
    print(f"\nFigure: {out}")
    return 0


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _check_device(parser: argparse.ArgumentParser, device: str) -> str:
    """Resolve ``--device``; exit with a message for an unknown or unavailable device."""
    import torch

    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        parser.error(
            f"Expected --device to be one of {', '.join(DEVICES)} or 'cuda:N' but got '{device}'."
        )
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device '{device}' was requested but CUDA is not available here.")
        if index and int(index) >= torch.cuda.device_count():
            parser.error(
                f"--device '{device}' was requested but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible."
            )
    if kind == "mps" and not torch.backends.mps.is_available():
        parser.error("--device 'mps' was requested but MPS is not available here.")
    return device


def _check_writable_dir(parser: argparse.ArgumentParser, path: Path, option: str) -> None:
    """Create ``path`` if needed and check that a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        parser.error(f"Expected {option} to be a writable directory but '{path}': {reason}.")
    if not os.access(path, os.W_OK):
        parser.error(f"Expected {option} to be a writable directory but '{path}' is not writable.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
