"""Guard (issue 18): bad inputs and faults as a user meets them, and the peak memory of ``predict``.

Part 1 builds a corpus of bad inputs and faults in a scratch folder (crafted checkpoints, outputs
aimed at inputs, broken headers and model-folder JSON, paths out of a dataset, undeclared or
wrapping label values, signals, a full disk) and runs each as ``python -m flexpatch ...`` in a
subprocess, as a user's shell would (stderr a pipe, no terminal). Every file in the folders a case
must not touch is hashed before and after; what the run leaves behind and whether a crafted payload
ran are checked after it. The table counts clean one-line exits, tracebacks, wrong exit codes,
messages of more than one line, files lost, files left behind and foreign code run.

Part 2 runs ``predict`` on synthetic CT volumes (int16, 1 mm, a scanner's LPS affine) with a
narrow 7-class U-Net, without ``--memory`` and with three budgets, and reads each process's peak
RSS from the kernel (``wait4``): everything the process held, interpreter and torch included.

    python benchmarks/guard.py --mode full    # every case; RSS at 256^3 and 512x512x400 (CPU, ~40 min)
    python benchmarks/guard.py --mode smoke   # a case per class, RSS at 48^3; writes under --work only
    python benchmarks/guard.py --mode smoke --cases all             # the whole corpus, under --work
    python benchmarks/guard.py --mode smoke --part rss --sizes 256 --rss-patch 64
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import describe_device, write_section  # noqa: E402

from flexpatch.data.io import atomic_path  # noqa: E402

TEMP_PREFIX = ".tmp-"  # the project's temporary files (flexpatch.data.io.TEMP_PREFIX)
NARROW = '{"channels": 4, "levels": 2}'  # a narrow U-Net: the corpus needs a model folder, not a good one
TRAIN = ["--steps", "1", "--batch", "1", "--val-every", "1", "--workers", "0", "--augment", "none",
         "--options", NARROW, "--device", "cpu"]  # fmt: skip
GB = 10**9  # the project's budgets are decimal (8GB = 8e9 bytes)
RSS_TARGET = 3 * GB  # issue 18 part 6: 512x512x400 at 7 classes under 3 GB without --memory
BIG = (512, 512, 400)

MODES: dict[str, dict[str, Any]] = {
    # smoke: one case per class and a tiny volume, so the test suite checks the code in under a minute
    "smoke": {"cases": "smoke", "sizes": [(48, 48, 48)], "budgets": ["2GB"],
              "rss_patch": 16, "timeout": 120},
    "full": {"cases": "all", "sizes": [(256, 256, 256), BIG], "budgets": ["1.5GB", "2GB", "3GB"],
             "rss_patch": 128, "timeout": 1800},
}  # fmt: skip


# ---------------------------------------------------------------- running the command


@dataclass
class Run:
    """What one ``python -m flexpatch`` process did."""

    rc: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int  # bytes, the kernel's high-water mark of the process (and children it waited for)
    lines_before_signal: int = 0  # stderr lines written before the signal (progress, not the answer)
    signalled: bool = False
    survivors: bool = False  # a process of its group still ran after it exited (a loader, say)
    timed_out: bool = False  # killed at the timeout: its exit code is ours, not its own


@dataclass
class Signal:
    """Send ``signum`` once ``ready()`` says the command is at work; ``group``: to its process
    group, as a terminal's Ctrl-C does, else to the process, as ``kill`` or a scheduler does."""

    signum: int
    ready: Callable[[], bool]
    group: bool


def _reader(stream: Any, sink: list[str]) -> threading.Thread:
    def pump() -> None:
        for line in stream:
            sink.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def launch(
    cmd: list[str], env: dict[str, str], timeout: float, sig: Signal | None = None, cwd: Path | None = None
) -> Run:
    """Run ``cmd`` to its end (killed at ``timeout``), stderr read line by line while it runs."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
        start_new_session=True,  # its own process group: Ctrl-C reaches it and its children, not us
        # a shell's background job inherits SIGINT ignored, and Python then never sees Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    out: list[str] = []
    err: list[str] = []
    threads = [_reader(proc.stdout, out), _reader(proc.stderr, err)]
    before, signalled, timed_out, deadline = 0, False, False, start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if sig is not None and not signalled and sig.ready():
            time.sleep(0.2)  # let the readers take what was written so far
            before, signalled = len(err), True
            (os.killpg if sig.group else os.kill)(proc.pid, sig.signum)
        if time.perf_counter() > deadline and not timed_out:
            os.killpg(proc.pid, signal.SIGKILL)
            timed_out = True
        time.sleep(0.02)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    for thread in threads:
        thread.join(timeout=10)
    survivors = _group_alive(proc.pid)
    if survivors:
        os.killpg(proc.pid, signal.SIGKILL)  # ours to end: the group we started
    seconds = time.perf_counter() - start
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    return Run(rc, "".join(out), "".join(err), seconds, peak, before, signalled, survivors, timed_out)


def _group_alive(pgid: int) -> bool:
    time.sleep(0.1)  # children get a moment to follow their parent out
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def child_env() -> dict[str, str]:
    """The caller's environment (threads included), as a pipe sees it: no terminal width."""
    env = dict(os.environ)
    env.pop("COLUMNS", None)  # what a script or a CI log gets; a wide value would hide wrapped lines
    return env


def flexpatch(*args: object) -> list[str]:
    return [sys.executable, "-m", "flexpatch", *map(str, args)]


# A full disk without root (no tmpfs to mount): writes under one folder take a byte budget, then
# fail with ENOSPC. Files opened through Python (JSON, nibabel's gzip, NumPy) and torch.save
# (given a file object over such a file: torch turns the OSError into its own RuntimeError, as it
# does on a real full disk) are covered; files created empty (mkstemp) and renames are not.
FULL_DISK = r"""
import builtins, errno, io, os, sys
root = os.path.realpath(os.environ["GUARD_FULL_ROOT"])
left = [int(os.environ["GUARD_FULL_BYTES"])]
real_open = io.open

def under(file):
    try:
        return os.path.realpath(os.fspath(file)).startswith(root + os.sep)
    except TypeError:
        return False

class Full:
    def __init__(self, f, name):
        self._f, self._name = f, name
    def write(self, data):
        if len(data) > left[0]:
            left[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)
        left[0] -= len(data)
        return self._f.write(data)
    def __getattr__(self, name):
        return getattr(self._f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self._f.__exit__(*exc)
    def __iter__(self):
        return iter(self._f)

def full_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return Full(f, os.fspath(file)) if any(c in mode for c in "wax+") and under(file) else f

builtins.open = io.open = full_open
import torch
real_save = torch.save

def full_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and under(f):
        with full_open(f, "wb") as handle:
            return real_save(obj, handle, *args, **kwargs)
    return real_save(obj, f, *args, **kwargs)

torch.save = full_save
sys.argv = ["flexpatch", *sys.argv[1:]]
from flexpatch.cli import main
main()
"""


# ---------------------------------------------------------------- building bad inputs


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker appears only if a loader runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def poison(checkpoint: Path, marker: Path, raw: bool = False) -> None:
    """Plant the payload in one of our own checkpoints (torch's zip format, or a bare pickle)."""
    import torch

    from flexpatch.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)  # our own file, written by the fixture (RNG states included)
    state["model"]["payload"] = Payload(marker)
    if raw:
        checkpoint.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, checkpoint)


def save_sform(
    path: Path, shape: tuple[int, ...], affine: np.ndarray, data: np.ndarray | None = None
) -> Path:
    """A NIfTI whose sform rows are written as given: nibabel would refuse to build a singular
    affine, so the header is filled directly, as a broken converter would."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    header["sform_code"], header["qform_code"] = 1, 0
    voxels = np.zeros(shape, np.float32) if data is None else data.astype(np.float32)
    nib.save(nib.Nifti1Image(voxels, None, header=header), str(path))
    return path


def save_pixdim(path: Path, shape: tuple[int, ...], first: float) -> Path:
    """A qform-only NIfTI whose pixdim[1] is ``first`` in the file's bytes (nibabel mends a zero
    or negative pixdim when writing, so the header is patched after saving)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[252:256] = struct.pack("<hh", 1, 0)  # qform_code scanner, sform_code unset
    raw[80:84] = struct.pack("<f", first)  # pixdim[1]
    path.write_bytes(bytes(raw))
    return path


def edit_json(path: Path, change: dict[str, Any] | None) -> Path:
    """Merge ``change`` into a JSON object file; None writes a list instead of an object."""
    value = [1, 2] if change is None else {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps(value))
    return path


def rewrite_nifti(
    path: Path, edit: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
) -> None:
    import nibabel as nib

    img = nib.load(str(path))
    data, affine = edit(np.asarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _shift(mm: float) -> np.ndarray:
    moved = np.zeros((4, 4))
    moved[:3, 3] = mm
    return moved


def write_ct(path: Path, shape: tuple[int, int, int], spacing: float = 1.0, seed: int = 0) -> Path:
    """A CT-like int16 volume in HU (air, body, lungs, organs, spine, noise) with a scanner's LPS
    affine; built slab by slab so that a 512x512x400 volume costs this script little memory."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    data = np.empty(shape, np.int16)
    for z0 in range(0, nz, 32):
        z = np.linspace(-1, 1, nz, dtype=np.float32)[None, None, z0 : z0 + 32]
        body = (x / 0.85) ** 2 + (y / 0.6) ** 2 < 1
        hu = np.where(body, 40.0, -1000.0) + 0 * z
        lungs = ((np.abs(x) - 0.4) / 0.3) ** 2 + (y / 0.4) ** 2 + ((z - 0.6) / 0.5) ** 2 < 1
        liver = ((x + 0.35) / 0.35) ** 2 + ((y + 0.05) / 0.3) ** 2 + ((z + 0.1) / 0.4) ** 2 < 1
        kidneys = ((np.abs(x) - 0.35) / 0.1) ** 2 + ((y - 0.3) / 0.12) ** 2 + ((z + 0.3) / 0.2) ** 2 < 1
        spine = (x / 0.1) ** 2 + ((y - 0.42) / 0.1) ** 2 < 1
        hu = np.where(lungs, -850.0, hu)
        hu = np.where(liver, 60.0, hu)
        hu = np.where(kidneys, 150.0, hu)
        hu = np.where(spine, 700.0, hu)
        hu += rng.normal(0, 12, hu.shape).astype(np.float32)
        data[:, :, z0 : z0 + 32] = np.clip(hu, -1024, 3071).astype(np.int16)
    affine = np.array(
        [[-spacing, 0, 0, nx * spacing / 2], [0, -spacing, 0, ny * spacing / 2],
         [0, 0, spacing, -nz * spacing / 2], [0, 0, 0, 1]]
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# ---------------------------------------------------------------- the corpus


@dataclass
class Fixtures:
    ds: Path  # a 3D abdomen phantom (7 labels), nnU-Net raw layout, 1 mm
    model: Path  # a narrow U-Net trained on it for 2 steps


@dataclass
class Case:
    """One bad input or fault: the command, what it must answer, and what it must not touch."""

    argv: list[str]  # the full command line
    expect: tuple[int, ...] = (2,)
    watch: list[Path] = field(default_factory=list)  # files and folders that must survive unchanged
    out: Path | None = None  # where a refused run must write nothing
    refusal: bool = True  # the answer comes before any work: nothing new may appear in ``out``
    marker: Path | None = None  # appears only if a crafted payload ran
    sig: Signal | None = None
    env: dict[str, str] = field(default_factory=dict)
    warn: str | None = None  # an exit-0 case must say this on a ``warning:`` line
    check: Callable[[], str | None] | None = None  # a further condition on the result (None: fine)
    note: str = ""


@dataclass
class Outcome:
    name: str
    group: str
    command: str
    expect: list[int]
    rc: int
    seconds: float
    clean: bool
    traceback: bool
    wrong_code: bool
    not_one_line: bool
    lost: list[str]
    left: list[str]
    foreign: bool
    problems: list[str]
    first_line: str
    stderr_tail: str  # the last lines, for the record (results.json)


class Corpus:
    """Builders of the cases, each in its own folder under ``root`` with copies of what it uses."""

    def __init__(self, fx: Fixtures, root: Path, env: dict[str, str], timeout: float) -> None:
        self.fx, self.root = fx, root
        self.env, self.timeout = env, timeout  # for the faults some cases start from

    # ---- helpers

    def folder(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def dataset(self, where: Path) -> Path:
        return shutil.copytree(self.fx.ds, where, ignore=shutil.ignore_patterns(".flexpatch_cache"))

    def model(self, where: Path) -> Path:
        return shutil.copytree(self.fx.model, where)

    def test_image(self, index: int = 0) -> Path:
        return self.fx.ds / "imagesTs" / f"phantom_test_{index:03d}_0000.nii.gz"

    def images(self, where: Path) -> Path:
        where.mkdir(parents=True)
        shutil.copy(self.test_image(), where / "case_0000.nii.gz")
        return where

    def predict_one(self, d: Path, image: Path, **extra: Any) -> Case:
        """predict on one (bad) image in its own folder: refused, the folder untouched, no output."""
        model = self.model(d / "model")
        return Case(flexpatch("predict", model, image, "--out", d / "pred", "--device", "cpu"),
                    watch=[image.parent, model], out=d / "pred", **extra)  # fmt: skip

    def predict_with(self, d: Path, name: str, change: dict[str, Any] | None) -> Case:
        """predict with a model folder whose ``name`` JSON was edited."""
        model = self.model(d / "model")
        edit_json(model / name, change)
        images = self.images(d / "images")
        return Case(flexpatch("predict", model, images, "--out", d / "pred", "--device", "cpu"),
                    watch=[model, images], out=d / "pred")  # fmt: skip

    # ---- code execution

    def payload_predict(self, d: Path, raw: bool = False) -> Case:
        model, marker = self.model(d / "stranger"), d / "pwned"
        poison(model / "model_best.pt", marker, raw)
        images = self.images(d / "images")
        return Case(flexpatch("predict", model, images, "--out", d / "pred", "--device", "cpu"),
                    watch=[model, images], out=d / "pred", marker=marker)  # fmt: skip

    def payload_init_from(self, d: Path) -> Case:
        model, marker, ds = self.model(d / "stranger"), d / "pwned", self.dataset(d / "ds")
        poison(model / "model_best.pt", marker)
        argv = flexpatch("train", ds, "--out", d / "new", "--init-from", model, "--patch", "16", *TRAIN)
        return Case(argv, watch=[model, ds], out=d / "new", marker=marker)

    def payload_resume(self, d: Path) -> Case:
        model, marker, ds = self.model(d / "stranger"), d / "pwned", self.dataset(d / "ds")
        poison(model / "model_last.pt", marker)
        argv = flexpatch("train", ds, "--out", model, "--resume", "--steps", "3", "--device", "cpu")
        return Case(argv, watch=[model, ds], marker=marker)

    def payload_sweep(self, d: Path) -> Case:
        model, marker, ds = self.model(d / "stranger"), d / "pwned", self.dataset(d / "ds")
        poison(model / "model_best.pt", marker)
        argv = flexpatch("sweep", model, ds, "--out", d / "report", "--sizes", "16", "--random", "0",
                         "--device", "cpu")  # fmt: skip
        return Case(argv, watch=[model, ds], out=d / "report", marker=marker)

    # ---- data loss

    def predict_out_is_input(self, d: Path, where: str = "folder") -> Case:
        """--out the input folder, its parent, or the folder of an input given as a file."""
        ds, model = self.dataset(d / "ds"), self.model(d / "model")
        out = ds if where == "parent" else ds / "imagesTs"
        inputs = out / "phantom_test_000_0000.nii.gz" if where == "file" else ds / "imagesTs"
        argv = flexpatch("predict", model, inputs, "--out", out, "--device", "cpu")
        return Case(argv, watch=[ds, model], out=out)

    def phantom_into_dataset(self, d: Path) -> Case:
        ds = self.dataset(d / "ds")
        return Case(flexpatch("phantom", ds, "--cases", 1, "--shape", "16,16,16"), watch=[ds], out=ds)

    def phantom_into_user_folder(self, d: Path, overwrite: bool = False) -> Case:
        folder = d / "my_scans"
        folder.mkdir()
        (folder / "notes.txt").write_text("my notes\n")
        shutil.copy(self.test_image(), folder / "scan.nii.gz")
        argv = flexpatch(
            "phantom", folder, "--cases", 1, "--shape", "16,16,16", *(["--overwrite"] * overwrite)
        )
        # --overwrite replaces "an earlier phantom (nothing else is)": either answer, nothing lost
        return Case(argv, expect=(0, 2) if overwrite else (2,), watch=[folder], out=folder,
                    refusal=not overwrite)  # fmt: skip

    def train_into(self, d: Path, target: str) -> Case:
        ds, model = self.dataset(d / "ds"), self.model(d / "model")
        out = model if target == "model" else ds
        argv = flexpatch("train", ds, "--out", out, "--patch", "16", *TRAIN)
        return Case(argv, watch=[ds, model], out=out)

    # ---- path traversal

    def msd(self, d: Path, bad: str) -> Case:
        """An MSD dataset (dataset.json lists the files) whose second entry leads elsewhere."""
        root, outside = d / "Task01_Guard", d / "outside"
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (root / sub).mkdir(parents=True)
        outside.mkdir()
        training = []
        for i in range(2):
            shutil.copy(
                self.fx.ds / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz", root / "imagesTr" / f"g_{i}.nii.gz"
            )
            shutil.copy(
                self.fx.ds / "labelsTr" / f"phantom_{i:03d}.nii.gz", root / "labelsTr" / f"g_{i}.nii.gz"
            )
            training.append({"image": f"./imagesTr/g_{i}.nii.gz", "label": f"./labelsTr/g_{i}.nii.gz"})
        # the file outside exists: "not found" would be no defence
        shutil.copy(self.fx.ds / "imagesTr" / "phantom_002_0000.nii.gz", outside / "secret.nii.gz")
        training[1]["image"] = (
            str(outside / "secret.nii.gz") if bad == "absolute" else "../outside/secret.nii.gz"
        )
        labels = json.loads((self.fx.ds / "dataset.json").read_text())["labels"]
        meta = {"name": "Task01_Guard", "modality": {"0": "CT"}, "numTraining": 2, "training": training,
                "test": [], "labels": {str(v): k for k, v in labels.items()}}  # fmt: skip
        (root / "dataset.json").write_text(json.dumps(meta))
        argv = flexpatch("train", root, "--out", d / "model", "--patch", "16", *TRAIN)
        return Case(argv, watch=[root, outside], out=d / "model")

    def symlink_out(self, d: Path) -> Case:
        ds, outside = self.dataset(d / "ds"), d / "outside"
        outside.mkdir()
        link = ds / "imagesTr" / "phantom_001_0000.nii.gz"
        shutil.move(link, outside / "secret_0000.nii.gz")
        link.symlink_to(outside / "secret_0000.nii.gz")
        argv = flexpatch("train", ds, "--out", d / "model", "--patch", "16", *TRAIN)
        # followed by design: a user's own links to shared storage are a common, legitimate layout;
        # what is refused is a dataset.json naming files out of the folder (the msd-* cases)
        note = "a user's symlink is followed by design"
        return Case(argv, expect=(0,), watch=[ds, outside], out=d / "model", refusal=False, note=note)

    # ---- headers

    def header(self, d: Path, kind: str) -> Case:
        (d / "images").mkdir()
        path = d / "images" / "bad_0000.nii.gz"
        if kind == "pixdim-negative":
            save_pixdim(path.with_suffix(""), (8, 8, 8), -2.0)  # uncompressed: the bytes are patched
            path = path.with_suffix("")
        elif kind == "empty-axis":
            save_sform(path, (6, 0, 4), np.eye(4))
        else:
            value = {"zero": 0.0, "nan": np.nan, "huge": 1e9, "coarse-grid": 5000.0}[kind]
            spacing = [value] * 3 if kind == "coarse-grid" else [1.0, value, 1.0]  # 40000^3 at 1 mm
            save_sform(path, (8, 8, 8), np.diag([*spacing, 1.0]), np.full((8, 8, 8), 40.0))
        return self.predict_one(d, path)

    # ---- values and geometry

    def label_beyond_int16(self, d: Path) -> Case:
        ds = self.dataset(d / "ds")

        def wrap(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            data = data.astype(np.int32)
            data[data == 2] = 65537  # the spleen: int16 would make it 1, the liver
            return data, affine

        rewrite_nifti(ds / "labelsTr" / "phantom_001.nii.gz", wrap)
        argv = flexpatch("train", ds, "--out", d / "model", "--patch", "16", *TRAIN)
        return Case(argv, watch=[ds], out=d / "model")

    def evaluate_pair(self, d: Path, kind: str) -> Case:
        """evaluate a prediction (a copy of the reference, then damaged) against the reference."""
        labels, pred = d / "labels", d / "pred"
        shutil.copytree(self.fx.ds / "labelsTs", labels)
        shutil.copytree(self.fx.ds / "labelsTs", pred)
        case = pred / "phantom_test_000.nii.gz"
        extra: list[object] = []
        if kind == "shifted":  # the same voxels 50 mm away on every axis
            rewrite_nifti(case, lambda a, m: (a, m + _shift(50.0)))
        elif kind == "shape":
            rewrite_nifti(case, lambda a, m: (a[:-4], m))
        elif kind == "fewer":
            declared = d / "dataset.json"
            declared.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
            extra = ["--labels-from", declared]
        elif kind == "dot-files":  # a macOS fork beside the prediction: skipped, the rest scored
            (pred / "._phantom_test_000.nii.gz").write_bytes(b"\x00\x05\x16\x07AppleDouble")
            (pred / ".tmp-stale.nii.gz").write_bytes(b"half a file")
        argv = flexpatch("evaluate", pred, labels, *extra, "--out", d / "report", "--no-hd95")
        ok = (0,) if kind == "dot-files" else (2,)
        return Case(argv, expect=ok, watch=[pred, labels], out=d / "report", refusal=kind != "dot-files")

    def voxels(self, d: Path, kind: str) -> Case:
        import nibabel as nib

        (d / "images").mkdir()
        path = d / "images" / f"{kind}_0000.nii.gz"
        if kind == "rgb":
            rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
            nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
        else:
            nib.save(nib.Nifti1Image(np.full((8, 8, 8), 40 + 2j, np.complex64), np.eye(4)), str(path))
        return self.predict_one(d, path)

    def resume_mixed(self, d: Path) -> Case:
        """config.json rewritten by another run (patch 32) beside this run's checkpoint (patch 16):
        resuming must continue the checkpoint's own run, or refuse; never stitch the two."""
        import torch

        ds, model = self.dataset(d / "ds"), self.model(d / "model")
        edit_json(model / "config.json", {"patch": "32"})
        argv = flexpatch("train", ds, "--out", model, "--resume", "--steps", "3", "--device", "cpu")

        def same_run() -> str | None:
            saved = torch.load(model / "model_last.pt", weights_only=False, map_location="cpu")  # ours
            patch = (saved.get("config") or {}).get("patch")
            log = [json.loads(x) for x in (model / "log.jsonl").read_text().splitlines() if x.strip()]
            sizes = {tuple(r["patch"]) for r in log if "patch" in r}
            return (
                None
                if patch == "16" and sizes <= {(16, 16, 16)}
                else f"stitched: checkpoint {patch}, log {sizes}"
            )

        return Case(argv, expect=(0, 2), watch=[ds], refusal=False, check=same_run)

    # ---- patch larger than every image, dot-files

    def patch_larger(self, d: Path) -> Case:
        ds = self.dataset(d / "ds")
        argv = flexpatch("train", ds, "--out", d / "model", "--patch", "64", *TRAIN)
        return Case(argv, expect=(0,), watch=[ds], out=d / "model", refusal=False, warn="clipped")

    def predict_dot_files(self, d: Path) -> Case:
        images, model = self.images(d / "images"), self.model(d / "model")
        (images / "._case_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # a macOS fork
        (images / ".tmp-x.nii.gz").write_bytes(b"half a file")  # a killed run's temporary file
        out = d / "pred"

        def one_output() -> str | None:
            written = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
            return None if written == ["case.nii.gz"] else f"outputs {written}, not ['case.nii.gz']"

        argv = flexpatch("predict", model, images, "--out", out, "--device", "cpu")
        return Case(argv, expect=(0,), watch=[images, model], out=out, refusal=False, check=one_output)

    def train_dot_files(self, d: Path) -> Case:
        ds = self.dataset(d / "ds")
        for sub in ("imagesTr", "labelsTr"):
            (ds / sub / "._phantom_000_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07AppleDouble")
            (ds / sub / ".tmp-abc.nii.gz").write_bytes(b"half a file")
        argv = flexpatch("train", ds, "--out", d / "model", "--patch", "16", *TRAIN)
        return Case(argv, expect=(0,), watch=[ds], out=d / "model", refusal=False)

    # ---- the parser

    def parse(self, d: Path, kind: str) -> Case:
        args = {
            "overlap-abc": ["predict", d / "m", d / "in", "--out", d / "o", "--overlap", "abc"],
            "unknown-option": ["train", d / "ds", "--out", d / "o", "--nosuch", "1"],
            "missing-argument": ["predict", d / "m", "--out", d / "o"],
            "steps-not-int": ["train", d / "ds", "--out", d / "o", "--steps", "x"],
        }[kind]
        return Case(flexpatch(*args), out=d / "o")

    # ---- signals

    def signal_predict(self, d: Path, signum: int) -> Case:
        """Two cases, a small one first: the signal comes once its output exists (the second is at work)."""
        images, model, out = d / "images", self.model(d / "model"), d / "pred"
        images.mkdir()
        shutil.copy(self.test_image(), images / "a_small_0000.nii.gz")
        write_ct(images / "b_large_0000.nii.gz", (128, 128, 128))  # 4096 windows of 16^3: long enough
        ready = (out / "a_small.nii.gz").exists
        argv = flexpatch("predict", model, images, "--out", out, "--patch-size", 16, "--overlap", 0.5,
                         "--device", "cpu")  # fmt: skip
        sig = Signal(signum, ready, group=signum == signal.SIGINT)
        return Case(argv, expect=(128 + signum,), watch=[images, model], out=out, refusal=False, sig=sig)

    def signal_train(self, d: Path, signum: int) -> Case:
        """A long run with one loader process; the signal comes after a few logged steps."""
        ds, out = self.dataset(d / "ds"), d / "model"

        def ready() -> bool:
            log = out / "log.jsonl"
            return log.is_file() and log.read_text().count("\n") >= 2

        argv = flexpatch("train", ds, "--out", out, "--patch", "16", "--steps", 100000, "--val-every", 1000,
                         "--workers", 1, "--augment", "none", "--options", NARROW,
                         "--device", "cpu")  # fmt: skip
        sig = Signal(signum, ready, group=signum == signal.SIGINT)
        return Case(argv, expect=(128 + signum,), watch=[ds], out=out, refusal=False, sig=sig)

    def resume_after_sigkill(self, d: Path) -> Case:
        """A run killed (SIGKILL: no handler runs) while it writes a checkpoint at every step, with a
        stale temporary file planted beside: resuming goes on from the last checkpoint and cleans up."""
        ds, out = self.dataset(d / "ds"), d / "model"

        def ready() -> bool:
            log = out / "log.jsonl"
            return log.is_file() and log.read_text().count("\n") >= 3

        argv = flexpatch("train", ds, "--out", out, "--patch", "16", "--steps", 10000, "--val-every", 1,
                         "--workers", 0, "--augment", "none", "--options", NARROW,
                         "--device", "cpu")  # fmt: skip
        launch(argv, self.env, self.timeout, Signal(signal.SIGKILL, ready, group=False))
        (out / ".tmp-stale.pt").write_bytes(b"half a checkpoint")  # as a kill inside a write leaves
        steps = (out / "log.jsonl").read_text().count("\n") + 2  # two past what was logged
        resume = flexpatch("train", ds, "--out", out, "--resume", "--steps", steps, "--device", "cpu")

        def resumed() -> str | None:
            log = [
                int(json.loads(x)["step"]) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()
            ]
            stale = sorted(p.name for p in out.glob(f"{TEMP_PREFIX}*"))
            if stale:
                return f"temporary files of the killed run still there: {stale}"
            return None if log == list(range(1, steps + 1)) else f"log steps {log}, not 1..{steps}"

        return Case(resume, expect=(0,), watch=[ds], refusal=False, check=resumed)

    # ---- a full disk

    def full_disk(self, argv: list[str], root: Path, budget: int, **extra: Any) -> Case:
        cmd = [sys.executable, "-c", FULL_DISK, *argv[3:]]  # argv[:3] is python -m flexpatch
        env = {"GUARD_FULL_ROOT": str(root), "GUARD_FULL_BYTES": str(budget)}
        note = "simulated: writes under the output folder fail with ENOSPC after a byte budget"
        return Case(cmd, env=env, refusal=False, note=note, **extra)

    def disk_full_train(self, d: Path) -> Case:
        ds, out = self.dataset(d / "ds"), d / "model"
        argv = flexpatch("train", ds, "--out", out, "--patch", "16", *TRAIN)
        # 16 kB: the JSON files fit, the first checkpoint does not
        return self.full_disk(argv, out, 16_000, watch=[ds], out=out)

    def disk_full_predict(self, d: Path) -> Case:
        images, model, out = self.images(d / "images"), self.model(d / "model"), d / "pred"
        argv = flexpatch("predict", model, images, "--out", out, "--device", "cpu")
        return self.full_disk(argv, out, 0, watch=[images, model], out=out)

    def disk_full_resume(self, d: Path) -> Case:
        """Resume with the disk full: the run's checkpoints must stay as they were, and loadable."""
        ds, model = self.dataset(d / "ds"), self.model(d / "model")
        argv = flexpatch("train", ds, "--out", model, "--resume", "--steps", "3", "--device", "cpu")
        kept = [model / "model_last.pt", model / "model_best.pt"]  # config.json takes the new --steps
        # 16 kB: the JSON files fit, the checkpoint does not
        return self.full_disk(argv, model, 16_000, watch=[ds, *kept], out=model)

    def resume_after_disk_full(self, d: Path) -> Case:
        """The run a full disk stopped goes on once there is space again."""
        case = self.disk_full_resume(d)
        launch(case.argv, {**self.env, **case.env}, self.timeout)  # the fault; another case judges it
        model = d / "model"
        argv = flexpatch("train", d / "ds", "--out", model, "--resume", "--steps", "3", "--device", "cpu")

        def three_steps() -> str | None:
            log = [json.loads(x) for x in (model / "log.jsonl").read_text().splitlines() if x.strip()]
            steps = [int(r["step"]) for r in log]
            return None if steps == [1, 2, 3] else f"log steps {steps}, not [1, 2, 3]"

        return Case(argv, expect=(0,), watch=[d / "ds"], refusal=False, check=three_steps)


# (name, class, in the smoke selection, builder)
Builder = Callable[[Corpus, Path], Case]


def _edited(name: str, change: dict[str, Any] | None) -> Builder:
    return lambda c, d: c.predict_with(d, name, change)


CASES: list[tuple[str, str, bool, Builder]] = [
    ("payload-predict-model-best", "code execution", True, lambda c, d: c.payload_predict(d)),
    ("payload-predict-raw-pickle", "code execution", False, lambda c, d: c.payload_predict(d, raw=True)),
    ("payload-train-init-from", "code execution", False, Corpus.payload_init_from),
    ("payload-train-resume", "code execution", False, Corpus.payload_resume),
    ("payload-sweep", "code execution", False, Corpus.payload_sweep),
    ("predict-out-is-input-folder", "data loss", True, lambda c, d: c.predict_out_is_input(d)),
    ("predict-out-holds-input", "data loss", False, lambda c, d: c.predict_out_is_input(d, "parent")),
    ("predict-out-beside-input-file", "data loss", False, lambda c, d: c.predict_out_is_input(d, "file")),
    ("phantom-into-dataset", "data loss", False, Corpus.phantom_into_dataset),
    ("phantom-into-user-folder", "data loss", False, lambda c, d: c.phantom_into_user_folder(d)),
    ("phantom-overwrite-user-folder", "data loss", False, lambda c, d: c.phantom_into_user_folder(d, True)),
    ("train-out-existing-model", "data loss", False, lambda c, d: c.train_into(d, "model")),
    ("train-out-is-dataset", "data loss", False, lambda c, d: c.train_into(d, "dataset")),
    ("msd-dotdot-path", "path traversal", True, lambda c, d: c.msd(d, "dotdot")),
    ("msd-absolute-path", "path traversal", False, lambda c, d: c.msd(d, "absolute")),
    ("nnunet-symlink-outside", "path traversal", False, Corpus.symlink_out),
    ("header-spacing-zero", "headers", True, lambda c, d: c.header(d, "zero")),
    ("header-pixdim-negative", "headers", False, lambda c, d: c.header(d, "pixdim-negative")),
    ("header-spacing-nan", "headers", False, lambda c, d: c.header(d, "nan")),
    ("header-spacing-huge", "headers", False, lambda c, d: c.header(d, "huge")),
    ("header-spacing-coarse-grid", "headers", False, lambda c, d: c.header(d, "coarse-grid")),
    ("header-empty-axis", "headers", False, lambda c, d: c.header(d, "empty-axis")),
    ("config-json-patch-int", "model-folder JSON", True, _edited("config.json", {"patch": 5})),
    ("config-json-not-object", "model-folder JSON", False, _edited("config.json", None)),
    ("model-json-ndim-string", "model-folder JSON", False, _edited("model.json", {"ndim": "3"})),
    ("method-json-fixed-size-str", "model-folder JSON", False, _edited("method.json", {"fixed_size": "y"})),
    ("plan-json-labels-list", "model-folder JSON", False, _edited("plan.json", {"labels": [1, 2]})),
    ("config-json-unknown-model", "model-folder JSON", False, _edited("config.json", {"model": "resnet9"})),
    ("model-json-unknown-model", "model-folder JSON", False, _edited("model.json", {"name": "resnet9"})),
    ("label-beyond-int16", "values and geometry", False, Corpus.label_beyond_int16),
    ("evaluate-shifted-affine", "values and geometry", True, lambda c, d: c.evaluate_pair(d, "shifted")),
    ("evaluate-other-shape", "values and geometry", False, lambda c, d: c.evaluate_pair(d, "shape")),
    ("evaluate-labels-from-fewer", "values and geometry", False, lambda c, d: c.evaluate_pair(d, "fewer")),
    ("complex-nifti", "values and geometry", False, lambda c, d: c.voxels(d, "complex")),
    ("rgb-nifti", "values and geometry", False, lambda c, d: c.voxels(d, "rgb")),
    ("resume-mixed-config", "values and geometry", False, Corpus.resume_mixed),
    ("train-patch-larger-than-images", "patch warning", False, Corpus.patch_larger),
    ("predict-dot-files", "dot-files", True, Corpus.predict_dot_files),
    ("train-dot-files", "dot-files", False, Corpus.train_dot_files),
    ("evaluate-dot-files", "dot-files", False, lambda c, d: c.evaluate_pair(d, "dot-files")),
    ("typer-overlap-abc", "parse errors", True, lambda c, d: c.parse(d, "overlap-abc")),
    ("typer-unknown-option", "parse errors", False, lambda c, d: c.parse(d, "unknown-option")),
    ("typer-missing-argument", "parse errors", False, lambda c, d: c.parse(d, "missing-argument")),
    ("typer-steps-not-int", "parse errors", False, lambda c, d: c.parse(d, "steps-not-int")),
    ("sigint-predict", "signals", False, lambda c, d: c.signal_predict(d, signal.SIGINT)),
    ("sigterm-predict", "signals", True, lambda c, d: c.signal_predict(d, signal.SIGTERM)),
    ("sigint-train", "signals", False, lambda c, d: c.signal_train(d, signal.SIGINT)),
    ("sigterm-train", "signals", False, lambda c, d: c.signal_train(d, signal.SIGTERM)),
    ("disk-full-train-checkpoint", "full disk", False, Corpus.disk_full_train),
    ("disk-full-predict-output", "full disk", True, Corpus.disk_full_predict),
    ("disk-full-resume-keeps-checkpoint", "full disk", False, Corpus.disk_full_resume),
    ("resume-after-disk-full", "full disk", False, Corpus.resume_after_disk_full),
    ("resume-after-sigkill", "signals", False, Corpus.resume_after_sigkill),
]  # fmt: skip


# ---------------------------------------------------------------- judging a run


def snapshot(paths: list[Path]) -> dict[Path, str]:
    """SHA-256 of every file under ``paths`` (the training cache, rewritten by design, left out)."""
    files: dict[Path, str] = {}
    for root in paths:
        found = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]
        for p in found:
            if ".flexpatch_cache" not in p.parts:
                files[p] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "dangling"
    return files


def broken(path: Path) -> bool:
    """A file a reader cannot read whole: a truncated NIfTI, JSON or checkpoint."""
    name = path.name
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            np.asarray(nib.load(str(path)).dataobj)
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".pt"):
            import torch

            torch.load(path, weights_only=False, map_location="cpu")  # written by flexpatch in this run
    except Exception:
        return True
    return False


def answer_of(case: Case, run: Run, lines: list[str]) -> list[str] | None:
    """The lines that answer the user: all of stderr for a refusal; after a signal, what came after
    it; for a fault met during work (a full disk), from the first ``error:`` line on, since the
    progress printed before it is no part of the answer. None for a success (progress is fine)."""
    if run.signalled:
        return lines[run.lines_before_signal :]
    if run.rc == 0:
        return None
    if case.refusal:
        return lines
    start = next((i for i, ln in enumerate(lines) if ln.startswith("error: ")), 0)
    return lines[start:]


def message_problems(case: Case, run: Run, lines: list[str], answer: list[str] | None) -> list[str]:
    problems = []
    if answer is not None and len(answer) != 1:
        problems.append(f"{len(answer)} lines of answer")
    elif answer is not None and run.rc == 2 and not answer[0].startswith("error: "):
        problems.append("the answer is not an 'error: ' line")
    if answer and TEMP_PREFIX in answer[0]:
        problems.append("names a temporary file, not the target")
    if case.warn and run.rc == 0 and not any(ln.startswith("warning:") and case.warn in ln for ln in lines):
        problems.append(f"no 'warning: ... {case.warn}' line")
    if run.timed_out:
        problems.append(f"killed by the benchmark after {run.seconds:.0f} s")
    if case.sig is not None and not run.signalled:
        problems.append("ended before the signal could be sent")
    if case.check is not None and run.rc == 0 and (why := case.check()):
        problems.append(why)
    return problems


def file_damage(case: Case, run: Run, before: dict[Path, str], out_before: set[Path], case_dir: Path
                ) -> tuple[list[str], list[str]]:  # fmt: skip
    """Files lost (changed or gone among those watched) and left behind (temporary files, new files
    in the output of a refused run, truncated outputs, processes still running)."""
    after = snapshot([p for p in case.watch if p.exists()])
    lost = sorted(str(p.relative_to(case_dir)) for p, h in before.items() if after.get(p) != h)
    left = {str(p.relative_to(case_dir)) for p in case_dir.rglob(f"{TEMP_PREFIX}*") if p not in before}
    if case.out is not None and case.out.is_dir():
        new = [p for p in case.out.rglob("*") if p.is_file() and p not in out_before and p not in before]
        refused = run.rc != 0 and case.refusal
        left |= {str(p.relative_to(case_dir)) for p in new if refused or broken(p)}
    if run.survivors:
        left.add("a process of its group still running")
    return lost, sorted(left)


def judge(name: str, group: str, case: Case, run: Run, before: dict[Path, str], out_before: set[Path],
          case_dir: Path) -> Outcome:  # fmt: skip
    """Classify a run: its exit, its message, and what it did to the files around it."""
    lines = run.stderr.splitlines()
    answer = answer_of(case, run, lines)
    problems = message_problems(case, run, lines, answer)
    traceback, wrong_code = "Traceback" in run.stderr, run.rc not in case.expect
    not_one_line = any(p.endswith("lines of answer") or p.startswith("the answer") for p in problems)
    lost, left = file_damage(case, run, before, out_before, case_dir)
    foreign = case.marker is not None and case.marker.exists()
    clean = not (traceback or wrong_code) and not problems
    first = next((ln for ln in (answer or lines) if ln.strip()), "(nothing)").replace(f"{case_dir}/", "")
    return Outcome(name, group, _shown(case.argv, case_dir), list(case.expect), run.rc, round(run.seconds, 1),
                   clean, traceback, wrong_code, not_one_line, lost, left, foreign, problems, first[:300],
                   "\n".join(lines[-8:])[-2000:])  # fmt: skip


def _shown(argv: list[str], case_dir: Path) -> str:
    """The command as a user would type it, paths relative to the case's folder."""
    if argv[1] == "-c":
        argv = ["python", "-c", "<full-disk wrapper>", *argv[3:]]
    else:
        argv = ["flexpatch", *argv[3:]]
    text = " ".join(a if " " not in a else f"'{a}'" for a in argv)
    return text.replace(f"{case_dir}/", "")


def run_case(
    corpus: Corpus, name: str, group: str, build: Builder, env: dict[str, str], timeout: float
) -> Outcome:
    case_dir = corpus.folder(name)
    case = build(corpus, case_dir)
    before = snapshot([p for p in case.watch if p.exists()])
    out_before = set(case.out.rglob("*")) if case.out is not None and case.out.is_dir() else set()
    run = launch(case.argv, {**env, **case.env}, timeout, case.sig, cwd=case_dir)
    outcome = judge(name, group, case, run, before, out_before, case_dir)
    verdict = (
        "clean" if outcome.clean and not (outcome.lost or outcome.left or outcome.foreign) else "NOT CLEAN"
    )
    print(
        f"  {name}: exit {run.rc} in {run.seconds:.1f} s, {verdict}: {outcome.first_line[:120]}", flush=True
    )
    return outcome


def run_corpus(fx: Fixtures, root: Path, selection: str, timeout: float) -> list[Outcome]:
    env = child_env()
    corpus, names = Corpus(fx, root, env, timeout), selection.split(",")
    chosen = [c for c in CASES if selection == "all" or (selection == "smoke" and c[2]) or c[0] in names]
    return [run_case(corpus, name, group, build, env, timeout) for name, group, _, build in chosen]


# ---------------------------------------------------------------- fixtures


def check_call(cmd: list[str], what: str) -> None:
    """A fixture's command: it must work, or the benchmark itself is broken."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
    if done.returncode != 0:
        raise SystemExit(f"guard: {what} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


def make_fixtures(work: Path, patch: int) -> Fixtures:
    """A 7-label abdomen phantom at 1 mm and a narrow U-Net trained on it in 2 steps at ``patch``."""
    shape = max(32, patch)
    ds, model = work / f"phantom{shape}", work / f"model{patch}"
    if not (model / "model_best.pt").is_file():  # made once per --work, reused by later runs
        shutil.rmtree(ds, ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)
        check_call(flexpatch("phantom", ds, "--cases", 3, "--shape", f"{shape},{shape},{shape}",
                             "--spacing", "1,1,1", "--test-cases", 2, "--seed", 0), "phantom")  # fmt: skip
        check_call(flexpatch("train", ds, "--out", model, "--patch", patch, "--steps", 2, "--batch", 1,
                             "--val-every", 2, "--workers", 0, "--augment", "none", "--options", NARROW,
                             "--device", "cpu"), "train")  # fmt: skip
    return Fixtures(ds, model)


# ---------------------------------------------------------------- part 2: peak RSS of predict


@dataclass
class RssRow:
    shape: tuple[int, int, int]
    budget: str | None
    rc: int
    peak: int  # bytes
    seconds: float
    window: str
    planner: str  # what predict said of its plan (--memory), or ""
    first_error: str


def parse_budget(text: str) -> int:
    units = {"gb": GB, "mb": 10**6, "gib": 2**30, "mib": 2**20}
    number, unit = re.fullmatch(r"([\d.]+)\s*([a-zA-Z]+)", text).groups()  # type: ignore[union-attr]
    return int(float(number) * units[unit.lower()])


def interpreter_floor() -> int:
    """Peak RSS of a process that only imports what predict imports: the floor under every row."""
    code = "import torch, nibabel, scipy.ndimage, flexpatch.cli, flexpatch.infer.predictor"
    return launch([sys.executable, "-c", code], child_env(), 300).peak_rss


def rss_runs(model: Path, work: Path, sizes: list[tuple[int, int, int]], budgets: list[str],
             timeout: float) -> list[RssRow]:  # fmt: skip
    """predict on each volume without --memory, then with each budget; a fresh process per row."""
    rows = []
    for shape in sizes:
        tag = "x".join(map(str, shape))
        volume = work / "volumes" / tag / "ct_0000.nii.gz"
        if not volume.is_file():  # a 512x512x400 volume takes a while to compress: kept in --work
            print(f"writing the {tag} CT volume", flush=True)
            with atomic_path(volume) as tmp:
                write_ct(tmp, shape)
        for budget in [None, *budgets]:
            out = work / "rss_out" / f"{tag}_{budget or 'none'}"
            shutil.rmtree(out, ignore_errors=True)
            argv = flexpatch("predict", model, volume, "--out", out, "--overlap", 0, "--tta", "none",
                             "--device", "cpu", *(["--memory", budget] if budget else []))  # fmt: skip
            run = launch(argv, child_env(), timeout)
            rows.append(_rss_row(shape, budget, run))
            r = rows[-1]
            print(f"  {tag} --memory {budget or 'none'}: peak {r.peak / GB:.2f} GB, window {r.window}, "
                  f"{r.seconds:.0f} s, exit {r.rc}", flush=True)  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)  # the label maps are not the measurement
    return rows


def _rss_row(shape: tuple[int, int, int], budget: str | None, run: Run) -> RssRow:
    text = run.stderr
    window = re.search(r"window (\d+x\d+x\d+)", text) or re.search(r"predict \((\d+), (\d+), (\d+)\)", text)
    shown = (
        "x".join(window.groups()) if window and len(window.groups()) == 3 else (window[1] if window else "?")
    )
    planner = next((ln.strip() for ln in text.splitlines() if ln.startswith("memory ")), "")
    error = "" if run.rc == 0 else next((ln for ln in text.splitlines() if ln.strip()), "(nothing)")
    return RssRow(shape, budget, run.rc, run.peak_rss, run.seconds, shown, planner, error[:300])


# ---------------------------------------------------------------- the report


COLUMNS = ("clean one-line exits", "tracebacks", "wrong exit codes", "not one line", "files lost",
           "files left behind", "foreign code run")  # fmt: skip


def counts(outcomes: list[Outcome]) -> list[int]:
    return [
        sum(o.clean for o in outcomes), sum(o.traceback for o in outcomes),
        sum(o.wrong_code for o in outcomes), sum(o.not_one_line for o in outcomes),
        sum(bool(o.lost) for o in outcomes), sum(bool(o.left) for o in outcomes),
        sum(o.foreign for o in outcomes),
    ]  # fmt: skip


def corpus_table(outcomes: list[Outcome]) -> str:
    groups = list(dict.fromkeys(o.group for o in outcomes))
    lines = ["| class | cases | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for g in groups:
        mine = [o for o in outcomes if o.group == g]
        lines.append(f"| {g} | {len(mine)} | " + " | ".join(map(str, counts(mine))) + " |")
    lines.append(
        f"| **all** | **{len(outcomes)}** | " + " | ".join(f"**{n}**" for n in counts(outcomes)) + " |"
    )
    return "\n".join(lines)


def faulty(o: Outcome) -> bool:
    return not o.clean or bool(o.lost or o.left) or o.foreign


def failures(outcomes: list[Outcome]) -> str:
    bad = [o for o in outcomes if faulty(o)]
    if not bad:
        return "none."
    items = []
    for o in bad:
        what = [f"exit {o.rc} (expected {' or '.join(map(str, o.expect))})"]
        what += ["traceback"] * o.traceback + o.problems
        what += [f"lost {', '.join(o.lost)}"] * bool(o.lost) + [f"left {', '.join(o.left)}"] * bool(o.left)
        what += ["THE PAYLOAD RAN"] * o.foreign
        items.append(f"- **{o.name}** ({'; '.join(what)}): `{o.command}`\n  - stderr: `{o.first_line}`")
    return "\n\n" + "\n".join(items)


def case_table(outcomes: list[Outcome]) -> str:
    lines = ["| case | class | exit (expected) | verdict | first stderr line |", "|---|---|---|---|---|"]
    for o in outcomes:
        verdict = "clean" if not faulty(o) else "**not clean**"
        line = o.first_line.replace("|", "\\|")[:160]
        lines.append(
            f"| {o.name} | {o.group} | {o.rc} ({'/'.join(map(str, o.expect))}) | {verdict} | `{line}` |"
        )
    return "\n".join(lines)


def rss_table(rows: list[RssRow], floor: int) -> str:
    lines = [
        "| volume | --memory | peak RSS GB | peak / budget | bytes per voxel | window | seconds | exit |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        ratio = f"{r.peak / parse_budget(r.budget):.2f}" if r.budget else "-"
        voxels = int(np.prod(r.shape))
        lines.append(
            f"| {'x'.join(map(str, r.shape))} | {r.budget or 'none'} | {r.peak / GB:.2f} | {ratio} | "
            f"{r.peak / voxels:.0f} | {r.window} | {r.seconds:.0f} | {r.rc} |"
        )
    planner = [
        f"- {'x'.join(map(str, r.shape))}, --memory {r.budget}: {r.planner}" for r in rows if r.planner
    ]
    errors = [f"- {'x'.join(map(str, r.shape))}, --memory {r.budget or 'none'}: `{r.first_error}`"
              for r in rows if r.rc != 0]  # fmt: skip
    text = "\n".join(lines)
    if floor:
        text += f"\n\nThe floor (a process importing what predict imports): {floor / GB:.2f} GB."
    if planner:
        text += "\n\nWhat predict said of its plan:\n\n" + "\n".join(planner)
    if errors:
        text += "\n\nRuns that failed:\n\n" + "\n".join(errors)
    return text


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def targets(outcomes: list[Outcome], rows: list[RssRow]) -> list[str]:
    found = []
    if outcomes:
        n = counts(outcomes)
        found.append(
            f"- Corpus: every column but the first at zero: tracebacks {n[1]}, wrong exit codes {n[2]}, "
            f"not one line {n[3]}, files lost {n[4]}, left behind {n[5]}, foreign code {n[6]}; clean "
            f"{n[0]}/{len(outcomes)} ({_verdict(sum(n[1:]) == 0 and n[0] == len(outcomes))})"
        )
    for r in rows:
        tag, peak = "x".join(map(str, r.shape)), f"peak {r.peak / GB:.2f} GB"
        if r.budget:
            ok = r.rc == 0 and r.peak <= parse_budget(r.budget)
            found.append(f"- {tag} within --memory {r.budget}: {peak} ({_verdict(ok)})")
        elif r.shape == BIG:
            ok = r.rc == 0 and r.peak < RSS_TARGET
            found.append(f"- {tag} without --memory under 3 GB: {peak} ({_verdict(ok)})")
    return found


def plot(rows: list[RssRow], path: Path) -> Path:
    """Peak RSS per volume and budget, each bar with its budget marked; the 3 GB target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in rows))
    budgets = list(dict.fromkeys(r.budget for r in rows))
    width = 0.8 / len(budgets)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, budget in enumerate(budgets):
        xs, peaks = [], []
        for i, shape in enumerate(shapes):
            for r in rows:
                if r.shape == shape and r.budget == budget:
                    xs.append(i + (j - (len(budgets) - 1) / 2) * width)
                    peaks.append(r.peak / GB)
        ax.bar(xs, peaks, width * 0.9, label=f"--memory {budget or 'none'}")
        if budget:
            left, right = [x - width / 2 for x in xs], [x + width / 2 for x in xs]
            ax.hlines([parse_budget(budget) / GB] * len(xs), left, right, colors="black", lw=1.5, zorder=3)
    ax.axhline(RSS_TARGET / GB, color="red", ls="--", lw=1, label="target without --memory (512x512x400)")
    ax.set_xticks(range(len(shapes)), ["x".join(map(str, s)) for s in shapes])
    ax.set_ylabel("peak RSS of predict (GB)")
    ax.set_title("predict's peak RSS on the CPU (black ticks: the budget)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


CORPUS_NOTE = (
    "**Bad inputs and faults.** Clean: the expected exit code (2 for a user error, 130 for SIGINT, 143 for "
    "SIGTERM, 0 where the input is valid), no traceback, and an answer of one line (`error: ...` for exit 2; "
    "after a signal, the one line it prints; a success may print progress, a warning case must print its "
    "`warning:` line). Files lost: a file that existed before the run in a folder the case must not touch, "
    "changed or gone (SHA-256 before and after). Left behind: a `.tmp-*` file, a new file in the output of a "
    "refused run, a truncated output, or a process still running. Foreign code: a crafted pickle in a "
    "checkpoint would create a marker file. Signals come once the command is at work (predict: its first "
    "output written; train: two steps logged); SIGINT goes to the process group, as a terminal's Ctrl-C, "
    "SIGTERM to the process. Full disk: simulated without root by a `python -c` wrapper around "
    "`flexpatch.cli.main` in which files opened for writing under the output folder (Python's open, which "
    "nibabel and JSON use, and `torch.save`) fail with ENOSPC once a byte budget is spent."
)
RSS_NOTE = (
    "**Peak RSS of predict** (the kernel's high-water mark of the process, `wait4`; a fresh process per "
    "row): synthetic CT volumes (int16, 1 mm, LPS affine, .nii.gz), a narrow U-Net (channels 4, 2 levels, "
    "7 classes) trained at patch {patch}^3 at 1 mm (so no resampling), `--overlap 0 --tta none --device "
    "cpu`; the window is the training patch without --memory, the planner's with it. Budgets in GB = 10^9 "
    "bytes."
)


def report(
    outcomes: list[Outcome], rows: list[RssRow], floor: int, setup: dict[str, Any], png: str | None
) -> str:
    parts = [
        f"flexpatch at {setup['code']}. Machine load (1/5/15-min load average): {setup['load']}; "
        f"OMP_NUM_THREADS={setup['threads']}. "
        "Each case is `python -m flexpatch ...` in a subprocess with stderr a pipe (no terminal width), in "
        "its own scratch folder holding copies of what it uses: a 3D abdomen phantom (7 labels, 32^3, 1 mm) "
        "and a narrow U-Net (channels 4, 2 levels) trained on it for 2 steps."
    ]
    if outcomes:
        parts += [
            CORPUS_NOTE,
            corpus_table(outcomes),
            "Cases that were not clean (paths relative to the case's folder): " + failures(outcomes),
            "<details><summary>Every case</summary>\n\n" + case_table(outcomes) + "\n\n</details>",
        ]
    if rows:
        parts += [
            RSS_NOTE.format(patch=setup["rss_patch"]),
            rss_table(rows, floor),
        ]
    parts.append("**Targets** (issue 18)\n\n" + "\n".join(targets(outcomes, rows)))
    if png:
        parts.append(f"![peak RSS of predict]({png})")
    return "\n\n".join(parts)


def print_summary(outcomes: list[Outcome]) -> None:
    if not outcomes:
        return
    print("\n" + corpus_table(outcomes) + "\n")
    for o in outcomes:
        if faulty(o):
            print(f"NOT CLEAN {o.name}: exit {o.rc}; {o.first_line}")


# ---------------------------------------------------------------- main


def code_version() -> str:
    """The commit measured, and whether src/ held uncommitted changes (others edit it meanwhile)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "src"], capture_output=True, text=True, check=False
    )
    if head.returncode != 0:
        return "an unknown commit (not a git checkout)"
    return f"commit {head.stdout.strip()}" + (
        " with uncommitted changes in src/" if dirty.stdout.strip() else ""
    )


def parse_shape(text: str) -> tuple[int, int, int]:
    values = [int(v) for v in text.lower().replace("^3", "").split("x")]
    return (values[0],) * 3 if len(values) == 1 else (values[0], values[1], values[2])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=tuple(MODES), default="smoke")
    p.add_argument("--work", type=Path, default=ROOT / ".bench" / "guard", help="scratch folder")
    p.add_argument("--part", choices=("all", "table", "rss"), default="all")
    p.add_argument("--cases", help="smoke, all, or names separated by commas (default: the mode's)")
    p.add_argument("--sizes", help="RSS volumes, e.g. 256,512x512x400 (default: the mode's)")
    p.add_argument("--budgets", help="--memory values, e.g. 1.5GB,2GB,3GB (default: the mode's)")
    p.add_argument("--rss-patch", type=int, help="training patch (and window) of the RSS model")
    args = p.parse_args(argv)
    m = MODES[args.mode]
    smoke = args.mode == "smoke"
    work = (args.work / args.mode).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_start = "/".join(f"{v:.1f}" for v in os.getloadavg())
    started = time.perf_counter()

    outcomes: list[Outcome] = []
    if args.part in ("all", "table"):
        fx = make_fixtures(work, 16)
        print(f"guard corpus ({args.cases or m['cases']}):", flush=True)
        shutil.rmtree(work / "cases", ignore_errors=True)
        outcomes = run_corpus(fx, work / "cases", args.cases or m["cases"], m["timeout"])
        print_summary(outcomes)

    rows: list[RssRow] = []
    floor, rss_patch = 0, args.rss_patch or m["rss_patch"]
    if args.part in ("all", "rss"):
        sizes = [parse_shape(s) for s in args.sizes.split(",")] if args.sizes else m["sizes"]
        budgets = args.budgets.split(",") if args.budgets else m["budgets"]
        model = make_fixtures(work, rss_patch).model  # the corpus's own when the patch is the same
        print("peak RSS of predict:", flush=True)
        # the floor is context for large volumes; the smoke run saves its few seconds
        floor = interpreter_floor() if not smoke or args.sizes else 0
        rows = rss_runs(model, work, sizes, budgets, m["timeout"])
        print("\n" + rss_table(rows, floor))

    load_end = "/".join(f"{v:.1f}" for v in os.getloadavg())
    load = f"{load_start} at the start, {load_end} at the end, on {os.cpu_count()} cores"
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    setup = {"load": load, "threads": threads, "rss_patch": rss_patch, "code": code_version()}
    out = work / "BENCHMARKS.md" if smoke else ROOT / "BENCHMARKS.md"  # smoke writes under --work only
    png = None
    if rows:
        figure = plot(
            rows, (work if smoke else ROOT / "benchmarks" / "figures") / f"guard_rss_{args.mode}.png"
        )
        png = os.path.relpath(figure, out.parent)
    body = report(outcomes, rows, floor, setup, png)
    (work / "results.json").write_text(json.dumps(
        {"cases": [dataclasses.asdict(o) for o in outcomes], "rss": [dataclasses.asdict(r) for r in rows],
         "floor": floor, "seconds": round(time.perf_counter() - started, 1)}, indent=1))  # fmt: skip
    cmd = "python benchmarks/guard.py " + " ".join(sys.argv[1:] if argv is None else argv)
    title = f"Guard: bad inputs, faults and predict's peak memory, {args.mode} mode"
    section = f"guard-{args.mode}"
    if args.part != "all":  # a part alone gets a section of its own: the other part's stays
        only = "peak RSS" if args.part == "rss" else "corpus"
        section, title = f"{section}-{args.part}", f"{title}, {only} only"
    write_section(out, section, title, body, cmd.strip(), describe_device("cpu"))
    print("\n" + "\n".join(targets(outcomes, rows)))
    print(f"wrote {out}" + (f" and {png}" if png else "") + f" in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
