"""Failed writes (disk full, permission, I/O error): one line naming the target file, no temporary
file left, the previous checkpoint intact and resumable.

A full disk is simulated where the bytes go: the temporary file's writes raise ENOSPC after taking
part of the data (so that torch's writer meets it mid-file, as on a real full disk), or the final
rename fails; ``/dev/full`` is a real one for the JSONL log. The CLI runs are real processes whose
file layer fails in a small wrapper around flexpatch's ``main``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from flexpatch.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from flexpatch.data.io import TEMP_PREFIX, save_json, write_text
from flexpatch.errors import FlexPatchError
from flexpatch.train.harness import jsonl_log, resume_checkpoint

ENOSPC = os.strerror(errno.ENOSPC)


class FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: the write that overflows it takes what fits, then
    fails with ENOSPC (or ``code``)."""

    def __init__(self, path: Path, room: int, code: int = errno.ENOSPC) -> None:
        super().__init__(path, "wb")
        self.room, self.code = room, code

    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            super().write(data[: self.room])
            self.room = 0
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return super().write(data)


def fill_disk(monkeypatch: pytest.MonkeyPatch, room: int, code: int = errno.ENOSPC) -> None:
    """Every temporary file opened from now on is on a disk with ``room`` bytes left."""
    real = Path.open

    def open_(self: Path, mode: str = "r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.name.startswith(TEMP_PREFIX) and "w" in mode:
            return FullDisk(self, room, code) if "b" in mode else io.TextIOWrapper(FullDisk(self, room, code))
        return real(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"{TEMP_PREFIX}*"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# the disk fills before the first byte, inside torch's archive, and at its very end
@pytest.mark.parametrize("room", [0, 100, 2000, 40_000])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int
) -> None:
    path = tmp_path / LAST
    before = {"model": {"w": torch.zeros(100, 100)}, "step": 1}
    save_checkpoint(path, before)
    fill_disk(monkeypatch, room)
    with pytest.raises(FlexPatchError) as err:
        save_checkpoint(path, {"model": {"w": torch.ones(100, 100)}, "step": 2})
    assert str(err.value) == f"{path}: cannot write ({ENOSPC}); its previous version is kept"
    assert temporaries(tmp_path) == []
    monkeypatch.undo()
    kept = load_checkpoint(path)
    assert kept["step"] == 1 and torch.equal(kept["model"]["w"], before["model"]["w"])


def test_failed_first_checkpoint_and_rename_name_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / BEST
    fill_disk(monkeypatch, 100, errno.EACCES)
    with pytest.raises(FlexPatchError, match=rf"^{path}: cannot write \(Permission denied\)$"):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    monkeypatch.undo()

    def refuse(*args: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(args[0]))  # names the temporary file

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(FlexPatchError, match=rf"^{path}: cannot write \(Input/output error\)$"):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    assert temporaries(tmp_path) == [] and not path.exists()


@pytest.mark.parametrize(
    "write",
    [lambda p: save_json(p, {"a": list(range(1000))}), lambda p: write_text(p, "x" * 10_000)],
    ids=["json", "text"],
)
def test_full_disk_during_a_json_or_text_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Callable[[Path], None]
) -> None:
    path = tmp_path / "config.json"
    path.write_text("{}")
    fill_disk(monkeypatch, 10)
    with pytest.raises(OSError) as err:
        write(path)
    # what the CLI prints: "error: <target>: No space left on device"
    assert (err.value.filename, err.value.errno) == (str(path), errno.ENOSPC)
    assert temporaries(tmp_path) == [] and path.read_text() == "{}"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_during_the_training_log() -> None:
    with pytest.raises(OSError) as err, jsonl_log(Path("/dev/full")) as log:
        log({"step": 1, "loss": 0.5})
    assert (err.value.filename, err.value.errno) == ("/dev/full", errno.ENOSPC)


def test_resume_without_the_last_checkpoint_says_why_the_best_cannot_stand_in(tmp_path: Path) -> None:
    with pytest.raises(FlexPatchError, match=r"model_last.pt: nothing to resume from$"):
        resume_checkpoint(tmp_path / LAST, tmp_path / BEST)
    save_checkpoint(tmp_path / BEST, {"model": {"w": torch.ones(3)}, "step": 1})
    with pytest.raises(FlexPatchError, match="model_best.pt holds only the best weights, not the optimiser"):
        resume_checkpoint(tmp_path / LAST, tmp_path / BEST)


# Runs flexpatch's CLI with the disk full (100 bytes left) from the FAIL_AT-th write of model_last.pt.
FULL_AT = """
import errno, io, os, sys
from pathlib import Path
from flexpatch.cli import main
from flexpatch.train.harness import Harness

fail_at, calls = int(sys.argv.pop(1)), [0]
real_open, real_save_last = Path.open, Harness.save_last

class FullDisk(io.FileIO):
    def write(self, data):
        super().write(memoryview(data).cast("B")[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

def save_last(self, state):
    calls[0] += 1
    return real_save_last(self, state)

def open_(self, mode="r", *args, **kwargs):
    if calls[0] >= fail_at and self.name.startswith(".tmp-") and "w" in mode:
        return FullDisk(self, "wb")
    return real_open(self, mode, *args, **kwargs)

Harness.save_last, Path.open = save_last, open_
main()
"""
TRAIN = ("--model", "unet", "--options", json.dumps({"channels": 4, "levels": 2, "convs_per_level": 2}),
         "--patch", "16", "--batch", "2", "--steps", 4, "--val-every", "1", "--workers", "0",
         "--device", "cpu")  # fmt: skip


def train_on_full_disk(ds: Path, out: Path, fail_at: int, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "full_at.py"
    script.write_text(FULL_AT)
    command = [sys.executable, script, fail_at, "train", ds, "--out", out, *TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, env=env)


def assert_run_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """A run that fails midway: its progress lines, then one error line (exit 2, no traceback)."""
    assert "Traceback" not in proc.stderr and proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {message}"] and proc.stderr.splitlines()[-1] == errors[0], proc.stderr


def test_cli_full_disk_mid_run_then_resume(tiny_cells: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    proc = train_on_full_disk(tiny_cells, out, 3, tmp_path)
    assert_run_error(proc, f"{out / LAST}: cannot write ({ENOSPC}); its previous version is kept")
    assert temporaries(out) == []
    assert load_checkpoint(out / LAST)["step"] == 2  # the failed write of step 3 left step 2's
    resumed = run_cli("train", tiny_cells, "--out", out, *TRAIN, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / LAST)["step"] == 4 and temporaries(out) == []


def test_cli_full_disk_at_the_first_last_checkpoint(tiny_cells: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    proc = train_on_full_disk(tiny_cells, out, 1, tmp_path)
    assert_run_error(proc, f"{out / LAST}: cannot write ({ENOSPC})")
    assert (out / BEST).is_file() and not (out / LAST).exists() and temporaries(out) == []
    resumed = run_cli("train", tiny_cells, "--out", out, *TRAIN, "--resume")
    assert_one_line_error(
        resumed,
        f"{out / LAST}: nothing to resume from; model_best.pt holds only the best weights",
        f"--init-from {out}",
    )


# A real full disk: a 280 KiB tmpfs for the model folder, in a mount namespace of its own (no root
# needed where user namespaces are allowed). Step 1's files fit (about 250 KiB: best, last, JSON);
# step 2's atomic writes need room for a second copy and fail. Then space is freed and the run resumed.
REAL_FULL_DISK = """
set -u
mount -t tmpfs -o size=280k tmpfs "$OUT" || exit 99
"$@" 2> "$LOGS/full.err"; echo $? > "$LOGS/full.rc"
ls -a "$OUT" > "$LOGS/full.ls"; cp "$OUT/model_last.pt" "$LOGS/kept.pt"
mount -o remount,size=50m "$OUT"
"$@" --resume 2> "$LOGS/resumed.err"; echo $? > "$LOGS/resumed.rc"
cp "$OUT/model_last.pt" "$LOGS/final.pt"
"""


def test_cli_real_full_disk_then_resume(tiny_cells: Path, tmp_path: Path) -> None:
    out, logs = tmp_path / "model", tmp_path / "logs"
    out.mkdir(), logs.mkdir()
    train = [sys.executable, "-m", "flexpatch", "train", tiny_cells, "--out", out, *TRAIN]
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", REAL_FULL_DISK, "sh", *train]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "OUT": str(out), "LOGS": str(logs)}
    try:
        proc = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600, env=env)
    except FileNotFoundError:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    if proc.returncode == 99 or not (logs / "full.rc").is_file():
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()}")
    full = subprocess.CompletedProcess(
        [], int((logs / "full.rc").read_text()), "", (logs / "full.err").read_text()
    )
    errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, full.stderr
    assert_run_error(full, errors[0].removeprefix("error: "))
    assert re.fullmatch(
        rf"error: {out}/model_(best|last)\.pt: cannot write \({ENOSPC}\); its previous version is kept",
        errors[0],
    )
    assert not [name for name in (logs / "full.ls").read_text().split() if name.startswith(TEMP_PREFIX)]
    assert load_checkpoint(logs / "kept.pt")["step"] == 1
    assert (logs / "resumed.rc").read_text().strip() == "0", (logs / "resumed.err").read_text()
    assert load_checkpoint(logs / "final.pt")["step"] == 4
