"""`evaluate --partial` (nnU-Net's chill) and `--nsd-tolerance`, through the API and as a real process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from flexpatch.data.io import write_image
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.metrics import evaluate_folders


def _folders(tmp_path: Path, predicted: tuple[str, ...] = ("a", "c")) -> tuple[Path, Path]:
    """Reference cases a, b, c (a 2 mm x 1 mm x 1 mm grid); predictions, one voxel off along axis 0,
    for ``predicted`` only."""
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    for case in ("a", "b", "c"):
        label = np.zeros((8, 8, 8), np.int16)
        label[2:6, 2:6, 2:6] = 1
        write_image(label_dir / f"{case}.nii.gz", label, affine)
        if case in predicted:
            write_image(pred_dir / f"{case}.nii.gz", np.roll(label, 1, 0), affine)
    return pred_dir, label_dir


def test_partial_scores_the_predictions_present(tmp_path: Path) -> None:
    pred_dir, label_dir = _folders(tmp_path)
    with pytest.raises(FlexPatchError) as e:
        evaluate_folders(pred_dir, label_dir, progress=False)
    message = str(e.value)
    assert "\n" not in message and str(label_dir / "b.nii.gz") in message
    assert "no prediction for case 'b'" in message and "--partial" in message and "2 predictions" in message

    report = evaluate_folders(pred_dir, label_dir, progress=False, partial=True)
    assert report.cases == ["a", "c"] and report.missing_cases == ["b"]
    summary = report.summary()
    assert (summary["n_cases"], summary["n_reference_cases"], summary["missing_cases"]) == (2, 3, ["b"])
    # a 2 mm shift: within the default 1 mm only the shared boundary and the inner side voxels (40/56)
    assert [r["nsd"] for r in report.per_case] == pytest.approx([80 / 112] * 2)
    assert report.title() == "Evaluation over 2 of 3 reference cases (partial; no prediction for b)"
    _, json_path = report.write(tmp_path / "out")
    written = json.loads(json_path.read_text())["summary"]
    assert (written["n_cases"], written["n_reference_cases"], written["missing_cases"]) == (2, 3, ["b"])


def test_partial_with_every_case_present_is_a_plain_evaluation(tmp_path: Path) -> None:
    pred_dir, label_dir = _folders(tmp_path, predicted=("a", "b", "c"))
    report = evaluate_folders(pred_dir, label_dir, progress=False, partial=True)
    assert report.missing_cases == [] and report.summary()["n_reference_cases"] == 3
    assert report.title() == "Evaluation over 3 cases"


def test_partial_still_refuses_a_prediction_without_a_label(tmp_path: Path) -> None:
    pred_dir, label_dir = _folders(tmp_path)
    (label_dir / "c.nii.gz").unlink()
    with pytest.raises(FlexPatchError, match=r"pred/c\.nii\.gz: no label for case 'c'"):
        evaluate_folders(pred_dir, label_dir, progress=False, partial=True)


def test_the_refusal_counts_every_missing_case(tmp_path: Path) -> None:
    pred_dir, label_dir = _folders(tmp_path, predicted=("c",))
    with pytest.raises(FlexPatchError, match=r"a\.nii\.gz: .*case 'a'.* \(nor for 1 more of the 3 cases\)"):
        evaluate_folders(pred_dir, label_dir, progress=False)


def test_cli_partial_and_nsd_tolerance(tmp_path: Path) -> None:
    pred_dir, label_dir = _folders(tmp_path)
    proc = run_cli("evaluate", pred_dir, label_dir)
    assert_one_line_error(proc, str(label_dir / "b.nii.gz"), "no prediction for case 'b'", "--partial")

    proc = run_cli("evaluate", pred_dir, label_dir, "--partial", "--nsd-tolerance", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["summary"]["n_cases"] == 2 and report["summary"]["n_reference_cases"] == 3
    assert report["summary"]["missing_cases"] == ["b"] and report["nsd_tolerance_mm"] == 2.0
    assert report["summary"]["classes"]["class_1"]["nsd"] == {"mean": 1.0, "std": 0.0, "n": 2}

    proc = run_cli("evaluate", pred_dir, label_dir, "--partial", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "2 of 3 reference cases" in proc.stderr and "NSD (1 mm)" in proc.stderr  # the table: stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]["n_reference_cases"] == 3

    proc = run_cli("evaluate", pred_dir, label_dir, "--partial", "--nsd-tolerance", "-1")
    assert_one_line_error(proc, "NSD tolerance", "-1")
