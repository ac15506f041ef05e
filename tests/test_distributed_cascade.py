"""The segment-then-segment cascade on several processes (torchrun, gloo on the CPU) against one.

As in test_distributed.py, the reference is one process's own run: two processes with the same
global batch must give the same losses of both stages, the same validation and the same weights
(to float rounding: the loss's sums are reduced in another order), write the folder once, and
resume exactly. The processes are started by torchrun, as a user starts them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flexpatch.cascade.config import CascadeConfig
from flexpatch.cascade.train import STAGES, train_cascade
from flexpatch.checkpoint import LAST
from test_distributed import TINY, _env, _log, assert_weights_close, torchrun

torch.set_num_threads(1)

# both stages validate at every step; "default" augmentation: its draws are skipped for the
# samples another process cuts
OPTIONS = {"jitter": 2, "min_side": 1, "val_every": 1, "augment": "default"}


def _cascade_args(data: Path, out: Path) -> list[object]:
    return [
        "train", data, "--out", out, "--cascade", "sts", "--input-size", 16, "--steps", 2, "--batch", 4,
        "--device", "cpu", "--options", TINY, "--cascade-options", json.dumps(OPTIONS),
    ]  # fmt: skip


def _config(folder: Path) -> CascadeConfig:
    """The config a torchrun run saved: the one-process reference trains exactly that."""
    return CascadeConfig.from_json(json.loads((folder / "cascade.json").read_text())["config"])


def assert_same_cascade(one: Path, many: Path) -> None:
    """The loss of every step of both stages to 1e-5, the same validation, and each stage's weights
    to AdamW's rounding (:func:`assert_weights_close`)."""
    a, b = _log(one), _log(many)
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    assert {r["stage"] for r in a} == set(STAGES)
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        [r.get("val_mean", 0) for r in b], [r.get("val_mean", 0) for r in a], rtol=1e-5, atol=1e-6
    )
    for stage in STAGES:
        wa = torch.load(one / stage / LAST, weights_only=False)["model"]
        wb = torch.load(many / stage / LAST, weights_only=False)["model"]
        assert_weights_close(wa, wb)


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("ndim", [2, 3])
def test_two_processes_train_the_cascade_as_one(
    tiny_cells: Path, tiny_abdomen: Path, tmp_path: Path, ndim: int
) -> None:
    """A global batch of 4 on two processes is one process's batch of 4, in both stages, with
    augmentation and jittered crops; only the main process writes (one summary line, the same files)."""
    data = tiny_cells if ndim == 2 else tiny_abdomen
    proc = torchrun(*_cascade_args(data, tmp_path / "two"))
    train_cascade(data, tmp_path / "one", _config(tmp_path / "two"), device="cpu", progress=False)
    assert_same_cascade(tmp_path / "one", tmp_path / "two")
    assert proc.stdout.count("trained cascade") == 1, proc.stdout
    assert "2 processes (cpu)" in proc.stderr  # the console speaks on stderr
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    state = torch.load(tmp_path / "two" / "fine" / LAST, weights_only=False)
    assert state["world"] == 2 and len(state["rng_ranks"]) == 2


STOPPED = """
import sys
from flexpatch.cascade.config import CascadeConfig
from flexpatch.cascade.train import train_cascade
from flexpatch.distributed import stop

config = CascadeConfig.of(**{options})
train_cascade(sys.argv[1], sys.argv[2], config, device="cpu", progress=False, stop_after={stop_after})
stop()
"""


def test_a_resume_under_torchrun_continues_the_cascade(tiny_cells: Path, tmp_path: Path) -> None:
    """Two processes stopped in the fine stage (2 rough steps + 1 fine) and resumed by
    ``torchrun ... train --resume`` end where one process's uninterrupted run ends; resumed on one
    process, the stopped run ends there too (to rounding)."""
    settings = dict(OPTIONS, input_size=16, steps=2, batch=4, model_kwargs=json.loads(TINY))
    script = tmp_path / "stopped.py"
    script.write_text(STOPPED.format(options=repr(settings), stop_after=3))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*launch, str(script), str(tiny_cells), str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert not (two / "cascade.json").exists()
    assert torch.load(two / "fine" / LAST, weights_only=False)["step"] == 1
    shutil.copytree(two, tmp_path / "three")
    torchrun("train", tiny_cells, "--out", two, "--resume", "--device", "cpu")
    train_cascade(tiny_cells, tmp_path / "one", CascadeConfig.of(**settings), device="cpu", progress=False)
    assert_same_cascade(tmp_path / "one", two)
    assert _config(two) == _config(tmp_path / "one")
    # another number of processes: the same global batches, so the same run to rounding
    train_cascade(tiny_cells, tmp_path / "three", device="cpu", progress=False, resume=True)
    assert_same_cascade(tmp_path / "one", tmp_path / "three")
