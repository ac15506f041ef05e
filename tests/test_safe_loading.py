"""Model folders from strangers: loading a checkpoint never runs code.

A crafted pickle whose unpickling would create a file is refused, with one line naming the file,
by the library and by every command that reads a checkpoint (predict, train --init-from,
train --resume); the file is never created. Our own checkpoints, RNG states with NumPy arrays
included, still load.
"""

from __future__ import annotations

import pickle
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from flexpatch.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from flexpatch.errors import FlexPatchError
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

torch.set_num_threads(1)


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the loader runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def assert_refused(proc: subprocess.CompletedProcess, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the checkpoint's payload ran"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "refused" in lines[0], proc.stderr


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_payload_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "model_best.pt"
    state = {"model": {"w": torch.zeros(2)}, "extra": Payload(marker)}
    if how == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    # torch's own files name the payload's function; a bare pickle is not even read that far
    needle = "refused: it names code" if how == "torch.save" else "unreadable checkpoint"
    with pytest.raises(FlexPatchError, match=needle) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    # the reference: full unpickling of the same file does run it
    pickle.loads(path.read_bytes()) if how == "pickle" else torch.load(path, weights_only=False)
    assert marker.exists()


def test_our_checkpoints_with_rng_and_numpy_state_round_trip(tmp_path: Path) -> None:
    state = {
        "model": {"w": torch.arange(4.0)},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "pool": {"ages": np.arange(5, dtype=np.int64), "scores": np.ones(3, np.float32)},
        "best": np.float64(0.5),
        "config": {"patch": "16", "flip": [0, 1], "labels": None},
    }
    save_checkpoint(tmp_path / LAST, state)
    back = load_checkpoint(tmp_path / LAST)
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["rng"]["python"] == state["rng"]["python"]
    np.testing.assert_array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    np.testing.assert_array_equal(back["pool"]["ages"], state["pool"]["ages"])
    assert back["pool"]["scores"].dtype == np.float32 and back["best"] == 0.5
    assert back["config"] == state["config"]


def test_not_a_dict_and_not_a_checkpoint_are_one_line_errors(tmp_path: Path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(FlexPatchError, match="not a flexpatch checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FlexPatchError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")


@pytest.fixture(scope="module")
def model(tiny_cells: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2D model folder, trained for two steps."""
    out = tmp_path_factory.mktemp("safe") / "model"
    config = TrainConfig(
        patch="32", steps=2, batch=1, val_every=2, workers=0, model_kwargs={"channels": 4, "levels": 2}
    )
    train(tiny_cells, out, config, device="cpu", progress=False)
    return out


def poisoned_copy(model: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A copy of ``model`` whose checkpoint ``name`` carries the payload; the payload's marker."""
    folder, marker = tmp_path / "stranger", tmp_path / "pwned"
    shutil.copytree(model, folder)
    state = load_checkpoint(folder / name)
    state["model"]["payload"] = Payload(marker)
    torch.save(state, folder / name)
    return folder, marker


def test_predict_refuses_a_strangers_model_folder(model: Path, tiny_cells: Path, tmp_path: Path) -> None:
    folder, marker = poisoned_copy(model, tmp_path, BEST)
    proc = run_cli("predict", folder, tiny_cells / "imagesTs", "--out", tmp_path / "pred", "--device", "cpu")
    assert_refused(proc, folder / BEST, marker)
    assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir())


def test_init_from_refuses_a_strangers_model_folder(model: Path, tiny_cells: Path, tmp_path: Path) -> None:
    folder, marker = poisoned_copy(model, tmp_path, BEST)
    args = ["--patch", "32", "--steps", 1, "--batch", 1, "--workers", 0, "--device", "cpu"]
    proc = run_cli("train", tiny_cells, "--out", tmp_path / "new", "--init-from", folder, *args)
    assert_refused(proc, folder / BEST, marker)


def test_resume_refuses_a_poisoned_last_checkpoint(model: Path, tiny_cells: Path, tmp_path: Path) -> None:
    folder, marker = poisoned_copy(model, tmp_path, LAST)
    proc = run_cli("train", tiny_cells, "--out", folder, "--resume", "--device", "cpu")
    assert_refused(proc, folder / LAST, marker)
