"""Many classes at the monitor's defaults: cost of ``start`` / ``update`` and of its state.

Usage::

    python benchmarks/bench_classes.py                    # C = 10 and 1000, defaults
    python benchmarks/bench_classes.py --classes 1000 --output full

Each case runs in a fresh process: an MLP ``Linear(32, 32)–ReLU–Linear(32, C)`` (33k
parameters at ``C = 1000``), a probe of ``N = 16`` examples with labels, one SGD step
between ``start`` and ``update``. Printed per case: the layout the tracker chose, the
seconds of ``start`` and of one ``update``, the process's peak resident memory
(``ru_maxrss``) and the size of ``state_dict()`` once pickled.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def run_case(classes: int, output: str | None) -> dict:
    """One case in this process: the tracker's layout, timings, peak RSS and state size."""
    import torch
    from torch import nn

    from lightning_ntk import NTKTracker

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, classes))
    x, y = torch.randn(16, 32), torch.randint(0, classes, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {} if output is None else {"output": output}
    tracker = NTKTracker(x, y, optimizer=opt, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        tracker.start(model)
        t_start = time.perf_counter() - t0
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    t0 = time.perf_counter()
    report = tracker.update(model, 4)
    t_update = time.perf_counter() - t0
    state = pickle.dumps(tracker.state_dict())
    return {
        "classes": classes,
        "params": sum(p.numel() for p in model.parameters()),
        "output": output or "default",
        "layout": tuple(tracker.last_kernel.shape) if tracker.last_kernel is not None else None,
        "start_s": round(t_start, 3),
        "update_s": round(t_update, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "state_mb": round(len(state) / 2**20, 3),
        "warnings": [str(w.message) for w in caught],
        "relative_change": report.relative_change,
        "eig_max": report.eig_max,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="*", default=[10, 1000])
    parser.add_argument("--output", default=None, help="layout (default: the tracker's)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.classes[0], args.output)))
        return
    for classes in args.classes:
        cmd = [sys.executable, __file__, "--child", "--classes", str(classes)]
        if args.output is not None:
            cmd += ["--output", args.output]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
