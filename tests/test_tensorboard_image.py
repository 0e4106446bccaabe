"""The ``ntk/kernel`` figure, read back from the event file: size, colour map, colour bar."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from lightning_ntk.monitor.loggers import kernel_image, write_extras


class _Report:
    step = 8
    verdict = "lazy"
    causes = ()
    predicted_regime = "bounded"
    message = "fine"


def _read_back(tmp_path, kernel, labels):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    write_extras(writer, _Report(), kernel=kernel, labels=labels)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    event = acc.Images("ntk/kernel")[-1]
    pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    return event, pixels.astype(float) / 255  # (H, W, 3)


def test_kernel_figure_read_back_is_wide_with_a_diverging_colour_bar(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(12, 4)
    kernel = x @ x.T - 1.0  # entries of both signs
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 1, 2])
    event, pixels = _read_back(tmp_path, kernel, labels)
    H, W, _ = pixels.shape
    assert (event.width, event.height) == (W, H) and W >= 256 and H >= 256
    # the colour bar: the rightmost column whose colours vary from red (top) to blue (bottom)
    saturation = pixels.max(axis=2) - pixels.min(axis=2)  # (H, W)
    bar_columns = [c for c in range(W) if (saturation[:, c] > 0.3).sum() > 0.6 * H]
    assert bar_columns and bar_columns[-1] > 0.7 * W, "no colour bar on the right"
    bar = pixels[:, bar_columns[-1]]
    rows = [r for r in range(H) if saturation[r, bar_columns[-1]] > 0.3]
    top, bottom = bar[rows[0]], bar[rows[-1]]
    assert top[0] > top[2] + 0.2, f"top of the colour bar is not red: {top}"
    assert bottom[2] > bottom[0] + 0.2, f"bottom of the colour bar is not blue: {bottom}"
    middle = bar[(rows[0] + rows[-1]) // 2]
    assert middle.min() > 0.85, f"0 is not white in the middle of the bar: {middle}"
    # label pixels (dark) right of the bar: the scale is written out
    assert (pixels[:, bar_columns[-1] + 1 :].max(axis=2) < 0.3).any()


def test_kernel_figure_blocks_are_upsampled_and_classes_outlined():
    kernel = torch.tensor([[2.0, -1.0, 0.0], [-1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
    labels = torch.tensor([1, 0, 1])
    image = kernel_image(kernel, labels)  # (3, H, W)
    assert image.shape[0] == 3 and image.shape[2] >= 256
    assert image.min() >= 0 and image.max() <= 1
    cell = -(-288 // 3)
    m = 6  # margin
    # sorted by class: example 1 (class 0) comes first; its diagonal entry 2 is the maximum
    assert torch.allclose(image[:, m + 5, m + 5], image[:, m + cell - 5, m + cell - 5])
    top_left = image[:, m + 5, m + 5]
    assert top_left[0] > 0.3 and top_left[2] < 0.2  # deepest red: the largest entry
    # a dark border between the class-0 block (1 example) and the class-1 block
    assert image[:, m + cell, m + 5 : m + 3 * cell - 5].max() < 0.2


def test_kernel_figure_rejects_a_non_square_kernel():
    with pytest.raises(ValueError, match=r"square \(N, N\) matrix but got \(2, 3\)"):
        kernel_image(torch.zeros(2, 3))
