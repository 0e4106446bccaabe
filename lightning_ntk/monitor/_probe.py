"""The probe set: drawing it once, splitting batches into inputs and labels, model access.

The probe is drawn by indexing the dataset itself with the tracker's own
``torch.Generator``: no data-loader iterator is created (creating one draws a seed from
the global RNG), and every RNG a dataset's ``__getitem__`` may touch (torch, ``random``,
NumPy) is restored afterwards, so training sees the same data in the same order.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..kernel import _inputs
from ..kernel._functional import exact_matmuls

BatchToXY = Callable[[Any], tuple[Any, Optional[Tensor]]]

_INPUT_KEYS = ("x", "input", "inputs", "features", "image", "images", "data")
_LABEL_KEYS = ("y", "label", "labels", "target", "targets")

# Candidates read from a dataset to stratify a probe of ``n`` examples: ``n · factor``.
_POOL_FACTOR = 20


def default_batch_to_xy(batch: Any) -> tuple[Any, Optional[Tensor]]:
    """Split a batch into ``(inputs, labels)``; labels are ``None`` when there are none.

    * a tensor is all inputs;
    * a tuple / list is ``(inputs, labels, ...)``;
    * a mapping takes its labels from the first of the keys ``y, label, labels, target,
      targets``, and its inputs from the first of ``x, input, inputs, features, image,
      images, data``; a mapping with none of these (a Hugging Face batch: ``input_ids``
      with ``attention_mask``, ``pixel_values``, ``input_values``, ...) keeps every field
      but the labels as the inputs, a mapping passed to the model as keyword arguments.

    Raises:
        TypeError: a batch of another type, or a mapping with no field but the labels.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        y_key = next((k for k in _LABEL_KEYS if k in batch), None)
        labels = batch[y_key] if y_key is not None else None
        x_key = next((k for k in _INPUT_KEYS if k in batch), None)
        if x_key is not None:
            return batch[x_key], labels
        # the model takes every other field by name (a tokenizer's or processor's batch)
        inputs = {k: v for k, v in batch.items() if k != y_key}
        if not inputs:
            raise TypeError(
                f"Cannot find the inputs in a batch with keys {sorted(batch)}: it holds "
                "nothing but the labels. Pass `batch_to_xy=lambda batch: (inputs, labels)`."
            )
        return inputs, labels
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        f"Cannot split a batch of type {type(batch).__name__} into inputs and labels; pass "
        "`batch_to_xy=lambda batch: (inputs, labels)`."
    )


def draw_probe(
    dataset: Any,
    n_probe: int,
    generator: torch.Generator,
    *,
    collate_fn: Optional[Callable[[list[Any]], Any]] = None,
    batch_to_xy: Optional[BatchToXY] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Draw ``n_probe`` examples of a map-style dataset, stratified by class.

    A random pool of ``min(len, 20·n_probe)`` indices is read (in the generator's order)
    and, when labels exist (integer labels, or binary 0/1 targets stored as floats), the
    probe takes classes in turn (round-robin over the classes present, each class's
    examples in pool order), so every class is represented as evenly as the pool allows.
    Only labelled examples are drawn: a negative integer label (``ignore_index``, ``-100``
    by default) marks an example no loss term reads; with fewer than ``n_probe`` labelled
    examples in the pool the probe is drawn without labels.

    Args:
        dataset: map-style dataset (``len`` and ``__getitem__``).
        n_probe: number of probe examples, ``1 ≤ n_probe ≤ len(dataset)``.
        generator: the tracker's own generator (the global RNG is not used).
        collate_fn: turns a list of items into a batch (the data loader's);
            default ``torch.utils.data.default_collate``.
        batch_to_xy: splits a batch into ``(inputs, labels)``.

    Returns:
        ``(probe_x (n_probe, ...), probe_y (n_probe,) or None)``.

    Raises:
        ValueError: ``n_probe`` larger than the dataset, or an empty dataset.
        TypeError: a dataset without ``len`` / ``__getitem__`` (an iterable dataset).
    """
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            f"Cannot draw a probe from a {type(dataset).__name__}: expected a map-style "
            "dataset with __len__ and __getitem__; pass `probe_x` / `probe_y` explicitly."
        )
    size = len(dataset)
    if size == 0:
        raise ValueError("Cannot draw a probe from an empty dataset (len 0).")
    if n_probe > size:
        raise ValueError(
            f"Expected `n_probe` to be at most the dataset size {size} but got {n_probe}."
        )
    collate = collate_fn or torch.utils.data.default_collate
    split = batch_to_xy or default_batch_to_xy
    pool = torch.randperm(size, generator=generator)[: min(size, _POOL_FACTOR * n_probe)]
    with preserved_rng():
        items = [dataset[int(i)] for i in pool]
    x, y = split(collate(items))
    if isinstance(y, Tensor) and _class_labels(y):
        labelled = _labelled(y)
        if len(labelled) >= n_probe:  # examples a loss ignores (label -100) are no probe
            chosen = labelled[_stratified(y[labelled], n_probe)]
        else:  # too few labelled examples in the pool: an unlabelled probe
            chosen, y = torch.arange(n_probe), None
    else:
        chosen = torch.arange(n_probe)
    return _take(x, chosen), (None if y is None else _take(y, chosen))


def _class_labels(y: Tensor) -> bool:
    """Labels to stratify by: integer labels ``(N,)``, or binary 0/1 targets as floats."""
    if y.ndim != 1:
        return False
    return not y.is_floating_point() or bool(((y == 0) | (y == 1)).all())


def _labelled(y: Tensor) -> Tensor:
    """Indices of the examples with a class: integer labels ``< 0`` are ignored ones.

    ``F.cross_entropy``'s ``ignore_index`` (default ``-100``) marks unlabelled examples,
    which no loss term reads and which have no class to stratify by or to align with.
    """
    if y.is_floating_point():
        return torch.arange(len(y))
    return (y >= 0).nonzero().flatten()


def _stratified(labels: Tensor, n: int) -> Tensor:
    """Indices of ``n`` entries taking the classes in turn, each in its given order."""
    per_class = [(labels == c).nonzero().flatten().tolist() for c in labels.unique().tolist()]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for members in per_class:
            if depth < len(members) and len(chosen) < n:
                chosen.append(members[depth])
        depth += 1
    return torch.tensor(sorted(chosen))


def _take(x: Any, index: Tensor) -> Any:
    if isinstance(x, Tensor):
        return x[index]
    if isinstance(x, Mapping):
        return {k: _take(v, index) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, str):
        sequence_type: Any = type(x)  # list, tuple or a namedtuple-like sequence
        return sequence_type(_take(v, index) for v in x)
    raise TypeError(f"Expected probe inputs to be a tensor but got {type(x).__name__}.")


@contextlib.contextmanager
def preserved_rng(device: Optional[torch.device] = None) -> Iterator[None]:
    """Leave the torch (CPU and ``device``), ``random`` and NumPy RNG states as found."""
    devices = [device] if device is not None and device.type == "cuda" else []
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global state is what we keep
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


def checked_probe(probe_x: Any, probe_y: Optional[Tensor]) -> tuple[Any, Optional[Tensor]]:
    """Detached copies of probe inputs and labels, after checking that they match.

    Raises:
        TypeError: a probe that is not a tensor or a mapping / tuple of tensors.
        ValueError: an empty probe, or labels whose length differs from the inputs'.
    """
    _inputs.check_batch("probe_x", probe_x)
    n = _inputs.batch_size(probe_x)
    if probe_y is not None:
        if not isinstance(probe_y, Tensor):
            raise TypeError(
                f"Expected `probe_y` to be a torch.Tensor or None but got {type(probe_y).__name__}."
            )
        if probe_y.ndim not in (1, 2) or probe_y.shape[0] != n:
            raise ValueError(
                f"Expected `probe_y` to have shape ({n},) or ({n}, C) to match `probe_x` "
                f"of {_inputs.describe(probe_x)} but got {tuple(probe_y.shape)}."
            )
        probe_y = probe_y.detach().clone()
    return _inputs.map_tensors(probe_x, lambda t: t.detach().clone()), probe_y


def check_finite_probe(probe_x: Any) -> None:
    """Refuse probe inputs holding NaN / inf, naming that cause (not the model)."""
    bad = torch.zeros(_inputs.batch_size(probe_x), dtype=torch.bool)
    for t in _inputs.tensors_of(probe_x):
        if t.is_floating_point():
            bad |= ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1).cpu()
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"The probe inputs hold non-finite values (NaN or inf) at rows {rows[:10]}"
            f"{' ...' if len(rows) > 10 else ''}: they were drawn from the training data "
            "(or given as `probe_x`), which holds NaN / inf there. Clean the data or pass "
            "a finite `probe_x`."
        )


def nonfinite_marker(batch: Any, marker: Optional[Tensor] = None) -> Optional[Tensor]:
    """``marker + 0 · Σ t`` over the floating tensors ``t`` of a (nested) batch, in place.

    ``0 · Σ t`` is zero when every entry of ``t`` is finite and NaN when one is NaN / inf,
    so the marker, which starts at zero, is NaN exactly once some batch held a non-finite
    value (a sum of finite entries could overflow only past ``3e38``: half-precision
    tensors are summed in float32). One reduction and one scalar update per tensor, no
    host sync; ``None`` while no floating tensor was seen.
    """
    # a plain tensor, the common batch, is read directly: this runs on every training step
    tensors = (batch,) if isinstance(batch, Tensor) else _floating_tensors(batch)
    for t in tensors:
        if not t.is_floating_point():
            continue
        total = t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()
        if marker is None:
            marker = torch.zeros((), dtype=total.dtype, device=total.device)
        if total.device != marker.device:
            total = total.to(marker.device)
        marker.add_(total, alpha=0)
    return marker


def _floating_tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        if batch.is_floating_point():
            yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _floating_tensors(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from _floating_tensors(value)


# Added to an exception the model's own code raised on the probe: a measurement failure,
# not a wrong monitor argument (the monitor warns and training goes on).
MODEL_FAILURE_NOTE = (
    "lightning_ntk: raised by the model's forward on the monitor's probe set "
    "(`forward_fn(model, x)` if given, else `model(x)`)."
)


def raised_by_model(err: BaseException) -> bool:
    """Whether ``err`` came from the model's own forward on the probe (see :func:`probe_logits`)."""
    return MODEL_FAILURE_NOTE in getattr(err, "__notes__", ())


def probe_logits(fm: Any, x: Any) -> Tensor:
    """The probe's logits ``(N, C)`` at the start, the model's failures told from the monitor's.

    The model's forward runs first: whatever it raises is re-raised unchanged (its type
    stays catchable) with :data:`MODEL_FAILURE_NOTE` added, except a PyTorch
    ``RuntimeError`` in a layer, which becomes the engine's ``ValueError`` naming the
    probe's shape and the layer (chained to it). Then the monitor's checks of the output
    (a tensor of ``(N, C)`` finite logits, one row per example) raise their
    ``TypeError`` / ``ValueError`` with a note on ``forward_fn`` / ``output_fn``.
    """
    try:
        with exact_matmuls(fm.device), torch.no_grad():
            raw = fm.raw(fm.params, x)
    except Exception as err:
        failure = _with_layer_hint(fm, x, err)
        failure.add_note(MODEL_FAILURE_NOTE)
        raise failure from failure.__cause__  # `err`, or the engine's ValueError naming the layer
    try:
        with exact_matmuls(fm.device):
            return fm.checked_logits(x, "probe_x")
    except (TypeError, ValueError) as err:
        err.add_note(
            "The probe is evaluated as `forward_fn(model, x)` if given, else `model(x)`; "
            "pass `forward_fn` or `output_fn` so it yields (N, C) logits."
        )
        if fm.output_fn is None and isinstance(raw, Tensor) and raw.ndim >= 3:
            err.add_note(_PER_POSITION_NOTE.format(shape=tuple(raw.shape)))
        raise


# per-position logits (token classification, segmentation) have no (N, C) form of their own
_PER_POSITION_NOTE = (
    "The output {shape} holds logits per position (token classification, segmentation): "
    "watch one position with output_fn=lambda out: out[:, 0] (and its labels with "
    "batch_to_xy=lambda batch: (batch[0], batch[1][:, 0])), or every position as one "
    "output vector with output_fn=lambda out: out.flatten(1)."
)


def map_style(loader: Any) -> bool:
    """Whether the probe can be drawn from ``loader``'s dataset (``len`` and indexing)."""
    dataset = loader.dataset if isinstance(loader, torch.utils.data.DataLoader) else loader
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return False
    return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def probe_from_batch(x: Any, y: Optional[Tensor], n_probe: int) -> tuple[Any, Optional[Tensor]]:
    """The first ``n_probe`` labelled examples of a training batch, as a probe.

    A stream (an ``IterableDataset``) cannot be indexed, so the probe is taken from its
    first batch, not stratified; negative integer labels (``ignore_index``) are left
    out as in :func:`draw_probe`, and a batch smaller than ``n_probe`` gives all it has.

    Raises:
        TypeError / ValueError: a batch that is no tensor or mapping / tuple of tensors.
    """
    _inputs.check_batch("the first training batch", x)
    n = _inputs.batch_size(x)
    keep = torch.arange(n)
    if isinstance(y, Tensor) and y.ndim == 1 and len(y) == n:
        labelled = _labelled(y.cpu())
        keep = labelled if len(labelled) else keep
        y = y if len(labelled) else None
    keep = keep[:n_probe]
    if isinstance(y, Tensor) and len(y) == n:
        y = y[keep.to(y.device)]
    else:
        y = None
    return _inputs.take(x, keep), y


def first_dataloader(loaders: Any) -> Any:
    """The first ``DataLoader`` in what ``trainer.train_dataloader`` returns."""
    if isinstance(loaders, torch.utils.data.DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for item in loaders:
            found = first_dataloader(item)
            if found is not None:
                return found
    iterables = getattr(loaders, "iterables", None)  # a CombinedLoader
    if iterables is not None:
        return first_dataloader(iterables)
    if loaders is None:
        raise ValueError(
            "NTKMonitor found no training dataloader to draw the probe from; pass `probe_x` "
            "(and `probe_y`)."
        )
    return loaders


def _with_layer_hint(fm: Any, x: Any, err: Exception) -> BaseException:
    """The engine's ``ValueError`` naming the failing layer for a PyTorch error, else ``err``."""
    if not isinstance(err, RuntimeError):
        return err
    try:
        with exact_matmuls(fm.device):
            fm.checked_logits(x, "probe_x")
    except (TypeError, ValueError) as described:
        if described.__cause__ is not None:  # the engine's description of this failure
            return described
    except Exception:  # the model failed differently this time: keep the first error
        return err
    return err
