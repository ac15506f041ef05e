"""Dataset layouts (nnU-Net v2 raw, MSD) and the errors for every kind of broken dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flexpatch.data.dataset import Case, load_case, load_dataset
from flexpatch.data.io import write_image
from flexpatch.errors import FlexPatchError

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def _affine(spacing: tuple[float, ...]) -> np.ndarray:
    return np.diag([*spacing, *([1.0] * (4 - len(spacing)))])


def _label(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, shape).astype(np.uint8)


def make_nnunet(
    root: Path,
    ndim: int = 3,
    channels: tuple[str, ...] = ("CT",),
    n: int = 2,
    ending: str = ".nii.gz",
    test: bool = False,
) -> dict[str, np.ndarray]:
    """Write a tiny nnU-Net v2 raw dataset; returns the arrays written, keyed by file name."""
    shape = (6, 5, 4)[:ndim]
    written = {}
    for i in range(n):
        cid = f"case_{i:03d}"
        for c in range(len(channels)):
            img = np.random.default_rng(10 * i + c).normal(size=shape).astype(np.float32)
            written[f"{cid}_{c:04d}"] = img
            write_image(root / "imagesTr" / f"{cid}_{c:04d}{ending}", img, _affine((1.5,) * ndim))
        written[cid] = _label(shape, i)
        write_image(root / "labelsTr" / f"{cid}{ending}", written[cid], _affine((1.5,) * ndim))
    if test:
        for c in range(len(channels)):
            write_image(root / "imagesTs" / f"tst_{c:04d}{ending}", np.zeros(shape, np.float32))
            write_image(root / "imagesTs" / f"nolabel_{c:04d}{ending}", np.zeros(shape, np.float32))
        write_image(root / "labelsTs" / f"tst{ending}", np.zeros(shape, np.uint8))
    meta = {
        "name": "Tiny",
        "channel_names": {str(c): name for c, name in enumerate(channels)},
        "labels": LABELS,
        "numTraining": n,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return written


def make_msd(root: Path, channels: int = 2) -> np.ndarray:
    """Write a tiny MSD dataset with one 4D (channels-last) image per case; returns case 0's image."""
    shape = (5, 4, 3)
    training, images = [], []
    for i in range(2):
        img = np.random.default_rng(i).normal(size=(channels, *shape)).astype(np.float32)
        images.append(img)
        write_image(root / "imagesTr" / f"la_{i}.nii.gz", img, channels=True)
        write_image(root / "labelsTr" / f"la_{i}.nii.gz", _label(shape, i))
        training.append({"image": f"./imagesTr/la_{i}.nii.gz", "label": f"./labelsTr/la_{i}.nii.gz"})
    write_image(root / "imagesTs" / "la_9.nii.gz", np.zeros((channels, *shape), np.float32), channels=True)
    meta = {
        "name": "Task02_Tiny",
        "modality": {str(c): f"MRI{c}" for c in range(channels)},
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "numTraining": 2,
        "training": training,
        "test": ["./imagesTs/la_9.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return images[0]


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("ndim", [2, 3])
def test_nnunet_layout_two_channels(tmp_path: Path, ndim: int) -> None:
    written = make_nnunet(tmp_path, ndim=ndim, channels=("T1", "T2"), test=True)
    ds = load_dataset(tmp_path)
    assert (ds.layout, ds.name, ds.ndim, ds.file_ending) == ("nnunet", "Tiny", ndim, ".nii.gz")
    assert ds.channel_names == ("T1", "T2") and ds.labels == LABELS
    assert ds.num_classes == 3 and ds.normalizations == ("zscore", "zscore")
    assert [c.id for c in ds.training] == ["case_000", "case_001"]
    assert ds.training[1].images == (
        tmp_path / "imagesTr" / "case_001_0000.nii.gz",
        tmp_path / "imagesTr" / "case_001_0001.nii.gz",
    )
    assert [(c.id, c.label) for c in ds.test] == [
        ("nolabel", None),
        ("tst", tmp_path / "labelsTs/tst.nii.gz"),
    ]
    image, label = load_case(ds.training[1], ds.ndim, ds.labels)
    assert image.data.shape == (2, *(6, 5, 4)[:ndim]) and label is not None
    np.testing.assert_array_equal(image.data[0], written["case_001_0000"])
    np.testing.assert_array_equal(image.data[1], written["case_001_0001"])
    np.testing.assert_array_equal(label.data, written["case_001"])
    assert image.spacing == (1.5,) * ndim
    json.dumps(ds.to_json())  # JSON-serialisable


def test_nnunet_png_2d_and_ct(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_image(tmp_path / "imagesTr" / "a_0000.png", rng.integers(0, 255, (8, 7)).astype(np.uint8))
    write_image(tmp_path / "labelsTr" / "a.png", rng.integers(0, 2, (8, 7)).astype(np.uint8))
    meta = {"channel_names": {"0": "ct"}, "labels": {"background": 0, "x": 1}, "file_ending": ".png"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(tmp_path)
    assert ds.ndim == 2 and ds.normalizations == ("ct",) and ds.num_classes == 2 and ds.name == tmp_path.name
    image, label = load_case(ds.training[0], ds.ndim, ds.labels)
    assert image.data.shape == (1, 8, 7) and label is not None and label.data.shape == (8, 7)


def test_rgb_png_holds_all_channels(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (6, 5, 3)).astype(np.uint8)
    write_image(tmp_path / "imagesTr" / "a_0000.png", rgb)
    write_image(tmp_path / "labelsTr" / "a.png", np.zeros((6, 5), np.uint8))
    meta = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0},
        "file_ending": ".png",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(tmp_path)
    image, _ = load_case(ds.training[0], ds.ndim, ds.labels)
    np.testing.assert_array_equal(image.data, np.moveaxis(rgb, -1, 0))


def test_ndim_from_dataset_json(tmp_path: Path) -> None:
    make_nnunet(tmp_path, ndim=3)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**meta, "ndim": 2}))
    assert load_dataset(tmp_path).ndim == 2


def test_msd_layout_4d_image(tmp_path: Path) -> None:
    first = make_msd(tmp_path)
    ds = load_dataset(tmp_path)
    assert (ds.layout, ds.name, ds.ndim, ds.file_ending) == ("msd", "Task02_Tiny", 3, ".nii.gz")
    assert ds.labels == LABELS and ds.channel_names == ("MRI0", "MRI1")
    assert [c.id for c in ds.training] == ["la_0", "la_1"] and [c.id for c in ds.test] == ["la_9"]
    assert ds.test[0].label is None
    image, label = load_case(ds.training[0], ds.ndim, ds.labels)
    np.testing.assert_array_equal(image.data, first)
    assert label is not None and label.data.shape == (5, 4, 3)


# ----------------------------------------------------------------------------- errors


def _rewrite(root: Path, **changes: object) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "dataset.json").write_text(json.dumps(meta))


def _raises(root: Path, *fragments: str) -> None:
    with pytest.raises(FlexPatchError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg


def test_missing_root_and_json(tmp_path: Path) -> None:
    _raises(tmp_path / "nowhere", "nowhere")
    _raises(tmp_path, "dataset.json")
    (tmp_path / "dataset.json").write_text("{not json")
    _raises(tmp_path, "dataset.json", "invalid JSON")


def test_missing_fields_are_named(tmp_path: Path) -> None:
    make_nnunet(tmp_path)
    _rewrite(tmp_path, labels=None, file_ending=None)
    _raises(tmp_path, "dataset.json", "'labels'", "'file_ending'")
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    _raises(tmp_path, "channel_names", "modality")
    make_msd(tmp_path / "msd")
    _rewrite(tmp_path / "msd", training=None)
    _raises(tmp_path / "msd", "'training'")


def test_unsupported_file_ending(tmp_path: Path) -> None:
    make_nnunet(tmp_path)
    _rewrite(tmp_path, file_ending=".dcm")
    _raises(tmp_path, "dataset.json", ".dcm")


def test_missing_channel_file(tmp_path: Path) -> None:
    make_nnunet(tmp_path, channels=("T1", "T2"))
    (tmp_path / "imagesTr" / "case_001_0001.nii.gz").unlink()
    _raises(tmp_path, "case_001_0001.nii.gz")


def test_missing_msd_image_and_label(tmp_path: Path) -> None:
    make_msd(tmp_path)
    (tmp_path / "labelsTr" / "la_1.nii.gz").unlink()
    _raises(tmp_path, "la_1.nii.gz", "label")
    (tmp_path / "imagesTr" / "la_0.nii.gz").unlink()
    _raises(tmp_path, "la_0")


def test_empty_dataset(tmp_path: Path) -> None:
    make_nnunet(tmp_path, n=0)
    (tmp_path / "labelsTr").mkdir()
    _raises(tmp_path, "dataset.json", "empty dataset")
    make_msd(tmp_path / "msd")
    _rewrite(tmp_path / "msd", training=[])
    _raises(tmp_path / "msd", "empty dataset")


def test_bad_labels_declaration(tmp_path: Path) -> None:
    make_nnunet(tmp_path)
    _rewrite(tmp_path, labels={"background": 0, "tumour": [1, 2]})
    _raises(tmp_path, "dataset.json", "tumour")
    _rewrite(tmp_path, labels={"liver": 1})
    _raises(tmp_path, "dataset.json", "background")


# ----------------------------------------------------------------------------- load_case checks


def _case(root: Path, images: list[str], label: str | None) -> Case:
    return Case("c", tuple(root / p for p in images), None if label is None else root / label)


def _case_raises(case: Case, *fragments: str, labels: dict[str, int] | None = None) -> None:
    with pytest.raises(FlexPatchError) as err:
        load_case(case, 3, labels)
    for f in fragments:
        assert f in str(err.value)


def test_channel_shape_and_affine_mismatch(tmp_path: Path) -> None:
    write_image(tmp_path / "a.nii.gz", np.zeros((4, 4, 4), np.float32))
    write_image(tmp_path / "b.nii.gz", np.zeros((4, 4, 5), np.float32))
    write_image(tmp_path / "c.nii.gz", np.zeros((4, 4, 4), np.float32), _affine((1.0, 1.0, 2.0)))
    _case_raises(_case(tmp_path, ["a.nii.gz", "b.nii.gz"], None), "b.nii.gz", "(4, 4, 5)")
    _case_raises(_case(tmp_path, ["a.nii.gz", "c.nii.gz"], None), "c.nii.gz", "affine")


def test_label_mismatch_and_undeclared_values(tmp_path: Path) -> None:
    write_image(tmp_path / "img.nii.gz", np.zeros((4, 4, 4), np.float32))
    write_image(tmp_path / "small.nii.gz", np.zeros((4, 4, 3), np.uint8))
    shifted = _affine((1.0, 1.0, 1.0))
    shifted[0, 3] = 0.01  # beyond the 1e-3 tolerance
    write_image(tmp_path / "moved.nii.gz", np.zeros((4, 4, 4), np.uint8), shifted)
    nudged = _affine((1.0, 1.0, 1.0))
    nudged[0, 3] = 1e-4  # within tolerance: accepted
    seven = np.zeros((4, 4, 4), np.uint8)
    seven[0, 0, 0], seven[1, 1, 1] = 7, 5
    write_image(tmp_path / "seven.nii.gz", seven, nudged)
    _case_raises(_case(tmp_path, ["img.nii.gz"], "small.nii.gz"), "small.nii.gz", "(4, 4, 3)")
    _case_raises(_case(tmp_path, ["img.nii.gz"], "moved.nii.gz"), "moved.nii.gz", "img.nii.gz", "affine")
    _case_raises(_case(tmp_path, ["img.nii.gz"], "seven.nii.gz"), "seven.nii.gz", "[5, 7]", labels=LABELS)
    _, label = load_case(_case(tmp_path, ["img.nii.gz"], "seven.nii.gz"), 3)  # no declared labels: no check
    assert label is not None and int(label.data.max()) == 7
