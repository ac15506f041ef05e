"""Streamed prediction: the sliding window slab by slab, restored slab by slab, labelled slab by
slab. Checked against the whole-image path (``sliding_window``, ``restore``: the latter is SciPy's
zoom) in 2D and 3D, and for the memory it never allocates."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from flexpatch.data.io import Volume
from flexpatch.data.preprocess import Plan
from flexpatch.data.resample import restore, restore_slabs
from flexpatch.infer.predictor import LoadedModel
from flexpatch.infer.sliding_window import slab_axis, sliding_window, sliding_window_slabs
from flexpatch.models import ModelSpec, build
from flexpatch.plan.budget import cpu_window_batch

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


def assemble(slabs, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """The slabs put together, checking that they come in order and cover every row once."""
    out = np.full(shape, np.nan, dtype=np.float32)
    row = 0
    for first, values in slabs:
        values = values.numpy() if isinstance(values, torch.Tensor) else values
        assert first == row, "slabs come in row order, without gaps"
        rows = values.shape[axis + 1]
        where = (slice(None), *[slice(None)] * axis, slice(first, first + rows))
        out[where] = values
        row += rows
    assert row == shape[axis + 1]
    return out


CASES = [  # image, patch, overlap, divisor: windows inside, covering (padded) and uneven layouts
    ((40, 33, 50), (16, 16, 16), 0.5, 1),
    ((40, 33, 50), (16, 48, 8), 0.75, 8),
    ((20, 37, 23), (8, 16, 8), 0.0, 8),
    ((40, 33, 50), (64, 64, 64), 0.5, 8),
    ((37, 29), (16, 8), 0.5, 8),
    ((64, 20), (16, 32), 0.3, 4),
]


@pytest.mark.parametrize(("shape", "patch", "overlap", "divisor"), CASES)
def test_slabs_are_the_whole_image_sliding_window(shape, patch, overlap, divisor) -> None:
    conv = torch.nn.Conv3d if len(shape) == 3 else torch.nn.Conv2d
    torch.manual_seed(0)
    net = conv(2, 3, 3, padding=1)
    image = torch.randn(1, 2, *shape)
    whole = sliding_window(net, image, patch, overlap=overlap, divisor=divisor)[0].numpy()
    for axis in range(len(shape)):
        slabs = sliding_window_slabs(net, image, patch, overlap, divisor=divisor, batch_size=3, axis=axis)
        np.testing.assert_allclose(assemble(slabs, axis, whole.shape), whole, atol=2e-6)


def test_the_slab_axis_is_the_one_the_window_covers_least() -> None:
    assert slab_axis((40, 200, 60), (32, 32, 32), 0.5, 1) == 1
    assert slab_axis((512, 512, 400), (128, 128, 128), 0.5, 1) == 0  # ties: the first
    assert slab_axis((30, 30), (64, 16), 0.5, 1) == 1  # axis 0 is covered whole


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ((30, 20, 25), (45, 13, 25)),
        ((30, 20, 25), (7, 50, 3)),
        ((10, 12), (31, 5)),
        ((5, 40, 9), (60, 41, 8)),
    ],
)
@pytest.mark.parametrize("rows", [1, 3, 100])
@pytest.mark.parametrize("chunk", [1, 200, 1 << 22])  # target voxels restored at a time
def test_slabs_restore_as_scipy_zoom_of_the_whole(source, target, rows, chunk, monkeypatch) -> None:
    monkeypatch.setattr("flexpatch.data.resample.RESTORE_CHUNK_VOXELS", chunk)
    probs = np.random.default_rng(0).random((3, *source)).astype(np.float32)
    props = {"original_shape": list(target)}
    whole = restore(probs, props, is_label=False)
    for axis in range(len(source)):
        slabs = [
            (i, probs.take(np.arange(i, min(i + rows, source[axis])), axis=axis + 1))
            for i in range(0, source[axis], rows)
        ]
        restored = assemble(restore_slabs(slabs, source[axis], props, axis), axis, whole.shape)
        np.testing.assert_allclose(restored, whole, atol=1e-6)


def random_model(ndim: int, classes: int, spacing: tuple[float, ...]) -> LoadedModel:
    torch.manual_seed(0)
    spec = ModelSpec("unet", ndim, 1, classes, dict(TINY))
    plan = Plan(
        ndim=ndim,
        in_channels=1,
        num_classes=classes,
        labels={f"c{i}": i for i in range(classes)},
        target_spacing=spacing,
        normalization=("zscore",),
        ct_window=(None,),
        median_shape=(32,) * ndim,
    )
    net = build(spec).eval()
    method = {"method": "sliding-window", "window": [16] * ndim, "fixed_size": False, "largest": [16] * ndim}
    return LoadedModel(net, spec, plan, {}, torch.device("cpu"), Path("."), method)


def volume(shape: tuple[int, ...], spacing: tuple[float, ...]) -> Volume:
    affine = np.eye(4)
    for ax, s in enumerate(spacing):
        affine[ax, ax] = s
    data = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    return Volume(data, affine, len(shape))


@pytest.mark.parametrize(
    ("shape", "spacing", "target"),
    [((30, 41, 23), (1.0, 1.3, 2.0), (1.5, 1.0, 1.0)), ((50, 37), (0.7, 1.0), (1.0, 1.2))],
)
def test_segment_is_the_whole_image_prediction(shape, spacing, target) -> None:
    """Labels and probabilities against the whole-image path written out by hand: sliding window,
    softmax, SciPy's zoom back to the input grid, argmax."""
    model = random_model(len(shape), 4, target)
    vol = volume(shape, spacing)
    image, props = model.prepare(vol)
    logits = sliding_window(model.net, image, (16,) * len(shape), overlap=0.5, divisor=model.divisor)
    reference = restore(torch.softmax(logits[0], 0).numpy(), props, is_label=False)
    labels, probs = model.segment(vol, probabilities=True)
    assert labels.dtype == np.uint8 and labels.shape == shape
    np.testing.assert_allclose(probs, reference, atol=1e-5)
    # ties within float rounding aside, the same label everywhere
    assert np.mean(labels == reference.argmax(0)) > 0.999
    alone, none = model.segment(vol)
    assert none is None and np.array_equal(alone, labels)


def test_segment_never_holds_the_whole_images_probabilities() -> None:
    """Streamed along the long axis, the NumPy allocations stay far below one float32 array of the
    image's class probabilities (the torch band is one window deep by construction)."""
    classes, shape = 7, (320, 32, 32)
    model = random_model(3, classes, (1.0, 1.0, 1.0))
    vol = volume(shape, (1.0, 1.0, 1.0))
    prepared = model.prepare(vol)
    whole = classes * np.prod(shape) * 4
    tracemalloc.start()
    labels, _ = model.segment(prepared)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert labels.shape == shape
    assert peak < whole / 3, f"NumPy peak {peak} bytes, the whole image's probabilities {whole}"


def test_the_cpu_window_batch_holds_at_most_128_cubed_voxels() -> None:
    assert cpu_window_batch((128, 128, 128), 4) == 1
    assert cpu_window_batch((96, 96, 96), 4) == 2
    assert cpu_window_batch((64, 64, 64), 4) == 4  # small windows keep the batch asked for
    assert cpu_window_batch((512, 512), 3) == 3
    assert cpu_window_batch((160, 160, 160), 4) == 1  # never below one
