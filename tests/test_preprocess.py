"""Fingerprint, plan, resampling, normalisation and the cache, against numpy/torch references."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexpatch.data.dataset import DatasetInfo, load_case, load_dataset, scheme_of
from flexpatch.data.io import Volume, load_json, save_json, write_image
from flexpatch.data.preprocess import (
    Plan,
    component_sizes,
    compute_fingerprint,
    load_preprocessed,
    make_plan,
    normalize,
    preprocess_case,
    preprocess_dataset,
)
from flexpatch.data.resample import resample, restore
from flexpatch.errors import FlexPatchError

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def _plan(ndim: int = 3, **kw: object) -> Plan:
    base = dict(
        ndim=ndim,
        in_channels=1,
        num_classes=3,
        labels=LABELS,
        target_spacing=(1.0,) * ndim,
        normalization=("zscore",),
        ct_window=(None,),
        median_shape=(8,) * ndim,
    )
    return Plan(**{**base, **kw})  # type: ignore[arg-type]


def _write_case(root: Path, cid: str, image: np.ndarray, label: np.ndarray, spacing: tuple) -> None:
    affine = np.diag([*spacing, 1.0])
    for c, channel in enumerate(image):
        write_image(root / "imagesTr" / f"{cid}_{c:04d}.nii.gz", channel, affine)
    write_image(root / "labelsTr" / f"{cid}.nii.gz", label.astype(np.uint8), affine)


def _fingerprint_dataset(root: Path) -> tuple[DatasetInfo, list[np.ndarray], list[np.ndarray]]:
    """Two 2-channel CT cases whose components are known by hand."""
    rng = np.random.default_rng(0)
    a = np.zeros((8, 8, 8), np.uint8)
    a[0:2, 0:2, 0:2] = 1  # 8 voxels
    a[4, 4, 4] = a[5, 5, 5] = 1  # corner-touching: one component of 2 under full connectivity
    a[6:8, 0:3, 0:1] = 2  # 6 voxels
    b = np.zeros((8, 8, 5), np.uint8)
    b[0, 0, 0] = 1  # 1 voxel
    labels, images = [a, b], []
    for cid, lab, spacing in (("a", a, (1.0, 1.0, 2.0)), ("b", b, (1.0, 1.0, 1.0))):
        img = (rng.normal(size=(2, *lab.shape)) * 100).astype(np.float32)
        img[1] += 5000  # channel 1 must not enter the intensity statistics
        images.append(img)
        _write_case(root, cid, img, lab, spacing)
    meta = {"channel_names": {"0": "CT", "1": "PET"}, "labels": LABELS, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return load_dataset(root), images, labels


# ----------------------------------------------------------------------------- fingerprint and plan


@pytest.mark.parametrize("ndim", [2, 3])
def test_component_sizes_full_connectivity(ndim: int) -> None:
    mask = np.zeros((6,) * ndim, bool)
    mask[(0,) * ndim] = mask[(1,) * ndim] = True  # diagonal neighbours: one component
    mask[(slice(3, 5),) * ndim] = True  # a block of 2**ndim voxels
    mask[(5,) * (ndim - 1) + (0,)] = True  # isolated
    assert sorted(component_sizes(mask)) == sorted([2, 2**ndim, 1])
    assert component_sizes(np.zeros((3,) * ndim, bool)) == []


def test_fingerprint_against_numpy(tmp_path: Path) -> None:
    ds, images, labels = _fingerprint_dataset(tmp_path)
    fp = compute_fingerprint(ds)
    json.dumps(fp)
    assert fp["case_ids"] == ["a", "b"]
    assert fp["spacings"] == [[1.0, 1.0, 2.0], [1.0, 1.0, 1.0]]
    assert fp["shapes"] == [[8, 8, 8], [8, 8, 5]]
    assert fp["median_spacing"] == [1.0, 1.0, 1.5] and fp["median_shape"] == [8.0, 8.0, 6.5]
    fg = np.concatenate([img[0][lab > 0] for img, lab in zip(images, labels, strict=True)]).astype(np.float64)
    stats = fp["intensity"]
    np.testing.assert_allclose(stats["mean"], fg.mean(), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], fg.std(), rtol=1e-6)
    np.testing.assert_allclose(stats["percentile_00_5"], np.percentile(fg, 0.5))
    np.testing.assert_allclose(stats["percentile_99_5"], np.percentile(fg, 99.5))
    assert (stats["min"], stats["max"]) == (fg.min(), fg.max())
    assert fp["voxel_counts"] == {"background": 512 - 16 + 320 - 1, "liver": 11, "tumour": 6}
    liver, tumour = fp["components"]["liver"], fp["components"]["tumour"]
    assert sorted(liver["sizes_voxels"]) == [1, 2, 8] and liver["count"] == 3
    assert sorted(liver["sizes_mm3"]) == [1.0, 4.0, 16.0]  # case a's voxels are 2 mm^3
    assert liver["mean_voxels"] == pytest.approx(11 / 3) and liver["median_voxels"] == 2.0
    assert liver["median_mm3"] == 4.0 and tumour["sizes_voxels"] == [6] and tumour["mean_mm3"] == 12.0


def test_make_plan(tmp_path: Path) -> None:
    ds, _, _ = _fingerprint_dataset(tmp_path)
    fp = compute_fingerprint(ds)
    plan = make_plan(ds, fp)
    # CT + PET: the CT channel by its window, the PET channel z-scored (not clipped to the CT window)
    assert plan.target_spacing == (1.0, 1.0, 1.5) and plan.normalization == ("ct", "zscore")
    assert plan.ct_window == ((fp["intensity"]["percentile_00_5"], fp["intensity"]["percentile_99_5"]), None)
    # resampled shapes (8, 8, round(16 / 1.5) = 11) and (8, 8, round(5 / 1.5) = 3): median z 7
    assert plan.median_shape == (8, 8, 7)
    assert (plan.ndim, plan.in_channels, plan.num_classes, plan.labels) == (3, 2, 3, LABELS)
    other = make_plan(ds, fp, target_spacing=(2, 2, 2), normalization="zscore")
    assert (
        other.target_spacing == (2.0, 2.0, 2.0)
        and other.ct_window == (None, None)
        and other.median_shape == (4, 4, 5)
    )  # z: 8 and 2
    with pytest.raises(FlexPatchError, match="target spacing"):
        make_plan(ds, fp, target_spacing=(1.0, 1.0))
    with pytest.raises(FlexPatchError, match="normalization"):
        make_plan(ds, fp, normalization="minmax")


def test_plan_json_round_trip(tmp_path: Path) -> None:
    plan = _plan(normalization=("ct",), ct_window=((-100.0, 200.0),))
    save_json(tmp_path / "plan.json", plan.to_json())
    assert Plan.from_json(load_json(tmp_path / "plan.json")) == plan
    with pytest.raises(FlexPatchError, match="target_spacing"):
        Plan.from_json({k: v for k, v in plan.to_json().items() if k != "target_spacing"})
    with pytest.raises(FlexPatchError, match="ct_window"):
        _plan(normalization=("ct",))


def test_json_helpers(tmp_path: Path) -> None:
    save_json(tmp_path / "x.json", {"a": np.float32(1.5), "b": np.arange(3), "p": tmp_path})
    assert load_json(tmp_path / "x.json") == {"a": 1.5, "b": [0, 1, 2], "p": str(tmp_path)}
    with pytest.raises(FlexPatchError, match="missing.json"):
        load_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(FlexPatchError, match="bad.json"):
        load_json(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_resample_matches_torch(ndim: int) -> None:
    data = np.random.default_rng(ndim).normal(size=(2, *(7, 5, 6)[:ndim])).astype(np.float32)
    for shape in [(11, 3, 12)[:ndim], (4, 9, 5)[:ndim]]:
        mode = "bilinear" if ndim == 2 else "trilinear"
        ref = F.interpolate(torch.from_numpy(data)[None], size=shape, mode=mode, align_corners=False)[0]
        np.testing.assert_allclose(resample(data, shape, order=1), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_label_round_trip_integer_zoom(ndim: int) -> None:
    label = np.random.default_rng(0).integers(0, 4, (5, 4, 3)[:ndim]).astype(np.int16)
    factors = (2, 3, 1)[:ndim]
    expected = label
    for axis, f in enumerate(factors):  # nearest neighbour at an integer zoom repeats every voxel
        expected = np.repeat(expected, f, axis=axis)
    up = resample(label, expected.shape, order=0)
    assert up.dtype == np.int16
    np.testing.assert_array_equal(up, expected)
    np.testing.assert_array_equal(restore(up, {"original_shape": list(label.shape)}, is_label=True), label)


@pytest.mark.parametrize("ndim", [2, 3])
def test_restore_shapes_and_identity(ndim: int) -> None:
    rng = np.random.default_rng(1)
    orig = (7, 5, 6)[:ndim]
    props = {"original_shape": list(orig)}
    for shape in [(10, 3, 4)[:ndim], (13, 8, 9)[:ndim]]:
        assert restore(rng.random((3, *shape)), props, is_label=False).shape == (3, *orig)
        assert restore(rng.integers(0, 3, shape), props, is_label=True).shape == orig
    probs = rng.random((2, *orig)).astype(np.float32)
    np.testing.assert_array_equal(restore(probs, props, is_label=False), probs)


# ----------------------------------------------------------------------------- normalisation and cases


def test_ct_normalisation_golden() -> None:
    plan = _plan(ndim=2, normalization=("ct",), ct_window=((0.0, 100.0),))
    image = np.array([[[-1000.0, 0.0, 50.0], [25.0, 100.0, 2000.0]]], np.float32)
    expected = np.array([[[0.0, 0.0, 0.5], [0.25, 1.0, 1.0]]], np.float32)
    np.testing.assert_array_equal(normalize(image, plan), expected)
    np.testing.assert_array_equal(normalize(image, _plan(ndim=2, normalization=("none",))), image)


def test_zscore_per_channel() -> None:
    image = np.random.default_rng(0).normal(size=(2, 6, 6)).astype(np.float32)
    image[1] = image[1] * 40 + 300
    out = normalize(image, _plan(ndim=2, in_channels=2, normalization=("zscore",) * 2, ct_window=(None,) * 2))
    for c in range(2):
        np.testing.assert_allclose(out[c], (image[c] - image[c].mean()) / image[c].std(), atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_preprocess_case_and_restore(ndim: int) -> None:
    spacing = (2.0, 1.0, 3.0)[:ndim]
    affine = np.diag([*spacing, *([1.0] * (4 - ndim))])
    affine[:3, 3] = [10.0, -5.0, 2.0]
    label = np.random.default_rng(0).integers(0, 3, (4, 5, 3)[:ndim]).astype(np.int16)
    image = Volume(label[None].astype(np.float32) * 10, affine, ndim)
    plan = _plan(ndim, normalization=("none",))
    data, seg, props = preprocess_case(image, Volume(label, affine, ndim), plan)
    expected = (8, 5, 9)[:ndim]
    assert data.shape == (1, *expected) and data.dtype == np.float32 and seg is not None
    assert seg.shape == expected and seg.dtype == np.int16
    assert props["original_shape"] == list(label.shape) and props["resampled_shape"] == list(expected)
    assert props["original_spacing"] == list(spacing) and props["original_affine"] == affine.tolist()
    json.dumps(props)
    np.testing.assert_array_equal(restore(seg, props, is_label=True), label)
    # the resampled grid's first voxel centre lies a quarter of an old voxel before the old first centre
    first = np.array(props["resampled_affine"]) @ np.array([0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(first[:2], [10.0 - 0.25 * 2.0, -5.0])
    with pytest.raises(FlexPatchError, match="channels"):
        preprocess_case(Volume(np.zeros((2, *label.shape), np.float32), affine, ndim), None, _plan(ndim))


def test_cache_reused_and_invalidated(tmp_path: Path) -> None:
    ds, _, _ = _fingerprint_dataset(tmp_path / "raw")
    plan = make_plan(ds, compute_fingerprint(ds), target_spacing=(1.0, 1.0, 2.0))
    paths = preprocess_dataset(ds, plan, tmp_path / "cache", progress=False)
    assert [p.name for p in paths] == ["a.npz", "b.npz"] and paths[0].parent.name == plan.digest()
    image, label, props = load_preprocessed(paths[1])
    ref_image, ref_label, ref_props = preprocess_case(*load_case(ds.training[1], 3, LABELS), plan)
    np.testing.assert_array_equal(image, ref_image)
    np.testing.assert_array_equal(label, ref_label)
    assert props == ref_props
    stamps = [(p.stat().st_mtime_ns, p.stat().st_ino) for p in paths]
    assert preprocess_dataset(ds, plan, tmp_path / "cache", progress=False) == paths
    assert [(p.stat().st_mtime_ns, p.stat().st_ino) for p in paths] == stamps
    # a changed source file rebuilds that case only
    src = ds.training[0].images[0]
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    preprocess_dataset(ds, plan, tmp_path / "cache", progress=False)
    assert (
        paths[0].stat().st_ino != stamps[0][1]
        and (paths[1].stat().st_mtime_ns, paths[1].stat().st_ino) == stamps[1]
    )
    # a changed plan goes to a new folder
    other = preprocess_dataset(ds, make_plan(ds, compute_fingerprint(ds)), tmp_path / "cache", progress=False)
    assert other[0].parent != paths[0].parent and all(p.is_file() for p in other)
    assert load_json(other[0].parent / "plan.json")["target_spacing"] == [1.0, 1.0, 1.5]


def test_each_channel_has_its_own_scheme_and_statistics(tmp_path: Path) -> None:
    """A CT + PET case: channel 1 (PET, +5000) is z-scored with its own statistics; its foreground
    statistics are measured too; nnU-Net's scheme names are read from channel_names."""
    ds, images, labels = _fingerprint_dataset(tmp_path)
    fp = compute_fingerprint(ds)
    assert fp["intensity_per_channel"][0] == fp["intensity"]
    pet = np.concatenate([img[1][lab > 0] for img, lab in zip(images, labels, strict=True)])
    pet_mean = pet.astype(np.float64).mean()
    np.testing.assert_allclose(fp["intensity_per_channel"][1]["mean"], pet_mean, rtol=1e-9)
    plan = make_plan(ds, fp)
    out = normalize(images[0], plan)
    lo, hi = plan.ct_window[0]
    np.testing.assert_allclose(out[0], (np.clip(images[0][0], lo, hi) - lo) / (hi - lo), rtol=1e-6)
    np.testing.assert_allclose(out[1], (images[0][1] - images[0][1].mean()) / images[0][1].std(), atol=1e-4)
    names = ["CT", "noNorm", "zscore", "rescale_to_0_1", "rgb_to_0_1", "T2", "PET"]
    assert [scheme_of(n) for n in names] == ["ct", "none", "zscore", "rescale", "rgb", "zscore", "zscore"]


def test_rescale_and_rgb_schemes_golden() -> None:
    image = np.array([[[10.0, 20.0], [30.0, 50.0]], [[0.0, 51.0], [255.0, 102.0]]], np.float32)
    plan = _plan(ndim=2, in_channels=2, normalization=("rescale", "rgb"), ct_window=(None, None))
    expected = np.array([[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.2], [1.0, 0.4]]], np.float32)
    np.testing.assert_allclose(normalize(image, plan), expected, rtol=1e-6)


def test_a_plan_of_one_scheme_for_all_channels_still_reads() -> None:
    """plan.json of earlier versions: one scheme and window applied to every channel, as before."""
    old = {**_plan(in_channels=2, normalization=("ct",) * 2, ct_window=((0.0, 1.0),) * 2).to_json()}
    old.update(normalization="ct", ct_window=[0.0, 1.0])
    plan = Plan.from_json(old)
    assert plan.normalization == ("ct", "ct") and plan.ct_window == ((0.0, 1.0), (0.0, 1.0))
