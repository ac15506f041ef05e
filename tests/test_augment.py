"""Augmentation of training patches: reproducible draws, exact geometry, intensity transforms
against SciPy and MONAI, the ignore label's loss, in 2D and 3D."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, extract
from flexpatch.sampling import PatchStream, SamplingConfig, make_loader, parse_patch_spec
from flexpatch.sampling.augment import (
    AugmentConfig,
    adjust_gamma,
    augmented_patch,
    draw_spatial,
    elastic_offsets,
    gaussian_blur,
    parse_augment,
    simulate_lowres,
)
from flexpatch.train.loss import segmentation_loss

NONE = parse_augment("none")


def test_presets_and_json_settings() -> None:
    assert parse_augment("default") == AugmentConfig()
    assert all(getattr(NONE, f.name) == 0 for f in dataclasses.fields(NONE) if f.name.startswith("p_"))
    heavy = parse_augment("heavy")
    assert heavy.p_elastic > 0 and heavy.p_rotation > AugmentConfig().p_rotation
    custom = parse_augment('{"p_mirror": 0, "zoom": [0.9, 1.1]}')
    assert custom.p_mirror == 0 and custom.zoom == (0.9, 1.1) and custom.p_rotation == 0.2
    assert parse_augment('{"preset": "none", "p_noise": 1}') == dataclasses.replace(NONE, p_noise=1.0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("strong", "not one of none, default, heavy"),
        ("[1, 2]", "preset name or a JSON object"),
        ('{"p_rotate": 0.5}', "unknown augmentation setting 'p_rotate'"),
        ('{"p_noise": 2}', "p_noise must be a probability"),
        ('{"zoom": [1.4, 0.7]}', "zoom must be a range"),
    ],
)
def test_bad_settings_are_refused_in_one_line(spec: str, message: str) -> None:
    with pytest.raises(FlexPatchError, match=message):
        parse_augment(spec)


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_rotated_patch_is_the_rotated_box(ndim: int) -> None:
    """A quarter turn of a box inside the image samples exactly the box turned by rot90."""
    shape = (12,) * ndim
    image = torch.arange(float(np.prod((20,) * ndim))).reshape(1, *(20,) * ndim)
    box = Patch.box((3,) * ndim, shape)
    quarter = np.eye(ndim)
    quarter[:2, :2] = [[0, -1], [1, 0]]  # patch axis 1 runs along -image axis 0
    turned = extract(image, [augmented_patch(box, quarter)], mode="nearest")[0, 0]
    plain = extract(image, [box])[0, 0]
    assert torch.equal(turned, torch.rot90(plain, -1, dims=(0, 1)))  # turned[i, j] = plain[11 - j, i]
    # and a zoom of 1/2 about the centre reads every second voxel of a box twice as wide
    half = augmented_patch(Patch.box((0,) * ndim, (7,) * ndim), 2 * np.eye(ndim))
    got = extract(image, [half], mode="nearest", padding="border")[0, 0]
    idx = np.clip(np.arange(7) * 2 - 3, 0, 19)
    want = image[0][np.ix_(*[idx] * ndim)]
    assert torch.equal(got, want)


def test_identity_draws_keep_the_box_fast_path() -> None:
    box = Patch.box((2, 5, 1), (8, 8, 8))
    assert augmented_patch(box, np.eye(3)).is_box
    assert augmented_patch(box, np.eye(3)).start == box.start


def test_rotation_acts_in_millimetres_and_in_plane_for_anisotropic_data() -> None:
    cfg = dataclasses.replace(NONE, p_rotation=1.0)
    g = torch.Generator().manual_seed(3)
    iso = draw_spatial(cfg, g, 3).linear
    assert np.allclose(iso @ iso.T, np.eye(3)) and not np.allclose(iso, np.eye(3))
    spacing = (1.0, 1.0, 2.0)
    lin = draw_spatial(cfg, torch.Generator().manual_seed(3), 3, spacing).linear
    d = np.diag(spacing)
    rot_mm = d @ lin @ np.linalg.inv(d)  # in millimetres the map is a rotation
    assert np.allclose(rot_mm @ rot_mm.T, np.eye(3))
    thick = draw_spatial(cfg, torch.Generator().manual_seed(3), 3, (1.0, 1.0, 5.0)).linear
    assert np.allclose(thick[2], [0, 0, 1]) and np.allclose(thick[:, 2], [0, 0, 1])  # in-plane only
    assert not np.allclose(thick, np.eye(3))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_blur_matches_scipy(ndim: int, sigma: float) -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(9, 11, 7)[:ndim]).astype(np.float32))
    want = ndimage.gaussian_filter(x.numpy().astype(np.float64), sigma, mode="nearest", truncate=3.0)
    assert np.allclose(gaussian_blur(x, sigma).numpy(), want, atol=1e-5)


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("ndim", [2, 3])
def test_gamma_matches_monai(ndim: int, invert: bool) -> None:
    from monai.transforms import AdjustContrast

    x = torch.from_numpy(np.random.default_rng(1).normal(size=(6, 7, 5)[:ndim]).astype(np.float32))
    want = AdjustContrast(1.3, invert_image=invert, retain_stats=True)(x[None].clone())[0]
    assert torch.allclose(adjust_gamma(x, 1.3, invert), torch.as_tensor(want), atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_lowres_keeps_the_shape_and_is_the_identity_at_factor_one(ndim: int) -> None:
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(8, 10, 6)[:ndim]).astype(np.float32))
    assert torch.allclose(simulate_lowres(x, 1.0), x)
    low = simulate_lowres(x, 0.5)
    assert low.shape == x.shape and not torch.allclose(low, x)


def test_elastic_offsets_are_smooth_and_bounded() -> None:
    off = elastic_offsets((16, 12, 10), magnitude=3.0, smooth=4.0, seed=5)
    assert off.shape == (16, 12, 10, 3)
    assert math.isclose(float(off.abs().max()), 3.0, rel_tol=1e-5)
    assert float((off[1:] - off[:-1]).abs().max()) < 3.0  # neighbours move alike
    assert torch.equal(off, elastic_offsets((16, 12, 10), 3.0, 4.0, 5))
    image = torch.randn(1, 20, 20, 20)
    box = Patch.box((2, 2, 2), (16, 12, 10))
    still = extract(image, [box], offsets=torch.zeros(1, 16, 12, 10, 3))
    assert torch.allclose(still, extract(image, [box]), atol=1e-5)


def _cases(folder: Path, ndim: int) -> list[Path]:
    rng = np.random.default_rng(ndim)
    paths = []
    for i, shape in enumerate([(24, 20, 18)[:ndim], (20, 24, 22)[:ndim]]):
        label = np.zeros(shape, np.int16)
        label[tuple(slice(n // 4, n // 2) for n in shape)] = 1
        image = (rng.normal(size=(2, *shape)) + label).astype(np.float32)
        np.savez(folder / f"c{i}.npz", image=image, label=label)
        paths.append(folder / f"c{i}.npz")
    return paths


def _stream(paths: list[Path], ndim: int, augment: AugmentConfig | None, **kw) -> PatchStream:
    cfg = SamplingConfig(batch_size=3, divisor=(8,) * ndim, augment=augment)
    return PatchStream(paths, parse_patch_spec("uniform:8-16", ndim, 8), cfg, seed=4, **kw)


@pytest.mark.parametrize("ndim", [2, 3])
def test_stream_augmentation_is_a_function_of_seed_and_step(tmp_path: Path, ndim: int) -> None:
    paths = _cases(tmp_path, ndim)
    heavy = parse_augment("heavy")
    full = list(make_loader(_stream(paths, ndim, heavy, steps=5), workers=0))
    resumed = list(make_loader(_stream(paths, ndim, heavy, start_step=2, steps=3), workers=2))
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    plain = list(_stream(paths, ndim, None, steps=5))
    # the same cases, sizes and centres with augmentation on; the patches differ
    assert [(p["cases"], p["size"], p["centres"]) for p in plain] == [
        (a["cases"], a["size"], a["centres"]) for a in full
    ]
    assert any(not torch.equal(p["image"], a["image"]) for p, a in zip(plain, full, strict=True))
    for a in full:  # labels stay labels: no value the case lacks, no interpolated fraction
        assert set(a["label"].unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("ndim", [2, 3])
def test_mirroring_flips_image_and_label_together(tmp_path: Path, ndim: int) -> None:
    paths = _cases(tmp_path, ndim)
    mirror = dataclasses.replace(NONE, p_mirror=1.0)
    plain, flipped = _stream(paths, ndim, None).batch(3), _stream(paths, ndim, mirror).batch(3)
    axes = list(range(2, 2 + ndim))
    assert torch.equal(flipped["image"], plain["image"].flip(axes))
    assert torch.equal(flipped["label"], plain["label"].flip([a - 1 for a in axes]))


def test_ignore_label_gets_no_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6, requires_grad=True)
    label = torch.randint(0, 3, (2, 1, 6, 6, 6))
    label[:, :, :2] = 255
    segmentation_loss(True, ignore=255)(logits, label).backward()
    assert logits.grad is not None
    assert float(logits.grad[:, :, :2].abs().max()) == 0.0
    assert float(logits.grad[:, :, 2:].abs().max()) > 0.0
    # and where nothing is ignored it is MONAI's DiceCELoss
    from monai.losses import DiceCELoss

    x, y = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 1, 5, 5))
    ref = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)(x, y)
    assert torch.allclose(segmentation_loss(False)(x, y), ref)


def test_patchwork_crops_get_the_intensity_set_reproducibly() -> None:
    from flexpatch.patchwork.config import PatchworkConfig
    from flexpatch.patchwork.rounds import _intensity

    crops = torch.randn(16, 1, 8, 8, 8)
    off = PatchworkConfig(intensity="none")
    assert _intensity(crops, off, torch.Generator().manual_seed(0)) is crops
    on = PatchworkConfig(intensity='{"preset": "none", "p_gamma": 1.0}')
    a = _intensity(crops, on, torch.Generator().manual_seed(1))
    b = _intensity(crops, on, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, crops)
    assert torch.allclose(a.mean((1, 2, 3, 4)), crops.mean((1, 2, 3, 4)), atol=1e-4)  # gamma keeps stats
    with pytest.raises(FlexPatchError, match="unknown augmentation setting"):
        PatchworkConfig(intensity='{"p_x": 1}').check()
