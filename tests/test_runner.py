"""The one prediction runner and the one image writer that every method uses, in 2D and 3D."""

from __future__ import annotations

import io
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from rich.console import Console

from flexpatch import runtime
from flexpatch.data.io import TEMP_PREFIX, Volume, read_image, read_label_names, write_like
from flexpatch.errors import FlexPatchError
from flexpatch.infer.runner import PROBABILITIES, Prediction, cases_for, names_by_value, run_prediction

torch.set_num_threads(1)

SHAPE = {2: (6, 5), 3: (6, 5, 4)}
NAMES = {0: "background", 1: "liver & <left> kidney"}


def oblique(ndim: int) -> np.ndarray:
    """A rotated, anisotropic grid: a header copied wrongly would show in the affine or the codes."""
    c, s = np.cos(0.4), np.sin(0.4)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.7, 1.3, 2.5])
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    return affine


def scan(folder: Path, case: str, ndim: int, seed: int = 0) -> Path:
    """A NIfTI input as scanners write it: qform 'scanner' (1), sform 'mni' (4), units mm and s."""
    data = np.random.default_rng(seed).normal(size=SHAPE[ndim]).astype(np.float32)
    img = nib.Nifti1Image(data if ndim == 3 else data[:, :, None], oblique(ndim))
    img.set_qform(oblique(ndim), 1)
    img.set_sform(oblique(ndim), 4)
    img.header.set_xyzt_units("mm", "sec")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case}_0000.nii.gz"
    nib.save(img, str(path))
    return path


def assert_header_of(output: Path, reference: Path) -> None:
    out, ref = nib.load(str(output)).header, nib.load(str(reference)).header
    for get in ("get_qform", "get_sform"):
        (a, a_code), (b, b_code) = getattr(out, get)(coded=True), getattr(ref, get)(coded=True)
        assert int(a_code) == int(b_code) and np.array_equal(a, b)
    assert out.get_xyzt_units() == ref.get_xyzt_units()


@pytest.mark.parametrize("ndim", [2, 3])
def test_writer_keeps_qform_sform_units_and_label_names(ndim: int, tmp_path: Path) -> None:
    path = scan(tmp_path / "in", "case", ndim)
    volume = read_image(path, ndim)
    labels = (volume.data[0] > 0).astype(np.uint8)
    out = write_like(tmp_path / "out" / "case.nii.gz", labels, volume, label_names=NAMES)
    assert_header_of(out, path)
    [ext] = nib.load(str(out)).header.extensions
    assert ext.get_code() == 6 and ext.get_content().startswith(b"<LabelTable>")
    assert read_label_names(out) == NAMES
    np.testing.assert_array_equal(read_image(out, ndim).data[0], labels)
    probs = np.stack([1 - labels, labels]).astype(np.float32)
    out = write_like(tmp_path / "out" / "probs.nii.gz", probs, volume, channels=True)
    assert nib.load(str(out)).shape == (*SHAPE[ndim], *([1] if ndim == 2 else []), 2)  # channels last
    assert_header_of(out, path)
    assert read_label_names(out) == {}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("ndim", [2, 3])
def test_writer_on_a_finer_grid_keeps_the_codes(ndim: int, tmp_path: Path) -> None:
    """A patchwork's sampling factor: the output's own affine in both forms, the input's codes."""
    path = scan(tmp_path, "case", ndim)
    volume = read_image(path, ndim)
    finer = volume.affine @ np.diag([0.5] * ndim + [1.0] * (4 - ndim))
    labels = np.zeros(tuple(2 * n for n in SHAPE[ndim]), np.int64)  # int64: stored as int32
    out = write_like(tmp_path / "fine.nii.gz", labels, volume, label_names=NAMES, affine=finer)
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, finer, atol=1e-6)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 4
    assert img.get_data_dtype() == np.int32 and read_label_names(out) == NAMES


def test_png_falls_back_to_the_plain_writer(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.arange(30, dtype=np.uint8).reshape(6, 5)).save(tmp_path / "cells.png")
    volume = read_image(tmp_path / "cells.png")
    labels = (volume.data[0] > 10).astype(np.uint8)
    out = write_like(tmp_path / "out" / "cells.png", labels, volume, label_names=NAMES)  # no place for names
    np.testing.assert_array_equal(np.asarray(Image.open(out)), labels)
    nifti = write_like(tmp_path / "out" / "cells.nii.gz", labels, volume, label_names=NAMES)
    assert read_label_names(nifti) == NAMES and np.array_equal(nib.load(str(nifti)).affine, np.eye(4))
    assert sorted(p.name for p in out.parent.iterdir()) == ["cells.nii.gz", "cells.png"]
    with pytest.raises(FlexPatchError, match="2 spatial axes"):
        write_like(tmp_path / "bad.nii.gz", labels[None], volume)


def threshold(volume: Volume) -> Prediction:
    """A stand-in method: class 1 above zero, its probabilities, and a report."""
    fg = (volume.data[0] > 0).astype(np.float32)
    probs = np.stack([1 - fg, fg])
    return Prediction(fg.astype(np.uint8), probs, info={"voxels": int(fg.sum())}, summary="thresholded")


@pytest.mark.parametrize("ndim", [2, 3])
def test_runner_writes_labels_probabilities_info_and_one_progress_bar(
    ndim: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = [scan(tmp_path / "in", case, ndim, seed) for seed, case in enumerate(["a", "b"])]
    stream = io.StringIO()
    monkeypatch.setattr(runtime, "console", Console(file=stream))  # not a terminal: plain lines
    out = tmp_path / "out"
    cases = cases_for([tmp_path / "in"], 1, out)
    written = run_prediction(
        cases, out, ndim, threshold, label_names=NAMES, save_probabilities=True, describe="threshold"
    )
    assert written == [out / "a.nii.gz", out / "b.nii.gz"]
    for path, image in zip(written, inputs, strict=True):
        volume = read_image(image, ndim)
        assert_header_of(path, image)
        assert read_label_names(path) == NAMES
        np.testing.assert_array_equal(read_image(path, ndim).data[0], volume.data[0] > 0)
        probs = out / PROBABILITIES / path.name
        assert_header_of(probs, image)
        np.testing.assert_allclose(read_image(probs, ndim).data.sum(0), 1.0)
    assert written.info == {
        c: {"voxels": int((read_image(i, ndim).data > 0).sum())} for c, i in zip("ab", inputs)
    }
    [line] = stream.getvalue().splitlines()  # the end of the run, one line
    assert re.fullmatch(r"threshold: 2/2 \(100%\) \d+:\d\d:\d\d  b: thresholded", line)


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_failure_leaves_nothing_half_written(
    ndim: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for seed, case in enumerate(["a", "b", "c"]):
        scan(tmp_path / "in", case, ndim, seed)
    out = tmp_path / "out"

    def fails_on_b(volume: Volume) -> Prediction:
        if volume.path is not None and volume.path.name.startswith("b_"):
            raise RuntimeError("segment failed")
        return threshold(volume)

    cases = cases_for([tmp_path / "in"], 1, out)
    with pytest.raises(RuntimeError, match="segment failed"):
        run_prediction(cases, out, ndim, fails_on_b, save_probabilities=True, progress=False)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["a.nii.gz", f"{PROBABILITIES}/a.nii.gz"]  # case a complete, nothing of b

    def disk_full(img: nib.Nifti1Image, filename: str) -> None:
        Path(filename).write_bytes(b"half an image")
        raise OSError("no space left on device")

    monkeypatch.setattr(nib, "save", disk_full)
    with pytest.raises(OSError, match="no space"):
        run_prediction(cases, tmp_path / "full", ndim, threshold, save_probabilities=True, progress=False)
    assert not [p for p in (tmp_path / "full").rglob("*") if p.is_file()]  # no .tmp- file, no output


def test_a_method_without_probabilities_is_refused(tmp_path: Path) -> None:
    scan(tmp_path / "in", "a", 2)
    cases = cases_for([tmp_path / "in"], 1, tmp_path / "out")
    with pytest.raises(FlexPatchError, match="no probabilities"):
        run_prediction(
            cases, tmp_path / "out", 2, lambda v: Prediction(np.zeros(SHAPE[2], np.uint8)),
            save_probabilities=True, progress=False,
        )  # fmt: skip


@pytest.mark.parametrize("fixture", ["tiny_cells", "tiny_abdomen"])
def test_sliding_window_label_maps_carry_the_plans_label_names(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import json

    from flexpatch.infer.predictor import load_model, predict_files
    from flexpatch.train.config import TrainConfig
    from flexpatch.train.loop import train

    dataset = request.getfixturevalue(fixture)
    config = TrainConfig(
        model_kwargs={"channels": 4, "levels": 2, "convs_per_level": 2}, patch="16", steps=1, batch=1,
        val_every=1, workers=0,
    )  # fmt: skip
    train(dataset, tmp_path / "model", config, device="cpu", progress=False)
    model = load_model(tmp_path / "model", device="cpu")
    image = sorted((dataset / "imagesTs").iterdir())[0]
    [pred] = predict_files(model, [image], tmp_path / "pred", save_probabilities=True, progress=False)
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    assert read_label_names(pred) == names_by_value(labels) == {v: k for k, v in labels.items()}
    assert (tmp_path / "pred" / PROBABILITIES / pred.name).is_file()
