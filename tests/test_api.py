"""The Python API: ``flexpatch.predict_array`` and ``flexpatch.segment``.

Reference: ``predict_files``, what ``flexpatch predict`` runs and writes, on the same file: the
label map read back from its output must equal the array API's, voxel for voxel, in 2D and 3D
(post-processing included), also for an oblique, anisotropic grid that must be resampled.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import flexpatch
from flexpatch.data.io import read_image
from flexpatch.errors import FlexPatchError
from flexpatch.infer.predictor import LoadedModel, load_model, predict_files
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


def tiny_train(dataset: Path, out: Path, patch: str) -> LoadedModel:
    config = TrainConfig(model_kwargs=TINY, patch=patch, steps=2, batch=2, val_every=2, workers=0)
    train(dataset, out, config, device="cpu", progress=False)
    return load_model(out, device="cpu")


@pytest.fixture(scope="module")
def model3d(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return tiny_train(tiny_abdomen, tmp_path_factory.mktemp("api3d"), "16")


@pytest.fixture(scope="module")
def model2d(tiny_cells: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return tiny_train(tiny_cells, tmp_path_factory.mktemp("api2d"), "32")


def first_test_image(dataset: Path) -> Path:
    return sorted((dataset / "imagesTs").iterdir())[0]


def predicted(model: LoadedModel, image: Path, out: Path) -> np.ndarray:
    """What ``flexpatch predict`` writes for ``image``, read back."""
    (written,) = predict_files(model, [image], out, progress=False)
    return np.asarray(nib.load(written).dataobj)


def oblique_copy(image: Path, out: Path) -> Path:
    """The image on a rotated, anisotropic grid (4 x 6 x 5 mm): the API must resample it as predict does."""
    img = nib.load(image)
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([4.0, 6.0, 5.0])
    affine[:3, 3] = [-40.0, 12.0, 3.0]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), out)
    return out


def test_predict_array_equals_predict_3d(model3d: LoadedModel, tiny_abdomen: Path, tmp_path: Path) -> None:
    image = oblique_copy(first_test_image(tiny_abdomen), tmp_path / "oblique_0000.nii.gz")
    reference = predicted(model3d, image, tmp_path / "pred")
    volume = read_image(image)
    before = volume.data.copy()
    labels = flexpatch.predict_array(model3d, volume.data, volume.affine)
    assert labels.shape == reference.shape == volume.data.shape[1:] and labels.dtype == reference.dtype
    assert np.array_equal(labels, reference) and len(np.unique(labels)) > 1
    assert np.array_equal(volume.data, before)  # the caller's array is left as it was
    one_channel = flexpatch.predict_array(model3d, volume.data[0], volume.affine)  # (*spatial)
    assert np.array_equal(one_channel, reference)


def test_segment_a_file_from_a_model_folder(model3d: LoadedModel, tiny_abdomen: Path, tmp_path: Path) -> None:
    image = first_test_image(tiny_abdomen)
    reference = predicted(model3d, image, tmp_path / "pred")
    labels, affine = flexpatch.segment(model3d.model_dir, image, device="cpu")
    assert np.array_equal(labels, reference)
    assert np.allclose(affine, nib.load(image).affine)
    raw = flexpatch.segment(model3d, str(image), patch_size=(16,), postprocess=False, tta="none")
    assert isinstance(raw, flexpatch.Segmentation) and raw.labels.shape == reference.shape


def test_predict_array_equals_predict_2d(model2d: LoadedModel, tiny_cells: Path, tmp_path: Path) -> None:
    image = first_test_image(tiny_cells)
    reference = predicted(model2d, image, tmp_path / "pred")  # nnU-Net's 2D NIfTI: (X, Y, 1)
    volume = read_image(image)
    assert volume.data.shape[0] == 1 and volume.data.ndim == 3
    labels = flexpatch.predict_array(model2d, volume.data[0], volume.affine, patch_size=(32, 32))
    assert labels.shape == volume.data.shape[1:] and np.array_equal(labels, reference[..., 0])
    # no affine: the identity, 1 mm pixels, which is the cells phantom's own spacing
    assert np.array_equal(flexpatch.predict_array(model2d, volume.data, patch_size=(32, 32)), labels)


@pytest.mark.parametrize(
    ("array", "affine", "needle"),
    [
        (np.zeros((2, 16, 16, 16)), None, "array 2x16x16x16 has 2 channels (axis 0), the model expects 1"),
        (np.zeros((16, 16)), None, "array 16x16 has 2 axes; this 3D model takes (C, *spatial)"),
        (np.zeros((1, 1, 16, 16, 16)), None, "array 1x1x16x16x16 has 5 axes"),
        (np.zeros((16, 0, 16)), None, "array 16x0x16 has an empty axis"),
        (np.full((16, 16, 16), np.nan), None, "4096 voxels are NaN or Inf"),
        (np.zeros((16, 16, 16), dtype=complex), None, "array of type complex128"),
        (np.zeros((16, 16, 16)), np.eye(3), "affine must be a 4x4 voxel -> world matrix, got shape 3x3"),
        (np.zeros((16, 16, 16)), np.zeros((4, 4)), "non-zero voxel size on every axis"),
        (np.zeros((16, 16, 16)), "identity", "affine must be a 4x4 voxel -> world matrix, got not numbers"),
    ],
)
def test_bad_arrays_are_one_line_errors(model3d: LoadedModel, array, affine, needle: str) -> None:
    with pytest.raises(FlexPatchError) as info:
        flexpatch.predict_array(model3d, array, affine)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_2d_model_refuses_a_3d_volume(model2d: LoadedModel) -> None:
    with pytest.raises(FlexPatchError, match="array 1x8x32x32 has 4 axes; this 2D model"):
        flexpatch.predict_array(model2d, np.zeros((1, 8, 32, 32)))


def test_the_api_is_public() -> None:
    from flexpatch.infer import arrays

    for name in ("predict_array", "segment", "Segmentation"):
        assert name in flexpatch.__all__ and getattr(flexpatch, name) is getattr(arrays, name)
