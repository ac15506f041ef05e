"""Bad input that used to pass silently: each is refused in one line naming the file, before any work.

Label values beyond int16 (they wrapped round: 65537 became 1), complex or RGB voxels (the imaginary
part was dropped), dataset.json entries that lead out of the dataset folder (they were followed), and
dot-files in an input folder (a macOS ``._`` fork or a killed run's ``.tmp-`` aborted a predict).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flexpatch.data.dataset import load_dataset
from flexpatch.data.io import read_image, read_label, write_image
from flexpatch.errors import FlexPatchError
from flexpatch.infer.runner import cases_for, group_inputs
from test_dataset import make_msd


def one_line(error: pytest.ExceptionInfo, path: Path) -> None:
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("ndim", [2, 3])
def test_label_values_beyond_int16_are_refused_not_wrapped(tmp_path: Path, ndim: int) -> None:
    label = np.zeros((6,) * ndim, np.int32)
    label[(1,) * ndim] = 65537  # int16 would make it 1
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label if ndim == 3 else label[..., None], np.eye(4)), str(path))
    with pytest.raises(FlexPatchError, match="label value 65537 is beyond 32767") as e:
        read_label(path, ndim)
    one_line(e, path)
    label[(1,) * ndim] = 32767  # the largest that fits is kept exactly
    nib.save(nib.Nifti1Image(label if ndim == 3 else label[..., None], np.eye(4)), str(path))
    assert int(read_label(path, ndim).data.max()) == 32767


@pytest.mark.parametrize("dtype", [np.complex64, "rgb"])
def test_complex_and_rgb_voxels_are_refused(tmp_path: Path, dtype: object) -> None:
    path = tmp_path / "image.nii.gz"
    if dtype == "rgb":
        rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    else:
        nib.save(nib.Nifti1Image(np.full((4, 4, 4), 1 + 2j, dtype=dtype), np.eye(4)), str(path))
    with pytest.raises(FlexPatchError, match="complex or RGB") as e:
        read_image(path, 3)
    one_line(e, path)


@pytest.mark.parametrize("bad", ["../outside.nii.gz", "imagesTr/../../outside.nii.gz", "/etc/outside.nii.gz"])
@pytest.mark.parametrize("field", ["image", "label"])
def test_msd_entries_leading_out_of_the_dataset_are_refused(tmp_path: Path, bad: str, field: str) -> None:
    root = tmp_path / "ds"
    make_msd(root)
    # the outside file exists: "not found" would be no defence
    write_image(tmp_path / "outside.nii.gz", np.zeros((5, 4, 3), np.float32))
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1][field] = bad
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(FlexPatchError, match="lies outside the dataset folder") as e:
        load_dataset(root)
    one_line(e, root / "dataset.json")
    # an entry that goes down and up again but stays inside is fine
    meta["training"][1][field] = f"./imagesTr/../{'imagesTr' if field == 'image' else 'labelsTr'}/la_1.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    assert len(load_dataset(root).training) == 2


def test_dot_files_in_an_input_folder_are_skipped(tmp_path: Path) -> None:
    for name in ("case_0000.nii.gz", "._case_0000.nii.gz", ".tmp-abc.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    assert group_inputs([tmp_path], 1) == {"case": [tmp_path / "case_0000.nii.gz"]}


@pytest.mark.parametrize("where", ["same", "parent"])
def test_an_output_folder_holding_an_input_is_refused(tmp_path: Path, where: str) -> None:
    images = tmp_path / "imagesTs"
    images.mkdir()
    (images / "case_0000.nii.gz").write_bytes(b"x")
    out = images if where == "same" else tmp_path
    with pytest.raises(FlexPatchError, match="output folder holds the input .*case_0000"):
        cases_for([images], 1, out)
    assert (images / "case_0000.nii.gz").read_bytes() == b"x"
    assert cases_for([images], 1, images / "pred") == {"case": [images / "case_0000.nii.gz"]}


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        ({"background": 0, "lesion": 255}, r"consecutive 0..1 .*found \[0, 255\].*255 -> 1"),
        ({"background": 0, "a": 1, "b": 3}, r"consecutive 0..2"),
        ({"background": 0, "ignore": 1, "a": 2}, "'ignore' label must have the largest value"),
    ],
)
def test_labels_that_are_not_consecutive_are_refused(tmp_path: Path, labels: dict, needle: str) -> None:
    meta = {"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(FlexPatchError, match=needle) as e:
        load_dataset(tmp_path)
    one_line(e, tmp_path / "dataset.json")
