"""``predict --memory`` on the CPU refuses a budget below what an image needs from its header,
before the image is read; the header reader agrees with the image reader in every format."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flexpatch.data.header import read_header
from flexpatch.data.io import read_image, write_image
from flexpatch.plan.budget import resident_bytes
from flexpatch.train.config import TrainConfig

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


@pytest.mark.parametrize(
    ("name", "shape", "channels"),
    [
        ("a.nii.gz", (7, 5, 3), False),
        ("a.nii.gz", (7, 5), False),  # nnU-Net's 2D NIfTI: (X, Y, 1)
        ("a.nii.gz", (2, 7, 5, 3), True),  # MSD's channels last
        ("a.mha", (7, 5, 3), False),
        ("a.nrrd", (7, 5), False),
        ("a.mha", (3, 7, 5), True),  # an ITK vector image: components are channels
        ("a.tif", (7, 5, 3), False),  # nnU-Net's 3D TIFF, its spacing in a.json
    ],
)
def test_the_header_gives_what_the_read_gives(
    tmp_path: Path, name: str, shape: tuple, channels: bool
) -> None:
    path = tmp_path / name
    affine = np.diag([0.5, 2.0, 3.0, 1.0]) if name.endswith("tif") else np.diag([0.5, -2.0, 3.0, 1.0])
    affine[:3, 3] = (0.0, 0.0, 0.0) if name.endswith("tif") else (4.0, -1.0, 2.5)
    write_image(path, np.arange(np.prod(shape), dtype=np.int16).reshape(shape), affine, channels=channels)
    header, volume = read_header(path), read_image(path)
    assert header is not None and header.data.shape == volume.data.shape
    assert header.ndim == volume.ndim and header.data.dtype == volume.data.dtype == np.float32
    np.testing.assert_allclose(header.affine, volume.affine, atol=1e-6)
    assert header.data.strides == (0,) * header.data.ndim  # a stand-in: no voxel held


def test_a_png_has_no_header_step(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.zeros((4, 6), dtype=np.uint8))
    assert read_header(tmp_path / "a.png") is None


def test_a_budget_below_the_image_is_refused_before_it_is_read(
    tiny_abdomen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from flexpatch.cli import main
    from flexpatch.train.loop import train

    config = TrainConfig(model="unet", model_kwargs=TINY, patch="16", steps=1, batch=1, workers=0)
    train(tiny_abdomen, tmp_path / "model", config, device="cpu", progress=False)
    # 256^3 voxels: 67 MB as float32 once read, a few kB on disk
    big = tmp_path / "in" / "big_0000.nii.gz"
    big.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), dtype=np.uint8), np.diag([6.0, 6.0, 6.0, 1.0])), big)
    read: list[Path] = []
    monkeypatch.setattr("flexpatch.data.io._load_nifti", lambda path: read.append(path))
    # above what the process holds, below that and the image
    budget = f"{(resident_bytes() + 30 * 10**6) // 10**6}MB"
    args = ["flexpatch", "predict", str(tmp_path / "model"), str(big.parent), "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", [*args, "--memory", budget, "--device", "cpu", "--json"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {big}: memory budget ") and "image 256x256x256" in err[0], err[0]
    assert "the image's 67.11 MB counted from its header, not read" in err[0]
    assert read == [] and not (tmp_path / "out" / "big.nii.gz").exists()


def test_an_ensemble_refuses_it_before_reading_too(
    tiny_abdomen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flexpatch.errors import FlexPatchError
    from flexpatch.infer.ensemble import predict_ensemble
    from flexpatch.train.loop import train

    for fold in ("a", "b"):
        config = TrainConfig(model="unet", model_kwargs=TINY, patch="16", steps=1, batch=1, workers=0)
        train(tiny_abdomen, tmp_path / fold, config, device="cpu", progress=False)
    big = tmp_path / "in" / "big_0000.nii.gz"
    big.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), dtype=np.uint8), np.diag([6.0, 6.0, 6.0, 1.0])), big)
    read: list[Path] = []
    monkeypatch.setattr("flexpatch.data.io._load_nifti", lambda path: read.append(path))
    budget = resident_bytes() + 30 * 10**6
    with pytest.raises(FlexPatchError, match=rf"^{big}: memory budget .* counted from its header, not read"):
        predict_ensemble([tmp_path / "a", tmp_path / "b"], [big.parent], tmp_path / "out", device="cpu",
                         memory=budget, progress=False)  # fmt: skip
    assert read == []


def test_the_floor_counts_the_post_processing(tiny_abdomen: Path, tmp_path: Path) -> None:
    """The largest-component cut runs after the sliding window, in its place: a budget whose window
    share cannot hold it is refused from the header when the model post-processes, not otherwise."""
    from flexpatch.errors import FlexPatchError
    from flexpatch.evaluate.postprocess import working_bytes
    from flexpatch.infer.floor import check_floor, outputs_bytes
    from flexpatch.infer.predictor import load_model
    from flexpatch.train.loop import train

    config = TrainConfig(model="unet", model_kwargs=TINY, patch="16", steps=1, batch=1, workers=0)
    train(tiny_abdomen, tmp_path / "model", config, device="cpu", progress=False)
    big = tmp_path / "big_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), dtype=np.uint8), np.diag([6.0, 6.0, 6.0, 1.0])), big)
    lm = load_model(tmp_path / "model", device="cpu")
    shape, held = (256, 256, 256), 10**8
    volume = 4 * 256**3  # float32 once read
    budget = held + volume + outputs_bytes(lm, shape, shape, None, 0.5, False) + 50 * 10**6
    assert working_bytes(shape, [1]) > 50 * 10**6  # the test's point: the share holds no cut
    (tmp_path / "model" / "postprocessing.json").write_text('{"largest_component": []}')
    check_floor(lm, [big], budget, None, 0.5, False, held)  # nothing to cut: the share suffices
    (tmp_path / "model" / "postprocessing.json").write_text('{"largest_component": [1, 3]}')
    with pytest.raises(FlexPatchError, match=rf"^{big}: memory budget .* largest component afterwards"):
        check_floor(lm, [big], budget, None, 0.5, False, held)
    check_floor(lm, [big], budget + working_bytes(shape, [1]), None, 0.5, False, held)
