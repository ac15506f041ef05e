"""Fault test: training killed (SIGKILL) at moments drawn by a seeded generator, once inside a
checkpoint write, then resumed to the end, must reproduce the uninterrupted run exactly.

Each training is a real ``flexpatch train`` process. The kill inside a write needs a known moment:
a small wrapper runs the CLI's ``main`` with ``torch.save`` replaced by one that writes half the
file and kills its own process. The other kill is a real signal at a random time after the run's
first new checkpoint. The uninterrupted reference runs in-process (the same numbers, one thread).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flexpatch.checkpoint import BEST, LAST, load_checkpoint
from flexpatch.data.io import TEMP_PREFIX
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

STEPS = 12
# a 2-level U-Net with 4 channels; validation (and so a checkpoint) after every step
TRAIN = ("--model", "unet", "--options", json.dumps({"channels": 4, "levels": 2, "convs_per_level": 2}),
         "--patch", "16", "--batch", "2", "--steps", STEPS, "--val-every", "1", "--workers", "0",
         "--device", "cpu")  # fmt: skip

# Runs flexpatch's CLI with the KILL_AT-th torch.save writing half its file, then SIGKILL.
DIE_IN_WRITE = """
import io, os, signal, sys
import torch
from flexpatch.cli import main

kill_at, calls, real_save = int(sys.argv.pop(1)), [0], torch.save

def dying_save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] < kill_at:
        return real_save(obj, f, *args, **kwargs)
    whole = io.BytesIO()
    real_save(obj, whole, *args, **kwargs)
    out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
    out.write(whole.getvalue()[: len(whole.getvalue()) // 2])
    out.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
main()
"""

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
GUARD = 300.0  # seconds: only against a hung child, never a measured bound


def start(command: list[object], log: Path) -> subprocess.Popen:
    """A process whose output goes to ``log`` (a pipe left unread could block it)."""
    with log.open("a") as out:
        return subprocess.Popen(list(map(str, command)), stdout=out, stderr=out, env=ENV)


def finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=GUARD)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"training hung:\n{log.read_text()}")


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"{TEMP_PREFIX}*"))


def checkpoint_id(path: Path) -> tuple[int, int] | None:
    """Changes with every write: each atomic rename puts a new file in place."""
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None


def kill_in_write(ds: Path, out: Path, kill_at: int, script: Path, log: Path) -> None:
    """A new run, killed halfway through writing its ``kill_at``-th checkpoint."""
    code = finish(start([sys.executable, script, kill_at, "train", ds, "--out", out, *TRAIN], log), log)
    assert code == -signal.SIGKILL, log.read_text()
    assert temporaries(out), "the kill should have left a half-written temporary file"
    # what the run wrote before is whole: the kill came after at least one model_last.pt
    assert load_checkpoint(out / LAST)["step"] >= 1


def kill_at_random(ds: Path, out: Path, delay: float, log: Path) -> None:
    """``--resume``, killed ``delay`` seconds after it wrote its first checkpoint (or not at all if
    the run ends first): any moment of a step, a validation, a log line or a write."""
    before = checkpoint_id(out / LAST)
    proc = start([sys.executable, "-m", "flexpatch", "train", ds, "--out", out, *TRAIN, "--resume"], log)
    deadline = time.monotonic() + GUARD
    while proc.poll() is None and checkpoint_id(out / LAST) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc, log) in (0, -signal.SIGKILL), log.read_text()


def read_log(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "log.jsonl").read_text().splitlines()]


def assert_same_run(ref: Path, got: Path) -> None:
    """Bit for bit: the final and the best weights, and every logged loss."""
    for name in (LAST, BEST):
        a, b = (load_checkpoint(d / name)["model"] for d in (ref, got))
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs from the uninterrupted run"
    assert [r["step"] for r in read_log(got)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in read_log(got)] == [r["loss"] for r in read_log(ref)]


@pytest.mark.parametrize("dataset", ["tiny_cells", "tiny_abdomen"], ids=["2d", "3d"])
def test_killed_training_resumes_exactly(
    dataset: str, request: pytest.FixtureRequest, tmp_path: Path, one_thread: None
) -> None:
    ds: Path = request.getfixturevalue(dataset)
    rng = random.Random(f"faults-{dataset}")  # seeded: the same moments every run of the suite
    out, log = tmp_path / "model", tmp_path / "runs.log"
    script = tmp_path / "die_in_write.py"
    script.write_text(DIE_IN_WRITE)

    # from the 3rd save on, a model_last.pt exists (step 1 writes the best, then the last)
    kill_in_write(ds, out, rng.randint(3, 8), script, log)
    kill_at_random(ds, out, rng.uniform(0.0, 1.0), log)
    resumed = start([sys.executable, "-m", "flexpatch", "train", ds, "--out", out, *TRAIN, "--resume"], log)
    assert finish(resumed, log) == 0, log.read_text()
    assert temporaries(out) == []

    ref = tmp_path / "reference"
    config = TrainConfig.from_json(json.loads((out / "config.json").read_text()))
    train(ds, ref, config, device="cpu", progress=False)
    assert_same_run(ref, out)
