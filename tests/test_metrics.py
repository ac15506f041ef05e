"""Metrics against MONAI (Dice, HD95), a hand-computed golden example, and folder evaluation end to end."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance
from scipy import ndimage

from flexpatch.data.io import write_image
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.metrics import (
    METRICS,
    dice_torch,
    evaluate_folders,
    hausdorff95,
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
