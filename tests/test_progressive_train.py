"""Progressive growing of the patch size inside the training loop, and its CLI schedule.

The schedule itself is tested in test_progressive.py; here the loop must follow it step by
step, resume mid-stage exactly, write a checkpoint at every stage switch, and train a UNETR
whose token grid changes with every stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flexpatch.checkpoint import LAST, load_checkpoint
from flexpatch.cli import app
from flexpatch.data.dataset import load_case, load_dataset
from flexpatch.infer.predictor import load_model
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

torch.set_num_threads(1)

# a 2-level U-Net with 4 channels: divisor 4 (pools 2), milliseconds per step
TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}
STEPS = 18
# Hand-grown to 16^3 with 2 pools per axis (step 4; the first axis starts at 8; axes 1, 2, 0, ...)
# and the PGPS+ batches from 2 at 16^3 backwards: floor(vol_{i+1} * b_{i+1} / vol_i), at least 2.
SIZES = [(8, 4, 4), (8, 8, 4), (8, 8, 8), (12, 8, 8), (12, 12, 8), (12, 12, 12), (16, 12, 12), (16, 16, 12)]
SIZES += [(16, 16, 16)]
BATCHES = [24, 12, 6, 4, 3, 2, 2, 2, 2]
# 18 steps over 9 stages: 2 each, so stage i trains steps 2i+1 and 2i+2 (1-based, as logged)
STAGE_ENDS = [2 * (i + 1) for i in range(len(SIZES) - 1)]
# validation every 6 steps lands on the ends of stages 2 and 5: their checkpoints must still be written
VAL_EVERY = 6
TINY_UNETR = {
    "hidden_size": 48,
    "mlp_dim": 96,
    "num_heads": 2,
    "num_layers": 2,
    "feature_size": 8,
    "token_size": 8,
    "img_size": 32,
}
UNETR_SIZES = [(16, 8, 8), (16, 16, 8), (16, 16, 16), (24, 16, 16), (24, 24, 16), (24, 24, 24)]
UNETR_SIZES += [(32, 24, 24), (32, 32, 24), (32, 32, 32)]
# the authors' PGPS trainers: 128^3 with 5 pools per axis
PAPER_SIZES = [(64, 32, 32), (64, 64, 32), (64, 64, 64), (96, 64, 64), (96, 96, 64), (96, 96, 96)]
PAPER_SIZES += [(128, 96, 96), (128, 128, 96), (128, 128, 128)]


def growing_config(**changes) -> TrainConfig:
    base = TrainConfig(
        model="unet",
        model_kwargs=TINY,
        patch="progressive:performance:16",
        steps=STEPS,
        batch=2,
        val_every=VAL_EVERY,
        workers=0,
    )
    return base.replace(**changes)


def read_log(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "log.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def growing_run(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted PGPS+ run that the interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("growing")
    train(tiny_abdomen, out, growing_config(), device="cpu", progress=False)
    return out


def test_logged_patch_and_batch_follow_the_schedule(growing_run: Path) -> None:
    log = read_log(growing_run)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    want_sizes = [size for size in SIZES for _ in range(2)]
    want_batches = [b for b in BATCHES for _ in range(2)]
    assert [tuple(r["patch"]) for r in log] == want_sizes
    assert [r["batch"] for r in log] == want_batches
    # validation at the largest size only, at val_every and at the end
    assert [r["step"] for r in log if "val_mean" in r] == [6, 12, 18]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_resume_mid_stage_continues_the_same_stage(
    tiny_abdomen: Path, growing_run: Path, tmp_path: Path
) -> None:
    stop = 5  # the first step of stage 2 (steps 5, 6): the resumed run must finish that stage
    first = train(tiny_abdomen, tmp_path, growing_config(), device="cpu", progress=False, stop_after=stop)
    assert first.steps == stop and load_checkpoint(tmp_path / LAST)["step"] == stop
    assert read_log(tmp_path)[-1]["patch"] == [8, 8, 8]

    train(tiny_abdomen, tmp_path, growing_config(), resume=True, device="cpu", progress=False)
    ref, got = read_log(growing_run), read_log(tmp_path)
    assert got[stop]["step"] == stop + 1 and got[stop]["patch"] == [8, 8, 8] and got[stop]["batch"] == 6
    # exact equality: the same patches, batch sizes, weights, optimiser moments and RNG draws
    for key in ("step", "patch", "batch", "loss", "lr"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
    assert [r.get("val_dice") for r in got] == [r.get("val_dice") for r in ref]
    assert same_weights(weights(growing_run / LAST), weights(tmp_path / LAST))
    # stage checkpoints from before and after the interruption match the uninterrupted run's
    names = sorted(p.name for p in growing_run.glob("model_stage*.pt"))
    assert names and names == sorted(p.name for p in tmp_path.glob("model_stage*.pt"))
    for name in names:
        assert same_weights(weights(growing_run / name), weights(tmp_path / name)), name


def test_a_checkpoint_at_every_stage_switch(tiny_abdomen: Path, growing_run: Path, tmp_path: Path) -> None:
    written = sorted(p.name for p in growing_run.glob("model_stage*.pt"))
    # every switch, those at a validation step (6, 12) included; none after the last stage
    assert written == sorted(f"model_stage{i}.pt" for i in range(len(STAGE_ENDS)))
    for stage, end in enumerate(STAGE_ENDS):
        assert load_checkpoint(growing_run / f"model_stage{stage}.pt")["step"] == end
    # a stage checkpoint holds the weights at its switch: those of a run stopped there
    train(tiny_abdomen, tmp_path, growing_config(), device="cpu", progress=False, stop_after=STAGE_ENDS[1])
    assert same_weights(weights(growing_run / "model_stage1.pt"), weights(tmp_path / LAST))
    assert not same_weights(
        weights(growing_run / "model_stage1.pt"), weights(growing_run / "model_stage2.pt")
    )


def test_unetr_trains_on_growing_patches_and_predicts_at_the_largest(
    tiny_abdomen: Path, tmp_path: Path
) -> None:
    config = TrainConfig(
        model="unetr",
        model_kwargs=TINY_UNETR,
        patch="progressive:resource:32",
        steps=len(UNETR_SIZES),
        batch=2,
        val_every=len(UNETR_SIZES),
        workers=0,
    )
    result = train(tiny_abdomen, tmp_path, config, device="cpu", progress=False)
    log = read_log(tmp_path)
    # token 8 gives a 4x4x4 grid at img_size 32; every earlier stage has another grid
    assert [tuple(r["patch"]) for r in log] == UNETR_SIZES
    assert [r["batch"] for r in log] == [2] * len(UNETR_SIZES)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert 0.0 <= result.best_dice <= 1.0
    # step 2 trained only on a 2x2x1 token grid: its update reached the 4x4x4 position
    # embeddings through the interpolation (an Adam step moves each by about lr = 1e-3)
    key = "vit.patch_embedding.position_embeddings"
    moved = weights(tmp_path / "model_stage1.pt")[key] - weights(tmp_path / "model_stage0.pt")[key]
    assert moved.abs().max() > 1e-4

    model = load_model(tmp_path, device="cpu")
    assert model.window(None) == (32, 32, 32)
    ds = load_dataset(tiny_abdomen)
    volume, _ = load_case(ds.test[0], ds.ndim, ds.labels)
    probs = model.probabilities(volume)
    assert probs.shape == (ds.num_classes, *volume.spatial_shape)
    assert abs(float(probs.sum(0).mean()) - 1.0) < 1e-4


def test_cli_schedule_json_gives_the_papers_batches() -> None:
    args = ["schedule", "--max", "128,128,128", "--pools", "5,5,5", "--mode", "performance"]
    result = CliRunner().invoke(app, [*args, "--batch", "2", "--steps", "1000", "--json"])
    assert result.exit_code == 0, f"{result.stderr}\n{result.exception!r}"
    plan = json.loads(result.stdout)
    stages = plan["stages"]
    assert [s["batch"] for s in stages] == [24, 12, 6, 4, 3, 2, 2, 2, 2]
    assert [tuple(s["patch"]) for s in stages] == PAPER_SIZES
    # 1000 // 9 = 111 steps per stage, the remainder in the last
    assert [s["steps"] for s in stages] == [111] * 8 + [112]
    assert plan["spec"] == "progressive:performance:128x128x128" and plan["foreground_ratio"] == 0.5
