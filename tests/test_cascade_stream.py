"""The cascade's prediction holds fewer image-sized arrays, with the same outputs as before.

Reference: the computation as it was before (whole-image argmax and one-hot, both kept in int64,
the rough probabilities kept through the fine stage, the probabilities always restored whole),
copied here; labels must agree exactly, probabilities within 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexpatch.cascade.config import CascadeConfig
from flexpatch.cascade.infer import (
    Cascade,
    crop_resize,
    load_cascade,
    object_boxes,
    paste_back,
    resize,
    rough_probabilities,
    segment,
)
from flexpatch.cascade.train import train_cascade
from flexpatch.data.io import Volume, read_image
from flexpatch.data.resample import restore

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


@torch.no_grad()
def old_segment(
    rough: torch.nn.Module,
    fine: torch.nn.Module,
    image: torch.Tensor,
    size: int,
    fuse: str,
    baseline: bool,
    rules: dict,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``segment`` as it was (commit 8799144)."""
    rough_p = rough_probabilities(rough, image, size, "cpu")
    if baseline:
        return rough_p, rough_p.argmax(0), []
    boxes = object_boxes(rough_p.argmax(0), size, 0, None, **rules)
    k, spatial = rough_p.shape[0], tuple(image.shape[1:])
    fused = torch.zeros((k, *spatial))
    fused[0] = 1.0
    masks = torch.zeros((k - 1, *spatial), dtype=torch.bool)
    for i in range(0, len(boxes), 16):
        chunk = [b for _, b in boxes[i : i + 16]]
        probs = torch.softmax(fine(crop_resize(image, chunk, size, "linear")).float(), dim=1)
        for box, p in zip(chunk, probs, strict=True):
            p = resize(p, box.size, "linear")
            paste_back(fused[:1], p[:1], box, "min")
            paste_back(fused[1:], p[1:], box, "max")
            onehot = F.one_hot(p.argmax(0), k).movedim(-1, 0).bool()
            paste_back(masks, onehot[1:], box, "or")
    fused /= fused.sum(0, keepdim=True).clamp_min(1e-6)
    if fuse == "max":
        return fused, fused.argmax(0), boxes
    score = torch.where(masks, fused[1:], torch.full_like(fused[1:], -1.0))
    labels = torch.where(masks.any(0), score.argmax(0) + 1, torch.zeros_like(score[0], dtype=torch.long))
    return fused, labels, boxes


@pytest.fixture(scope="module")
def cascades(tiny_cells: Path, tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A barely trained cascade per ndim: its rough masks are noisy, so boxes are many and overlap."""
    out = {}
    for ndim, data in ((2, tiny_cells), (3, tiny_abdomen)):
        folder = tmp_path_factory.mktemp(f"sts{ndim}d")
        config = CascadeConfig.of(
            input_size=16, steps=1, batch=2, jitter=4, val_every=1, model_kwargs=TINY, min_side=2
        )
        train_cascade(data, folder, config, device="cpu", progress=False)
        image = read_image(data / "imagesTs" / "phantom_test_000_0000.nii.gz", ndim=ndim)
        out[ndim] = load_cascade(folder, device="cpu"), image
    return out


def finer(volume: Volume, factor: float) -> Volume:
    """The volume with voxels ``factor`` times as large: its resampled grid differs from its own."""
    affine = volume.affine.copy()
    affine[:3, :3] *= factor
    return Volume(volume.data, affine, volume.ndim, volume.path)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(("fuse", "baseline"), [("or", False), ("max", False), ("max", True)])
def test_streamed_cascade_matches_the_old_computation(
    cascades: dict, ndim: int, fuse: str, baseline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flexpatch.cascade.infer.ARGMAX_CHUNK_VOXELS", 50)  # several chunks per image
    monkeypatch.setattr("flexpatch.data.resample.RESTORE_CHUNK_VOXELS", 300)
    cascade: Cascade = cascades[ndim][0]
    volume = finer(cascades[ndim][1], 0.85)
    image, props = cascade.rough.prepare(volume)
    assert tuple(props["resampled_shape"]) != tuple(props["original_shape"])
    rough, fine = cascade.networks("none")
    old = old_segment(rough, fine, image[0], cascade.input_size, fuse, baseline, cascade.rules)
    assert baseline or len(old[2]) > 3, len(old[2])  # the fusion has work to do
    new = segment(rough, fine, image[0], cascade.input_size, fuse=fuse, baseline=baseline, **cascade.rules)
    assert torch.equal(new.probabilities, old[0]) and torch.equal(new.labels, old[1]) and new.boxes == old[2]
    # on the input's grid: the labels exactly, the probabilities (restored chunk by chunk) within 1e-6
    old_probs = restore(old[0].numpy(), props, is_label=False)
    old_labels = restore(old[1].numpy().astype(np.int16), props, is_label=True)
    seg = cascade.predict(volume, fuse, baseline)
    assert seg.labels.dtype == np.int16 and np.array_equal(seg.labels, old_labels)
    assert seg.probabilities.shape == old_probs.shape and seg.probabilities.dtype == np.float32
    np.testing.assert_allclose(seg.probabilities, old_probs, rtol=0, atol=1e-6)
    alone = cascade.predict(volume, fuse, baseline, probabilities=False)
    assert alone.probabilities is None and np.array_equal(alone.labels, old_labels)
    assert alone.boxes == seg.boxes == old[2]
