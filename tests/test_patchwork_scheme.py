"""Patchwork geometry: widths, snapping, tree coverage, balance, augmentation, crops (2D and 3D)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, accumulate
from flexpatch.patchwork import crop, generate
from flexpatch.patchwork.scheme import ImageFrame, Scheme, level_widths, undersampling


def _geom(shape, spacing, system="matrix"):
    affine = np.eye(len(shape) + 1)
    affine[: len(shape), : len(shape)] = np.diag(spacing)
    affine[: len(shape), -1] = [-7.0] * len(shape)
    return ImageFrame.of(shape, affine, system)


@pytest.mark.parametrize("ndim", [2, 3])
def test_widths_follow_the_geometric_formula(ndim):
    geom = _geom((100,) * ndim, (2.0,) * ndim)
    scheme = Scheme(ndim=ndim, depth=4, matrix=(16,) * ndim, fov_rel=0.9, destvox_rel=0.5)
    w = level_widths(scheme, geom)
    fov = 0.9 * 200.0  # extent = 100 voxels of 2 mm
    final = 15 * 0.5 * 2.0
    fac = (final / fov) ** (1 / 3)
    for k in range(4):
        np.testing.assert_allclose(w[k], fov * fac**k)
    np.testing.assert_allclose(w[-1], final)
    u = undersampling(scheme, geom, w)
    np.testing.assert_allclose(u[-1], 0.5)  # finest patch voxel = half an image voxel


def test_fov_mm_destvox_mm_and_errors():
    geom = _geom((50, 60, 70), (1.0, 1.0, 3.0))
    s = Scheme(ndim=3, depth=2, matrix=[(8, 8, 8), (16, 16, 8)], fov_mm=(40, 40, 90), destvox_mm=(1, 1, 3))
    w = level_widths(s, geom)
    np.testing.assert_allclose(w[0], [40, 40, 90])
    np.testing.assert_allclose(w[1], [15, 15, 21])
    with pytest.raises(FlexPatchError, match="fov_mm or fov_rel"):
        Scheme(ndim=3, fov_mm=10, fov_rel=0.5)
    with pytest.raises(FlexPatchError, match="snapper"):
        Scheme(ndim=2, depth=3, snapper=(1, 1))
    with pytest.raises(FlexPatchError, match="system"):
        Scheme(ndim=2, system="scanner")
    assert Scheme.from_json(s.to_json()) == s


def _inside(child: generate.Level, parent: generate.Level, cm, pm) -> bool:
    """Every corner of each child lies inside its parent's box (in parent voxel units)."""
    n = child.centre.shape[1]
    corners = np.array(np.meshgrid(*[[0, m - 1] for m in cm], indexing="ij")).reshape(n, -1)
    rel = generate.relative_affines(parent.affine[child.parent], child.affine)
    pts = rel[:, :n, :n] @ corners + rel[:, :n, n:]
    return bool(np.all(pts >= -1e-6) and np.all(pts <= (np.asarray(pm) - 1)[:, None] + 1e-6))


@pytest.mark.parametrize("ndim", [2, 3])
def test_children_stay_inside_their_parent_with_the_snapper(ndim):
    geom = _geom((64,) * ndim, (1.5,) * ndim)
    scheme = Scheme(ndim=ndim, depth=3, matrix=(8,) * ndim, fov_rel=0.8, destvox_rel=1.0)
    widths = level_widths(scheme, geom)
    rng = np.random.default_rng(0)
    aug = generate.Augment(dphi=0.3, flip=(1,) * ndim, dscale=0.1)
    levels = generate.draw_chains(scheme, geom, widths, 200, rng, augment=aug)
    for k in (1, 2):
        assert _inside(levels[k], levels[k - 1], scheme.matrix[k], scheme.matrix[k - 1])
    # without the snapper only the centre is kept inside: some children stick out
    loose = Scheme(ndim=ndim, depth=3, matrix=(8,) * ndim, fov_rel=0.8, snapper=(0, 0, 0))
    levels = generate.draw_chains(loose, geom, level_widths(loose, geom), 200, rng)
    assert not _inside(levels[2], levels[1], loose.matrix[2], loose.matrix[1])


@pytest.mark.parametrize("ndim", [2, 3])
def test_tree_generation_covers_the_image(ndim):
    shape = (40, 52, 36)[:ndim]
    geom = _geom(shape, (1.0,) * ndim)
    scheme = Scheme(ndim=ndim, depth=3, matrix=(6,) * ndim, fov_rel=0.7, destvox_rel=1.0)
    widths = level_widths(scheme, geom)
    rng = np.random.default_rng(1)
    level = generate.first_level(scheme, geom, widths, "tree", 0, rng)
    for k in (1, 2):
        level = generate.next_level(scheme, geom, widths, k, level, np.arange(len(level)), "tree", 1, rng)
    cover = torch.zeros(1, *shape)
    out = torch.zeros(1, *shape)
    patches = [Patch(a, scheme.matrix[-1]) for a in level.affine]
    accumulate(out, cover, torch.ones(len(patches), 1, *scheme.matrix[-1]), patches)
    assert bool((cover > 0).all()), f"{int((cover == 0).sum())} voxels never covered"


def test_grid_offsets_count():
    off = generate.grid_offsets(np.array([0.3, 0.5, 1.0]), overlap=0.0)
    assert len(off) == 4 * 3 * 1  # floor(1/0.3 + 1) = 4, floor(1/0.5 + 1) = 3, as wide as parent: 1
    np.testing.assert_allclose(sorted(set(off[:, 0])), [-0.375, -0.125, 0.125, 0.375])


def test_balance_offset_and_autoweight():
    assert generate.balance_offset(0.5, 10, 1000) == pytest.approx(0.5 * 10 / (500 - 10))
    assert generate.balance_offset(0.0, 10, 1000) is None
    assert generate.balance_offset(0.5, 600, 1000) is None
    f = np.array([100.0, 10.0])
    w = generate.autoweight(f, 1.0)
    np.testing.assert_allclose(w * (f + 1), [w[0] * 101] * 2)  # p = 1: weight * volume is equal
    np.testing.assert_allclose(generate.autoweight(f, 0.0), [110 / 112] * 2)  # p = 0: all labels alike


@pytest.mark.parametrize("ndim", [2, 3])
def test_balanced_centres_hit_the_label_at_the_ratio(ndim):
    shape = (30,) * ndim
    label = np.zeros(shape, dtype=np.int64)
    label[(slice(3, 6),) * ndim] = 1  # a tiny object
    geom = _geom(shape, (1.0,) * ndim)
    sampler = generate.CentreSampler(geom, label, ratio=0.5)
    idx = np.round(sampler.in_image(np.random.default_rng(0), 4000)).astype(int)
    hit = label[tuple(np.clip(idx, 0, 29).T)].mean()
    assert 0.45 < hit < 0.55
    uniform = generate.CentreSampler(geom, label, ratio=0.0).in_image(np.random.default_rng(0), 4000)
    assert label[tuple(np.clip(np.round(uniform).astype(int), 0, 29).T)].mean() < 0.05


def test_rotations_are_rotations():
    rng = np.random.default_rng(3)
    for n in (2, 3):
        r = generate.rotations(rng, 50, n, 0.7)
        np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.tile(np.eye(n), (50, 1, 1)), atol=1e-12)
        np.testing.assert_allclose(np.linalg.det(r), 1.0)


def test_world_system_follows_an_oblique_affine():
    """In the world system an upright patch in mm stays upright whatever the scan's rotation."""
    a = np.eye(4)
    c, s = np.cos(0.4), np.sin(0.4)
    a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([2.0, 2.0, 3.0])
    geom = ImageFrame.of((20, 20, 10), a, "world")
    aff = geom.to_index(np.zeros((1, 3)), np.eye(3)[None], np.array([10.0, 10.0, 10.0]), (11, 11, 11))
    world_step = a[:3, :3] @ aff[0, :3, :3]  # patch axis -> world mm
    np.testing.assert_allclose(world_step, np.eye(3), atol=1e-12)


@pytest.mark.parametrize("how", [1.0, "boxcar", "max", "mixture"])
def test_smoothing_before_cropping(how):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 24, 24)).astype(np.float32)
    out = crop.smooth_level(image, how, [3.0, 3.0])
    assert out.shape == (3 if how == "mixture" else 1, 24, 24)
    if how == "max":
        from scipy import ndimage

        np.testing.assert_allclose(out[0], ndimage.maximum_filter(image[0], 3))
    if how in (1.0, "boxcar"):
        assert out.std() < image.std()
    assert crop.smooth_level(image, 1.0, [1.0, 1.0]) is image  # no undersampling, no smoothing


def test_crops_and_normalisation():
    image = np.arange(2 * 10 * 12, dtype=np.float32).reshape(2, 10, 12)
    scheme = Scheme(ndim=2, depth=1, matrix=(4, 4), normalize="patch_m0s1")
    src = crop.level_sources(image, scheme, [np.ones(2)])
    a = Patch.box((2, 3), (4, 4)).affine
    c = crop.crop_image(src[0], a[None], (4, 4), scheme)
    assert c.shape == (1, 2, 4, 4)
    np.testing.assert_allclose(c.mean(dim=(2, 3)).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(crop.normalize_image(image, "max").max(), 1.0)
    m = crop.normalize_image(image, "m0s1")
    assert abs(m.mean()) < 1e-5 and abs(m.std() - 1) < 1e-5
    label = torch.zeros(10, 12, dtype=torch.long)
    label[3, 4] = 2
    lc = crop.crop_label(label, a[None], (4, 4))
    assert lc.dtype == torch.long and int(lc[0, 1, 1]) == 2


@pytest.mark.parametrize("ndim", [2, 3])
def test_nearest_box_reads_the_same_voxels_as_nearest_sampling(ndim):
    from flexpatch.geometry import extract, nearest_box

    image = torch.randn(2, *(20,) * ndim)
    rng = np.random.default_rng(4)
    for _ in range(10):
        a = np.eye(ndim + 1)
        a[:ndim, ndim] = rng.uniform(-3, 15, ndim)
        a[:ndim, ndim] += np.where(
            np.abs(a[:ndim, ndim] % 1 - 0.5) < 0.05, 0.2, 0.0
        )  # keep off rounding ties
        p = Patch(a, (7,) * ndim)
        box = nearest_box(p)
        assert box.is_box
        torch.testing.assert_close(extract(image, [box]), extract(image, [p], mode="nearest"))
    scaled = Patch.scaled((5.0,) * ndim, (8.0,) * ndim, (5,) * ndim)
    assert nearest_box(scaled) is scaled
