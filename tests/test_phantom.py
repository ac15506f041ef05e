"""The built-in phantom: dataset layout, determinism, anatomy and the properties the methods rely on."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
from scipy import ndimage

from flexpatch.data.io import read_image, read_label
from flexpatch.data.phantom import ABDOMEN_LABELS, CELLS_LABELS, abdomen_case, cells_case, make_phantom
from flexpatch.errors import FlexPatchError


@cache
def abdomen64(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Training case i of seed 0 at 64^3, shared by the anatomy tests (0.2 s each)."""
    return abdomen_case((64, 64, 64), np.random.default_rng((0, 0, i)))


def spine_x(image: np.ndarray) -> float:
    """Mean x of bone: nothing but the spine is brighter than 400 HU."""
    return float(np.argwhere(image > 400)[:, 0].mean())


def load_case(folder, split: str, case: str) -> tuple[np.ndarray, np.ndarray]:
    image = read_image(folder / f"images{split}" / f"{case}_0000.nii.gz").data
    return image, read_label(folder / f"labels{split}" / f"{case}.nii.gz").data


def test_layout_and_dataset_json(tmp_path):
    out = make_phantom(tmp_path / "ds", cases=3, shape=(24, 20, 16), seed=7, progress=True)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "phantom_abdomen"
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == ABDOMEN_LABELS
    assert (meta["numTraining"], meta["numTest"], meta["file_ending"]) == (3, 2, ".nii.gz")
    assert (meta["ndim"], meta["spacing"], meta["kind"], meta["seed"]) == (3, [2.0, 2.0, 2.0], "abdomen", 7)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        f"phantom_00{i}_0000.nii.gz" for i in range(3)
    ]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"phantom_00{i}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [
        f"phantom_test_00{j}_0000.nii.gz" for j in (0, 1)
    ]
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == [
        f"phantom_test_00{j}.nii.gz" for j in (0, 1)
    ]
    image, label = load_case(out, "Tr", "phantom_002")
    assert image.shape == (1, 24, 20, 16) and label.shape == (24, 20, 16)
    assert label.max() <= 6 and image.min() < -900  # air outside the body


def test_cells_dataset_json_and_2d_layout(tmp_path):
    out = make_phantom(tmp_path, cases=1, test_cases=0, shape=(48, 40), ndim=2, kind="cells", progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["channel_names"], meta["labels"], meta["ndim"]) == ({"0": "microscopy"}, CELLS_LABELS, 2)
    assert meta["spacing"] == [1.0, 1.0] and not (out / "imagesTs").exists()
    import nibabel as nib

    assert nib.load(out / "imagesTr" / "phantom_000_0000.nii.gz").shape == (48, 40, 1)  # nnU-Net's 2D layout
    image, label = load_case(out, "Tr", "phantom_000")
    assert image.shape == (1, 48, 40) and set(np.unique(label)) <= {0, 1}


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_is_spacing_plus_origin(tmp_path, ndim):
    shape, spacing = (20, 18, 16)[:ndim], (1.5, 2.0, 3.0)[:ndim]
    out = make_phantom(
        tmp_path, cases=1, test_cases=0, shape=shape, ndim=ndim, spacing=spacing, progress=False
    )
    affine = read_image(out / "imagesTr" / "phantom_000_0000.nii.gz").affine
    expected = np.diag([*spacing, *(1.0,) * (4 - ndim)])
    expected[:ndim, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True)]  # centred on 0
    np.testing.assert_allclose(affine, expected)
    assert np.all(affine[:ndim, 3] != 0)
    np.testing.assert_allclose(read_label(out / "labelsTr" / "phantom_000.nii.gz").affine, expected)


@pytest.mark.parametrize("kind", ["abdomen", "cells"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_same_seed_same_arrays_other_seed_differs(tmp_path, kind, ndim):
    shape = (24,) * ndim
    a, b, c = (
        make_phantom(
            tmp_path / name, cases=1, test_cases=1, shape=shape, ndim=ndim, kind=kind, seed=s, progress=False
        )
        for name, s in (("a", 3), ("b", 3), ("c", 4))
    )
    for split, case in (("Tr", "phantom_000"), ("Ts", "phantom_test_000")):
        (ia, la), (ib, lb), (ic, lc) = (load_case(d, split, case) for d in (a, b, c))
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
        assert not np.array_equal(ia, ic)


def test_more_cases_leave_earlier_cases_unchanged(tmp_path):
    small = make_phantom(tmp_path / "s", cases=1, test_cases=1, shape=(20, 20, 20), progress=False)
    large = make_phantom(tmp_path / "l", cases=3, test_cases=2, shape=(20, 20, 20), progress=False)
    for split, case in (("Tr", "phantom_000"), ("Ts", "phantom_test_000")):
        for x, y in zip(load_case(small, split, case), load_case(large, split, case), strict=True):
            assert np.array_equal(x, y)
    assert not np.array_equal(
        load_case(large, "Tr", "phantom_000")[0], load_case(large, "Tr", "phantom_001")[0]
    )


def test_rerun_with_fewer_cases_removes_stale_ones(tmp_path):
    make_phantom(tmp_path, cases=3, test_cases=2, shape=(16, 16, 16), progress=False)
    with pytest.raises(FlexPatchError, match="holds a phantom already; --overwrite replaces it"):
        make_phantom(tmp_path, cases=1, test_cases=1, shape=(16, 16, 16), progress=False)
    make_phantom(tmp_path, cases=1, test_cases=1, shape=(16, 16, 16), progress=False, overwrite=True)
    assert [p.name for p in (tmp_path / "imagesTr").iterdir()] == ["phantom_000_0000.nii.gz"]
    assert [p.name for p in (tmp_path / "labelsTs").iterdir()] == ["phantom_test_000.nii.gz"]


def test_all_labels_present_and_lesions_inside_liver():
    seen = set()
    for i in range(4):
        image, label = abdomen64(i)
        assert image.dtype == np.float32 and label.dtype == np.int16
        assert set(range(6)) <= set(np.unique(label).tolist()), f"case {i} misses an organ"
        seen |= set(np.unique(label).tolist())
        lesion = label == 6
        if lesion.any():
            rim = ndimage.binary_dilation(lesion) & ~lesion
            assert np.isin(label[rim], (1, 6)).mean() > 0.9  # lesions lie in the liver
            assert image[lesion].mean() < image[label == 1].mean() - 20  # and are darker than it
    assert seen == set(range(7))


def test_kidneys_differ_only_by_side_of_the_spine():
    """Right kidney at low x, left at high x, the spine between, and the same intensities.

    This is what makes small patches fail: locally the two kidneys are indistinguishable.
    """
    for i in range(4):
        image, label = abdomen64(i)
        right, left = label == ABDOMEN_LABELS["kidney_right"], label == ABDOMEN_LABELS["kidney_left"]
        assert np.argwhere(right)[:, 0].mean() < spine_x(image) < np.argwhere(left)[:, 0].mean()
        assert abs(image[right].mean() - image[left].mean()) < 10
        assert abs(np.median(image[right]) - np.median(image[left])) < 10


def test_organ_layout_and_intensities():
    image, label = abdomen64(0)
    mid = image.shape[0] / 2
    x = {k: np.argwhere(label == k)[:, 0].mean() for k in range(1, 6)}
    z = {k: np.argwhere(label == k)[:, 2].mean() for k in range(1, 6)}
    assert x[1] < mid < x[2] and x[3] > mid  # liver right; spleen and stomach left
    assert z[1] > z[4] and z[2] > z[5]  # liver and spleen above the kidneys
    liver, spleen = image[label == 1].mean(), image[label == 2].mean()
    assert 40 < liver < 85 and abs(liver - spleen) < 15  # liver and spleen look alike: context decides
    assert image[label == 4].mean() > liver + 30  # kidneys are the bright organs
    assert image[0, 0, 0] < -900 and image.max() > 500  # air outside, bone in the spine


def test_two_d_abdomen_is_a_slice_through_the_kidneys():
    image, label = abdomen_case((64, 64), np.random.default_rng(1))
    assert image.shape == label.shape == (64, 64)
    assert {1, 4, 5} <= set(np.unique(label).tolist())
    assert np.argwhere(label == 4)[:, 0].mean() < spine_x(image) < np.argwhere(label == 5)[:, 0].mean()


@pytest.mark.parametrize("ndim", [2, 3])
def test_cells_are_bright_binary_nuclei(ndim):
    shape = (64, 64) if ndim == 2 else (32, 32, 32)
    for seed in range(3):
        image, label = cells_case(shape, np.random.default_rng(seed))
        assert image.dtype == np.float32 and image.shape == shape and label.shape == shape
        assert 0 <= image.min() and image.max() <= 1
        assert set(np.unique(label).tolist()) == {0, 1}
        assert ndimage.label(label)[1] > 3
        assert image[label == 1].mean() > image[label == 0].mean() + 0.15


def test_lesion_radius_controls_lesion_size():
    small = [abdomen_case((48, 48, 48), np.random.default_rng((5, i)), (1.0, 1.5))[1] for i in range(3)]
    large = [abdomen_case((48, 48, 48), np.random.default_rng((5, i)), (4.0, 5.0))[1] for i in range(3)]
    counts = [(s == 6).sum() for s in small], [(g == 6).sum() for g in large]
    assert sum(counts[1]) > 5 * sum(counts[0]) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "brain"}, "brain"),
        ({"cases": 0}, "cases"),
        ({"test_cases": -1}, "test_cases"),
        ({"seed": -1}, "seed"),
        ({"shape": (32, 32)}, r"\(32, 32\)"),
        ({"shape": (32, 8, 32)}, "too small"),
        ({"ndim": 4, "shape": (16,) * 4}, "ndim"),
        ({"spacing": (1.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"lesion_radius": (5.0, 2.0)}, "lesion_radius"),
        ({"lesion_radius": (0.0, 2.0)}, "lesion_radius"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, match):
    with pytest.raises(FlexPatchError, match=match):
        make_phantom(tmp_path, **{"shape": (16, 16, 16), "progress": False, **kwargs})
    assert not any(tmp_path.iterdir())  # validation happens before anything is written


def test_case_functions_validate_too():
    rng = np.random.default_rng(0)
    with pytest.raises(FlexPatchError, match="too small"):
        abdomen_case((8, 32, 32), rng)
    with pytest.raises(FlexPatchError, match="ndim"):
        cells_case((32,), rng)
    with pytest.raises(FlexPatchError, match="radius"):
        cells_case((32, 32), rng, radius=(3.0, 1.0))


def test_a_folder_holding_something_else_is_never_written_into(tmp_path):
    (tmp_path / "dataset.json").write_text('{"name": "Dataset001_Real", "labels": {}}')
    small = dict(cases=1, test_cases=0, shape=(16,) * 3, progress=False)
    for overwrite in (False, True):
        with pytest.raises(FlexPatchError, match="holds dataset.json, not a phantom; write the phantom"):
            make_phantom(tmp_path, **small, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.json"]
    assert "Real" in (tmp_path / "dataset.json").read_text()
