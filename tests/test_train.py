"""End-to-end training on the tiny phantoms: exact resume, model folders, logs, schedules, early errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flexpatch.checkpoint import BEST, LAST, load_checkpoint
from flexpatch.errors import FlexPatchError
from flexpatch.train import loop
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

torch.set_num_threads(1)

# a 2-level U-Net with 4 channels: divisor 4, a few thousand weights, milliseconds per step
TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}
# dropout makes the loss depend on torch's RNG, so resume must restore it at the right moment
DROPOUT = {"strides": [1, 2, 2], "filters": [4, 8, 8], "dropout": 0.3}
STEPS, VAL_EVERY, LR = 6, 2, 1e-3


def tiny_config(**changes) -> TrainConfig:
    base = TrainConfig(
        model="unet",
        model_kwargs=TINY,
        patch="16",
        steps=STEPS,
        batch=2,
        lr=LR,
        val_every=VAL_EVERY,
        workers=0,
    )
    return base.replace(**changes)


def read_log(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_runs(tiny_abdomen: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs (workers 0) that interrupted-and-resumed runs must reproduce."""
    out = {}
    for name, config in (
        ("unet", tiny_config()),
        ("dropout", tiny_config(model="dynunet", model_kwargs=DROPOUT)),
    ):
        out[name] = tmp_path_factory.mktemp(f"ref_{name}")
        train(tiny_abdomen, out[name], config, device="cpu", progress=False)
    return out


@pytest.mark.parametrize(
    ("model", "workers", "stop"),
    [("unet", 0, 3), ("unet", 2, 4), ("dropout", 0, 3)],
    ids=["workers0", "workers2", "dropout-rng"],
)
def test_resume_reproduces_the_uninterrupted_run(
    tiny_abdomen: Path, reference_runs: dict[str, Path], tmp_path: Path, model: str, workers: int, stop: int
) -> None:
    ref_dir = reference_runs[model]
    config = TrainConfig.from_json(json.loads((ref_dir / "config.json").read_text()))
    interrupted = config.replace(workers=workers)
    first = train(tiny_abdomen, tmp_path, interrupted, device="cpu", progress=False, stop_after=stop)
    assert first.steps == stop
    assert load_checkpoint(tmp_path / LAST)["step"] == stop
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, stop + 1))

    train(tiny_abdomen, tmp_path, interrupted, resume=True, device="cpu", progress=False)
    ref, got = read_log(ref_dir), read_log(tmp_path)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    # exact equality: the same batches, weights, optimiser moments and RNG draws
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    assert [r.get("val_dice") for r in got] == [r.get("val_dice") for r in ref]
    ref_weights, weights = (load_checkpoint(d / LAST)["model"] for d in (ref_dir, tmp_path))
    assert all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)


def test_model_folder_is_self_contained(reference_runs: dict[str, Path], tmp_path: Path) -> None:
    from flexpatch import load_model  # the public entry point

    ref = reference_runs["unet"]
    names = {p.name for p in ref.iterdir()}
    assert names == {
        "config.json",
        "plan.json",
        "fingerprint.json",
        "model.json",
        "dataset.json",
        BEST,
        LAST,
        "log.jsonl",
        "progress.png",  # the training curves, drawn from log.jsonl
        "method.json",
        "postprocessing.json",
    }
    assert not [p for p in ref.iterdir() if p.name.startswith(".tmp-")]
    assert TrainConfig.from_json(json.loads((ref / "config.json").read_text())) == tiny_config()

    last = load_checkpoint(ref / LAST)
    assert {"model", "optimizer", "scheduler", "step", "best", "rng", "config"} <= set(last)
    assert last["step"] == STEPS
    best = load_checkpoint(ref / BEST)
    log = read_log(ref)
    best_val = max(r["val_mean"] for r in log if "val_mean" in r)
    assert best["val_mean"] == pytest.approx(best_val) == last["best"]
    assert best["step"] == next(r["step"] for r in log if r.get("val_mean") == best_val)

    # a copy of the folder, far from the dataset, is all that predict needs
    moved = shutil.copytree(ref, tmp_path / "moved")
    model = load_model(moved, device="cpu")
    assert model.spec.name == "unet" and model.plan.ndim == 3 and model.train_patch == (16, 16, 16)
    for key, value in best["model"].items():
        assert torch.equal(model.net.state_dict()[key], value)


def test_log_has_validation_dice_every_val_every_steps(reference_runs: dict[str, Path]) -> None:
    plan = json.loads((reference_runs["unet"] / "plan.json").read_text())
    foreground = sorted(str(v) for v in plan["labels"].values() if v)
    for record in read_log(reference_runs["unet"]):
        assert set(record) >= {"step", "loss", "lr", "patch"} and record["patch"] == [16, 16, 16]
        has_val = record["step"] % VAL_EVERY == 0 or record["step"] == STEPS
        assert ("val_dice" in record) == has_val
        if has_val:
            assert sorted(record["val_dice"]) == foreground
            assert all(0.0 <= d <= 1.0 for d in record["val_dice"].values())
            assert record["val_mean"] == pytest.approx(sum(record["val_dice"].values()) / len(foreground))


def test_poly_learning_rate_decays_to_zero(reference_runs: dict[str, Path]) -> None:
    lrs = [r["lr"] for r in read_log(reference_runs["unet"])]
    # the lr logged after step s is lr0 * (1 - s / steps) ** 0.9 (nnU-Net's poly schedule)
    expected = [LR * (1 - s / STEPS) ** 0.9 for s in range(1, STEPS + 1)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lrs[-1] == 0.0


def test_sgd_optimizer(tiny_abdomen: Path, tmp_path: Path) -> None:
    config = tiny_config(optimizer="sgd", lr=1e-2, steps=2)
    result = train(tiny_abdomen, tmp_path, config, device="cpu", progress=False)
    opt = load_checkpoint(tmp_path / LAST)["optimizer"]
    group = opt["param_groups"][0]
    assert group["nesterov"] is True and group["momentum"] == 0.99
    assert group["weight_decay"] == config.weight_decay
    assert all("momentum_buffer" in s for s in opt["state"].values())
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.last_loss))
    assert read_log(tmp_path)[-1]["lr"] == 0.0


def test_2d_training_on_cells(tiny_cells: Path, tmp_path: Path) -> None:
    config = tiny_config(patch="32", steps=2, val_every=1)
    result = train(tiny_cells, tmp_path, config, device="cpu", progress=False)
    plan = json.loads((tmp_path / "plan.json").read_text())
    spec = json.loads((tmp_path / "model.json").read_text())
    assert plan["ndim"] == 2 and spec["ndim"] == 2 and spec["out_channels"] == 2
    log = read_log(tmp_path)
    assert [r["patch"] for r in log] == [[32, 32], [32, 32]]
    assert all(set(r["val_dice"]) == {"1"} for r in log)
    assert 0.0 <= result.best_dice <= 1.0


def test_uniform_patch_spec_trains_on_varying_sizes(tiny_abdomen: Path, tmp_path: Path) -> None:
    config = tiny_config(patch="uniform:8-32", steps=6, val_every=6)
    train(tiny_abdomen, tmp_path, config, device="cpu", progress=False)
    sizes = [tuple(r["patch"]) for r in read_log(tmp_path)]
    assert len(set(sizes)) > 1
    assert all(8 <= s <= 32 and s % 4 == 0 for size in sizes for s in size)
    # anisotropic draws too: the axes are drawn independently
    assert any(len(set(size)) > 1 for size in sizes)


@pytest.fixture
def no_preprocessing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and forbid) any call of the slow fingerprint/preprocessing stage."""
    calls: list[str] = []

    def forbidden(*args, **kwargs):
        calls.append("prepare")
        raise AssertionError("prepare ran before the inputs were checked")

    monkeypatch.setattr(loop, "prepare", forbidden)
    return calls


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"model": "nosuchnet"}, "unknown model 'nosuchnet'"),
        ({"model_kwargs": {"levels": 2, "colour": "red"}}, "colour"),
        ({"patch": "18"}, "nearest valid sizes 16 or 20"),
        ({"patch": "0"}, "must be positive"),
        ({"patch": "16,16"}, "has 2 axes but the data are 3D"),
        ({"val_patch": (18, 16, 16)}, "16 or 20 on axis 0"),
    ],
)
def test_bad_model_or_patch_fails_before_preprocessing(
    tiny_abdomen: Path, tmp_path: Path, no_preprocessing: list[str], changes: dict, needle: str
) -> None:
    out = tmp_path / "model"
    with pytest.raises(FlexPatchError, match=needle):
        train(tiny_abdomen, out, tiny_config(**changes), device="cpu", progress=False)
    assert no_preprocessing == []
    assert not out.exists()  # nothing half-written


def test_unwritable_model_folder_fails_before_preprocessing(
    tiny_abdomen: Path, tmp_path: Path, no_preprocessing: list[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(FlexPatchError, match=f"{blocker}.*is a file"):
        train(tiny_abdomen, blocker / "model", tiny_config(), device="cpu", progress=False)
    assert no_preprocessing == []


def test_resume_needs_a_checkpoint_and_the_same_config(tiny_abdomen: Path, tmp_path: Path) -> None:
    with pytest.raises(FlexPatchError, match="nothing to resume from"):
        train(tiny_abdomen, tmp_path / "none", tiny_config(), resume=True, device="cpu", progress=False)
    config = tiny_config(steps=2)
    train(tiny_abdomen, tmp_path, config, device="cpu", progress=False, stop_after=1)
    # more steps may be asked for on resume, another learning rate not
    with pytest.raises(FlexPatchError, match="different lr"):
        train(tiny_abdomen, tmp_path, config.replace(steps=3, lr=0.5), resume=True, progress=False)
    # the saved config is used when none is given; workers may change
    result = train(tiny_abdomen, tmp_path, None, resume=True, device="cpu", progress=False)
    assert result.steps == 2 and [r["step"] for r in read_log(tmp_path)] == [1, 2]
    # resuming a finished run does nothing and keeps the log
    again = train(
        tiny_abdomen, tmp_path, config.replace(workers=1), resume=True, device="cpu", progress=False
    )
    assert again.steps == 2 and len(read_log(tmp_path)) == 2


def test_resume_with_more_steps_extends_a_finished_run(tiny_abdomen: Path, tmp_path: Path) -> None:
    train(tiny_abdomen, tmp_path, tiny_config(steps=2), device="cpu", progress=False)
    with pytest.raises(FlexPatchError, match="2 steps are done already, steps=1"):
        train(tiny_abdomen, tmp_path, resume=True, changes={"steps": 1}, device="cpu", progress=False)
    with pytest.raises(FlexPatchError, match="cannot change lr"):
        train(tiny_abdomen, tmp_path, resume=True, changes={"lr": 0.1}, device="cpu", progress=False)
    longer = train(tiny_abdomen, tmp_path, resume=True, changes={"steps": 3}, device="cpu", progress=False)
    assert longer.steps == 3 and [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 3
    assert load_checkpoint(tmp_path / LAST)["config"]["steps"] == 3


def test_a_new_run_never_replaces_another_runs_folder(tiny_abdomen: Path, tmp_path: Path) -> None:
    train(tiny_abdomen, tmp_path, tiny_config(steps=1), device="cpu", progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(FlexPatchError, match="not empty .* use --resume .* or --overwrite"):
        train(tiny_abdomen, tmp_path, tiny_config(steps=2), device="cpu", progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    # a folder that is not a model folder is not emptied, even with overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FlexPatchError, match="not a flexpatch model folder"):
        train(tiny_abdomen, foreign, tiny_config(steps=1), device="cpu", progress=False, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    # a killed run's temporary file is cleaned up on the next run in that folder
    (tmp_path / ".tmp-abc.pt").write_bytes(b"half")
    train(tiny_abdomen, tmp_path, tiny_config(steps=1), device="cpu", progress=False, resume=True)
    assert not (tmp_path / ".tmp-abc.pt").exists()


def test_new_run_in_an_old_folder_measures_the_new_dataset(
    tiny_abdomen: Path, tiny_cells: Path, tmp_path: Path
) -> None:
    train(tiny_abdomen, tmp_path, tiny_config(steps=1), device="cpu", progress=False)
    train(tiny_cells, tmp_path, tiny_config(steps=1), device="cpu", progress=False, overwrite=True)
    plan = json.loads((tmp_path / "plan.json").read_text())
    fingerprint = json.loads((tmp_path / "fingerprint.json").read_text())
    assert plan["ndim"] == 2 and len(fingerprint["median_spacing"]) == 2
    assert [r["step"] for r in read_log(tmp_path)] == [1]


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"batch": 0}, "batch must be >= 1"),
        ({"lr": 0.0}, "learning rate must be > 0"),
        ({"optimizer": "adam"}, "unknown optimizer 'adam'; choose one of adamw, sgd"),
        ({"workers": -1}, "workers must be >= 0"),
        ({"val_overlap": 1.0}, r"val_overlap must be in \[0, 1\)"),
        ({"foreground_ratio": 1.5}, r"foreground ratio must be in \[0, 1\]"),
    ],
)
def test_config_rejects_bad_values(changes: dict, needle: str) -> None:
    with pytest.raises(FlexPatchError, match=needle):
        tiny_config(**changes)


def test_config_round_trips_through_json() -> None:
    config = tiny_config(val_patch=(32, 32, 16), target_spacing=(1.5, 1.5, 3.0))
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert tiny_config(val_patch=(32,)).validation_patch(3) == (32, 32, 32)
    assert config.validation_patch(3) == (32, 32, 16) and tiny_config().validation_patch(2) is None
