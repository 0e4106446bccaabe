"""NTKTracker in a hand-written PyTorch loop, with TensorBoard logs (no Lightning).

Trains a small MLP on scikit-learn's bundled digits twice — hard one-hot targets, then
label smoothing 0.1 — reports the empirical NTK on a stratified probe set at log-spaced
steps, and writes every report to TensorBoard with ``SummaryWriter``: the ``ntk/*``
scalars, the eigenvalue histogram, the kernel heat map, the diagnosis text and a
custom-scalars layout. Runs offline in a few seconds::

    python examples/plain_pytorch_loop.py --logdir runs/ntk
    tensorboard --logdir runs/ntk

It checks itself: the hard-label run must be flagged for diverging logits, the smoothed
run must not.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.tensorboard import SummaryWriter

from lightning_ntk import NTKTracker
from lightning_ntk.monitor.loggers import write_extras, write_layout


def digits() -> TensorDataset:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return TensorDataset(x, torch.tensor(data.target))


def train(label_smoothing: float, steps: int, logdir: Path, seed: int = 0) -> NTKTracker:
    torch.manual_seed(seed)
    data = digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    # a short loop: doubling steps give the logit trend enough reports past step 100
    tracker = NTKTracker(n_probe=30, log_base=2, optimizer=optimizer, loss=loss_fn)
    tracker.draw_probe(data)  # stratified, with the tracker's own generator
    tracker.start(model)
    writer = SummaryWriter(logdir / f"smoothing_{label_smoothing}")
    write_layout(writer, tracker.thresholds)
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True)
    step = 0
    while step < steps:
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            step += 1
            if tracker.is_due(step):
                report = tracker.update(model, step)
                for name, value in tracker.scalars(report).items():
                    writer.add_scalar(name, value, step)
                write_extras(
                    writer,
                    report,
                    eigenvalues=tracker.eigenvalues,
                    kernel=tracker.kernel_matrix(),
                    labels=tracker.probe_y,
                )
            if step == steps:
                break
    writer.close()
    return tracker


def main(argv: list[str] | None = None) -> dict[float, NTKTracker]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=None, help="TensorBoard log directory")
    parser.add_argument("--steps", type=int, default=512)
    args = parser.parse_args(argv)
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="ntk_plain_loop_"))
    trackers = {}
    for smoothing in (0.0, 0.1):
        tracker = train(smoothing, args.steps, logdir)
        last = tracker.history[-1]
        print(
            f"label smoothing {smoothing}: step {last.step}, verdict {last.verdict}, "
            f"relative change {last.relative_change:.3f}, logit norm {last.logit_norm:.2f}, "
            f"predicted {last.predicted_regime}\n  {last.message}"
        )
        trackers[smoothing] = tracker
    assert "logits diverging" in trackers[0.0].history[-1].causes
    assert "logits diverging" not in trackers[0.1].history[-1].causes
    print(f"TensorBoard logs in {logdir}")
    return trackers


if __name__ == "__main__":
    main()
