"""The benchmarks' smoke modes: each script's code, which its CPU quick and GPU full modes share, runs.

The GPU full modes cannot run in CI; a smoke run goes through the same functions (training, sweeps,
inference subprocesses, tables, targets, plots) at tiny sizes, so a change that breaks a full mode
fails here rather than on a lent GPU. Smoke runs write under their --work folder only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {
    "patch_size_robustness": ["--mode", "smoke"],
    "progressive": ["--smoke", "--seeds", "1"],  # 4 spawned trainings instead of 8
    "segment_then_segment": ["--smoke"],
    "planning": ["--mode", "smoke"],
    "patchwork": ["--smoke", "--budget", "3"],
}


def _tracked_outputs() -> dict[Path, float]:
    paths = [ROOT / "BENCHMARKS.md", *(ROOT / "benchmarks" / "figures").glob("*.png")]
    return {p: p.stat().st_mtime for p in paths if p.exists()}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_smoke_mode_runs_and_reports_without_touching_the_recorded_results(script, tmp_path):
    before = _tracked_outputs()
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *SMOKE[script], "--work", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"
    reports = [*tmp_path.rglob("BENCHMARKS.md"), *tmp_path.rglob("report.md")]
    assert reports, f"{script}: no report under {tmp_path}"
    text = reports[0].read_text()
    assert "| " in text and "target" in text.lower()  # a table and the targets' verdicts
    assert _tracked_outputs() == before, f"{script} --smoke rewrote BENCHMARKS.md or a committed figure"
