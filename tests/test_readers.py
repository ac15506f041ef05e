"""Readers beyond NIfTI: SimpleITK's .mha/.nrrd (geometry as nibabel's), nnU-Net's 3D TIFF with its
spacing JSON, dataset.json's overwrite_image_reader_writer, and MSD's 4D multi-channel images from
training to prediction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from flexpatch.data.dataset import load_case, load_dataset
from flexpatch.data.io import channel_count, read_image, read_label, write_image, write_like
from flexpatch.errors import FlexPatchError
from flexpatch.infer.predictor import load_model, predict_files
from flexpatch.infer.runner import Prediction, group_inputs, run_prediction
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}  # divisor 4
LPS = np.diag([-1.0, -1.0, 1.0])


def rotation(a: float, b: float, c: float) -> np.ndarray:
    """A proper rotation from three angles (degrees) about x, y and z."""
    a, b, c = np.radians([a, b, c])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


ROTATION = rotation(20, -35, 50)
SPACING = np.array([0.7, 1.3, 2.9])
ORIGIN = np.array([-12.25, 45.5, 7.125])


def oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = ROTATION * SPACING
    affine[:3, 3] = ORIGIN
    return affine


def volume(shape: tuple[int, ...] = (6, 5, 4), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def by_hand(data: np.ndarray) -> sitk.Image:
    """The image of :func:`oblique_affine` built for ITK by hand: LPS geometry, axes reversed."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.T))
    image.SetSpacing(SPACING.tolist())
    image.SetOrigin((LPS @ ORIGIN).tolist())
    image.SetDirection((LPS @ ROTATION).ravel().tolist())
    return image


def one_line(e: pytest.ExceptionInfo, *needles: object) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, msg


# ----------------------------------------------------------------------------- SimpleITK


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_round_trip_keeps_an_oblique_affine(tmp_path: Path, suffix: str) -> None:
    data, affine = volume(), oblique_affine()
    write_image(tmp_path / f"a{suffix}", data, affine)
    back = read_image(tmp_path / f"a{suffix}")
    np.testing.assert_allclose(back.affine, affine, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(back.data[0], data)
    # what ITK itself holds: LPS and the voxel axes as numpy reverses them
    image = sitk.ReadImage(str(tmp_path / f"a{suffix}"))
    np.testing.assert_allclose(image.GetDirection(), (LPS @ ROTATION).ravel(), atol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), LPS @ ORIGIN, atol=1e-12)
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), data.T)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_nifti_by_nibabel_and_itk_files_read_the_same(tmp_path: Path, suffix: str) -> None:
    data = volume(seed=1)
    nifti = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(data, oblique_affine()), str(nifti))
    sitk.WriteImage(by_hand(data), str(tmp_path / f"hand{suffix}"))  # geometry set by hand
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(tmp_path / f"itk{suffix}"))  # ITK's NIfTI reading
    reference = read_image(nifti)
    for name in (f"hand{suffix}", f"itk{suffix}"):
        other = read_image(tmp_path / name)
        np.testing.assert_array_equal(other.data, reference.data)
        # the NIfTI header holds float32: 1e-5 mm is its rounding, not a difference of convention
        np.testing.assert_allclose(other.affine, reference.affine, rtol=0, atol=1e-5)
        assert other.spacing == pytest.approx(reference.spacing)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_four_d_and_vector_images_are_channels(tmp_path: Path, suffix: str) -> None:
    data = volume((2, 6, 5, 4), seed=2)
    nib.save(nib.Nifti1Image(np.moveaxis(data, 0, -1), oblique_affine()), str(tmp_path / "msd.nii.gz"))
    four_d = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(data, 0, -1).T), isVector=False)
    four_d.SetSpacing([*SPACING, 1.0])
    four_d.SetOrigin([*(LPS @ ORIGIN), 0.0])
    direction = np.eye(4)
    direction[:3, :3] = LPS @ ROTATION
    four_d.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(four_d, str(tmp_path / f"4d{suffix}"))
    write_image(tmp_path / f"vector{suffix}", data, oblique_affine(), channels=True)
    assert sitk.ReadImage(str(tmp_path / f"vector{suffix}")).GetNumberOfComponentsPerPixel() == 2
    reference = read_image(tmp_path / "msd.nii.gz", 3)
    for name in ("msd.nii.gz", f"4d{suffix}", f"vector{suffix}"):
        got = read_image(tmp_path / name, 3)
        assert got.data.shape == (2, 6, 5, 4) and channel_count(tmp_path / name) == 2
        np.testing.assert_array_equal(got.data, data)
        np.testing.assert_allclose(got.affine, reference.affine, rtol=0, atol=1e-5)


def test_two_d_itk_images(tmp_path: Path) -> None:
    data = volume((6, 5), seed=3)
    in_plane = np.diag([0.5, 0.75, 1.0, 1.0])
    in_plane[:2, 3] = [3.0, -4.0]
    write_image(tmp_path / "flat.mha", data, in_plane)
    assert sitk.ReadImage(str(tmp_path / "flat.mha")).GetDimension() == 2
    got = read_image(tmp_path / "flat.mha")
    assert got.ndim == 2 and got.data.shape == (1, 6, 5)
    np.testing.assert_array_equal(got.data[0], data)
    np.testing.assert_allclose(got.affine, in_plane, atol=1e-12)
    # a slice of a volume keeps its place in the world: one slice of a 3D image
    write_image(tmp_path / "slice.mha", data, oblique_affine())
    assert sitk.ReadImage(str(tmp_path / "slice.mha")).GetSize() == (6, 5, 1)
    got = read_image(tmp_path / "slice.mha", 2)
    np.testing.assert_array_equal(got.data[0], data)
    np.testing.assert_allclose(got.affine, oblique_affine(), atol=1e-12)


def test_prediction_of_an_itk_input_is_written_in_its_format_on_its_grid(tmp_path: Path) -> None:
    data = volume(seed=4)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(by_hand(data), str(tmp_path / "in" / "case_0000.nrrd"))

    def segment(vol: object) -> Prediction:
        return Prediction(labels=(vol.data[0] > 0).astype(np.uint8))  # type: ignore[attr-defined]

    [out] = run_prediction(group_inputs([tmp_path / "in"], 1), tmp_path / "out", 3, segment, progress=False)
    assert out == tmp_path / "out" / "case.nrrd"
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(tmp_path / "in" / "case_0000.nrrd"))
    assert written.GetDirection() == pytest.approx(source.GetDirection(), abs=1e-12)
    assert written.GetOrigin() == pytest.approx(source.GetOrigin(), abs=1e-12)
    assert written.GetSpacing() == pytest.approx(source.GetSpacing(), abs=1e-12)
    np.testing.assert_array_equal(read_label(out).data, data > 0)
    # a prediction written as .mha for a NIfTI input keeps the NIfTI's geometry too
    nib.save(nib.Nifti1Image(data, oblique_affine()), str(tmp_path / "a.nii.gz"))
    reference = read_image(tmp_path / "a.nii.gz")
    write_like(tmp_path / "p.mha", (data > 0).astype(np.uint8), reference)
    np.testing.assert_allclose(read_label(tmp_path / "p.mha").affine, reference.affine, atol=1e-12)


def test_broken_itk_files_are_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mha"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(FlexPatchError) as e:
        read_image(garbage)
    one_line(e, garbage, "not a readable image")
    # a header with a zero spacing is refused before its voxels are read
    header = tmp_path / "zero.mha"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementSpacing = 1 0 1\n"
        "ElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    )
    with open(header, "ab") as f:
        f.write(bytes(8))
    with pytest.raises(FlexPatchError) as e:
        read_image(header)
    one_line(e, header, "spacing", "axis 1")
    with pytest.raises(FlexPatchError) as e:
        read_image(tmp_path / "missing.nrrd")
    one_line(e, "missing.nrrd", "not found")


# ----------------------------------------------------------------------------- 3D TIFF


def test_three_d_tiff_with_its_spacing_json(tmp_path: Path) -> None:
    data = volume((7, 6, 5), seed=5)
    tifffile.imwrite(tmp_path / "cell_0000.tif", data)
    (tmp_path / "cell.json").write_text(json.dumps({"spacing": [2.0, 0.5, 0.25]}))  # nnU-Net's name
    got = read_image(tmp_path / "cell_0000.tif")
    assert got.ndim == 3 and got.data.shape == (1, 7, 6, 5) and got.spacing == (2.0, 0.5, 0.25)
    np.testing.assert_array_equal(got.data[0], data)
    # written back: the stack and its own JSON, nnU-Net's Tiff3DIO segmentation
    write_like(tmp_path / "out" / "cell.tif", (data > 0).astype(np.uint8), got)
    assert json.loads((tmp_path / "out" / "cell.json").read_text()) == {"spacing": [2.0, 0.5, 0.25]}
    back = read_label(tmp_path / "out" / "cell.tif")
    assert back.spacing == (2.0, 0.5, 0.25)
    np.testing.assert_array_equal(back.data, data > 0)
    # without a JSON, a stack is still 3D, with unit spacing
    tifffile.imwrite(tmp_path / "bare.tif", data)
    assert read_image(tmp_path / "bare.tif").spacing == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "content", ["{not json", '{"spacing": [1, 2]}', '{"spacing": [1, 0, 1]}', '["spacing"]']
)
def test_a_bad_spacing_json_is_one_line_naming_it(tmp_path: Path, content: str) -> None:
    tifffile.imwrite(tmp_path / "cell.tif", volume((4, 4, 4)))
    (tmp_path / "cell.json").write_text(content)
    with pytest.raises(FlexPatchError) as e:
        read_image(tmp_path / "cell.tif")
    one_line(e, tmp_path / "cell.json")


def tiff_dataset(source: Path, root: Path, reader: str | None = None, spacing_json: bool = True) -> Path:
    """The abdomen phantom as nnU-Net's 3D TIFF dataset: stacks with their spacing JSONs."""
    meta = json.loads((source / "dataset.json").read_text())
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
        for f in sorted((source / folder).glob("*.nii.gz")):
            vol = read_image(f)
            stem = f.name[: -len(".nii.gz")]
            tifffile.imwrite(root / folder / f"{stem}.tif", vol.data[0].astype(np.float32))
            if spacing_json:
                name = stem[: -len("_0000")] if folder.startswith("images") else stem
                (root / folder / f"{name}.json").write_text(json.dumps({"spacing": list(vol.spacing)}))
    meta["file_ending"] = ".tif"
    del meta["ndim"]  # the files say (or the reader): a stack with its JSON is 3D
    if reader is not None:
        meta["overwrite_image_reader_writer"] = reader
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def config() -> TrainConfig:
    return TrainConfig(model_kwargs=TINY, patch="16", steps=2, batch=2, val_every=2, workers=0)


def test_a_three_d_tiff_dataset_trains_and_predicts(
    tiny_abdomen: Path, tmp_path: Path, one_thread: None
) -> None:
    root = tiff_dataset(tiny_abdomen, tmp_path / "tif")
    ds = load_dataset(root)
    assert ds.ndim == 3 and ds.file_ending == ".tif"
    image, label = load_case(ds.training[0], ds.ndim, ds.labels)
    assert image.spacing == (6.0, 6.0, 6.0) and label is not None and label.spacing == image.spacing
    train(root, tmp_path / "m", config(), device="cpu", progress=False)
    model = load_model(tmp_path / "m", device="cpu")
    assert model.plan.ndim == 3
    written = predict_files(model, [root / "imagesTs"], tmp_path / "out", progress=False)
    assert [p.name for p in written] == ["phantom_test_000.tif", "phantom_test_001.tif"]
    seg = read_label(written[0])
    assert seg.data.shape == (32, 32, 32) and seg.spacing == (6.0, 6.0, 6.0)


# ----------------------------------------------------------------------------- dataset.json's reader


@pytest.mark.parametrize(
    ("reader", "ending", "ndim"),
    [("Tiff3DIO", ".tif", 3), ("NaturalImage2DIO", ".tif", 2), ("None", ".tif", 3),
     ("SimpleITKIO", ".nii.gz", 3), ("NibabelIO", ".nii.gz", 3), ("NibabelIOWithReorient", ".nii.gz", 3)],
)  # fmt: skip
def test_overwrite_image_reader_writer_is_honoured(
    tiny_abdomen: Path, tmp_path: Path, reader: str, ending: str, ndim: int
) -> None:
    if ending == ".tif":  # no spacing JSON: Tiff3DIO says 3D, NaturalImage2DIO 2D, the stacks 3D
        root = tiff_dataset(tiny_abdomen, tmp_path / "ds", reader, spacing_json=False)
    else:
        root = Path(shutil.copytree(tiny_abdomen, tmp_path / "ds"))
        meta = json.loads((root / "dataset.json").read_text())
        (root / "dataset.json").write_text(json.dumps({**meta, "overwrite_image_reader_writer": reader}))
    assert load_dataset(root).ndim == ndim


@pytest.mark.parametrize(
    ("reader", "needle"),
    [("MyOwnIO", "'MyOwnIO' is not a reader"), ("NibabelIO", "does not read '.tif'"),
     ("NaturalImage2DIO", "'ndim' 3 but")],
)  # fmt: skip
def test_unknown_or_unfit_readers_are_refused(
    tiny_abdomen: Path, tmp_path: Path, reader: str, needle: str
) -> None:
    root = tiff_dataset(tiny_abdomen, tmp_path / "ds", reader)
    if reader == "NaturalImage2DIO":  # at odds with the dataset's own ndim
        meta = json.loads((root / "dataset.json").read_text())
        (root / "dataset.json").write_text(json.dumps({**meta, "ndim": 3}))
    with pytest.raises(FlexPatchError) as e:
        load_dataset(root)
    one_line(e, root / "dataset.json", "overwrite_image_reader_writer", needle)


# ----------------------------------------------------------------------------- MSD 4D images


def msd_dataset(source: Path, root: Path) -> Path:
    """The abdomen phantom as an MSD task of two channels: one 4D NIfTI (channels last) per case."""
    ds = load_dataset(source)
    training = []
    for case in (*ds.training, *ds.test):
        image, label = load_case(case, 3)
        two = np.concatenate([image.data, 0.5 * image.data + 10.0])
        folder = "imagesTr" if case in ds.training else "imagesTs"
        write_image(root / folder / f"{case.id}.nii.gz", two, image.affine, channels=True)
        if case in ds.training:
            write_image(root / "labelsTr" / f"{case.id}.nii.gz", label.data, label.affine)  # type: ignore[union-attr]
            training.append(
                {"image": f"./imagesTr/{case.id}.nii.gz", "label": f"./labelsTr/{case.id}.nii.gz"}
            )
    meta = json.loads((source / "dataset.json").read_text())
    labels = {str(v): k for k, v in meta["labels"].items()}
    tests = [f"./imagesTs/{c.id}.nii.gz" for c in ds.test]
    msd = {
        "name": "Task99_Two",
        "modality": {"0": "CT", "1": "MR"},
        "labels": labels,
        "training": training,
        "test": tests,
    }
    (root / "dataset.json").write_text(json.dumps(msd))
    return root


def test_an_msd_dataset_of_4d_images_trains_and_predicts_its_test_images(
    tiny_abdomen: Path, tmp_path: Path, one_thread: None
) -> None:
    root = msd_dataset(tiny_abdomen, tmp_path / "msd")
    ds = load_dataset(root)
    assert ds.layout == "msd" and ds.channel_names == ("CT", "MR") and len(ds.test) == 2
    train(root, tmp_path / "m", config(), device="cpu", progress=False)
    model = load_model(tmp_path / "m", device="cpu")
    assert model.plan.in_channels == 2
    written = predict_files(model, [root / "imagesTs"], tmp_path / "out", progress=False)
    assert [p.name for p in written] == ["phantom_test_000.nii.gz", "phantom_test_001.nii.gz"]
    seg = nib.load(str(written[0]))
    assert seg.shape == (32, 32, 32)
    np.testing.assert_allclose(
        seg.affine, nib.load(str(root / "imagesTs" / "phantom_test_000.nii.gz")).affine
    )
    # a single file that does not hold the model's channels is one line before any case runs
    single = tmp_path / "one" / "case.nii.gz"
    write_image(single, np.zeros((8, 8, 8), np.float32))
    with pytest.raises(FlexPatchError) as e:
        predict_files(model, [single], tmp_path / "out2", progress=False)
    one_line(e, single, "has 1 file, holding 1 channel(s); the model expects 2")
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())
