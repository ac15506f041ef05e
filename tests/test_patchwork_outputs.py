"""DNP's output types on hand-made probabilities, and label names through a real NIfTI file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flexpatch.data.io import Volume, label_names_extension, read_image, read_label_names, write_like
from flexpatch.errors import FlexPatchError
from flexpatch.patchwork.outputs import parse_out_type, to_output

# four voxels, each a probability vector; reshaped to a 2D (2, 2) or a 3D (2, 1, 2) grid
# categorical: (background, label 4, label 16); values avoid .5 when scaled by 255 or 32767
CAT = [[0.6, 0.25, 0.15], [0.2, 0.45, 0.35], [0.15, 0.25, 0.6], [0.35, 0.4, 0.25]]
CAT_VALUES = [4, 16]
# multi-label sigmoids: (label 3, label 7)
MULTI = [[0.2, 0.15], [0.8, 0.6], [0.55, 0.65], [0.45, 0.05]]
MULTI_VALUES = [3, 7]
SPATIAL = {2: (2, 2), 3: (2, 1, 2)}


def _probs(voxels: list[list[float]], ndim: int, torch_tensor: bool = False) -> np.ndarray | torch.Tensor:
    arr = np.asarray(voxels, dtype=np.float32).T.reshape(len(voxels[0]), *SPATIAL[ndim])
    return torch.from_numpy(arr) if torch_tensor else arr


def _grid(values: list, ndim: int) -> np.ndarray:
    """Per-voxel expected values (scalars or channel lists) on the test grid, channels last."""
    arr = np.asarray(values)
    return arr.reshape(*SPATIAL[ndim], *arr.shape[1:])


@pytest.mark.parametrize(
    ("spec", "kind", "thresholds"),
    [
        ("float32", "float32", None),
        ("uint8", "uint8", None),
        ("int16", "int16", None),
        ("mask", "mask", None),
        ("mask:0.4,0.5", "mask", [0.4, 0.5]),
        ("atlas", "atlas", None),
        ("atlas:0.4,0.5", "atlas", [0.4, 0.5]),
        ("atls:0.3", "atlas", [0.3]),
        (" ATLS ", "atlas", None),
    ],
)
def test_parse_out_type(spec: str, kind: str, thresholds: list[float] | None) -> None:
    assert parse_out_type(spec) == (kind, thresholds)


@pytest.mark.parametrize(
    "spec",
    ["", "float16", "probs", "float32:0.5", "mask:", "mask:a", "mask:0.4,,0.5", "atlas:1.5", "mask:nan"],
)
def test_bad_out_type_raises(spec: str) -> None:
    with pytest.raises(FlexPatchError) as err:
        parse_out_type(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ndim", [2, 3])
def test_probability_types_categorical(ndim: int) -> None:
    probs = _probs(CAT, ndim, torch_tensor=True)
    f32 = to_output(probs, "float32", True, CAT_VALUES)
    assert f32.dtype == np.float32 and f32.shape == (*SPATIAL[ndim], 2)
    np.testing.assert_array_equal(f32, _grid([v[1:] for v in CAT], ndim).astype(np.float32))
    u8 = to_output(probs, "uint8", True, CAT_VALUES)
    assert u8.dtype == np.uint8
    np.testing.assert_array_equal(u8, _grid([[64, 38], [115, 89], [64, 153], [102, 64]], ndim))
    i16 = to_output(probs, "int16", True, CAT_VALUES)
    assert i16.dtype == np.int16
    expected = [[8192, 4915], [14745, 11468], [8192, 19660], [13107, 8192]]
    np.testing.assert_array_equal(i16, _grid(expected, ndim))


@pytest.mark.parametrize("ndim", [2, 3])
def test_probability_types_multilabel(ndim: int) -> None:
    probs = _probs(MULTI, ndim)
    f32 = to_output(probs, "float32", False, MULTI_VALUES)
    np.testing.assert_array_equal(f32, _grid(MULTI, ndim).astype(np.float32))
    u8 = to_output(probs, "uint8", False, MULTI_VALUES)
    np.testing.assert_array_equal(u8, _grid([[51, 38], [204, 153], [140, 166], [115, 13]], ndim))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(
    ("voxels", "categorical", "values", "spec", "expected"),
    [
        (CAT, True, CAT_VALUES, "mask", [[0, 0], [0, 0], [0, 1], [0, 0]]),
        (CAT, True, CAT_VALUES, "mask:0.35,0.3", [[0, 0], [1, 1], [0, 1], [1, 0]]),
        (CAT, True, CAT_VALUES, "mask:0.3", [[0, 0], [1, 1], [0, 1], [1, 0]]),
        (MULTI, False, MULTI_VALUES, "mask", [[0, 0], [1, 1], [1, 1], [0, 0]]),
        (MULTI, False, MULTI_VALUES, "mask:0.7,0.1", [[0, 1], [1, 1], [0, 1], [0, 0]]),
    ],
)
def test_mask(
    ndim: int, voxels: list, categorical: bool, values: list[int], spec: str, expected: list
) -> None:
    out = to_output(_probs(voxels, ndim), spec, categorical, values)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, _grid(expected, ndim))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(
    ("voxels", "categorical", "values", "spec", "expected"),
    [
        (CAT, True, CAT_VALUES, "atlas", [0, 4, 16, 4]),  # plain argmax, background included
        (CAT, True, CAT_VALUES, "atlas:0.42,0.5", [0, 4, 16, 0]),  # voxel 3: 0.4 < 0.42
        (CAT, True, CAT_VALUES, "atls:0.5", [0, 0, 16, 0]),
        (MULTI, False, MULTI_VALUES, "atlas", [0, 3, 7, 0]),  # default threshold 0.5
        (MULTI, False, MULTI_VALUES, "atlas:0.4", [0, 3, 7, 3]),
        (MULTI, False, MULTI_VALUES, "atlas:0.6,0.7", [0, 3, 0, 0]),
        # voxel 1: label 3 (0.8) fails 0.9, so label 7 (0.6 >= 0.55) wins although less probable
        (MULTI, False, MULTI_VALUES, "atlas:0.9,0.55", [0, 7, 7, 0]),
    ],
)
def test_atlas(
    ndim: int, voxels: list, categorical: bool, values: list[int], spec: str, expected: list
) -> None:
    out = to_output(_probs(voxels, ndim), spec, categorical, values)
    assert out.dtype == np.uint8 and out.shape == SPATIAL[ndim]
    np.testing.assert_array_equal(out, _grid(expected, ndim))


def test_atlas_large_label_values_are_int16() -> None:
    out = to_output(_probs(CAT, 2), "atlas", True, [4, 300])
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [[0, 4], [300, 4]])


def test_to_output_errors() -> None:
    probs = _probs(CAT, 2)
    with pytest.raises(FlexPatchError, match="thresholds"):
        to_output(probs, "mask:0.1,0.2,0.3", True, CAT_VALUES)
    with pytest.raises(FlexPatchError, match="thresholds"):
        to_output(probs, "atlas:0.1,0.2,0.3", True, CAT_VALUES)
    with pytest.raises(FlexPatchError, match="channels"):
        to_output(probs, "float32", False, CAT_VALUES)  # 3 channels but 2 labels
    with pytest.raises(FlexPatchError, match="label values"):
        to_output(probs, "float32", True, [4, 4])


def _affine() -> np.ndarray:
    c, s = np.cos(0.3), np.sin(0.3)
    rows = [[0.8 * c, -1.5 * s, 0, -20.0], [0.8 * s, 1.5 * c, 0, 13.5], [0, 0, 2.5, 7.0], [0, 0, 0, 1]]
    return np.array(rows)


def _reference(ndim: int) -> Volume:
    """An input without a file: the outputs take its affine (no header to copy)."""
    return Volume(np.zeros((1, *SPATIAL[ndim]), np.float32), _affine(), ndim)


def test_label_names_round_trip_3d(tmp_path: Path) -> None:
    atlas = to_output(_probs(CAT, 3), "atlas", True, CAT_VALUES)
    names = {4: "liver & <left> kidney", 16: 'spleen "main"'}
    path = write_like(tmp_path / "out" / "atlas.nii.gz", atlas, _reference(3), label_names=names)
    assert path == tmp_path / "out" / "atlas.nii.gz"
    img = nib.load(str(path))
    assert [e.get_code() for e in img.header.extensions] == [6]
    assert b"<LabelTable>" in img.header.extensions[0].get_content()
    np.testing.assert_allclose(img.affine, _affine(), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), atlas)
    assert read_label_names(path) == names
    assert [p.name for p in path.parent.iterdir()] == ["atlas.nii.gz"]  # no temporary file left


def test_channels_last_2d_and_3d_files(tmp_path: Path) -> None:
    probs2 = to_output(_probs(CAT, 2), "float32", True, CAT_VALUES)  # (2, 2, 2): 2D + 2 channels
    first = np.moveaxis(probs2, -1, 0)
    names = {4: "a", 16: "b"}
    p2 = write_like(tmp_path / "p2.nii.gz", first, _reference(2), channels=True, label_names=names)
    assert nib.load(str(p2)).shape == (2, 2, 1, 2)  # nnU-Net's 2D layout, channels in the 4th dim
    vol = read_image(p2, ndim=2)
    np.testing.assert_array_equal(vol.data, np.moveaxis(probs2, -1, 0))
    np.testing.assert_allclose(vol.affine, _affine(), atol=1e-6)
    assert read_label_names(p2) == {4: "a", 16: "b"}
    mask3 = to_output(_probs(MULTI, 3), "mask", False, MULTI_VALUES)  # (2, 1, 2, 2)
    p3 = write_like(tmp_path / "m3.nii", np.moveaxis(mask3, -1, 0), _reference(3), channels=True)
    img = nib.load(str(p3))
    assert img.shape == (2, 1, 2, 2) and img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask3)
    assert read_label_names(p3) == {}  # no label names written, no extension


def test_extension_and_write_errors(tmp_path: Path) -> None:
    ext = label_names_extension({2: "b", 1: "a"})
    assert ext.get_code() == 6
    assert ext.get_content() == b'<LabelTable><Label Key="1">a</Label><Label Key="2">b</Label></LabelTable>'
    with pytest.raises(FlexPatchError, match="3 spatial axes after the channels"):
        write_like(tmp_path / "x.nii.gz", np.zeros((2, 2, 2, 2, 2)), _reference(3), channels=True)
    with pytest.raises(FlexPatchError, match="not found"):
        read_label_names(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("spec", ["atlas", "atlas:0.45,0.3,0.5"])
def test_categorical_atlas_in_slabs_equals_numpy(monkeypatch, ndim: int, spec: str) -> None:
    """The slab-wise torch atlas (on the probabilities' device) against a plain NumPy argmax,
    with slabs of a few voxels so that the image spans many of them; tensor or array input."""
    import flexpatch.patchwork.outputs as outputs

    monkeypatch.setattr(outputs, "SLAB_VOXELS", 7)
    rng = np.random.default_rng(ndim)
    logits = rng.standard_normal((4, *(9, 5, 6)[:ndim])).astype(np.float32)
    logits[:, 0] = logits[1, 0]  # ties between channels: the first wins in both
    probs = np.exp(logits) / np.exp(logits).sum(0)
    values = [2, 5, 9]
    win = np.argmax(probs, axis=0)
    if ":" in spec:
        need = np.array([0.0, 0.45, 0.3, 0.5])[win]
        win = np.where(np.take_along_axis(probs, win[None], 0)[0] < need, 0, win)
    expected = np.array([0, *values])[win]
    for given in (probs, torch.from_numpy(probs)):
        got = to_output(given, spec, True, values)
        assert got.dtype == np.uint8 and got.shape == probs.shape[1:]
        np.testing.assert_array_equal(got, expected)
