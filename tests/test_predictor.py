"""Prediction from a model folder: the input's grid and header, probabilities, any window, channels."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flexpatch.data.io import read_image
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.postprocess import keep_largest, read_postprocessing
from flexpatch.infer.predictor import LoadedModel, load_model, predict_files
from flexpatch.infer.runner import group_inputs
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


def tiny_train(dataset: Path, out: Path, patch: str = "16") -> LoadedModel:
    config = TrainConfig(model_kwargs=TINY, patch=patch, steps=2, batch=2, val_every=2, workers=0)
    train(dataset, out, config, device="cpu", progress=False)
    return load_model(out, device="cpu")


@pytest.fixture(scope="module")
def model3d(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return tiny_train(tiny_abdomen, tmp_path_factory.mktemp("model3d"))


@pytest.fixture(scope="module")
def model2d(tiny_cells: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return tiny_train(tiny_cells, tmp_path_factory.mktemp("model2d"), patch="32")


def assert_same_grid(output: Path, reference: Path) -> None:
    """The output lies on the reference's grid: shape, affine and the orientation header fields."""
    out, ref = nib.load(str(output)), nib.load(str(reference))
    assert out.shape[: len(ref.shape)] == ref.shape
    assert np.array_equal(out.affine, ref.affine)  # exact, not approximately
    for get in ("get_qform", "get_sform"):
        (a, a_code), (b, b_code) = getattr(out.header, get)(coded=True), getattr(ref.header, get)(coded=True)
        assert int(a_code) == int(b_code)
        assert (a is None and b is None) or np.array_equal(a, b)
    assert out.header.get_zooms()[:3] == ref.header.get_zooms()[:3]
    assert out.header.get_xyzt_units() == ref.header.get_xyzt_units()


LEVEL = 0.2  # of the CT window: soft tissue above it, fat and air below


class Threshold(torch.nn.Module):
    """A stand-in network whose answer is known: class 1 where the normalised intensity > LEVEL."""

    def __init__(self, ndim: int, classes: int) -> None:
        super().__init__()
        self.divisor, self.classes = (1,) * ndim, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.classes, *x.shape[2:])
        logits[:, 1] = (x[:, 0] - LEVEL) * 50
        return logits


def threshold_reference(raw: np.ndarray, model: LoadedModel) -> np.ndarray:
    """Class 1 where the CT-windowed intensity exceeds LEVEL, computed on the raw grid without flexpatch."""
    lo, hi = model.plan.ct_window[0]
    return (np.clip(raw, lo, hi) - lo) / (hi - lo) > LEVEL


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_predictions_keep_the_input_shape_and_header(
    model3d: LoadedModel, tiny_abdomen: Path, tmp_path: Path
) -> None:
    images = sorted((tiny_abdomen / "imagesTs").iterdir())
    written = predict_files(model3d, [tiny_abdomen / "imagesTs"], tmp_path, patch_size=(16,), progress=False)
    assert [p.name for p in written] == ["phantom_test_000.nii.gz", "phantom_test_001.nii.gz"]
    for image, pred in zip(images, written, strict=True):
        assert_same_grid(pred, image)
        seg = np.asarray(nib.load(str(pred)).dataobj)
        assert seg.dtype == np.uint8 and seg.max() < model3d.plan.num_classes
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in written]


def test_scanner_header_with_rotation_is_copied(
    model3d: LoadedModel, tiny_abdomen: Path, tmp_path: Path
) -> None:
    """An oblique scan with qform and sform both set (code 1, as scanners write) keeps both."""
    src = nib.load(str(tiny_abdomen / "imagesTs" / "phantom_test_000_0000.nii.gz"))
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([6.0, 6.0, 6.0])
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    img = nib.Nifti1Image(np.asarray(src.dataobj), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    img.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "oblique_0000.nii.gz"
    nib.save(img, str(path))
    [pred] = predict_files(model3d, [path], tmp_path / "out", patch_size=(16,), progress=False)
    assert pred.name == "oblique.nii.gz"
    assert_same_grid(pred, path)


def test_probabilities_are_written_channels_last_and_sum_to_one(
    model3d: LoadedModel, tiny_abdomen: Path, tmp_path: Path
) -> None:
    image = tiny_abdomen / "imagesTs" / "phantom_test_001_0000.nii.gz"
    [pred] = predict_files(model3d, [image], tmp_path, save_probabilities=True, progress=False)
    probs_path = tmp_path / "probabilities" / "phantom_test_001.nii.gz"
    probs = np.asarray(nib.load(str(probs_path)).dataobj)
    assert probs.shape == (32, 32, 32, model3d.plan.num_classes) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    # the label map is the argmax, then the model's post-processing (probabilities stay as predicted)
    want = keep_largest(probs.argmax(-1), read_postprocessing(model3d.model_dir))
    np.testing.assert_array_equal(want, np.asarray(nib.load(str(pred)).dataobj))
    assert_same_grid(probs_path, image)


def test_window_larger_than_the_image(model3d: LoadedModel, tiny_abdomen: Path) -> None:
    volume = read_image(tiny_abdomen / "imagesTs" / "phantom_test_000_0000.nii.gz")
    huge = model3d.probabilities(volume, patch_size=(64, 96, 128))
    assert huge.shape == (model3d.plan.num_classes, 32, 32, 32)
    # a window covering the image becomes the whole (32^3) image: the same as asking for 32^3
    exact = model3d.probabilities(volume, patch_size=(32,))
    np.testing.assert_allclose(huge, exact, atol=1e-6)


def test_window_is_validated(model3d: LoadedModel) -> None:
    with pytest.raises(FlexPatchError, match=r"nearest valid sizes 16 or 20 on axis 1"):
        model3d.window((16, 18, 16))
    with pytest.raises(FlexPatchError, match="must be positive"):
        model3d.window((0,))
    with pytest.raises(FlexPatchError, match="has 2 axes, the model is 3D"):
        model3d.window((16, 16))
    assert model3d.window(None) == (16, 16, 16) and model3d.window((8,)) == (8, 8, 8)


def test_windows_beyond_the_largest_training_patch_run_as_it(
    model3d: LoadedModel, capsys: pytest.CaptureFixture
) -> None:
    """A window larger than any training patch normalises over a field training never saw:
    it runs as the largest trained window, said once, and gives that window's output."""
    assert model3d.largest_trained == (16, 16, 16)
    assert model3d.window((24,)) == (16, 16, 16) and model3d.window((32, 8, 64)) == (16, 8, 16)
    assert "larger than any training patch: running 16x16x16" in capsys.readouterr().err
    image = torch.randn(1, 1, 20, 18, 22)
    props = {"original_shape": (20, 18, 22)}
    big = model3d.probabilities((image, props), patch_size=(48,))
    same = model3d.probabilities((image, props), patch_size=(16,))
    np.testing.assert_array_equal(big, same)


def test_anisotropic_input_returns_to_its_own_grid(
    model3d: LoadedModel, tiny_abdomen: Path, tmp_path: Path
) -> None:
    """A (6, 6, 12) mm scan is resampled to the plan's 6 mm and the labels come back on its grid."""
    src = nib.load(str(tiny_abdomen / "imagesTs" / "phantom_test_000_0000.nii.gz"))
    raw = np.asarray(src.dataobj)[:, :, ::2]  # every other slice: 12 mm apart
    affine = src.affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    path = tmp_path / "thick_0000.nii.gz"
    nib.save(nib.Nifti1Image(raw, affine), str(path))
    assert model3d.plan.target_spacing == (6.0, 6.0, 6.0)

    [pred] = predict_files(model3d, [path], tmp_path / "out", patch_size=(16,), progress=False)
    assert_same_grid(pred, path)
    assert nib.load(str(pred)).shape == (32, 32, 16)

    # with a network whose answer is known, the labels must line up with the input voxel by voxel
    known = dataclasses.replace(model3d, net=Threshold(3, model3d.plan.num_classes))
    [pred] = predict_files(known, [path], tmp_path / "known", patch_size=(16,), progress=False)
    seg = np.asarray(nib.load(str(pred)).dataobj)
    expected = threshold_reference(raw, model3d)
    assert 0.05 < expected.mean() < 0.95
    score = dice(seg == 1, expected)
    assert score > 0.9
    # a slip of one voxel along any axis (z is the resampled one) would be visibly worse
    for axis in range(3):
        assert dice(seg == 1, np.roll(expected, 1, axis=axis)) < score - 0.05


def test_2d_prediction_keeps_nnunet_layout(model2d: LoadedModel, tiny_cells: Path, tmp_path: Path) -> None:
    image = tiny_cells / "imagesTs" / "phantom_test_000_0000.nii.gz"
    [pred] = predict_files(
        model2d, [image], tmp_path, patch_size=(16,), save_probabilities=True, progress=False
    )
    assert nib.load(str(pred)).shape == (64, 64, 1)
    assert_same_grid(pred, image)
    probs = np.asarray(nib.load(str(tmp_path / "probabilities" / "phantom_test_000.nii.gz")).dataobj)
    assert probs.shape == (64, 64, 1, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_png_in_png_out(model2d: LoadedModel, tiny_cells: Path, tmp_path: Path) -> None:
    from PIL import Image

    raw = np.asarray(nib.load(str(tiny_cells / "imagesTs" / "phantom_test_001_0000.nii.gz")).dataobj)[:, :, 0]
    scaled = (255 * (raw - raw.min()) / (raw.max() - raw.min())).astype(np.uint8)
    Image.fromarray(scaled).save(tmp_path / "cells.png")
    [pred] = predict_files(model2d, [tmp_path / "cells.png"], tmp_path / "out", progress=False)
    assert pred.name == "cells.png"
    seg = np.asarray(Image.open(pred))
    assert seg.shape == (64, 64) and seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1}


@pytest.fixture(scope="module")
def two_channel_dataset(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3D phantom with a second channel (a scaled copy), in nnU-Net's CASE_0001 naming."""
    root = tmp_path_factory.mktemp("two_channel")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        shutil.copytree(tiny_abdomen / sub, root / sub)
    for folder in (root / "imagesTr", root / "imagesTs"):
        for first in sorted(folder.glob("*_0000.nii.gz")):
            img = nib.load(str(first))
            second = nib.Nifti1Image(np.asarray(img.dataobj) * 0.5 + 10, img.affine)
            nib.save(second, str(first.with_name(first.name.replace("_0000", "_0001"))))
    meta = json.loads((tiny_abdomen / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "CT_half"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_two_channel_cases_are_grouped(two_channel_dataset: Path, tmp_path: Path) -> None:
    files = sorted((two_channel_dataset / "imagesTs").iterdir())
    cases = group_inputs([two_channel_dataset / "imagesTs"], channels=2)
    assert cases == {"phantom_test_000": files[:2], "phantom_test_001": files[2:]}
    with pytest.raises(FlexPatchError, match=r"phantom_test_000_0000.nii.gz: case phantom_test_000 has 1"):
        group_inputs([files[0]], channels=2)

    model = tiny_train(two_channel_dataset, tmp_path / "model")
    assert model.plan.in_channels == 2 and model.spec.in_channels == 2
    written = predict_files(model, files, tmp_path / "out", progress=False)
    assert [p.name for p in written] == ["phantom_test_000.nii.gz", "phantom_test_001.nii.gz"]
    for pred, image in zip(written, files[::2], strict=True):
        assert_same_grid(pred, image)
    # a one-channel input to a two-channel model names the file and both counts
    with pytest.raises(FlexPatchError, match=r"has 1 channels, the model expects 2"):
        model.probabilities(read_image(files[0]))


def test_failing_prediction_leaves_no_partial_files(
    model3d: LoadedModel, tiny_abdomen: Path, tmp_path: Path
) -> None:
    good = tiny_abdomen / "imagesTs" / "phantom_test_000_0000.nii.gz"
    bad = tmp_path / "zz_truncated_0000.nii.gz"
    bad.write_bytes(good.read_bytes()[:2000])
    out = tmp_path / "out"
    with pytest.raises(FlexPatchError, match="zz_truncated_0000.nii.gz: not a readable NIfTI"):
        predict_files(model3d, [good, bad], out, patch_size=(16,), progress=False)
    # the finished case is complete; nothing of the failed one, no temporary file
    assert [p.name for p in out.iterdir()] == ["phantom_test_000.nii.gz"]
    assert nib.load(str(out / "phantom_test_000.nii.gz")).shape == (32, 32, 32)


def test_a_folder_written_before_method_json_loads_with_the_same_window(
    model3d: LoadedModel, tmp_path: Path
) -> None:
    old = shutil.copytree(model3d.model_dir, tmp_path / "old")
    (old / "method.json").unlink()
    legacy = load_model(old, device="cpu")
    assert legacy.train_patch == model3d.train_patch == (16, 16, 16)
    assert legacy.fixed_size == model3d.fixed_size is True
    # a folder of another method is refused by the sliding-window loader in one line
    (old / "method.json").write_text(json.dumps({"method": "patchwork", "format": 1}))
    with pytest.raises(FlexPatchError, match="a patchwork model folder, not a sliding-window model"):
        load_model(old, device="cpu")


def test_unusable_model_folders(model3d: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(FlexPatchError, match="model folder not found"):
        load_model(tmp_path / "nothing")
    broken = shutil.copytree(model3d.model_dir, tmp_path / "broken")
    (broken / "model_best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FlexPatchError, match="model_best.pt: unreadable checkpoint"):
        load_model(broken, device="cpu")
    with pytest.raises(FlexPatchError, match="unknown checkpoint 'newest'"):
        load_model(model3d.model_dir, checkpoint="newest")
    (broken / "plan.json").unlink()
    with pytest.raises(FlexPatchError, match="plan.json: file not found"):
        load_model(broken, device="cpu")
