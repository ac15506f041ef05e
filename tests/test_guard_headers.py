"""Geometry and settings that cannot be right, refused in one line naming the file, before any work.

Image headers (zero, negative, NaN/Inf or absurd spacings, an empty axis), resampled grids too large
to hold, model-folder JSON of the wrong type or naming an unknown model, predictions off their
label's grid or holding undeclared labels. A training patch larger than every image is the one
warning: the run goes on with the patch clipped, and says to what.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from flexpatch.checkpoint import LAST, load_checkpoint, save_checkpoint
from flexpatch.data import sanity
from flexpatch.data.io import Volume, read_image, read_label
from flexpatch.data.preprocess import Plan, preprocess_case
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.metrics import evaluate_folders
from flexpatch.infer.predictor import load_model
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import resolve_config, train

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


def one_line(error: pytest.ExceptionInfo, path: Path | str, *needles: str) -> str:
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def save_with_sform(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> Path:
    """A NIfTI whose sform is ``affine`` as given: nibabel would refuse to build an image from a
    singular one, so the header rows are written directly, as a broken converter would."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), None, header=header), str(path))
    return path


def save_with_pixdim(path: Path, shape: tuple[int, ...], first: float) -> Path:
    """A qform-only NIfTI whose pixdim[1] is ``first`` in the file's bytes (nibabel would mend it
    on writing, and does on reading, so the header is patched after saving)."""
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[252:256] = struct.pack("<hh", 1, 0)  # qform_code scanner, sform_code unset
    raw[80:84] = struct.pack("<f", first)  # pixdim[1]
    path.write_bytes(bytes(raw))
    return path


def spatial(ndim: int) -> tuple[int, ...]:
    """An nnU-Net-style shape: 2D data carry a trailing axis of length 1."""
    return (6, 5, 4) if ndim == 3 else (6, 5, 1)


# ---------------------------------------------------------------- image headers


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(
    ("value", "why"),
    [(0.0, "axis 1 is zero"), (np.nan, "axis 1 is not finite"), (np.inf, "axis 1 is not finite"),
     (1e9, "outside"), (1e-9, "outside")],
)  # fmt: skip
def test_broken_spacings_are_refused_with_the_numbers(
    tmp_path: Path, ndim: int, value: float, why: str
) -> None:
    path = save_with_sform(tmp_path / "image.nii.gz", spatial(ndim), np.diag([1.5, value, 2.0, 1.0]))
    for read in (read_image, read_label):
        with pytest.raises(FlexPatchError) as e:
            read(path, ndim)
        one_line(e, path, why, f"1.5 x {value:g}")


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(("value", "why"), [(0.0, "is zero"), (-2.0, "is negative")])
def test_a_qform_only_pixdim_is_checked_as_written(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], ndim: int, value: float, why: str
) -> None:
    """nibabel turns a zero pixdim into 1 and a negative one into its absolute value, logging it
    on stderr; the file's own number is refused, and nibabel's log does not break the one line."""
    path = save_with_pixdim(tmp_path / "image.nii", spatial(ndim), value)
    capfd.readouterr()
    with pytest.raises(FlexPatchError) as e:
        read_image(path, ndim)
    one_line(e, path, "pixdim", why)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("shape", [(6, 0, 4), (0, 5, 1)])
def test_an_empty_axis_is_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = save_with_sform(tmp_path / "empty.nii.gz", shape, np.eye(4))
    with pytest.raises(FlexPatchError) as e:
        read_image(path)
    one_line(e, path, "x".join(map(str, shape)), "empty axis")


def test_an_empty_tiff_is_refused(tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "empty.tif"
    with pytest.warns(UserWarning, match="zero-size"):  # tifffile writes it all the same
        tifffile.imwrite(path, np.zeros((0, 5), np.uint8))
    with pytest.raises(FlexPatchError) as e:
        read_image(path)
    one_line(e, path, "0x5", "empty axis")


def test_a_nan_origin_is_refused(tmp_path: Path) -> None:
    affine = np.eye(4)
    affine[0, 3] = np.nan
    path = save_with_sform(tmp_path / "origin.nii.gz", (6, 5, 4), affine)
    with pytest.raises(FlexPatchError) as e:
        read_image(path)
    one_line(e, path, "NaN or Inf")


def test_valid_headers_still_read(tmp_path: Path) -> None:
    # a flipped axis (negative direction), nnU-Net's 999 on the 2D singleton axis, a zero there
    flipped = save_with_sform(tmp_path / "lps.nii.gz", (6, 5, 4), np.diag([-0.7, -0.7, 2.5, 1.0]))
    assert read_image(flipped).spacing == pytest.approx((0.7, 0.7, 2.5))
    for z in (999.0, 0.0):
        flat = save_with_sform(tmp_path / f"2d_{z:g}.nii.gz", (6, 5, 1), np.diag([0.5, 0.5, z, 1.0]))
        assert read_image(flat, 2).spacing == pytest.approx((0.5, 0.5))
    micro = save_with_sform(tmp_path / "em.nii.gz", (6, 5, 4), np.diag([4e-6, 4e-6, 4e-5, 1.0]))
    assert read_image(micro).spacing == pytest.approx((4e-6, 4e-6, 4e-5))  # electron microscopy, in mm


# ---------------------------------------------------------------- resampled grids


def _plan(ndim: int, spacing: float) -> Plan:
    return Plan(
        ndim=ndim, in_channels=1, num_classes=2, labels={"background": 0, "fg": 1},
        target_spacing=(spacing,) * ndim, normalization=("none",), ct_window=(None,),
        median_shape=(8,) * ndim,
    )  # fmt: skip


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_resampled_grid_beyond_the_voxel_limit_is_refused_before_allocating(
    tmp_path: Path, ndim: int
) -> None:
    path = tmp_path / "coarse.nii.gz"
    affine = np.diag([5000.0, 5000.0, 5000.0 if ndim == 3 else 1.0, 1.0])  # allowed by the header check
    volume = Volume(np.zeros((1,) + (8,) * ndim, np.float32), affine, ndim, path)
    with pytest.raises(FlexPatchError) as e:
        preprocess_case(volume, None, _plan(ndim, 0.5))
    grid = "x".join(["80000"] * ndim)
    one_line(e, path, "8x8", "5000 x 5000", "0.5 x 0.5", grid, "voxels")


def test_a_resampled_grid_beyond_the_memory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sanity, "physical_memory", lambda: 1000)
    path = tmp_path / "case.nii.gz"
    volume = Volume(np.zeros((1, 8, 8, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), 3, path)
    with pytest.raises(FlexPatchError) as e:
        preprocess_case(volume, None, _plan(3, 1.0))
    one_line(e, path, "16x16x16", "this machine's")
    monkeypatch.setattr(sanity, "physical_memory", lambda: None)  # an OS that does not say
    assert preprocess_case(volume, None, _plan(3, 1.0))[0].shape == (1, 16, 16, 16)


# ---------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def model_dir(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guard_model")
    config = TrainConfig(model_kwargs=TINY, patch="16", steps=1, batch=1, val_every=1, workers=0)
    train(tiny_abdomen, out, config, device="cpu", progress=False)
    return out


def _edit(folder: Path, name: str, change: dict | None) -> Path:
    path = folder / name
    if change is None:
        path.write_text("[1, 2]")
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return path


WRONG_TYPES = [
    ("config.json", {"patch": 5}, "field 'patch' must be a string, got 5"),
    ("config.json", {"steps": "x"}, "field 'steps' must be an integer, got \"x\""),
    ("config.json", {"val_patch": "abc"}, "field 'val_patch' must be a list of integers or null"),
    ("config.json", {"model_kwargs": [1]}, "field 'model_kwargs' must be an object"),
    ("config.json", None, "must be a JSON object"),
    ("model.json", {"ndim": "3"}, "field 'ndim' must be an integer"),
    ("model.json", {"kwargs": []}, "field 'kwargs' must be an object"),
    ("plan.json", {"ndim": "x"}, "field 'ndim' must be an integer"),
    ("plan.json", {"labels": [1, 2]}, "field 'labels' must be an object of integers"),
    ("plan.json", {"target_spacing": "abc"}, "field 'target_spacing' must be a list of numbers"),
    ("plan.json", {"median_shape": [1.5, 2, 3]}, "field 'median_shape' must be a list of integers"),
    ("plan.json", {"num_classes": "7"}, "field 'num_classes' must be an integer"),
    ("plan.json", {"normalization": 5}, "field 'normalization' must be"),
    ("method.json", {"fixed_size": "yes"}, "field 'fixed_size' must be true or false"),
]


@pytest.mark.parametrize(("name", "change", "needle"), WRONG_TYPES)
def test_model_folder_json_of_the_wrong_type_names_the_file_and_field(
    model_dir: Path, tmp_path: Path, name: str, change: dict | None, needle: str
) -> None:
    folder = shutil.copytree(model_dir, tmp_path / "model")
    path = _edit(folder, name, change)
    with pytest.raises(FlexPatchError) as e:
        load_model(folder, device="cpu")
    one_line(e, path, needle)


def test_a_folder_without_method_json_is_checked_too(model_dir: Path, tmp_path: Path) -> None:
    """It used to read config.json's patch straight into the patch parser: AttributeError."""
    folder = shutil.copytree(model_dir, tmp_path / "legacy")
    (folder / "method.json").unlink()
    path = _edit(folder, "config.json", {"patch": 5})
    with pytest.raises(FlexPatchError) as e:
        load_model(folder, device="cpu")
    one_line(e, path, "field 'patch'")


def test_a_plan_with_one_normalisation_for_all_channels_still_loads(model_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(model_dir, tmp_path / "older")
    plan = json.loads((folder / "plan.json").read_text())
    _edit(folder, "plan.json", {"normalization": plan["normalization"][0], "ct_window": plan["ct_window"][0]})
    assert load_model(folder, device="cpu").plan.normalization == tuple(plan["normalization"])


@pytest.mark.parametrize("name", ["config.json", "model.json"])
def test_an_unknown_model_name_is_one_line_naming_the_file(
    model_dir: Path, tmp_path: Path, name: str
) -> None:
    """An unknown name in config.json used to predict with exit 0 (model.json's network was built)."""
    folder = shutil.copytree(model_dir, tmp_path / "unknown")
    path = _edit(folder, name, {"model" if name == "config.json" else "name": "resnet9000"})
    with pytest.raises(FlexPatchError) as e:
        load_model(folder, device="cpu")
    one_line(e, path, "'resnet9000' is not a registered model", "unet")


def test_a_config_naming_another_registered_model_is_refused(model_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(model_dir, tmp_path / "mixed")
    path = _edit(folder, "config.json", {"model": "segresnet"})
    with pytest.raises(FlexPatchError) as e:
        load_model(folder, device="cpu")
    one_line(e, path, "'segresnet'", "'unet'", "mixes two runs")


def test_resume_names_the_file_its_config_came_from(model_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(model_dir, tmp_path / "resume")
    state = load_checkpoint(folder / LAST)
    state.pop("config")  # a checkpoint of an older version: config.json is the only record
    save_checkpoint(folder / LAST, state)
    path = _edit(folder, "config.json", {"patch": 5})
    with pytest.raises(FlexPatchError) as e:
        resolve_config(folder, None, resume=True)
    one_line(e, path, "field 'patch' must be a string")


def test_init_from_a_model_json_of_the_wrong_type_names_it(
    model_dir: Path, tiny_abdomen: Path, tmp_path: Path
) -> None:
    source = shutil.copytree(model_dir, tmp_path / "source")
    path = _edit(source, "model.json", {"in_channels": 1.5})
    config = TrainConfig(model_kwargs=TINY, patch="16", steps=1, batch=1, workers=0, init_from=str(source))
    with pytest.raises(FlexPatchError) as e:
        train(tiny_abdomen, tmp_path / "new", config, device="cpu", progress=False)
    one_line(e, path, "field 'in_channels' must be an integer, got 1.5")


def test_predict_on_a_bad_model_folder_is_one_line_exit_2(
    model_dir: Path, tiny_abdomen: Path, tmp_path: Path
) -> None:
    folder = shutil.copytree(model_dir, tmp_path / "model")
    path = _edit(folder, "config.json", {"model": "resnet9000"})
    out = tmp_path / "pred"
    proc = run_cli("predict", folder, tiny_abdomen / "imagesTs", "--out", out, "--device", "cpu")
    assert_one_line_error(proc, str(path), "resnet9000")
    assert not out.exists()


# ---------------------------------------------------------------- training patch larger than every image


def test_a_patch_larger_than_every_image_is_a_warning_saying_what_it_is_clipped_to(
    tiny_cells: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = TrainConfig(model_kwargs=TINY, patch="128,96", steps=1, batch=1, val_every=1, workers=0)
    result = train(tiny_cells, tmp_path / "model", config, device="cpu", progress=False)
    assert result.steps == 1  # a warning, not an error
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        "warning: patch 128x96 is larger than every image (at most 64x64 voxels at 1 x 1 mm); "
        "training patches are clipped to 64x64 or less"
    ]
    log = [json.loads(ln) for ln in (tmp_path / "model" / "log.jsonl").read_text().splitlines()]
    assert log[0]["patch"] == [64, 64]  # what the warning said


def test_no_warning_while_some_image_holds_the_patch() -> None:
    assert sanity.clipped_patch((32, 32, 32), [(20, 40, 40), (40, 20, 40)], (8, 8, 8)) is None
    assert sanity.clipped_patch((64, 32, 32), [(20, 40, 40), (40, 20, 40)], (8, 8, 8)) == (
        (40, 40, 40),
        (40, 32, 32),
    )


# ---------------------------------------------------------------- evaluate: grids and declared labels


def _pair(tmp_path: Path, ndim: int, shift: float = 0.0, extra: int | None = None) -> tuple[Path, Path]:
    shape = (10, 9, 8)[:ndim]
    label = np.zeros(shape, np.int16)
    label[(slice(2, 6),) * ndim] = 1
    label[(slice(7, 8),) * ndim] = 2
    pred = label.copy()
    if extra is not None:
        pred[0, 0] = extra
    affine = np.array([[0, 0, 1.5, -40], [0, -0.8, 0, 12], [2.0, 0, 0, 7], [0, 0, 0, 1]], np.float64)
    moved = affine.copy()
    moved[:3, 3] += shift
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    for folder, data, a in ((pred_dir, pred, moved), (label_dir, label, affine)):
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data if ndim == 3 else data[..., None], a), str(folder / "case.nii.gz"))
    return pred_dir, label_dir


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_prediction_off_its_labels_grid_is_refused(tmp_path: Path, ndim: int) -> None:
    """A prediction shifted 50 mm used to score Dice 1.0."""
    pred_dir, label_dir = _pair(tmp_path, ndim, shift=50.0)
    with pytest.raises(FlexPatchError) as e:
        evaluate_folders(pred_dir, label_dir, progress=False)
    one_line(e, pred_dir / "case.nii.gz", str(label_dir / "case.nii.gz"), "up to 86.6 mm", "affines differ")


@pytest.mark.parametrize("ndim", [2, 3])
def test_float_rounding_of_the_affine_is_not_a_different_grid(tmp_path: Path, ndim: int) -> None:
    pred_dir, label_dir = _pair(tmp_path, ndim, shift=2e-4)
    report = evaluate_folders(pred_dir, label_dir, progress=False, hd95=False)
    assert [r["dice"] for r in report.per_case] == [1.0, 1.0]


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("where", ["pred", "labels"])
def test_labels_from_declaring_fewer_classes_is_an_error(tmp_path: Path, ndim: int, where: str) -> None:
    """The classes it did not declare used to be dropped silently."""
    pred_dir, label_dir = _pair(tmp_path, ndim, extra=3)
    if where == "labels":  # the undeclared value in the reference instead
        shutil.copy(pred_dir / "case.nii.gz", label_dir / "case.nii.gz")
    declared = tmp_path / "dataset.json"
    labels = {"background": 0, "a": 1, "b": 2}
    declared.write_text(json.dumps({"labels": labels}))
    with pytest.raises(FlexPatchError) as e:
        evaluate_folders(pred_dir, label_dir, labels, progress=False, labels_source=declared)
    message = one_line(e, declared, "declares the foreground labels 1, 2, but", "holds 3 too")
    assert str(tmp_path / where / "case.nii.gz") in message
    report = evaluate_folders(pred_dir, label_dir, {**labels, "c": 3}, progress=False, hd95=False)
    assert [r["class"] for r in report.per_case] == ["a", "b", "c"]


def test_evaluate_cli_refuses_in_one_line(tmp_path: Path) -> None:
    pred_dir, label_dir = _pair(tmp_path, 3, shift=50.0)
    assert_one_line_error(run_cli("evaluate", pred_dir, label_dir), str(pred_dir / "case.nii.gz"), "mm away")
    pred_dir, label_dir = _pair(tmp_path / "b", 3, extra=3)
    declared = tmp_path / "dataset.json"
    for labels, needle in (
        ({"background": 0, "a": 1}, "labels/case.nii.gz holds 2 too"),
        ({"a": [1, 2]}, "one integer"),
    ):
        declared.write_text(json.dumps({"labels": labels}))
        proc = run_cli("evaluate", pred_dir, label_dir, "--labels-from", declared)
        assert_one_line_error(proc, str(declared), needle)
