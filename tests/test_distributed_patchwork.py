"""The deep neural patchwork on several processes (torchrun, gloo on the CPU) against one.

As in test_distributed.py the reference is one process's own run: two processes with the same
batch must give the same loss every round, the same hard-mined patch sets, the same validation
(and mask thresholds) and the same weights, to float rounding (the loss's sums are reduced in
another order), write the folder once, and resume exactly.

The runs use lr 1e-4, not the default 1e-3: AdamW's first steps move every weight by about the
learning rate whatever its gradient's size, so the rounding of a near-zero gradient can move a
weight by up to lr, and the tiny networks here turn that into diverging runs within a few steps
(a one-process run whose weights are perturbed by 1e-7 differs by 2e-3 after one step). At 1e-4
the seven steps of two rounds stay within rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from flexpatch.patchwork.config import PatchworkConfig
from flexpatch.patchwork.losses import LabelEmbedding, patch_loss
from flexpatch.patchwork.train import train_patchwork
from test_distributed import TINY, _env, assert_weights_close, torchrun

torch.set_num_threads(1)

# 3 training cases x 3 chains = 9 patches, batches of 4: the last batch (1 patch) is smaller than
# the processes; hard mining keeps 4 of them for the second round (13 patches, 4 steps)
SETTINGS = {"depth": 2, "num_patches": 3, "hard_mining": 1.0, "batch_size": 4, "lr": 1e-4, "workers": 0}
OPTIONS = {"val_every": 1, "save_every": 1}  # a validation and a resume.pt every round


def _config(ndim: int, rounds: int, **options: object) -> PatchworkConfig:
    scheme = {"depth": 2, "matrix": [8] * ndim, "fov_rel": [0.8] * ndim}
    settings = {k: v for k, v in SETTINGS.items() if k != "depth"}
    return PatchworkConfig(
        scheme=scheme, block_options=json.loads(TINY), rounds=rounds, **settings, **OPTIONS, **options
    )


def _args(data: Path, out: Path, rounds: int, **options: object) -> list[object]:
    """``train --patchwork`` with the settings of :func:`_config`."""
    extra = {"lr": SETTINGS["lr"], "hard_mining_order": "loss", **OPTIONS, **options}
    return [
        "train", data, "--out", out, "--patchwork", "--depth", 2, "--matrix", 8, "--fov-rel", 0.8,
        "--options", TINY, "--rounds", rounds, "--num-patches", 3, "--hard-mining", 1, "--batch", 4,
        "--workers", 0, "--device", "cpu", "--patchwork-options", _options_file(out, extra),
    ]  # fmt: skip


def _options_file(out: Path, options: dict[str, object]) -> Path:
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(options))
    return path


def assert_same_patchwork(one: Path, many: Path) -> None:
    """Every round's loss and patch count, the validation Dice and mask thresholds, the last and the
    best weights (the label embedding's too) to rounding; one log, written once."""
    a, b = (json.loads((folder / "log.json").read_text()) for folder in (one, many))
    assert [r["round"] for r in a] == [r["round"] for r in b] and len(a) >= 2
    assert [r["patches"] for r in a] == [r["patches"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r["val_mean"] for r in b], [r["val_mean"] for r in a], rtol=1e-5, atol=1e-6)
    assert [r["thresholds"] for r in a] == [r["thresholds"] for r in b]
    for name in ("patchwork.pt", "patchwork_best.pt"):
        wa, wb = (torch.load(folder / name, weights_only=False) for folder in (one, many))
        nets = [k for k in ("net", "embedding") if wa[k] is not None]
        flat = [{f"{n}.{k}": v for n in nets for k, v in w[n].items()} for w in (wa, wb)]
        assert_weights_close(*flat, lr=SETTINGS["lr"])
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in many.iterdir())


def test_two_processes_train_a_2d_patchwork_as_one(tiny_cells: Path, tmp_path: Path) -> None:
    """2D, softmax Dice + CE over the batch, hard mining by loss (every patch's loss gathered), the
    held-out case validated every round: two processes with batches of 4 are one process."""
    train_patchwork(tiny_cells, tmp_path / "one", _config(2, rounds=2), device="cpu", progress=False)
    proc = torchrun(*_args(tiny_cells, tmp_path / "two", rounds=2))
    assert_same_patchwork(tmp_path / "one", tmp_path / "two")
    assert proc.stdout.count("trained patchwork: 2 rounds") == 1, proc.stdout


def test_a_3d_patchwork_resumed_under_torchrun_goes_on_as_one(tiny_abdomen: Path, tmp_path: Path) -> None:
    """3D with a label embedding (sampled softmax: the same negatives on every process), two epochs
    a round, hard mining by F1: one round on two processes, resumed on two for a second, is the
    one-process run of two rounds."""
    options = {"embedding_dim": 3, "num_sampled": 4, "hard_mining_order": "f1", "epochs": 2}
    config = _config(3, rounds=2, **options)
    train_patchwork(tiny_abdomen, tmp_path / "one", config, device="cpu", progress=False)
    torchrun(*_args(tiny_abdomen, tmp_path / "two", rounds=1, **options))
    torchrun("train", tiny_abdomen, "--out", tmp_path / "two", "--resume", "--rounds", 2, "--device", "cpu")
    assert_same_patchwork(tmp_path / "one", tmp_path / "two")


def _first_two_with_the_rest(loss_of: Callable[[slice, Callable], torch.Tensor]) -> torch.Tensor:
    """``loss_of(samples, total)`` for a batch's first two samples, their statistics summed with the
    other samples' (as two processes, each with its part of the batch, sum them)."""
    rest: list[torch.Tensor] = []
    loss_of(slice(2, None), lambda stats: rest.append(stats.detach()) or stats)
    return loss_of(slice(0, 2), lambda stats: stats + rest[0])


@pytest.mark.parametrize("batch_dice", [True, False])
@pytest.mark.parametrize("categorical", [True, False])
def test_the_loss_of_summed_parts_is_the_batch_loss(batch_dice: bool, categorical: bool) -> None:
    """The loss from the statistics of two parts of a batch (what two processes sum) is the whole
    batch's, with don't-care voxels, and so is an embedding's sampled softmax."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64)
    shape = (5, 6, 6) if categorical else (5, 3, 6, 6)
    target = torch.randint(-1, 3 if categorical else 2, shape, generator=g)
    target = target if categorical else target.double()
    whole, _ = patch_loss(logits, target, categorical, batch_dice=batch_dice)
    part = _first_two_with_the_rest(
        lambda s, total: patch_loss(logits[s], target[s], categorical, batch_dice=batch_dice, total=total)[0]
    )
    torch.testing.assert_close(part, whole)
    if categorical:
        emb = LabelEmbedding(3, 3, seed=1).double()
        negatives = lambda: torch.Generator().manual_seed(4)  # noqa: E731 - the same draw each time
        full = emb.sampled_loss(logits, target, 2, negatives())
        part = _first_two_with_the_rest(
            lambda s, total: emb.sampled_loss(logits[s], target[s], 2, negatives(), total)
        )
        torch.testing.assert_close(part, full)


def test_a_batch_the_processes_cannot_split_is_said_once(tiny_cells: Path, tmp_path: Path) -> None:
    """--nproc 2 with a batch of 1: one line, exit code 2, before the model folder is made."""
    args = [str(a) for a in _args(tiny_cells, tmp_path / "m", rounds=1)]
    args[args.index("--batch") + 1] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "flexpatch", *args, "--nproc", "2"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: a batch of 1 cannot be split across 2 processes: use a global batch of at least 2"
    ]
    assert not (tmp_path / "m").exists()
