"""The benchmarks' smoke modes: each script's code, which its CPU quick and GPU full modes share, runs.

The GPU full modes cannot run in CI; a smoke run goes through the same functions (training, sweeps,
inference subprocesses, tables, targets, plots) at tiny sizes, so a change that breaks a full mode
fails here rather than on a lent GPU. Smoke runs write under their --work folder only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {
    "patch_size_robustness": ["--mode", "smoke"],
    "progressive": ["--smoke", "--seeds", "1"],  # 4 spawned trainings instead of 8
    "planning": ["--mode", "smoke"],
    "patchwork": ["--smoke", "--budget", "3"],
    "sliding_window": ["--smoke"],
    "patchwork_memory": ["--mode", "smoke"],
    "augment_loader": ["--smoke"],
    "precision": ["--smoke"],
}


# Each script runs beside the other xdist worker: torch's default threads in both (and in their
# loader and inference children) oversubscribe the two cores, and OpenMP's spinning made the
# patchwork smoke run, a minute alone, overrun the 300 s test timeout.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _tracked_outputs() -> dict[Path, float]:
    paths = [ROOT / "BENCHMARKS.md", *(ROOT / "benchmarks" / "figures").glob("*.png")]
    return {p: p.stat().st_mtime for p in paths if p.exists()}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_smoke_mode_runs_and_reports_without_touching_the_recorded_results(script, tmp_path):
    before = _tracked_outputs()
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *SMOKE[script], "--work", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540, check=False, env=ONE_THREAD)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"
    reports = [*tmp_path.rglob("BENCHMARKS.md"), *tmp_path.rglob("report.md")]
    assert reports, f"{script}: no report under {tmp_path}"
    text = reports[0].read_text()
    assert "| " in text and "target" in text.lower()  # a table and the targets' verdicts
    assert _tracked_outputs() == before, f"{script} --smoke rewrote BENCHMARKS.md or a committed figure"


def test_sts_keeps_finished_sizes_and_a_second_call_reuses_them(tmp_path):
    """A mode that outlasts one time-limited device call goes on where it stopped (seed 05's full mode).
    Its first call is also the script's smoke run (report, table, targets, recorded results untouched)."""
    before = _tracked_outputs()
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "segment_then_segment.py"),
        "--smoke",
        "--work",
        str(tmp_path),
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=540, check=False, env=ONE_THREAD)
    assert first.returncode == 0, first.stderr[-3000:]
    text = [*tmp_path.rglob("BENCHMARKS.md"), *tmp_path.rglob("report.md")][0].read_text()
    assert "| " in text and "target" in text.lower()
    assert _tracked_outputs() == before
    assert "segment-then-segment unet at S=" in first.stdout + first.stderr
    kept = sorted(tmp_path.rglob("rows.json"))
    assert len(kept) == 3  # cells at S 16 and 32, lesions at S 16
    rows = json.loads((tmp_path / "smoke" / "results.json").read_text())["rows"]
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=540, check=False, env=ONE_THREAD)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "segment-then-segment unet at S=" not in second.stdout + second.stderr  # nothing trained
    assert json.loads((tmp_path / "smoke" / "results.json").read_text())["rows"] == rows
    assert {p: p.stat().st_mtime_ns for p in kept} == stamps


def test_context_smoke_trains_every_model_and_reports_dice_compute_and_targets(tmp_path):
    """benchmarks/context.py --mode smoke: FP, AP, the context models and the MONAI baseline, tiny."""
    before = _tracked_outputs()
    script = ROOT / "benchmarks" / "context.py"
    cmd = [sys.executable, str(script), "--mode", "smoke", "--work", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540, check=False, env=ONE_THREAD)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"
    work = tmp_path / "smoke"
    text = (work / "BENCHMARKS.md").read_text()
    assert "<!-- context-smoke:start -->" in text and "Targets" in text
    assert "FP 16^3" in text and "MONAI UNet 16^3" in text and "train TFLOP" in text
    assert (work / "context_smoke.png").stat().st_size > 0 and (work / "sweep.csv").is_file()
    assert "wrote" in (work / "context.log").read_text()  # progress lines reach the log file too
    assert _tracked_outputs() == before, "context --mode smoke rewrote BENCHMARKS.md or a committed figure"
