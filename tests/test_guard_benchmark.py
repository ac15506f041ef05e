"""benchmarks/guard.py: its smoke mode runs a case of every class and predict's peak RSS at 48^3, and
reports under --work only; its judge counts what a bad answer did (so a clean table means something).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "guard.py"
# as in test_benchmarks: beside the other xdist worker, default threads oversubscribe the two cores
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
CLASSES = {"code execution", "data loss", "path traversal", "headers", "model-folder JSON",
           "values and geometry", "dot-files", "parse errors", "signals", "full disk"}  # fmt: skip
COLUMNS = ("clean one-line exits", "tracebacks", "wrong exit codes", "files lost", "files left behind",
           "foreign code run")  # fmt: skip
ARGV = [sys.executable, "-m", "flexpatch", "predict"]


def _guard():  # noqa: ANN202 - the benchmark script, loaded as a module
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("guard", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["guard"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _tracked_outputs() -> dict[Path, float]:
    paths = [ROOT / "BENCHMARKS.md", *(ROOT / "benchmarks" / "figures").glob("*.png")]
    return {p: p.stat().st_mtime for p in paths if p.exists()}


def test_smoke_mode_runs_every_class_and_reports_without_touching_the_recorded_results(
    tmp_path: Path,
) -> None:
    before = _tracked_outputs()
    cmd = [sys.executable, str(SCRIPT), "--mode", "smoke", "--work", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540, check=False, env=ONE_THREAD)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"
    work = tmp_path / "smoke"
    text = (work / "BENCHMARKS.md").read_text()
    assert "<!-- guard-smoke:start -->" in text and "**Targets**" in text and "peak RSS GB" in text
    assert all(f"| {column} " in text for column in COLUMNS)
    results = json.loads((work / "results.json").read_text())
    assert {case["group"] for case in results["cases"]} == CLASSES
    assert all(isinstance(case["rc"], int) and case["first_line"] for case in results["cases"])
    assert [row["budget"] for row in results["rss"]] == [None, "2GB"]
    assert all(row["rc"] == 0 and row["peak"] > 50e6 for row in results["rss"])  # torch alone holds more
    assert (work / "guard_rss_smoke.png").stat().st_size > 0
    assert _tracked_outputs() == before, "guard --mode smoke rewrote BENCHMARKS.md or a committed figure"


def test_the_judge_counts_tracebacks_lost_files_leftovers_and_payloads(tmp_path: Path) -> None:
    g = _guard()
    kept, out, marker = tmp_path / "kept", tmp_path / "out", tmp_path / "pwned"
    kept.mkdir()
    out.mkdir()
    (kept / "image.nii.gz").write_bytes(b"scan")
    case = g.Case(ARGV, watch=[kept], out=out, marker=marker)
    before = g.snapshot([kept])

    quiet = g.judge("ok", "x", case, g.Run(2, "", "error: no\n", 1.0, 0), before, set(), tmp_path)
    assert quiet.clean and not (quiet.lost or quiet.left or quiet.foreign)

    (kept / "image.nii.gz").write_bytes(b"overwritten")
    (out / ".tmp-abc.nii.gz").write_bytes(b"half")
    (out / "case.nii.gz").write_bytes(b"written by a refused run")
    marker.write_text("")
    crash = g.Run(1, "", "Traceback (most recent call last):\n  boom\n", 1.0, 0)
    bad = g.judge("bad", "x", case, crash, before, set(), tmp_path)
    assert bad.traceback and bad.wrong_code and bad.not_one_line and not bad.clean and bad.foreign
    assert bad.lost == ["kept/image.nii.gz"] and bad.left == ["out/.tmp-abc.nii.gz", "out/case.nii.gz"]


def test_the_answer_is_what_follows_the_signal_or_the_work(tmp_path: Path) -> None:
    g = _guard()
    progress = "train: 1/9 (11%) 0:00:01\n"
    signalled = g.Case(ARGV, expect=(130,), refusal=False, sig=g.Signal(signal.SIGINT, bool, True))
    run = g.Run(130, "", progress + "interrupted\n", 1.0, 0, lines_before_signal=1, signalled=True)
    assert g.judge("sig", "x", signalled, run, {}, set(), tmp_path).clean
    # a fault met during work: the progress before its one error line is no part of the answer
    during, full = g.Case(ARGV, refusal=False), g.Run(2, "", progress + "error: full\n", 1.0, 0)
    assert g.judge("disk", "x", during, full, {}, set(), tmp_path).clean
    # a refusal must come before any output
    late = g.Run(2, "", progress + "error: no\n", 1.0, 0)
    refused = g.judge("ref", "x", g.Case(ARGV), late, {}, set(), tmp_path)
    assert refused.not_one_line and not refused.clean
