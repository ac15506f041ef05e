"""`evaluate` pairs predictions and labels by case id across every format the readers read
(NIfTI, SimpleITK's .mha/.nrrd, nnU-Net's 3D TIFF), with files written by the libraries themselves."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from conftest import assert_one_line_error, run_cli
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.metrics import evaluate_folders

SPACING = (0.5, 0.75, 2.0)
ORIGIN = (10.0, -4.0, 3.0)


def _sitk_write(path: Path, array_xyz: np.ndarray) -> None:
    """An ITK image of nibabel-ordered voxels (ITK's numpy view is reversed), default direction."""
    n = array_xyz.ndim
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.T.astype(np.uint8)))
    image.SetSpacing(SPACING[:n])
    image.SetOrigin(ORIGIN[:n])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _nib_write(path: Path, array_xyz: np.ndarray) -> None:
    """The same grid as :func:`_sitk_write`'s, in RAS: ITK's LPS x and y flip (2D: nnU-Net's
    trailing singleton axis)."""
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [-ORIGIN[0], -ORIGIN[1], ORIGIN[2] if array_xyz.ndim == 3 else 0.0]
    data = array_xyz if array_xyz.ndim == 3 else array_xyz[:, :, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))


def _tiff_write(path: Path, stack: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, stack.astype(np.uint8))
    path.with_suffix(".json").write_text(json.dumps({"spacing": list(SPACING)}))


def _masks(ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """A label cube (square) of side 4 and a prediction with 3 of its 4 rows along axis 0 and
    one row outside: 12 of 16 (2D) or 48 of 64 (3D) voxels shared, Dice 2 * 3/4 * n / 2n = 0.75."""
    label = np.zeros((10,) * ndim, np.uint8)
    label[(slice(2, 6),) * ndim] = 1
    return label, np.roll(label, 1, axis=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_cases_pair_by_id_across_formats(tmp_path: Path, ndim: int) -> None:
    label, pred = _masks(ndim)
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    _sitk_write(label_dir / "a.mha", label)  # ITK label, NIfTI prediction
    _nib_write(pred_dir / "a.nii.gz", pred)
    _nib_write(label_dir / "b.nii", label)  # NIfTI label, ITK prediction
    _sitk_write(pred_dir / "b.nrrd", pred)
    _sitk_write(label_dir / "c.nrrd", label)  # ITK on both sides
    _sitk_write(pred_dir / "c.mha", pred)
    cases = ["a", "b", "c"]
    if ndim == 3:  # nnU-Net's 3D TIFF, its spacing in CASE.json beside it
        _tiff_write(label_dir / "d.tif", label)
        _tiff_write(pred_dir / "d.tiff", pred)
        cases.append("d")
    report = evaluate_folders(pred_dir, label_dir, progress=False)
    assert report.cases == cases
    assert [r["dice"] for r in report.per_case] == pytest.approx([0.75] * len(cases))
    assert [r["recall"] for r in report.per_case] == pytest.approx([0.75] * len(cases))


@pytest.mark.parametrize("ndim", [2, 3])
def test_an_itk_prediction_off_its_labels_grid_is_refused(tmp_path: Path, ndim: int) -> None:
    label, pred = _masks(ndim)
    _nib_write(tmp_path / "labels" / "a.nii.gz", label)
    path = tmp_path / "pred" / "a.mha"
    _sitk_write(path, pred)
    image = sitk.ReadImage(str(path))
    image.SetOrigin([o + 5.0 for o in ORIGIN[:ndim]])  # the same voxels, 5 mm away
    sitk.WriteImage(image, str(path))
    with pytest.raises(FlexPatchError, match="their affines differ") as e:
        evaluate_folders(tmp_path / "pred", tmp_path / "labels", progress=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_case_in_two_formats_is_one_line(tmp_path: Path) -> None:
    label, pred = _masks(3)
    _sitk_write(tmp_path / "labels" / "a.mha", label)
    _sitk_write(tmp_path / "pred" / "a.mha", pred)
    _nib_write(tmp_path / "pred" / "a.nii.gz", pred)
    with pytest.raises(FlexPatchError) as e:
        evaluate_folders(tmp_path / "pred", tmp_path / "labels", progress=False)
    message = str(e.value)
    assert message.startswith(str(tmp_path / "pred" / "a.nii.gz")) and "\n" not in message
    assert "case 'a' is also a.mha in this prediction folder" in message
    done = run_cli("evaluate", tmp_path / "pred", tmp_path / "labels", "--no-hd95")
    assert_one_line_error(done, "case 'a' is also a.mha")
    (tmp_path / "pred" / "a.nii.gz").unlink()
    done = run_cli("evaluate", tmp_path / "pred", tmp_path / "labels", "--no-hd95", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["per_case"][0]["dice"] == pytest.approx(0.75)
