"""Segment-then-segment: the authors' box rules in 2D and 3D, crop and paste-back, training and prediction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexpatch.cascade.config import CascadeConfig, check_unused
from flexpatch.cascade.infer import (
    Box,
    crop_resize,
    expand_box,
    is_cascade,
    load_cascade,
    object_boxes,
    paste_back,
    predict_cascade_files,
    segment,
)
from flexpatch.cascade.train import train_cascade
from flexpatch.checkpoint import LAST, load_checkpoint, save_checkpoint
from flexpatch.data.io import read_image
from flexpatch.errors import FlexPatchError
from flexpatch.infer.predictor import load_model
from flexpatch.infer.tta import Mirrored
from flexpatch.train.config import TrainConfig

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}  # divisor 4


def authors_expand_bbox(bbox: tuple[int, int, int, int], size: tuple[int, int], padding: int) -> tuple:
    """``expand_bbox`` of the authors' cropping.py (left, top, width, height; size = (H, W))."""
    left, top, w, h = bbox
    if w < h:
        left -= (h - w) // 2
        w = h
    elif h < w:
        top -= (w - h) // 2
        h = w
    h, w, left, top = h + 2 * padding, w + 2 * padding, left - padding, top - padding
    if left + w > size[1]:
        left -= left + w - size[1]
    if h + top > size[0]:
        top -= h + top - size[0]
    return max(0, left), max(0, top), w, h


def mask_with(shape: tuple[int, ...], *blocks: tuple[tuple[int, ...], tuple[int, ...], int]) -> np.ndarray:
    """A label map with axis-aligned blocks ``(start, size, class)``."""
    m = np.zeros(shape, dtype=np.int16)
    for start, size, cls in blocks:
        m[tuple(slice(s, s + w) for s, w in zip(start, size, strict=True))] = cls
    return m


@pytest.mark.parametrize("ndim", [2, 3])
def test_box_is_squared_about_its_centre_padded_and_kept_inside(ndim: int) -> None:
    # S = 32: padding 4. Component sides 6, 10, 8: side 10, starts moved back by (10 - w) // 2.
    start, size = (10, 12, 14)[:ndim], (6, 10, 8)[:ndim]
    [(cls, box)] = object_boxes(mask_with((40,) * ndim, (start, size, 1)), 32)
    assert cls == 1 and box == Box((4, 8, 9)[:ndim], (18,) * ndim)
    # odd difference (5 vs 8): moved back by 1, the floor of 3 / 2
    [(_, box)] = object_boxes(mask_with((40,) * ndim, ((20,) * ndim, (5,) + (8,) * (ndim - 1), 2)), 32)
    assert box == Box((15,) + (16,) * (ndim - 1), (16,) * ndim)
    # at the first and the last voxel: shifted inside, size kept
    [(_, lo), (_, hi)] = object_boxes(
        mask_with((40,) * ndim, ((0,) * ndim, (6,) * ndim, 1), ((34,) * ndim, (6,) * ndim, 1)), 32
    )
    assert lo == Box((0,) * ndim, (14,) * ndim) and hi == Box((26,) * ndim, (14,) * ndim)


def test_boxes_match_the_authors_code_in_2d() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = tuple(int(v) for v in rng.integers(30, 90, 2))
        h, w = (int(v) for v in rng.integers(1, 20, 2))
        top, left = int(rng.integers(0, shape[0] - h + 1)), int(rng.integers(0, shape[1] - w + 1))
        box = expand_box((top, left), (h, w), shape, padding=4)
        ref_l, ref_t, ref_w, ref_h = authors_expand_bbox((left, top, w, h), shape, 4)
        if max(h, w) + 8 > min(shape):
            assert box is None  # the authors' box would leave the image: dropped here
        else:
            assert box == Box((ref_t, ref_l), (ref_h, ref_w))


@pytest.mark.parametrize("ndim", [2, 3])
def test_small_and_oversized_components_are_dropped(ndim: int) -> None:
    thin = mask_with((40,) * ndim, ((5,) * ndim, (4,) + (10,) * (ndim - 1), 1))
    ok = mask_with((40,) * ndim, ((5,) * ndim, (5,) + (10,) * (ndim - 1), 1))
    assert object_boxes(thin, 32) == [] and len(object_boxes(ok, 32)) == 1
    assert len(object_boxes(thin, 32, min_side=4)) == 1
    big = mask_with((20,) * ndim, ((2,) * ndim, (16,) * ndim, 1))  # 16 + 2 * 4 > 20
    assert object_boxes(big, 32) == []
    assert object_boxes(big, 32, oversize="clip") == [(1, Box((0,) * ndim, (20,) * ndim))]


@pytest.mark.parametrize("ndim", [2, 3])
def test_components_use_full_connectivity_and_classes(ndim: int) -> None:
    # two blocks touching only at a corner: one object (8-connectivity in 2D, 26 in 3D)
    m = mask_with((40,) * ndim, ((5,) * ndim, (6,) * ndim, 1), ((11,) * ndim, (6,) * ndim, 1))
    assert object_boxes(m, 16) == [(1, expand_box((5,) * ndim, (12,) * ndim, (40,) * ndim, 2))]
    # touching blocks of two classes: a box each, or one box of the larger class
    m = mask_with((40,) * ndim, ((5,) * ndim, (6,) * ndim, 1), ((11,) + (5,) * (ndim - 1), (8,) * ndim, 2))
    assert [c for c, _ in object_boxes(m, 16)] == [1, 2]
    assert [c for c, _ in object_boxes(m, 16, per_class=False)] == [2]


@pytest.mark.parametrize("ndim", [2, 3])
def test_jitter_stays_in_bounds_reaches_them_and_replays(ndim: int) -> None:
    jitter, shape = 4, (48,) * ndim
    m = mask_with(shape, ((20,) * ndim, (10,) * ndim, 1))
    sides, starts = set(), set()
    for seed in range(300):
        [(_, box)] = object_boxes(m, 32, jitter, torch.Generator().manual_seed(seed))
        # the largest jittered side (10 +- 4) plus 2 * 4 padding, the same on every axis
        assert len(set(box.size)) == 1 and 14 <= box.size[0] <= 22
        # start 20 +- 4, moved back by at most (14 - 6) // 2 for squaring and by 4 for padding
        assert all(8 <= s <= 20 for s in box.start)
        sides.add(box.size[0])
        starts.update(box.start)
    assert 22 in sides and min(sides) <= 15 and {8, 20} <= starts
    draw = lambda: object_boxes(m, 32, jitter, torch.Generator().manual_seed(7))  # noqa: E731
    assert draw() == draw() and object_boxes(m, 32, 0) == object_boxes(m, 32)


@pytest.mark.parametrize("ndim", [2, 3])
def test_whole_image_crop_matches_torch_interpolate(ndim: int) -> None:
    image = torch.rand(2, *(24, 20, 18)[:ndim])
    for size in (8, 32):
        ours = crop_resize(image, [Box.whole(image.shape[1:])], size)[0]
        mode = "bilinear" if ndim == 2 else "trilinear"
        ref = F.interpolate(image[None], size=(size,) * ndim, mode=mode, align_corners=False)[0]
        assert torch.allclose(ours, ref, atol=1e-5)
    box = Box((3,) * ndim, (8,) * ndim)  # crop size == S: a plain slice
    assert torch.equal(crop_resize(image, [box], 8)[0], image[(slice(None), *box.slices())])


@pytest.mark.parametrize("ndim", [2, 3])
def test_paste_back_puts_a_crop_exactly_where_it_came_from(ndim: int) -> None:
    g = torch.Generator().manual_seed(0)
    shape, box = (24, 28, 20)[:ndim], Box((3, 9, 2)[:ndim], (8,) * ndim)
    mask = torch.rand(1, *shape, generator=g) > 0.5
    crop = crop_resize(mask.to(torch.int16), [box], 8, "nearest")[0]
    target = torch.zeros(1, *shape, dtype=torch.bool)
    paste_back(target, crop, box, "or")
    expected = torch.zeros_like(mask)
    expected[(slice(None), *box.slices())] = mask[(slice(None), *box.slices())]
    assert torch.equal(target, expected)
    # a box twice S: 2-voxel blocks survive the round trip exactly
    big = Box((4, 6, 2)[:ndim], (16,) * ndim)
    blocks = torch.rand(1, *(8,) * ndim, generator=g) > 0.5
    up = blocks.repeat_interleave(2, 1).repeat_interleave(2, 2)
    up = up.repeat_interleave(2, 3) if ndim == 3 else up
    image = torch.zeros(1, *shape, dtype=torch.int16)
    image[(slice(None), *big.slices())] = up
    target = torch.zeros(1, *shape, dtype=torch.bool)
    paste_back(target, crop_resize(image, [big], 8, "nearest")[0], big, "or")
    assert torch.equal(target, image.bool())
    # probabilities: the maximum, only inside the box
    probs = torch.zeros(1, *shape)
    paste_back(probs, torch.full((1, *(5,) * ndim), 0.7), big, "max")
    assert probs.sum() == pytest.approx(0.7 * 16**ndim) and probs[(0, *big.slices())].min() == pytest.approx(
        0.7
    )
    with pytest.raises(FlexPatchError, match="leaves the image"):
        paste_back(target, crop, Box((20,) * ndim, (8,) * ndim), "or")


class Levels(torch.nn.Module):
    """A stand-in network whose answer is known: class c where the intensity is near c."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([-20 * (x[:, 0] - c).abs() for c in range(self.classes)], dim=1)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("fuse", ["or", "max"])
def test_cascade_of_known_networks_recovers_the_objects(ndim: int, fuse: str) -> None:
    # objects of 12 voxels on a 4-voxel grid: the rough pass at 64 -> 16 finds them exactly and
    # each box is 12 + 2 * 2 = 16 = S voxels, so every step is exact
    shape = (64,) * ndim
    label = mask_with(shape, ((4,) * ndim, (12,) * ndim, 1), ((40,) + (8,) * (ndim - 1), (12,) * ndim, 2))
    image = torch.from_numpy(label.astype(np.float32))[None]
    net = Levels(3)
    seg = segment(net, net, image, 16, fuse=fuse)
    assert [c for c, _ in seg.boxes] == [1, 2] and all(b.size == (16,) * ndim for _, b in seg.boxes)
    assert torch.equal(seg.labels, torch.from_numpy(label).long())
    assert torch.allclose(seg.probabilities.sum(0), torch.ones(shape))
    baseline = segment(net, net, image, 16, baseline=True)
    # the baseline's linear 4x upsampling keeps 0.625 of an object at its border voxel and 0.875
    # at the next, per axis: it loses the voxels where the product falls under 0.5; the crops, none
    weight = [0.625, 0.875] + [1.0] * 8 + [0.875, 0.625]
    faces = [
        [a + i for a, i in zip(start, idx, strict=True)]
        for start in ((4,) * ndim, (40,) + (8,) * (ndim - 1))
        for idx in np.ndindex(*(12,) * ndim)
        if np.prod([weight[i] for i in idx]) < 0.5
    ]
    wrong = (baseline.labels != seg.labels).nonzero().tolist()
    assert baseline.boxes == [] and sorted(wrong) == sorted(faces)


def tiny_cascade(
    dataset: Path, out: Path, resume: bool = False, stop_after: int | None = None, **changes
) -> dict:
    base = dict(input_size=16, steps=3, batch=2, jitter=4, val_every=3, model_kwargs=TINY, min_side=2)
    config = CascadeConfig.of(**{**base, **changes})
    return train_cascade(
        dataset, out, config, device="cpu", progress=False, resume=resume, stop_after=stop_after
    )


def test_cascade_trains_and_predicts_2d(tiny_cells: Path, tmp_path: Path) -> None:
    summary = tiny_cascade(tiny_cells, tmp_path / "sts")
    assert summary["steps"] == 6 and np.isfinite(summary["last_loss"])
    model_dir = tmp_path / "sts"
    assert is_cascade(model_dir) and not is_cascade(tiny_cells)
    log = [json.loads(line) for line in (model_dir / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in log] == [(s, i) for s in ("rough", "fine") for i in (1, 2, 3)]
    assert "val_dice" in log[2] and "val_dice" in log[5]
    rough = load_model(model_dir / "rough", device="cpu")  # ordinary model folders
    assert rough.train_patch == (16, 16)
    out = tmp_path / "pred"
    written = predict_cascade_files(model_dir, [tiny_cells / "imagesTs"], out, device="cpu", progress=False)
    assert len(written) == 2
    for path in written:
        ref = read_image(tiny_cells / "imagesTs" / path.name.replace(".nii.gz", "_0000.nii.gz"), ndim=2)
        seg = np.asarray(nib.load(str(path)).dataobj)
        assert seg.shape[:2] == ref.spatial_shape and seg.max() <= 1
    boxes = json.loads((out / "boxes.json").read_text())
    assert sorted(boxes) == ["phantom_test_000", "phantom_test_001"]
    base = predict_cascade_files(
        model_dir, [tiny_cells / "imagesTs"], tmp_path / "base", device="cpu", baseline=True, progress=False
    )
    assert (
        len(base) == 2
        and json.loads((tmp_path / "base" / "boxes.json").read_text())["phantom_test_000"] == []
    )


def test_cascade_trains_and_predicts_3d_multiclass(tiny_abdomen: Path, tmp_path: Path) -> None:
    tiny_cascade(tiny_abdomen, tmp_path / "sts", steps=2, val_every=2, fine_from_rough=False, fuse="max")
    cascade = load_cascade(tmp_path / "sts", device="cpu")
    assert cascade.fuse == "max" and cascade.rules == {"min_side": 2, "per_class": True, "oversize": "drop"}
    volume = read_image(tiny_abdomen / "imagesTs" / "phantom_test_000_0000.nii.gz", ndim=3)
    seg = cascade.predict(volume)
    assert seg.labels.shape == volume.spatial_shape and seg.probabilities.shape == (7, *volume.spatial_shape)
    assert np.allclose(seg.probabilities.sum(0), 1, atol=1e-4)
    # the phantom's kidneys are a left/right pair: no mirroring in training, none at test time
    assert cascade.networks("auto") == (
        cascade.rough.net,
        cascade.fine.net,
    )
    with pytest.raises(FlexPatchError, match="would swap left and right"):
        cascade.networks("mirror")


def test_cascade_mirrors_at_test_time_when_trained_mirrored(tiny_cells: Path, tmp_path: Path) -> None:
    tiny_cascade(tiny_cells, tmp_path / "sts", steps=1, val_every=1)
    cascade = load_cascade(tmp_path / "sts", device="cpu")
    rough, fine = cascade.networks("auto")  # trained with the default augmentation: mirrored
    assert isinstance(rough, Mirrored) and isinstance(fine, Mirrored) and rough.net is cascade.rough.net
    volume = read_image(tiny_cells / "imagesTs" / "phantom_test_000_0000.nii.gz", ndim=2)
    plain, mirrored = (
        cascade.predict(volume, baseline=True),
        cascade.predict(volume, baseline=True, tta="mirror"),
    )
    assert plain.probabilities.shape == mirrored.probabilities.shape
    assert not np.allclose(plain.probabilities, mirrored.probabilities)


def test_fine_network_starts_from_the_rough_one(tiny_cells: Path, tmp_path: Path) -> None:
    tiny_cascade(tiny_cells, tmp_path / "sts", steps=1, val_every=1, lr=1e-12)
    rough, fine = (load_checkpoint(tmp_path / "sts" / s / LAST)["model"] for s in ("rough", "fine"))
    # a learning rate of 1e-12 moves no weight visibly: the fine net still holds the rough one's
    assert all(torch.allclose(rough[k], fine[k], atol=1e-6) for k in rough)


def test_bad_input_size_fails_before_preprocessing(tiny_cells: Path, tmp_path: Path) -> None:
    with pytest.raises(FlexPatchError, match="nearest valid sizes 16 or 20"):
        tiny_cascade(tiny_cells, tmp_path / "sts", input_size=18)
    assert not (tmp_path / "sts").exists()
    with pytest.raises(FlexPatchError, match="does not use train.grad_clip"):
        config = CascadeConfig(input_size=16, train=TrainConfig(grad_clip=1.0))
        train_cascade(tiny_cells, tmp_path / "sts", config, device="cpu", progress=False)
    assert not (tmp_path / "sts").exists()
    with pytest.raises(FlexPatchError, match="fusion"):
        CascadeConfig(fuse="and")
    with pytest.raises(FlexPatchError, match="not a segment-then-segment"):
        load_cascade(tmp_path, device="cpu")


def old_flat_config(**changes) -> dict:
    """The flat ``CascadeConfig`` dict (every field on one level) that older versions saved."""
    flat = dict(input_size=16, steps=3, fine_steps=None, batch=2, jitter=4, fine_from_rough=True,
                model="unet", model_kwargs=TINY, lr=1e-3, optimizer="adamw", weight_decay=3e-5,
                poly_power=0.9, val_every=3, val_fraction=0.2, fuse="or", min_side=2, per_class=True,
                oversize="drop", amp=True, target_spacing=None, seed=0)  # fmt: skip
    return {**flat, **changes}


def test_config_holds_a_train_config_and_reads_the_older_flat_form() -> None:
    config = CascadeConfig.of(input_size=16, steps=3, batch=2, jitter=4, val_every=3, model_kwargs=TINY,
                              min_side=2, target_spacing=(1.0, 2.0))  # fmt: skip
    assert config.train.batch == 2 and config.train.patch == "16" and config.train.workers == 0
    assert CascadeConfig().train.batch == 8  # the cascade's default, not TrainConfig's
    assert CascadeConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    flat = old_flat_config(target_spacing=[1.0, 2.0])  # older versions trained without augmentation
    unaugmented = dataclasses.replace(config, train=config.train.replace(augment="none"))
    assert CascadeConfig.from_json(flat) == unaugmented
    own = {k: v for k, v in config.to_json().items() if k != "train"}
    assert config.flat() == {**config.train.to_json(), **own}
    # each stage's config.json: as the older, flat config derived it
    old_stage = TrainConfig(model="unet", model_kwargs=TINY, patch="16", steps=3, batch=2, val_every=3,
                            workers=0, target_spacing=(1.0, 2.0))  # fmt: skip
    assert config.stage("rough") == config.stage("fine") == old_stage
    assert CascadeConfig.of(steps=3, fine_steps=5).stage("fine").steps == 5
    with pytest.raises(FlexPatchError, match="does not use train.init_from"):
        check_unused(CascadeConfig(train=TrainConfig(init_from="elsewhere")).train)
    with pytest.raises(FlexPatchError, match="cascade.json: train: field 'steps' must be an integer"):
        CascadeConfig.from_json({"input_size": 16, "train": {"steps": "many"}})


@pytest.mark.parametrize(
    ("stop", "flat"), [(2, False), (4, False), (4, True)]
)  # in the rough stage, in the fine stage; from checkpoints holding the older, flat config
def test_resume_reproduces_the_uninterrupted_cascade(
    tiny_cells: Path, tmp_path: Path, stop: int, flat: bool
) -> None:
    old = {"augment": "none"} if flat else {}  # as older versions trained
    whole = tiny_cascade(tiny_cells, tmp_path / "whole", val_every=2, **old)
    part = tmp_path / "part"
    first = tiny_cascade(tiny_cells, part, val_every=2, stop_after=stop, **old)
    assert first["steps"] == stop and not is_cascade(part)
    if flat:  # as an older version wrote them
        for stage in ("rough", "fine"):
            state = load_checkpoint(part / stage / LAST)
            state["cascade"] = old_flat_config(val_every=2)
            save_checkpoint(part / stage / LAST, state)
    with pytest.raises(FlexPatchError, match="not empty .* --resume"):
        tiny_cascade(tiny_cells, part, val_every=2, **old)
    with pytest.raises(FlexPatchError, match="cannot resume with a different lr"):
        tiny_cascade(tiny_cells, part, val_every=2, lr=0.5, resume=True, **old)
    if flat:  # the same config, given: it equals the flat one saved (whose run had no augmentation)
        with pytest.raises(FlexPatchError, match="cannot resume with a different augment"):
            tiny_cascade(tiny_cells, part, val_every=2, resume=True)
        done = tiny_cascade(tiny_cells, part, val_every=2, resume=True, **old)
    else:
        done = train_cascade(tiny_cells, part, None, device="cpu", progress=False, resume=True)
    assert done["steps"] == whole["steps"] == 6 and is_cascade(part)
    assert done["best_val_dice"] == whole["best_val_dice"]
    for stage in ("rough", "fine"):
        for name in ("model_best.pt", "model_last.pt"):
            a, b = (load_checkpoint(m / stage / name)["model"] for m in (tmp_path / "whole", part))
            assert all(torch.equal(a[k], b[k]) for k in a), f"{stage}/{name}"
    read = lambda m: [json.loads(x) for x in (m / "log.jsonl").read_text().splitlines()]  # noqa: E731
    logs = [read(tmp_path / "whole"), read(part)]
    assert logs[0] == logs[1] and len(logs[0]) == 6
    if flat:  # a finished folder of an older version: its cascade.json holds the flat config
        meta = json.loads((part / "cascade.json").read_text())
        older = old_flat_config(val_every=2)
        assert CascadeConfig.from_json(meta["config"]) == CascadeConfig.from_json(older)
        (part / "cascade.json").write_text(json.dumps({**meta, "config": older}))
        cascade = load_cascade(part, device="cpu")
        assert cascade.input_size == 16 and cascade.rules["min_side"] == 2
        images, pred = [tiny_cells / "imagesTs"], tmp_path / "pred"
        assert len(predict_cascade_files(part, images, pred, device="cpu", progress=False)) == 2


def test_resume_needs_a_started_cascade(tiny_cells: Path, tmp_path: Path) -> None:
    with pytest.raises(FlexPatchError, match="nothing to resume from"):
        train_cascade(tiny_cells, tmp_path / "none", None, device="cpu", progress=False, resume=True)
