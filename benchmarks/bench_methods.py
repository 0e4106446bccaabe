"""Is ``method="auto"`` within 1.2x of the fastest exact method? Two tables, one run.

1. Scaling: MLP, CNN, a BatchNorm ResNet-style block, an embedding + LayerNorm text model,
   at several probe sizes N and class counts C, full and trace layouts.
2. Registry: every model of ``tests/cases.py`` (the architectures people train:
   Transformer encoders, ViT, LSTM / GRU, weight / spectral norm, depthwise + SE, SDPA,
   Hugging Face BERT, batch-free inputs, ...), float32, full layout, for ``x2=None`` and
   ``x2`` given; with auto's pick, the methods PyTorch cannot run on the model, auto
   against the torch.func recipe (``vmap(jacrev)`` + ``einsum``, as in ``bench_ntk.py``),
   and the largest relative error of any method against the float64 reference.
3. First calls: every registry model in a fresh process (after a warm-up that pays the
   process's one-off start-up on another model), the total of the first 8 calls of auto
   and of each exact method on its own copy of the model (so each pays its own planning
   and tracing), the calls of the methods interleaved; auto's total against the best
   single method's.

Every method is timed side by side on the same inputs: after a warm-up, in interleaved rounds
(the fastest round counts), so that the ratio compares like with like on a noisy
machine. Explicit methods run with ``fallback=False``: one PyTorch cannot run is "n/a".

Usage::

    python benchmarks/bench_methods.py [--repeats 7] [--quick]
        [--only scaling|registry|first-calls] [--calls 8] [--threads T] [--models ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from functools import partial

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_ntk import empirical_ntk, reference_ntk
from lightning_ntk.kernel import choose_method, last_call_info
from lightning_ntk.kernel._functional import FunctionalModel
from lightning_ntk.kernel.structured import plan_structure

METHODS = ["structured", "jacobian", "ntk_vp"]
_MIN_SAMPLE = 0.1  # seconds: shorter calls are repeated within one timing sample
_HOPELESS = 4.0  # methods this many times slower than the fastest are timed once


class ResBlock(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))))
        return self.head(h.mean(dim=(2, 3)))


class TextModel(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.norm(self.embed(tokens))))
        return self.head(h.mean(dim=1))


def mlp(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, classes)
    )


def cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 6 * 6, classes),
    )  # fmt: skip


def cases(quick: bool):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out = []
    for n in (16, 64) if not quick else (16,):
        for c in (10, 100) if not quick else (10,):
            images = torch.randn(n, 3, 16, 16, generator=g)
            tokens = torch.randint(0, 1000, (n, 16), generator=g)
            out.append(("mlp", n, c, mlp(c), torch.randn(n, 64, generator=g)))
            out.append(("cnn", n, c, cnn(c), images))
            out.append(("resblock", n, c, ResBlock(classes=c), images))
            out.append(("text", n, c, TextModel(classes=c), tokens))
    return out


def time_methods(model: nn.Module, x: torch.Tensor, output: str, repeats: int) -> dict:
    """Seconds of each exact method (ntk_vp only where it is not hopeless) and auto.

    The methods are timed in interleaved rounds (each round times every method once, in a
    rotated order), so a drift in machine speed hits all of them alike; calls shorter
    than ``_MIN_SAMPLE`` seconds are repeated within one sample and averaged. The
    fastest round counts: on a shared machine noise only ever adds time.
    """
    n = x.shape[0]
    c = model(x[:1]).shape[1]
    p = sum(q.numel() for q in model.parameters())
    methods = []
    for method in [*METHODS, "auto"]:
        if method == "ntk_vp" and n * c > 1000:
            continue  # N·C vjp/jvp pairs: minutes, and never the fastest at this size
        if method == "jacobian" and n * c * p > 2**28:
            continue  # the Jacobian block alone would exceed 1 GiB
        methods.append(method)
    calls, once = {}, {}
    for method in methods:  # warm-up (plans cached), and how many calls make one sample
        run = partial(empirical_ntk, model, x, output=output, method=method)
        run()
        start = time.perf_counter()
        run()
        once[method] = time.perf_counter() - start
        calls[method] = (run, max(1, math.ceil(_MIN_SAMPLE / max(once[method], 1e-6))))
    # a method over _HOPELESS times the fastest keeps its single timing (marked "*")
    contenders = [m for m in methods if once[m] <= _HOPELESS * min(once.values())]
    samples: dict[str, list[float]] = {m: [] for m in contenders}
    for r in range(repeats):
        for method in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            run, k = calls[method]
            start = time.perf_counter()
            for _ in range(k):
                run()
            samples[method].append((time.perf_counter() - start) / k)
    times = {m: min(t) for m, t in samples.items()}
    return {m: times.get(m, -once[m]) for m in methods}  # negative: a single timing


def time_calls(runs: dict, repeats: int) -> dict:
    """Seconds of each call in ``runs`` (``None``: it raised), timed as :func:`time_methods`."""
    calls, once = {}, {}
    for name, run in runs.items():
        try:
            run()  # warm-up
        except Exception:
            once[name] = None
            continue
        start = time.perf_counter()
        run()
        once[name] = time.perf_counter() - start
        calls[name] = (run, max(1, math.ceil(_MIN_SAMPLE / max(once[name], 1e-6))))
    ran = [m for m in calls]
    fastest = min(once[m] for m in ran)
    contenders = [m for m in ran if once[m] <= _HOPELESS * fastest]
    samples: dict[str, list[float]] = {m: [] for m in contenders}
    for r in range(repeats):
        for name in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            run, k = calls[name]
            start = time.perf_counter()
            for _ in range(k):
                run()
            samples[name].append((time.perf_counter() - start) / k)
    times = {m: min(t) for m, t in samples.items()}
    return {m: (None if once[m] is None else times.get(m, -once[m])) for m in runs}


def recipe_ntk(model: nn.Module, x1, x2, output_fn) -> torch.Tensor:
    """The torch.func tutorial's recipe: ``vmap(jacrev)`` per example, one einsum each."""
    from torch.func import functional_call, jacrev, vmap

    from lightning_ntk.kernel._inputs import call_args, unsqueeze

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def single(p, x):
        args, kwargs = call_args(unsqueeze(x))
        out = functional_call(model, p, args, kwargs)
        return (output_fn(out) if output_fn else out).squeeze(0)

    jac1 = vmap(jacrev(single), (None, 0))(params, x1)
    jac2 = jac1 if x2 is None else vmap(jacrev(single), (None, 0))(params, x2)
    return sum(torch.einsum("Naf,Mbf->NMab", jac1[k].flatten(2), jac2[k].flatten(2)) for k in jac1)


REGISTRY_METHODS = ["structured", "jacobian", "ntk_vp", "loop"]


def _float_on(t: torch.Tensor, device: str) -> torch.Tensor:
    return (t.float() if t.is_floating_point() else t).to(device)


def _synchronized(run):
    def timed():
        out = run()
        torch.cuda.synchronize()
        return out

    return timed


def registry(repeats: int, quick: bool, device: str = "cpu") -> list[float]:
    """The registry table; returns auto / fastest of every row."""
    from lightning_ntk.kernel._inputs import map_tensors
    from tests.cases import CASES

    n1, n2 = (8, 4) if quick else (16, 8)
    names = " ".join(f"{m:>10s}" for m in REGISTRY_METHODS)
    print(f"\nRegistry (tests/cases.py) on {device}, float32, full layout, N1={n1}, "
          f"N2={n2} when given")  # fmt: skip
    print(f"{'model':24s} {'x2':5s} {names} {'auto':>9s} {'recipe':>9s} {'picks':>10s} "
          f"{'auto/best':>9s} {'auto/recipe':>11s} {'max error':>9s}  cannot run")  # fmt: skip
    ratios = []
    for case in CASES:
        torch.manual_seed(0)
        model = case.model().float().eval().to(device)

        def as_float(x):
            return map_tensors(x, partial(_float_on, device=device))

        x1, x2 = as_float(case.inputs(n1, seed=11)), as_float(case.inputs(n2, seed=12))
        for second in (None, x2):
            kw = dict(output_fn=case.output_fn)
            runs = {
                m: partial(empirical_ntk, model, x1, second, method=m, fallback=False, **kw)
                for m in REGISTRY_METHODS
            }
            runs["auto"] = partial(empirical_ntk, model, x1, second, **kw)
            runs["recipe"] = partial(recipe_ntk, model, x1, second, case.output_fn)
            if device != "cpu":
                runs = {m: _synchronized(run) for m, run in runs.items()}
            times = time_calls(runs, repeats)
            error = _max_error(runs, times, model, x1, second, case.output_fn)
            runs["auto"]()
            info = last_call_info()
            exact = {m: t for m, t in times.items() if m in REGISTRY_METHODS and t is not None}
            auto = abs(times["auto"])
            best = min(abs(t) for t in exact.values())
            ratios.append(auto / best)
            recipe = times["recipe"]
            vs_recipe = f"{auto / abs(recipe):11.2f}" if recipe is not None else f"{'-':>11s}"
            cannot = [m for m in REGISTRY_METHODS if times[m] is None]
            cells = " ".join(_cell(times[m]) if times[m] is not None else f"{'n/a':>10s}"
                             for m in REGISTRY_METHODS)  # fmt: skip
            print(f"{case.name:24s} {'None' if second is None else 'given':5s} {cells} "
                  f"{auto:9.4f} {_cell(recipe)[1:] if recipe is not None else '      n/a'} "
                  f"{info.method:>10s} {auto / best:9.2f} {vs_recipe} {error:9.1e}  "
                  f"{','.join(cannot) or '-'}", flush=True)  # fmt: skip
    return ratios


def _max_error(runs, times, model, x1, x2, output_fn) -> float:
    """Largest error of the methods that ran and auto, relative to the float64 reference."""
    R = reference_ntk(model, x1, x2, output_fn=output_fn)
    scale = R.abs().max()
    errors = [
        float((runs[m]().double().cpu() - R.cpu()).abs().max() / scale)
        for m in [*REGISTRY_METHODS, "auto"]
        if times[m] is not None
    ]
    return max(errors)


def _cell(seconds) -> str:
    if seconds is None:
        return f"{'-':>10s}"
    return f"{abs(seconds):9.4f}*" if seconds < 0 else f"{seconds:10.4f}"


def auto_choice(model: nn.Module, x: torch.Tensor) -> str:
    """The method ``"auto"`` picks for one block of the whole probe."""
    fm = FunctionalModel(model)
    with torch.no_grad():
        num_classes = fm(fm.params, x[:1]).shape[1]
    return choose_method(fm, plan_structure(fm, x), num_classes, x.shape[0], x=x).value


def scaling(repeats: int, quick: bool) -> list[float]:
    """The scaling table; returns auto / fastest of the rows with several methods."""
    names = " ".join(f"{m:>10s}" for m in METHODS)
    print(f"{'case':9s} {'N':>4s} {'C':>4s} {'layout':6s} {names} {'auto':>10s} {'picks':>10s} "
          f"{'auto/best':>9s}")  # fmt: skip
    ratios = []
    for name, n, c, model, x in cases(quick):
        picks = auto_choice(model, x)
        for output in ("full", "trace"):
            times = time_methods(model, x, output, repeats)
            auto = abs(times.pop("auto"))
            best = min(abs(t) for t in times.values())
            if len(times) > 1:  # rows with a single exact method compare it with itself
                ratios.append(auto / best)
            cells = " ".join(_cell(times.get(m)) for m in METHODS)
            print(f"{name:9s} {n:4d} {c:4d} {output:6s} {cells} {auto:10.4f} {picks:>10s} "
                  f"{auto / best:9.2f}", flush=True)  # fmt: skip
    print("(* timed once: over 4x the fastest method)")
    return ratios


FIRST_CALL_METHODS = ["auto", "structured", "jacobian", "ntk_vp"]  # loop: never fastest


def _warm_up_process() -> None:
    """Pay the process's one-off start-up (autograd, vmap, forward mode) on other models."""
    from lightning_ntk.kernel import _plan, _run

    torch.manual_seed(1)
    warm = [
        (mlp(10), torch.randn(4, 64)),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 3)),
         torch.randn(4, 3, 6, 6)),
        (nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1),
         torch.randn(4, 3, 8)),
    ]  # fmt: skip
    for model, x in warm:
        model.eval()
        out = (lambda o: o.flatten(1)) if isinstance(model, nn.TransformerEncoder) else None
        for method in FIRST_CALL_METHODS:
            try:
                empirical_ntk(model, x, method=method, output_fn=out)
            except Exception:
                pass
    _run.FAILED.clear()
    _plan._PLANS.clear()


def first_calls_case(name: str, n: int, calls: int) -> dict:
    """One registry model in this process: seconds of each of the first ``calls`` calls."""
    from lightning_ntk.kernel._inputs import map_tensors
    from tests.cases import CASES_BY_NAME

    _warm_up_process()
    case = CASES_BY_NAME[name]
    x = map_tensors(case.inputs(n, seed=11), lambda t: t.float() if t.is_floating_point() else t)
    models = {m: case.model().float().eval() for m in FIRST_CALL_METHODS}  # own plans each
    seconds: dict[str, list[float]] = {m: [] for m in FIRST_CALL_METHODS}
    failed: dict[str, str] = {}
    picks = []
    for call in range(calls):
        shift = call % len(FIRST_CALL_METHODS)
        for method in FIRST_CALL_METHODS[shift:] + FIRST_CALL_METHODS[:shift]:
            if method in failed:
                continue
            kw = {} if method == "auto" else {"fallback": False}
            start = time.perf_counter()
            try:
                empirical_ntk(models[method], x, method=method, output_fn=case.output_fn, **kw)
            except Exception as err:
                failed[method] = type(err).__name__
                continue
            seconds[method].append(time.perf_counter() - start)
            if method == "auto":
                info = last_call_info()
                picks.append(f"{info.method} ({info.choice})")
    return {"seconds": seconds, "failed": failed, "picks": picks}


def first_calls(n: int, calls: int, names: list[str], repeats: int, threads: int) -> list[float]:
    """The first-calls table, each model in fresh processes; returns auto / best per model.

    Each model runs in ``repeats`` fresh processes; a method's total is the sum over the
    call index of the fastest of the processes (on a shared machine noise only adds).
    """
    from tests.cases import CASES

    print(f"\nFirst {calls} calls (tests/cases.py), each model in a fresh process after a "
          f"warm-up; float32, full layout, N={n}, x2=None, {threads} thread(s); seconds in "
          f"total, per call the fastest of {repeats} processes")  # fmt: skip
    cols = " ".join(f"{m:>10s}" for m in FIRST_CALL_METHODS)
    print(f"{'model':24s} {cols} {'best':>10s} {'auto/best':>9s}  auto's pick")
    ratios = []
    for case in CASES:
        if names and case.name not in names:
            continue
        command = [sys.executable, __file__, "--first-calls-case", case.name, "--n", str(n),
                   "--calls", str(calls), "--threads", str(threads)]  # fmt: skip
        results = []
        for _ in range(repeats):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{case.name:24s} failed: {done.stderr.strip().splitlines()[-1:]}")
                break
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if len(results) < repeats:
            continue
        totals = {
            m: sum(min(r["seconds"][m][i] for r in results) for i in range(calls))
            for m in FIRST_CALL_METHODS
            if all(len(r["seconds"][m]) == calls for r in results)
        }
        result = {"picks": [p for r in results for p in r["picks"]]}
        exact = {m: t for m, t in totals.items() if m != "auto"}
        best = min(exact, key=exact.__getitem__)
        ratio = totals["auto"] / exact[best]
        ratios.append(ratio)
        cells = " ".join(f"{totals[m]:10.4f}" if m in totals else f"{'n/a':>10s}"
                         for m in FIRST_CALL_METHODS)  # fmt: skip
        picks = sorted(set(result["picks"]), key=result["picks"].index)
        print(f"{case.name:24s} {cells} {best:>10s} {ratio:9.2f}  {'; '.join(picks)}",
              flush=True)  # fmt: skip
    return ratios


def _summary(what: str, ratios: list[float]) -> None:
    ratios = sorted(ratios)
    print(f"\n{what}: auto / fastest over {len(ratios)} rows: median "
          f"{ratios[len(ratios) // 2]:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}, "
          f"{sum(r > 1.2 for r in ratios)} above 1.2")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one N and C only")
    parser.add_argument("--only", choices=("scaling", "registry", "first-calls"), default=None)
    parser.add_argument("--device", default="cpu", help="device of the registry table")
    parser.add_argument("--calls", type=int, default=8, help="first calls: how many")
    parser.add_argument("--n", type=int, default=16, help="first calls: probe size")
    parser.add_argument("--models", nargs="*", default=[], help="first calls: these only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--first-calls-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.first_calls_case:  # one model, in this (fresh) process
        print(json.dumps(first_calls_case(args.first_calls_case, args.n, args.calls)))
        return
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; seconds, best of {args.repeats} rounds")
    if args.only in (None, "scaling"):
        _summary("scaling", scaling(args.repeats, args.quick))
    if args.only in (None, "registry"):
        _summary("registry", registry(args.repeats, args.quick, args.device))
    if args.only in (None, "first-calls"):
        calls = first_calls(args.n, args.calls, args.models, args.repeats, torch.get_num_threads())
        _summary("first calls", calls)


if __name__ == "__main__":
    main()
