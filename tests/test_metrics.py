"""Metrics against MONAI (Dice, HD95, NSD), hand-computed golden examples, folder evaluation end to end."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from flexpatch.data.io import write_image
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.metrics import (
    METRICS,
    dice_torch,
    evaluate_folders,
    hausdorff95,
    normalized_surface_dice,
    segmentation_metrics,
)
from flexpatch.evaluate.report import EvaluationReport


def _onehot(m: np.ndarray, n_classes: int) -> torch.Tensor:
    """(*S) integer map -> (1, C, *S) float one-hot, as MONAI metrics expect."""
    t = torch.as_tensor(m, dtype=torch.long)
    return torch.nn.functional.one_hot(t, n_classes).movedim(-1, 0)[None].float()


def _random_maps(ndim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random maps with classes 1..3 (and class 4 nowhere), so classes form blobs."""
    rng = np.random.default_rng(seed)
    shape = (24,) * ndim if ndim == 2 else (16,) * ndim
    maps = []
    for _ in range(2):
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
        maps.append(np.digitize(noise, np.quantile(noise, [0.4, 0.6, 0.8])).astype(np.int16))
    return maps[0], maps[1]


@pytest.mark.parametrize("ndim", [2, 3])
def test_dice_equals_monai(ndim: int) -> None:
    pred, label = _random_maps(ndim, seed=ndim)
    classes = [1, 2, 3, 4]  # 4 is empty in both: NaN in MONAI (ignore_empty) and here
    ours = segmentation_metrics(pred, label, classes, hd95=False)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    ref = metric(_onehot(pred, 5), _onehot(label, 5))[0].numpy()
    got = np.array([ours[c]["dice"] for c in classes])
    assert math.isnan(ref[3]) and math.isnan(got[3])
    np.testing.assert_allclose(got, ref, rtol=1e-6, equal_nan=True)
    assert set(ours[1]) == {"dice", "iou", "precision", "recall"}


def _blob(shape: tuple[int, ...], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_hd95_equals_monai(ndim: int) -> None:
    rng = np.random.default_rng(10 + ndim)
    shape = (40, 36) if ndim == 2 else (24, 20, 18)
    spacing = (0.7, 1.9) if ndim == 2 else (0.8, 1.3, 2.5)
    for _ in range(3):
        pred = _blob(shape, tuple(rng.uniform(5, s - 5) for s in shape), tuple(rng.uniform(2, 6, ndim)))
        label = _blob(shape, tuple(rng.uniform(5, s - 5) for s in shape), tuple(rng.uniform(2, 6, ndim)))
        # a stray island far away moves the 95th percentile, and touches the border (the erosion edge case)
        pred[(0,) * ndim] = True
        ours = hausdorff95(pred, label, spacing)
        ref = compute_hausdorff_distance(
            torch.as_tensor(pred)[None, None].float(),
            torch.as_tensor(label)[None, None].float(),
            include_background=True,
            percentile=95,
            spacing=list(spacing),
        )
        np.testing.assert_allclose(ours, float(ref), rtol=1e-3, atol=1e-4)
        assert segmentation_metrics(pred.astype(int), label.astype(int), [1], spacing)[1]["hd95"] == ours


def test_hd95_is_symmetric_max_of_directed_percentiles() -> None:
    # label is one pixel; pred is that pixel plus a pixel 10 mm away along axis 1 (spacing 2):
    # label->pred distances are all 0, pred->label are {0, 10}; the 95th percentile of {0, 10} is 9.5.
    label = np.zeros((5, 12), bool)
    label[2, 2] = True
    pred = label.copy()
    pred[2, 7] = True
    assert hausdorff95(pred, label, (1.0, 2.0)) == pytest.approx(9.5)
    assert hausdorff95(label, pred, (1.0, 2.0)) == pytest.approx(9.5)


def test_golden_4x4() -> None:
    pred = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]])
    label = np.array([[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]])
    m = segmentation_metrics(pred, label, [1, 2, 3, 4], hd95=False)
    # class 1: |P| = 4, |L| = 4, overlap 3
    assert m[1] == pytest.approx({"dice": 6 / 8, "iou": 3 / 5, "precision": 3 / 4, "recall": 3 / 4})
    # class 2: predicted, absent from the label -> dice 0, precision 0, recall undefined
    assert (m[2]["dice"], m[2]["iou"], m[2]["precision"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m[2]["recall"])
    # class 3: in the label, not predicted -> dice 0, recall 0, precision undefined
    assert (m[3]["dice"], m[3]["iou"], m[3]["recall"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m[3]["precision"])
    # class 4: absent from both -> everything undefined
    assert all(math.isnan(v) for v in m[4].values())


def test_hd95_nan_when_a_side_is_empty() -> None:
    pred = np.zeros((6, 6), np.int16)
    label = np.zeros((6, 6), np.int16)
    label[2:4, 2:4] = 1
    assert math.isnan(segmentation_metrics(pred, label, [1])[1]["hd95"])
    assert math.isnan(segmentation_metrics(label, pred, [1])[1]["hd95"])
    assert math.isnan(segmentation_metrics(pred, pred, [1])[1]["hd95"])


def test_bad_input_raises() -> None:
    with pytest.raises(FlexPatchError, match=r"\(4, 4\).*\(4, 5\)"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 5)), [1])
    with pytest.raises(FlexPatchError, match="spacing"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 4)), [1], spacing=(1.0, 1.0, 1.0))
    with pytest.raises(FlexPatchError, match="same shape"):
        dice_torch(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("ndim", [2, 3])
def test_dice_torch_matches_numpy(ndim: int) -> None:
    maps = [_random_maps(ndim, seed=20 + i) for i in range(3)]
    # case 1: class 2 predicted but absent from the label -> 0, not NaN (unlike MONAI's ignore_empty)
    maps[1][1][maps[1][1] == 2] = 0
    assert (maps[1][0] == 2).any()
    got = dice_torch(
        torch.cat([_onehot(p, 5) for p, _ in maps]), torch.cat([_onehot(lab, 5) for _, lab in maps])
    )
    assert got.shape == (3, 5)
    for b, (p, lab) in enumerate(maps):
        ref = segmentation_metrics(p, lab, range(5), hd95=False)
        np.testing.assert_allclose(got[b].numpy(), [ref[c]["dice"] for c in range(5)], rtol=1e-5)
    assert got[1, 2] == 0.0 and torch.isnan(got[:, 4]).all()


def _write_case(folder: Path, name: str, data: np.ndarray, spacing: tuple[float, ...]) -> None:
    affine = np.diag([*spacing, 1.0] if len(spacing) == 3 else [*spacing, 1.0, 1.0])
    write_image(folder / name, data.astype(np.int16), affine)


@pytest.mark.parametrize("ndim", [2, 3])
def test_evaluate_folders_end_to_end(tmp_path: Path, ndim: int) -> None:
    spacing = (1.5, 0.5, 2.0)[:ndim]
    shape = (12,) * ndim
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "gt"
    cases = {}
    for i in range(2):
        label = np.zeros(shape, np.int16)
        label[(slice(2, 8),) * ndim] = 1
        label[(slice(9, 11),) * ndim] = 2
        pred = np.roll(label, i, axis=0)
        if i == 1:
            pred[pred == 2] = 0  # class 2 missed in case 1
        cases[f"case_{i}"] = (pred, label)
        _write_case(pred_dir, f"case_{i}.nii.gz", pred, spacing)
        _write_case(label_dir, f"case_{i}.nii.gz", label, spacing)
    (pred_dir / "plans.json").write_text("{}")  # non-image files are ignored

    report = evaluate_folders(pred_dir, label_dir, progress=False)
    assert [(r["case"], r["class"]) for r in report.per_case] == [
        ("case_0", "class_1"),
        ("case_0", "class_2"),
        ("case_1", "class_1"),
        ("case_1", "class_2"),
    ]
    for row in report.per_case:
        pred, label = cases[row["case"]]
        ref = segmentation_metrics(pred, label, [row["label"]], spacing)[row["label"]]
        np.testing.assert_equal([row[m] for m in METRICS], [ref[m] for m in METRICS])
    assert report.per_case[0]["dice"] == 1.0 and report.per_case[0]["hd95"] == 0.0
    assert report.per_case[3]["dice"] == 0.0 and math.isnan(report.per_case[3]["hd95"])

    csv_path, json_path = report.write(tmp_path / "out")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 4 and list(rows[0]) == ["case", "class", "label", *METRICS]
    assert float(rows[2]["dice"]) == pytest.approx(report.per_case[2]["dice"])
    assert rows[3]["hd95"] == "nan"
    summary = json.loads(json_path.read_text())["summary"]
    assert summary["n_cases"] == 2
    dice1 = [report.per_case[0]["dice"], report.per_case[2]["dice"]]
    assert summary["classes"]["class_1"]["dice"]["mean"] == pytest.approx(np.mean(dice1))
    assert summary["classes"]["class_1"]["dice"]["std"] == pytest.approx(np.std(dice1))
    assert summary["classes"]["class_2"]["hd95"] == {"mean": 0.0, "std": 0.0, "n": 1}  # NaN skipped

    named = evaluate_folders(
        pred_dir, label_dir, labels={"background": 0, "organ": 1, "vessel": 2}, hd95=False, progress=False
    )
    assert named.classes == ["organ", "vessel"] and "hd95" not in named.per_case[0]
    assert named.per_case[2]["dice"] == report.per_case[2]["dice"]
    # declaring fewer classes than the maps hold is an error, not a silent subset
    with pytest.raises(FlexPatchError, match="declares the foreground labels 1, but .* holds 2 too"):
        evaluate_folders(pred_dir, label_dir, labels={"background": 0, "organ": 1}, progress=False)


def test_evaluate_folders_fills_classes_absent_from_a_case(tmp_path: Path) -> None:
    a = np.zeros((6, 6), np.int16)
    a[1:3, 1:3] = 1
    b = np.zeros((6, 6), np.int16)
    b[2:5, 2:5] = 2
    for folder in ("p", "l"):
        _write_case(tmp_path / folder, "a.nii.gz", a, (1.0, 1.0))
        _write_case(tmp_path / folder, "b.nii.gz", b, (1.0, 1.0))
    report = evaluate_folders(tmp_path / "p", tmp_path / "l", progress=False)
    by = {(r["case"], r["class"]): r for r in report.per_case}
    assert by[("a", "class_1")]["dice"] == 1.0 and math.isnan(by[("a", "class_2")]["dice"])
    assert math.isnan(by[("b", "class_1")]["hd95"]) and by[("b", "class_2")]["hd95"] == 0.0
    summary = report.summary()
    assert summary["mean"]["dice"] == {"mean": 1.0, "std": 0.0, "n": 2}


def test_evaluate_folders_errors_name_the_file(tmp_path: Path) -> None:
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "gt"
    _write_case(pred_dir, "a.nii.gz", np.ones((4, 4, 4)), (1.0, 1.0, 1.0))
    _write_case(label_dir, "a.nii.gz", np.ones((4, 4, 5)), (1.0, 1.0, 1.0))
    with pytest.raises(FlexPatchError, match=r"pred/a\.nii\.gz.*gt/a\.nii\.gz"):
        evaluate_folders(pred_dir, label_dir, progress=False)

    _write_case(pred_dir, "b.nii.gz", np.ones((4, 4, 4)), (1.0, 1.0, 1.0))
    with pytest.raises(FlexPatchError, match=r"pred/b\.nii\.gz: no label"):
        evaluate_folders(pred_dir, label_dir, progress=False)

    (pred_dir / "b.nii.gz").unlink()
    _write_case(label_dir, "c.nii.gz", np.ones((4, 4, 4)), (1.0, 1.0, 1.0))
    with pytest.raises(FlexPatchError, match=r"gt/c\.nii\.gz: no prediction"):
        evaluate_folders(pred_dir, label_dir, progress=False)

    with pytest.raises(FlexPatchError, match="missing"):
        evaluate_folders(tmp_path / "missing", label_dir, progress=False)
    with pytest.raises(FlexPatchError, match="no foreground"):
        evaluate_folders(pred_dir, label_dir, labels={"background": 0}, progress=False)


def test_report_table_and_json_have_no_nan() -> None:
    rows = [
        {"case": "a", "class": "liver", "label": 1, **dict.fromkeys(METRICS, 0.5)},
        {"case": "b", "class": "liver", "label": 1, **dict.fromkeys(METRICS, math.nan)},
    ]
    report = EvaluationReport(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no all-NaN RuntimeWarning from the summary
        text = json.dumps(report.to_json(), allow_nan=False)
    assert json.loads(text)["per_case"][1]["dice"] is None
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(report.table())
    out = console.export_text()
    assert "liver" in out and "0.500 ± 0.000" in out and "0.50 ± 0.00" in out


# ---------------------------------------------------------------- Normalised Surface Dice


def _monai_nsd(pred: np.ndarray, label: np.ndarray, tolerance: float, spacing: tuple[float, ...]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on an empty mask and on its own deprecations
        nsd = compute_surface_dice(
            torch.as_tensor(pred)[None, None].float(),
            torch.as_tensor(label)[None, None].float(),
            class_thresholds=[tolerance],
            include_background=True,
            spacing=[float(s) for s in spacing],
        )
    return float(nsd[0, 0])


def _cubes(ndim: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """A 4-voxel square/cube as label, and the same shifted by one voxel along ``axis`` as prediction."""
    label = np.zeros((8,) * ndim, bool)
    label[(slice(2, 6),) * ndim] = True
    return np.roll(label, 1, axis), label


@pytest.mark.parametrize(
    ("spacing", "tolerance", "expected"),
    [
        # 56 boundary voxels each. Shifted by one voxel along axis 0, 36 of the prediction's lie on the
        # label's boundary (0 mm); its 4 bottom-face voxels inside the label's sides are one axis-1/2 voxel
        # from a side (1 mm); its 16 top-face voxels are one axis-0 voxel from the label's top (3 mm).
        # The label's boundary mirrors this. NSD = 2 * (voxels within tolerance) / 112.
        ((3.0, 1.0, 1.0), 0.5, 2 * 36 / 112),
        ((3.0, 1.0, 1.0), 1.0, 2 * 40 / 112),
        ((3.0, 1.0, 1.0), 2.9, 2 * 40 / 112),
        ((3.0, 1.0, 1.0), 3.0, 1.0),
        # the same shift along a 1 mm axis: the faces are 1 mm apart and the inner voxels 1 mm from a face
        ((1.0, 3.0, 1.0), 0.5, 2 * 36 / 112),
        ((1.0, 3.0, 1.0), 1.0, 1.0),
    ],
)
def test_nsd_hand_computed_cubes(spacing: tuple[float, ...], tolerance: float, expected: float) -> None:
    pred, label = _cubes(3, axis=0)
    assert normalized_surface_dice(pred, label, tolerance, spacing) == pytest.approx(expected)
    assert normalized_surface_dice(label, pred, tolerance, spacing) == pytest.approx(expected)
    assert _monai_nsd(pred, label, tolerance, spacing) == pytest.approx(expected, rel=1e-6)


def test_nsd_hand_computed_squares() -> None:
    # 12 boundary pixels each; shifted by one 2.5 mm pixel along axis 1: 6 of the prediction's lie on
    # the label's boundary, 2 (its left column's inner pixels) are 1 mm (one axis-0 pixel) from the
    # label's top/bottom row, 4 (its right column) are 2.5 mm from the label's right column; symmetric.
    pred, label = _cubes(2, axis=1)
    spacing = (1.0, 2.5)
    for tolerance, expected in ((0.0, 12 / 24), (0.9, 12 / 24), (1.0, 16 / 24), (2.5, 1.0), (9.0, 1.0)):
        assert normalized_surface_dice(pred, label, tolerance, spacing) == pytest.approx(expected)
    # without spacing every shift is one voxel (1 mm)
    assert normalized_surface_dice(pred, label, 1.0) == 1.0


def test_nsd_counts_a_voxel_at_a_float32_spacing_as_one_voxel() -> None:
    """NIfTI stores 0.8 mm as 0.800000011920929: the neighbour one voxel away is within 0.8 mm."""
    pred, label = _cubes(2, axis=0)
    spacing = (float(np.float32(0.8)), 5.0)
    assert normalized_surface_dice(pred, label, 0.8, spacing) == 1.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_nsd_equals_monai_on_random_shapes(ndim: int) -> None:
    rng = np.random.default_rng(30 + ndim)
    shape = (40, 36) if ndim == 2 else (24, 20, 18)
    spacing = (0.7, 1.9) if ndim == 2 else (0.8, 1.3, 2.5)
    seen: list[float] = []
    for _ in range(4):
        # near shapes (a moved, reshaped blob), so that the scores spread over (0, 1)
        centre, radii = rng.uniform(8, np.array(shape) - 8), rng.uniform(3, 7, ndim)
        pred = _blob(shape, tuple(centre), tuple(radii))
        label = _blob(
            shape, tuple(centre + rng.uniform(-2, 2, ndim)), tuple(radii * rng.uniform(0.7, 1.3, ndim))
        )
        pred[(0,) * ndim] = True  # an island on the border (the erosion edge case)
        for tolerance in (0.0, 1.0, 2.2, 4.5):
            ours = normalized_surface_dice(pred, label, tolerance, spacing)
            assert ours == pytest.approx(_monai_nsd(pred, label, tolerance, spacing), rel=1e-6)
            seen.append(ours)
        scores = segmentation_metrics(pred.astype(int), label.astype(int), [1], spacing, nsd_tolerance=2.2)[1]
        assert scores["nsd"] == normalized_surface_dice(pred, label, 2.2, spacing)
        assert scores["hd95"] == hausdorff95(pred, label, spacing)  # from the same distance transforms
    assert len({round(v, 3) for v in seen}) > 10 and 0 < min(seen) and max(seen) < 1


@pytest.mark.parametrize("ndim", [2, 3])
def test_nsd_on_empty_masks_follows_dice(ndim: int) -> None:
    """Both empty: NaN (drops out of the means, as Dice and HD95); one empty: 0 (as Dice; MONAI too)."""
    empty = np.zeros((6,) * ndim, np.int16)
    full = empty.copy()
    full[(slice(2, 4),) * ndim] = 1
    assert math.isnan(normalized_surface_dice(empty, empty))
    assert normalized_surface_dice(full, empty) == 0.0 and normalized_surface_dice(empty, full) == 0.0
    assert math.isnan(_monai_nsd(empty, empty, 1.0, (1.0,) * ndim))
    assert _monai_nsd(full, empty, 1.0, (1.0,) * ndim) == 0.0 == _monai_nsd(empty, full, 1.0, (1.0,) * ndim)
    for pred, label in ((full, empty), (empty, full)):
        m = segmentation_metrics(pred, label, [1, 2])
        assert (m[1]["dice"], m[1]["nsd"]) == (0.0, 0.0) and math.isnan(m[1]["hd95"])
        assert all(math.isnan(m[2][k]) for k in ("dice", "hd95", "nsd"))


def test_nsd_options_and_bad_tolerance() -> None:
    pred, label = _cubes(2, axis=0)
    assert "nsd" not in segmentation_metrics(pred, label, [1], hd95=False)[1]
    assert set(segmentation_metrics(pred, label, [1], nsd_tolerance=None)[1]) == {
        "dice",
        "iou",
        "precision",
        "recall",
        "hd95",
    }
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(FlexPatchError, match="NSD tolerance"):
            normalized_surface_dice(pred, label, bad)
        with pytest.raises(FlexPatchError, match="NSD tolerance"):
            segmentation_metrics(pred, label, [1], nsd_tolerance=bad)
    with pytest.raises(FlexPatchError, match="spacing"):
        normalized_surface_dice(pred, label, 1.0, (1.0, 1.0, 1.0))


@pytest.mark.parametrize("ndim", [2, 3])
def test_evaluate_folders_nsd_uses_the_affines_spacing(tmp_path: Path, ndim: int) -> None:
    """The spacing comes from the label's affine, also when it is oblique (column norms)."""
    pred, label = _cubes(ndim, axis=0)
    c, s = math.cos(0.3), math.sin(0.3)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    spacing = (3.0, 1.0, 1.0) if ndim == 3 else (1.0, 2.5, 1.0)  # 2D: the shift along a 1 mm axis
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    for folder, data in (("p", pred), ("l", label)):
        write_image(tmp_path / folder / "case.nii.gz", data.astype(np.int16), affine)
    report = evaluate_folders(tmp_path / "p", tmp_path / "l", progress=False)
    # 3D: as in the hand-computed cubes; 2D: rows 1 mm apart, and the inner pixels 1 mm from a row
    assert report.per_case[0]["nsd"] == pytest.approx(2 * 40 / 112 if ndim == 3 else 1.0)
    assert report.nsd_tolerance == 1.0 and report.metrics == METRICS
    strict = evaluate_folders(tmp_path / "p", tmp_path / "l", progress=False, nsd_tolerance=0.5)
    assert strict.per_case[0]["nsd"] == pytest.approx(2 * 36 / 112 if ndim == 3 else 12 / 24)
    summary = strict.to_json()
    assert summary["nsd_tolerance_mm"] == 0.5 and summary["summary"]["classes"]["class_1"]["nsd"]["n"] == 1
    none = evaluate_folders(tmp_path / "p", tmp_path / "l", progress=False, nsd_tolerance=None)
    assert "nsd" not in none.metrics and none.to_json()["nsd_tolerance_mm"] is None
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(strict.table())
    assert "NSD (0.5 mm)" in console.export_text()
