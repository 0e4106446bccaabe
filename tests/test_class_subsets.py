"""Per-example class subsets of the kernel, against the float64 reference gathered alike."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import Tensor, nn

from lightning_ntk import empirical_ntk
from lightning_ntk.kernel._layout import transpose_kernel
from lightning_ntk.kernel.reference import reference_ntk
from lightning_ntk.kernel.sketch import class_subset_ntk, probe_classes

from .cases import CASES_BY_NAME

METHODS = ["structured", "jacobian", "ntk_vp", "auto"]
OUTPUTS = ["full", "diagonal", "trace"]
C = 7  # classes of the MLP
N1, N2, M = 5, 4, 3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, C)
    )


def _rows(n: int, m: int, classes: int, seed: int) -> Tensor:
    """``(n, m)`` random class indices per example (repeats allowed, as the API allows)."""
    return torch.randint(0, classes, (n, m), generator=torch.Generator().manual_seed(seed))


def _gathered(full: Tensor, rows1: Tensor, rows2: Tensor, output: str) -> Tensor:
    """``K[i, j, r, s] = full[i, j, rows1[i, r], rows2[j, s]]`` in the layout ``output``."""
    i = torch.arange(rows1.shape[0])[:, None, None, None]
    j = torch.arange(rows2.shape[0])[None, :, None, None]
    K = full[i, j, rows1[:, None, :, None], rows2[None, :, None, :]]  # (N1, N2, m, m)
    if output == "full":
        return K
    diag = K.diagonal(dim1=2, dim2=3)  # (N1, N2, m)
    return diag if output == "diagonal" else diag.mean(dim=-1)


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def mlp_setup():
    model = _mlp().double()
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(N1, 6, generator=g, dtype=torch.float64)
    x2 = torch.randn(N2, 6, generator=g, dtype=torch.float64)
    full11 = reference_ntk(model, x1)
    full12 = reference_ntk(model, x1, x2)
    return model, x1, x2, _rows(N1, M, C, 2), _rows(N2, M, C, 3), full11, full12


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("method", METHODS)
def test_per_example_subsets_match_the_reference(mlp_setup, method, output):
    model, x1, x2, rows1, rows2, full11, full12 = mlp_setup
    K11 = class_subset_ntk(model, x1, classes=rows1, output=output, method=method)
    _assert_close(K11, _gathered(full11, rows1, rows1, output))
    K12 = class_subset_ntk(
        model, x1, x2, classes=rows1, classes2=rows2, output=output, method=method
    )
    _assert_close(K12, _gathered(full12, rows1, rows2, output))
    assert torch.equal(K11, transpose_kernel(K11, output))  # exactly symmetric for x2=None


@pytest.mark.parametrize("method", METHODS)
def test_chunks_smaller_than_the_probe(mlp_setup, method):
    model, x1, x2, rows1, rows2, full11, full12 = mlp_setup
    K11 = class_subset_ntk(model, x1, classes=rows1, method=method, chunk_size=2)
    _assert_close(K11, _gathered(full11, rows1, rows1, "full"))
    assert torch.equal(K11, transpose_kernel(K11, "full"))
    K12 = class_subset_ntk(
        model, x1, x2, classes=rows1, classes2=rows2, method=method, chunk_size=3, store_on="cpu"
    )
    _assert_close(K12, _gathered(full12, rows1, rows2, "full"))


@pytest.mark.parametrize("method", METHODS)
def test_cnn_with_batchnorm_and_dropout(method):
    case = CASES_BY_NAME["cnn_batchnorm"]  # 5 classes, eval-mode BatchNorm and dropout
    model = case.model().train()
    x1, x2 = case.inputs(4, seed=0), case.inputs(3, seed=1)
    rows1, rows2 = _rows(4, 2, 5, 4), _rows(3, 2, 5, 5)
    full = reference_ntk(model, x1, x2)
    K = class_subset_ntk(
        model, x1, x2, classes=rows1, classes2=rows2, method=method, output="diagonal", chunk_size=2
    )
    _assert_close(K, _gathered(full, rows1, rows2, "diagonal"))
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", ["text_embedding_layernorm", "dict_output"])
def test_integer_token_inputs_and_an_output_fn(name):
    case = CASES_BY_NAME[name]  # 3 classes each
    model = case.model()
    x = case.inputs(4)
    rows = _rows(4, 2, 3, 6)
    full = reference_ntk(model, x, output_fn=case.output_fn)
    K = class_subset_ntk(model, x, classes=rows, output_fn=case.output_fn, chunk_size=3)
    _assert_close(K, _gathered(full, rows, rows, "full"))


@pytest.mark.parametrize("output", ["full", "trace"])
def test_per_layer_parts_are_the_plain_parts_gathered(mlp_setup, output):
    model, x1, x2, rows1, rows2, _, _ = mlp_setup
    plain = empirical_ntk(model, x1, x2, per_layer=True)
    total = class_subset_ntk(model, x1, x2, classes=rows1, classes2=rows2, output=output)
    parts = class_subset_ntk(
        model, x1, x2, classes=rows1, classes2=rows2, output=output, per_layer=True
    )
    assert list(parts) == list(plain)
    for name, part in parts.items():
        _assert_close(part, _gathered(plain[name], rows1, rows2, output))
    _assert_close(sum(parts.values()), total)


@pytest.mark.parametrize(
    "params",
    ["4", ["0.weight", "4"], lambda name, p: name.startswith("4.") or name == "0.bias"],
    ids=["module", "names", "predicate"],
)
@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_parameter_selection_as_in_the_plain_call(mlp_setup, params, method):
    model, x1, _, rows1, _, _, _ = mlp_setup
    full = reference_ntk(model, x1, params=params)
    K = class_subset_ntk(model, x1, classes=rows1, params=params, method=method)
    _assert_close(K, _gathered(full, rows1, rows1, "full"))
    parts = class_subset_ntk(model, x1, classes=rows1, params=params, per_layer=True)
    assert list(parts) == list(empirical_ntk(model, x1, params=params, per_layer=True))


def test_the_model_is_left_untouched():
    case = CASES_BY_NAME["cnn_batchnorm"]
    model = case.model().train()
    model[0].eval()  # a mix of flags, each to be kept
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    model[4].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    x = case.inputs(3)
    rows = _rows(3, 2, 5, 7)
    for method in METHODS:
        class_subset_ntk(model, x, classes=rows, method=method)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert flags == [m.training for m in model.modules()]
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()].count(False) == 1
    assert not any(k.startswith("model.") for k in model.state_dict())


def test_shared_one_dimensional_classes_still_slice_the_kernel(mlp_setup):
    model, x1, x2, _, _, _, full12 = mlp_setup
    classes = torch.tensor([5, 0, 3])
    K = class_subset_ntk(model, x1, x2, classes=classes, output="diagonal")
    _assert_close(K, full12[:, :, classes, classes])


def _brute_force_rows(logits: Tensor, labels: Optional[Tensor], top_k: int) -> Tensor:
    rows = []
    for i, row in enumerate(logits.tolist()):
        order = sorted(range(len(row)), key=lambda a: -row[a])
        if labels is None:
            rows.append(order[:top_k])
        else:
            label = int(labels[i])
            rows.append([label, *[a for a in order if a != label][:top_k]])
    return torch.tensor(rows)


def test_probe_classes_per_example_rows():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([int(logits[0].argmax()), int(logits[1].argmin()), 3, 3, 9, 0])
    rows = probe_classes(logits, labels, top_k=4, per_example=True)
    assert rows.shape == (6, 5) and rows.dtype == torch.int64
    assert torch.equal(rows[:, 0], labels)
    assert all(len(set(row)) == 5 for row in rows.tolist())
    assert torch.equal(rows, _brute_force_rows(logits, labels, 4))
    assert torch.equal(probe_classes(logits, labels, top_k=9, per_example=True)[:, 0], labels)
    no_labels = probe_classes(logits, top_k=3, per_example=True)
    assert torch.equal(no_labels, _brute_force_rows(logits, None, 3))
    shared = probe_classes(logits, labels, top_k=4)
    assert torch.equal(shared, torch.unique(rows))


def test_probe_classes_rows_feed_the_kernel(mlp_setup):
    model, x1, _, _, _, full11, _ = mlp_setup
    labels = torch.tensor([0, 6, 2, 2, 5])
    rows = probe_classes(model(x1).detach(), labels, top_k=2, per_example=True)
    K = class_subset_ntk(model, x1, classes=rows, output="trace")
    _assert_close(K, _gathered(full11, rows, rows, "trace"))


def test_class_argument_errors(mlp_setup):
    model, x1, x2, rows1, rows2, _, _ = mlp_setup
    with pytest.raises(ValueError, match="`classes` to be a non-empty 1-D tensor"):
        class_subset_ntk(model, x1, classes=[[0, 1, 2], [3], [4, 5], [6], [0]])
    with pytest.raises(ValueError, match="`classes` to be a non-empty 1-D tensor"):
        class_subset_ntk(model, x1, classes=rows1[:, :, None])
    with pytest.raises(ValueError, match=r"`classes` of shape \(5, m\) with m >= 1"):
        class_subset_ntk(model, x1, classes=rows1[:4])
    with pytest.raises(ValueError, match=r"`classes` of shape \(5, m\) with m >= 1"):
        class_subset_ntk(model, x1, classes=rows1[:, :0])
    with pytest.raises(TypeError, match="`classes` to hold integer class indices"):
        class_subset_ntk(model, x1, classes=rows1.double())
    for bad in (C, -1):
        out_of_range = rows1.clone()
        out_of_range[2, 1] = bad
        with pytest.raises(ValueError, match=r"`classes` holds indices outside \[0, 7\)"):
            class_subset_ntk(model, x1, classes=out_of_range)
    with pytest.raises(ValueError, match=r"`classes2` holds indices outside \[0, 7\)"):
        class_subset_ntk(model, x1, x2, classes=rows1, classes2=rows2 + C)
    with pytest.raises(ValueError, match=r"Expected `classes2` of shape \(4, 3\).*but got None"):
        class_subset_ntk(model, x1, x2, classes=rows1)
    with pytest.raises(ValueError, match="`classes2` to hold m = 3 classes per example"):
        class_subset_ntk(model, x1, x2, classes=rows1, classes2=rows2[:, :2])
    with pytest.raises(ValueError, match=r"`classes2` of shape \(4, m\)"):
        class_subset_ntk(model, x1, x2, classes=rows1, classes2=rows2[:3])
    with pytest.raises(ValueError, match="`classes2` goes with `x2`"):
        class_subset_ntk(model, x1, classes=rows1, classes2=rows1)
    with pytest.raises(ValueError, match="`classes2` goes with per-example classes"):
        class_subset_ntk(model, x1, x2, classes=torch.tensor([1, 2]), classes2=rows2)


def test_a_compute_dtype_too_narrow_for_the_class_indices():
    model = nn.Linear(3, 300).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    rows = torch.tensor([[299, 0], [1, 2]])
    with pytest.raises(ValueError, match="holds class indices exactly only below 256"):
        class_subset_ntk(model, x, classes=rows, dtype=torch.bfloat16)


def test_probe_classes_argument_errors():
    logits = torch.randn(3, 7)
    labels = torch.tensor([0, 6, 2])
    with pytest.raises(ValueError, match=r"`top_k` to be a positive int <= 7 .* but got 0"):
        probe_classes(logits, top_k=0, per_example=True)
    with pytest.raises(ValueError, match=r"`top_k` to be a positive int <= 7 .* but got 8"):
        probe_classes(logits, top_k=8, per_example=True)
    with pytest.raises(ValueError, match=r"`top_k` to be a positive int <= 6 \(the label"):
        probe_classes(logits, labels, top_k=7, per_example=True)
    with pytest.raises(ValueError, match=r"`top_k` to be a positive int <= 7 .* but got True"):
        probe_classes(logits, top_k=True)
    with pytest.raises(ValueError, match=r"`labels` of shape \(3,\)"):
        probe_classes(logits, labels[:, None], per_example=True)
    with pytest.raises(ValueError, match=r"`labels` in \[0, 7\)"):
        probe_classes(logits, torch.tensor([0, 7, 2]), top_k=2, per_example=True)
    with pytest.raises(TypeError, match="`labels` to hold integer classes"):
        probe_classes(logits, labels.float(), top_k=2, per_example=True)
    with pytest.raises(ValueError, match=r"`logits` of shape \(N, C\)"):
        probe_classes(logits[0], top_k=2, per_example=True)
    with pytest.raises(TypeError, match="`per_example` to be a bool"):
        probe_classes(logits, top_k=2, per_example="yes")
