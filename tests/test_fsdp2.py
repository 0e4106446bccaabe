"""The exact NTK of models sharded with FSDP2 (``fully_shard``), two gloo processes on the CPU.

One spawn runs every check: each rank shards an MLP and a small Transformer encoder
classifier per layer and at the root, computes kernels, linearizations and tracker
reports on the sharded model, and an unsharded copy gives the reference on the same
rank. The test process compares what both ranks sent back.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_ntk import NTKTracker, empirical_ntk, linearize

METHODS = ("auto", "structured", "jacobian", "ntk_vp", "loop")
REPORT_FIELDS = (
    "relative_change",
    "kernel_distance",
    "linearization_error",
    "param_distance",
    "logit_norm",
    "logit_growth",
    "eig_max",
    "effective_rank",
    "target_alignment",
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)  # uneven shards on two ranks: 13 rows -> 7 + 6, 5 -> 3 + 2
    return nn.Sequential(nn.Linear(6, 13), nn.Tanh(), nn.Linear(13, 9), nn.Tanh(), nn.Linear(9, 5))


class _Encoder(nn.Module):
    """Token embedding, one Transformer encoder layer, mean pooling, a linear head."""

    def __init__(self, vocab: int = 11, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.TransformerEncoderLayer(
            width, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(ids)).mean(dim=1))


class _RootOwned(nn.Module):
    """A layer owned by the root FSDP module itself, and one sharded on its own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.inp = nn.Linear(6, 9)
        self.out = nn.Linear(9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x)))


def _shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.children():
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _sgd_step(model: nn.Module, x, y, optimizer=None) -> None:
    # (an optimizer of an FSDP2 model is made while its parameters are sharded)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.5)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def _whole(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _report(report) -> dict:
    return {"verdict": report.verdict, **{field: getattr(report, field) for field in REPORT_FIELDS}}


def _tracker_reports(
    model, reference, x, y, probe_x, probe_y, distributed: bool, peek: bool = False
) -> dict:
    """Start a tracker on both models, one identical SGD step on both, two reports each.

    The sharded model's tracker is also resumed from its state dict (taken after the
    first report) in a new tracker, whose second report must be the original's. With
    ``peek``, a forward pass without backward precedes the start and the first report
    (after which FSDP2 leaves the root's own parameters unsharded).
    """
    out: dict = {}
    for name, m in (("sharded", model), ("reference", reference)):
        tracker = NTKTracker(probe_x, probe_y, distributed=distributed and name == "sharded")
        sgd = torch.optim.SGD(m.parameters(), lr=0.5)
        if peek:
            with torch.no_grad():
                m(x)
        tracker.start(m)
        _sgd_step(m, x, y, sgd)
        if peek:
            with torch.no_grad():
                m(x)
        out[name] = _report(tracker.update(m, step=1))
        saved = copy.deepcopy(tracker.state_dict())
        gathered = copy.deepcopy(tracker.state_dict(gather=True)) if name == "sharded" else None
        _sgd_step(m, x, y, sgd)
        out[name + "_2"] = _report(tracker.update(m, step=2))
        if name == "sharded":
            resumed = NTKTracker(probe_x, probe_y, distributed=distributed)
            resumed.load_state_dict(saved)
            out["resumed_2"] = _report(resumed.update(m, step=2))
            kept = saved["state"]["theta0"]
            out["kept_shapes"] = {  # θ0 as kept, and the whole parameter's shape
                n: (tuple(kept[f"model.{n}"].shape), tuple(p.shape))
                for n, p in m.named_parameters()
            }
            out["kept_sharded"] = [n[len("model.") :] for n in saved["state"]["sharded"]]
            # saved whole (any rank can load it), sharded again at the first report
            assert gathered is not None
            out["gathered_shapes"] = {
                n[len("model.") :]: tuple(t.shape) for n, t in gathered["state"]["theta0"].items()
            }
            out["gathered_sharded"] = list(gathered["state"]["sharded"])
            from_whole = NTKTracker(probe_x, probe_y, distributed=distributed)
            from_whole.load_state_dict(gathered)
            out["resumed_whole_2"] = _report(from_whole.update(m, step=2))
            out["resumed_whole_sharded"] = list(from_whole.started_state.sharded)
    return out


def _checks(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(3)
    results: dict = {}

    # ------------------------------------------------------------------ MLP
    reference = _mlp()
    model = _shard(copy.deepcopy(reference), mesh)
    hooks = [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in model.modules()]
    local = {n: p.to_local().clone() for n, p in model.named_parameters()}
    x = torch.randn(7, 6, generator=gen)
    x2 = torch.randn(3, 6, generator=gen)
    results["mlp"] = {
        m: (empirical_ntk(model, x, method=m), empirical_ntk(reference, x, method=m))
        for m in METHODS
    }
    results["mlp_x2"] = (
        empirical_ntk(model, x, x2, output="diagonal", chunk_size=2),
        empirical_ntk(reference, x, x2, output="diagonal"),
    )
    results["mlp_per_layer"] = (
        empirical_ntk(model, x, per_layer=True, output="trace", params=["2", "4.bias"]),
        empirical_ntk(reference, x, per_layer=True, output="trace", params=["2", "4.bias"]),
    )
    lin = linearize(model)
    results["mlp_linearize_at_theta0"] = (lin(x), reference(x).detach())

    # the model is left as found: hooks, shards, training step
    results["mlp_hooks"] = (
        hooks,
        [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in model.modules()],
    )
    results["mlp_shards"] = {
        n: torch.equal(p.to_local(), local[n]) and type(p).__name__ == "DTensor"
        for n, p in model.named_parameters()
    }
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    _sgd_step(model, x, y)
    _sgd_step(reference, x, y)
    results["mlp_trained"] = (
        _whole(model),
        {n: p.detach().clone() for n, p in reference.named_parameters()},
    )
    results["mlp_linearize_after_step"] = (lin(x2), linearize(reference, lin.params0)(x2))

    # Adam's kernel reads the optimizer's (sharded) second moments
    adams = []
    for m in (model, reference):
        adam = torch.optim.Adam(m.parameters(), lr=1e-2)
        nn.functional.cross_entropy(m(x), y).backward()
        adam.step()
        adams.append(adam)
    results["mlp_adam"] = tuple(
        empirical_ntk(m, x, kernel="adam", optimizer=adam, output="trace")
        for m, adam in zip((model, reference), adams)
    )

    # ------------------------------------------------------------------ encoder
    reference = _Encoder()
    model = _shard(copy.deepcopy(reference), mesh)
    ids = torch.randint(0, 11, (5, 4), generator=gen)
    results["encoder"] = {
        m: (empirical_ntk(model, ids, method=m), empirical_ntk(reference, ids, method=m))
        for m in ("auto", "jacobian")
    }

    # ------------------------------------------------------------------ refused
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hybrid = nn.Linear(
        6, 4
    )  # HSDP-like: replicated over one mesh dimension, sharded over the other
    mesh_2d = init_device_mesh("cpu", (1, world))
    hybrid.weight = nn.Parameter(
        distribute_tensor(hybrid.weight.detach(), mesh_2d, [Replicate(), Shard(0)])
    )
    try:
        empirical_ntk(hybrid, x)
        results["refused_2d"] = "no error"
    except ValueError as err:
        results["refused_2d"] = str(err)
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tensor_parallel = parallelize_module(
        _mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()}
    )
    try:
        empirical_ntk(tensor_parallel, x)
        results["refused_tensor_parallel"] = "no error"
    except ValueError as err:
        results["refused_tensor_parallel"] = str(err)

    # ------------------------------------------------------------------ tracker
    probe_y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    for distributed in (False, True):
        reference = _mlp()
        model = _shard(copy.deepcopy(reference), mesh)
        results[f"tracker_{distributed}"] = _tracker_reports(
            model, reference, x, y, x, probe_y % 5, distributed
        )
    reference = _RootOwned()  # the root's own layer: unsharded between forward and backward
    model = copy.deepcopy(reference)
    fully_shard(model.out, mesh=mesh)
    fully_shard(model, mesh=mesh)
    results["tracker_root"] = _tracker_reports(
        model, reference, x, y, x, probe_y % 5, True, peek=True
    )
    reference = _Encoder()
    model = _shard(copy.deepcopy(reference), mesh)
    labels = torch.tensor([0, 1, 2, 0, 1])
    results["tracker_encoder"] = _tracker_reports(model, reference, ids, labels, ids, labels, True)
    return results


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        out[rank] = _checks(rank, world)
    except Exception as err:  # the test process shows the rank's failure
        import traceback

        out[rank] = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (got - expected).norm() / expected.norm()
    assert error <= 1e-5, f"{what}: relative error {error:.2e} > 1e-5"


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    world = 2
    manager = mp.Manager()
    out = manager.dict()
    try:
        mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    finally:
        results = [out.get(rank) for rank in range(world)]
    for rank, result in enumerate(results):
        assert isinstance(result, dict), f"rank {rank}: {result}"
    return results


def test_kernel_of_the_sharded_mlp_is_the_unsharded_kernel_on_every_rank(ranks):
    for rank, result in enumerate(ranks):
        for method, (got, expected) in result["mlp"].items():
            assert got.shape == (7, 7, 5, 5)
            _close(got, expected, f"rank {rank}, method {method}")
        _close(*result["mlp_x2"], f"rank {rank}, x2 diagonal in blocks")
        _close(*result["mlp_adam"], f"rank {rank}, Adam's kernel")
        got, expected = result["mlp_per_layer"]
        assert list(got) == list(expected) == ["2.weight", "2.bias", "4.bias"]
        for name in got:
            _close(got[name], expected[name], f"rank {rank}, per layer {name}")


def test_kernel_of_the_sharded_encoder_is_the_unsharded_kernel_on_every_rank(ranks):
    for rank, result in enumerate(ranks):
        for method, (got, expected) in result["encoder"].items():
            assert got.shape == (5, 5, 3, 3)
            _close(got, expected, f"rank {rank}, encoder, method {method}")


def test_the_sharded_model_is_left_as_found_and_trains_as_without_the_kernel(ranks):
    for result in ranks:
        before, after = result["mlp_hooks"]
        assert before == after and any(pre for pre, _ in before)  # FSDP's hooks, intact
        assert all(result["mlp_shards"].values()), result["mlp_shards"]
        trained, expected = result["mlp_trained"]
        for name, p in expected.items():
            torch.testing.assert_close(trained[name], p.detach(), rtol=1e-6, atol=1e-7)


def test_linearization_of_the_sharded_model(ranks):
    for rank, result in enumerate(ranks):
        _close(*result["mlp_linearize_at_theta0"], f"rank {rank}, f_lin at theta0")
        _close(*result["mlp_linearize_after_step"], f"rank {rank}, f_lin after a step")


@pytest.mark.parametrize(
    "case", ["tracker_False", "tracker_True", "tracker_root", "tracker_encoder"]
)
def test_tracker_on_the_sharded_model_reports_what_it_reports_unsharded(ranks, case):
    for result in ranks:
        got, expected = result[case]["sharded"], result[case]["reference"]
        assert got["verdict"] == expected["verdict"]
        for field in REPORT_FIELDS:
            assert got[field] == pytest.approx(expected[field], rel=1e-4, abs=1e-7), field
        rank0 = ranks[0][case]["sharded"]  # the same report on every rank
        assert got["verdict"] == rank0["verdict"]
        for field in REPORT_FIELDS:
            assert got[field] == pytest.approx(rank0[field], rel=1e-6, abs=1e-9), field
        got, expected = result[case]["sharded_2"], result[case]["reference_2"]
        for field in REPORT_FIELDS:  # the second report reads θ0 and the first's point
            assert got[field] == pytest.approx(expected[field], rel=1e-4, abs=1e-7), field


@pytest.mark.parametrize("case", ["tracker_False", "tracker_True", "tracker_root"])
def test_tracker_keeps_this_ranks_shards_and_resumes_from_them(ranks, case):
    # the root's own layer was unsharded when the tracker started: kept whole
    expected = ["out.weight", "out.bias"] if case == "tracker_root" else None
    for rank, result in enumerate(ranks):
        shapes, sharded = result[case]["kept_shapes"], result[case]["kept_sharded"]
        assert sharded == (expected or list(shapes))
        for name, (kept, whole) in shapes.items():
            if name not in sharded:
                assert kept == whole, name
                continue
            # this rank's rows (chunks of ceil(rows / 2): rank 0 the larger), not all of them
            rows = -(-whole[0] // 2) if rank == 0 else whole[0] // 2
            assert kept == (rows, *whole[1:]), name
        resumed, original = result[case]["resumed_2"], result[case]["sharded_2"]
        assert resumed["verdict"] == original["verdict"]
        for field in REPORT_FIELDS:
            assert resumed[field] == pytest.approx(original[field], rel=1e-6, abs=1e-9), field


def test_a_hybrid_sharding_is_refused_on_every_rank(ranks):
    for result in ranks:
        message = result["refused_2d"]
        assert "'weight' is sharded on a 2-D device mesh" in message, message
        assert "only 1-D meshes" in message
        assert 'self.device_mesh["data_parallel"]' in message  # what to do under Lightning


def test_tensor_parallelism_is_refused_on_every_rank(ranks):
    for result in ranks:
        message = result["refused_tensor_parallel"]
        assert "module '0' converts its inputs or outputs to and from DTensors" in message, message
        assert "tensor parallelism, e.g. `parallelize_module`" in message


@pytest.mark.parametrize("case", ["tracker_False", "tracker_True", "tracker_root"])
def test_tracker_state_gathered_whole_resumes_and_keeps_shards_again(ranks, case):
    for result in ranks:
        shapes = result[case]["kept_shapes"]
        assert result[case]["gathered_sharded"] == []
        assert result[case]["gathered_shapes"] == {n: whole for n, (_, whole) in shapes.items()}
        # its first report (after a training step: every parameter sharded) shards θ0 again
        assert result[case]["resumed_whole_sharded"] == [f"model.{n}" for n in shapes]
        original, resumed = result[case]["sharded_2"], result[case]["resumed_whole_2"]
        assert resumed["verdict"] == original["verdict"]
        for field in REPORT_FIELDS:
            assert resumed[field] == pytest.approx(original[field], rel=1e-6, abs=1e-9), field
