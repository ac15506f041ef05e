"""A patchwork writes its predictions in the input's format, through the runner's one writer, as
every method does (a .mha input gives a .mha prediction on the same world grid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from flexpatch.data.io import Volume, read_image, read_label
from flexpatch.infer.runner import Prediction, output_suffix
from flexpatch.patchwork.apply import ApplyOptions
from flexpatch.patchwork.config import PatchworkConfig
from flexpatch.patchwork.predict import predict_patchwork_files
from flexpatch.patchwork.train import train_patchwork

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


@pytest.fixture(scope="module")
def patchwork(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One round of a tiny two-level 3D patchwork, a test image and the same image as SimpleITK
    writes it in .mha."""
    scheme = {"depth": 2, "matrix": [8, 8, 8], "fov_rel": [0.8, 0.8, 0.8]}
    config = PatchworkConfig(
        scheme=scheme, block_options=TINY, rounds=1, num_patches=2, batch_size=2, workers=0
    )
    root = tmp_path_factory.mktemp("pw_formats")
    train_patchwork(tiny_abdomen, root / "model", config, device="cpu", progress=False)
    image = sorted((tiny_abdomen / "imagesTs").iterdir())[0]
    mha = root / "mha" / image.name.replace(".nii.gz", ".mha")
    mha.parent.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(image)), str(mha))
    return root / "model", image, mha


def _predict(model: Path, image: Path, out: Path, out_type: str = "atlas", factor: float = 1.0) -> Path:
    opts = ApplyOptions(sampling_factor=factor)
    written = predict_patchwork_files(model, [image], out, opts, out_type, device="cpu", progress=False)
    assert len(written) == 1
    return written[0]


@pytest.mark.parametrize(("out_type", "factor"), [("atlas", 1.0), ("mask", 1.0), ("atlas", 2.0)])
def test_a_mha_input_gives_a_mha_prediction(patchwork, tmp_path: Path, out_type: str, factor: float) -> None:
    model, nifti, mha = patchwork
    case = nifti.name.removesuffix("_0000.nii.gz")
    from_nifti = _predict(model, nifti, tmp_path / "a", out_type, factor)
    from_mha = _predict(model, mha, tmp_path / "b", out_type, factor)
    assert from_nifti == tmp_path / "a" / f"{case}.nii.gz"
    assert from_mha == tmp_path / "b" / f"{case}.mha"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [f"{case}.mha"]
    a, b = read_image(from_nifti, 3), read_image(from_mha, 3)
    assert b.data.shape[0] == (len(a.data) if out_type == "mask" else 1)  # masks: an ITK vector image
    np.testing.assert_array_equal(b.data, a.data)  # the same voxels ...
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)  # ... in the same places
    if factor == 1.0:
        np.testing.assert_allclose(b.affine, read_image(nifti, 3).affine, atol=1e-4)
        if out_type == "atlas":
            read_label(from_mha, 3)  # a label map the readers take back
    else:
        assert b.spatial_shape == tuple(2 * n for n in read_image(nifti, 3).spatial_shape)


def test_a_png_or_tiff_input_keeps_its_format_unless_it_cannot_hold_the_output(tmp_path: Path) -> None:
    affine = np.eye(4)
    image = Volume(np.zeros((1, 8, 8), np.float32), affine, 2, tmp_path / "case_0000.png")
    labels = np.zeros((8, 8), np.uint8)
    assert output_suffix(image, Prediction(labels)) == ".png"
    assert output_suffix(image, Prediction(labels, affine=affine)) == ".png"
    masks = np.zeros((2, 8, 8), np.uint8)
    assert output_suffix(image, Prediction(masks, channels=True)) == ".nii.gz"  # channels
    finer = np.diag([0.5, 0.5, 1.0, 1.0])  # a patchwork's sampling_factor 2
    assert output_suffix(image, Prediction(labels, affine=finer)) == ".nii.gz"
    stack = Volume(np.zeros((1, 4, 8, 8), np.float32), np.diag([2.0, 1, 1, 1]), 3, tmp_path / "c.tif")
    assert output_suffix(stack, Prediction(np.zeros((4, 8, 8), np.uint8))) == ".tif"
    nrrd = Volume(np.zeros((1, 4, 8, 8), np.float32), affine, 3, tmp_path / "c.nrrd")
    assert output_suffix(nrrd, Prediction(np.zeros((2, 4, 8, 8)), affine=finer, channels=True)) == ".nrrd"
