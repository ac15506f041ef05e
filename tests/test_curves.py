"""Training curves: records -> series (hand-made logs of every method, old ones included),
progress.png drawn at each validation of real tiny runs (core 2D/3D, cascade, patchwork), the same
picture redrawn from the log, TensorBoard event files, and a resumed run's curves continuing."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from flexpatch.cascade.config import CascadeConfig
from flexpatch.cascade.train import train_cascade
from flexpatch.errors import FlexPatchError
from flexpatch.patchwork.config import PatchworkConfig
from flexpatch.patchwork.train import train_patchwork
from flexpatch.train import curves
from flexpatch.train.config import TrainConfig
from flexpatch.train.curves import (
    check_tensorboard,
    read_records,
    redraw,
    series,
    tensorboard_logging,
    tensorboard_tag,
)
from flexpatch.train.loop import train

torch.set_num_threads(1)

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")


def core_records() -> list[dict]:
    """A core trainer's log: random patch sizes, a skipped step, validation every 2 steps."""
    return [
        {"step": 1, "loss": 1.5, "lr": 1e-3, "patch": [16, 32], "batch": 2},
        {"step": 2, "loss": 1.25, "lr": 9e-4, "patch": [32, 32], "batch": 2,
         "val_dice": {"1": 0.25, "2": 0.75}, "val_mean": 0.5},
        {"step": 3, "loss": float("inf"), "lr": 8e-4, "patch": [16, 16], "batch": 2, "skipped": True},
        {"step": 4, "loss": 1.0, "lr": 7e-4, "patch": [32, 16], "batch": 2,
         "val_dice": {"1": 0.5, "2": float("nan")}, "val_mean": 0.5},
    ]  # fmt: skip


def test_series_of_a_core_log_has_every_panel() -> None:
    got = series(core_records(), {"1": "liver", "2": "spleen"})
    assert got.unit == "step" and got.stages == [] and got.last == 4.0
    xs, ys = got.panels["loss"]["train"]
    assert list(got.panels["loss"]) == ["train"]
    assert xs == [1, 2, 3, 4] and ys[:2] + ys[3:] == [1.5, 1.25, 1.0] and math.isnan(ys[2])  # inf: a gap
    assert got.panels["lr"] == {"lr": ([1, 2, 3, 4], [1e-3, 9e-4, 8e-4, 7e-4])}
    dice = got.panels["dice"]
    assert list(dice) == ["liver", "spleen", "mean"]
    assert dice["liver"] == ([2, 4], [0.25, 0.5]) and dice["mean"] == ([2, 4], [0.5, 0.5])
    assert dice["spleen"][1][0] == 0.75 and math.isnan(dice["spleen"][1][1])
    assert got.panels["patch"] == {
        "axis 0": ([1, 2, 3, 4], [16, 32, 16, 32]),
        "axis 1": ([1, 2, 3, 4], [32, 32, 16, 16]),
    }
    assert got.shown() == ["loss", "dice", "lr", "patch"]


def test_a_fixed_patch_draws_no_patch_panel_and_an_old_record_still_reads() -> None:
    fixed = [{**r, "patch": [32, 32]} for r in core_records()]
    assert series(fixed).shown() == ["loss", "dice", "lr"]
    # an older record: no patch, no lr, no val_mean (the mean is the classes' NaN-free mean)
    old = series([{"step": 5, "loss": 0.5, "val_dice": {"1": 0.2, "2": float("nan"), "3": 0.4}}])
    assert old.panels["dice"]["mean"] == ([5], [pytest.approx(0.3)])
    assert old.shown() == ["loss", "dice"]
    # records without a step (a foreign line) are none; a log line cut short is skipped on reading
    assert series([{"note": "x"}]).panels == {}


def test_cascade_stages_continue_on_one_axis_and_old_cascade_logs_read(tmp_path: Path) -> None:
    log = [
        {"stage": "rough", "step": 1, "loss": 2.0, "lr": 1e-3},
        {"stage": "rough", "step": 2, "loss": 1.5, "lr": 5e-4, "val_dice": 0.25},  # an older cascade's float
        {"stage": "fine", "step": 1, "loss": 1.0, "lr": 1e-3},
        {"stage": "fine", "step": 2, "loss": 0.5, "lr": 5e-4, "val_dice": {"1": 0.5}, "val_mean": 0.5},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"stage": "fi')
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "cell": 1}}))
    got = series(read_records(tmp_path), curves.class_names(tmp_path))
    assert got.stages == [(0.0, "rough"), (2.0, "fine")] and got.last == 4.0
    assert got.panels["loss"] == {"train (rough)": ([1, 2], [2.0, 1.5]), "train (fine)": ([3, 4], [1.0, 0.5])}
    assert got.panels["dice"] == {
        "mean (rough)": ([2], [0.25]),
        "cell (fine)": ([4], [0.5]),
        "mean (fine)": ([4], [0.5]),
    }
    assert tensorboard_tag("dice", "cell (fine)") == "dice/fine/cell"
    assert tensorboard_tag("dice", "whole tumor") == "dice/whole_tumor"


def test_patchwork_rounds_count_from_one(tmp_path: Path) -> None:
    log = [
        {"round": 0, "loss": 0.9, "patches": 8, "seconds": 1.0},  # an older round: no lr
        {
            "round": 1,
            "loss": 0.7,
            "lr": 1e-3,
            "patches": 8,
            "seconds": 2.0,
            "val_dice": {"1": 0.4},
            "val_mean": 0.4,
        },
    ]
    (tmp_path / "log.json").write_text(json.dumps(log))
    got = series(read_records(tmp_path))
    assert got.unit == "round" and got.panels["loss"]["train"] == ([1, 2], [0.9, 0.7])
    assert got.panels["lr"]["lr"] == ([2], [1e-3]) and got.panels["dice"]["1"] == ([2], [0.4])
    assert redraw(tmp_path)["records"] == 2
    assert (tmp_path / "progress.png").read_bytes().startswith(PNG_HEADER)
    with pytest.raises(FlexPatchError, match="no training log"):
        read_records(tmp_path / "nothing")


def core_config(patch: str, **changes: object) -> TrainConfig:
    return TrainConfig(model="unet", model_kwargs=TINY, patch=patch, steps=6, batch=2, val_every=2,
                       workers=0, **changes)  # fmt: skip


@pytest.fixture
def drawings(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, bytes, curves.Series]]:
    """Each drawing a run makes: its last step, the PNG's bytes and the series drawn."""
    made: list[tuple[float, bytes, curves.Series]] = []
    draw = curves.draw_progress

    def spy(got: curves.Series, path: Path, title: str = "") -> bool:
        done = draw(got, path, title)
        made.append((got.last, path.read_bytes(), got))
        return done

    monkeypatch.setattr(curves, "draw_progress", spy)
    return made


@pytest.mark.parametrize(("fixture", "patch"), [("tiny_cells", "uniform:16-32"), ("tiny_abdomen", "16")])
def test_training_draws_progress_at_each_validation_and_the_log_redraws_it(
    fixture: str, patch: str, request: pytest.FixtureRequest, tmp_path: Path, drawings: list
) -> None:
    model = tmp_path / "m"
    train(request.getfixturevalue(fixture), model, core_config(patch), device="cpu", progress=False)
    assert [d[0] for d in drawings] == [2, 4, 6]  # at validations only, not every step
    pngs = [d[1] for d in drawings]
    assert all(p.startswith(PNG_HEADER) for p in pngs) and len(set(pngs)) == 3  # it changes
    assert (model / "progress.png").read_bytes() == pngs[-1]
    panels = drawings[-1][2].shown()
    assert panels == (
        ["loss", "dice", "lr", "patch"] if patch.startswith("uniform") else ["loss", "dice", "lr"]
    )
    names = json.loads((model / "dataset.json").read_text())["labels"]
    assert list(drawings[-1][2].panels["dice"]) == [k for k in names if k != "background"] + ["mean"]
    # from the log alone: the same picture, byte for byte
    again = redraw(model, tmp_path / "again.png")
    assert again["records"] == 6 and (tmp_path / "again.png").read_bytes() == pngs[-1]


def test_a_resumed_run_continues_its_curves_without_duplicates(
    tiny_cells: Path, tmp_path: Path, drawings: list
) -> None:
    model, config = tmp_path / "resumed" / "m", core_config("uniform:16-32")
    train(tiny_cells, model, config, device="cpu", progress=False, stop_after=3)
    # a run killed after logging step 4 but before its next checkpoint: the resume drops that line
    with (model / "log.jsonl").open("a") as log:
        log.write(json.dumps({"step": 4, "loss": 99.0, "lr": 1.0}) + "\n")
    train(tiny_cells, model, config, device="cpu", progress=False, resume=True)
    last = drawings[-1][2]
    xs, ys = last.panels["loss"]["train"]
    assert xs == [1, 2, 3, 4, 5, 6] and 99.0 not in ys
    assert last.panels["dice"]["mean"][0] == [2, 4, 6]
    reference = tmp_path / "whole" / "m"  # the same name: the title names the folder
    train(tiny_cells, reference, config, device="cpu", progress=False)
    # the uninterrupted run's picture, byte for byte (an exact resume logs the same numbers)
    assert (model / "progress.png").read_bytes() == (reference / "progress.png").read_bytes()


def test_cascade_and_patchwork_draw_their_curves(tiny_cells: Path, tmp_path: Path, drawings: list) -> None:
    config = CascadeConfig.of(
        input_size=16, steps=3, batch=2, jitter=4, val_every=3, model_kwargs=TINY, min_side=2
    )
    with tensorboard_logging(HAS_TENSORBOARD):
        train_cascade(tiny_cells, tmp_path / "sts", config, device="cpu", progress=False)
    if HAS_TENSORBOARD:  # the fine stage's events go on after the rough stage's, which stay
        events = scalars(tmp_path / "sts" / "tensorboard")
        assert [s for s, _ in events["loss/rough/train"]] == [1, 2, 3]
        assert [s for s, _ in events["loss/fine/train"]] == [4, 5, 6]
    assert [d[0] for d in drawings] == [3, 6]  # each stage's validation, on one axis
    got = drawings[-1][2]
    assert got.stages == [(0.0, "rough"), (3.0, "fine")]
    assert set(got.panels["loss"]) == {"train (rough)", "train (fine)"}
    assert "mean (fine)" in got.panels["dice"] and any(
        k.endswith("(rough)") and k != "mean (rough)" for k in got.panels["dice"]
    )
    assert redraw(tmp_path / "sts", tmp_path / "sts.png")["records"] == 6
    assert (tmp_path / "sts.png").read_bytes() == (tmp_path / "sts" / "progress.png").read_bytes()

    scheme = {"depth": 2, "matrix": [[8, 8]], "fov_rel": [0.8, 0.8]}
    pw = PatchworkConfig(scheme=scheme, block_options=TINY, rounds=3, num_patches=3, batch_size=4, workers=0,
                         val_every=2, save_every=1)  # fmt: skip
    drawings.clear()
    train_patchwork(tiny_cells, tmp_path / "pw", pw, "cpu", False)
    assert [d[0] for d in drawings] == [2, 3]
    log = json.loads((tmp_path / "pw" / "log.json").read_text())
    assert all(r["lr"] == pw.lr for r in log)
    assert drawings[-1][2].unit == "round" and set(drawings[-1][2].panels) == {"loss", "lr", "dice"}
    redraw(tmp_path / "pw", tmp_path / "pw.png")
    assert (tmp_path / "pw.png").read_bytes() == (tmp_path / "pw" / "progress.png").read_bytes()


def test_tensorboard_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as uninstalled
    with pytest.raises(FlexPatchError, match=r"pip install 'flexpatch\[tensorboard\]'"):
        check_tensorboard()
    with pytest.raises(FlexPatchError), tensorboard_logging():
        pass


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_cli_tensorboard_without_it_is_one_line_error(tiny_cells: Path, tmp_path: Path) -> None:
    proc = run_cli("train", tiny_cells, "--out", tmp_path / "m", "--steps", "1", "--tensorboard")
    assert_one_line_error(proc, "tensorboard")
    assert not (tmp_path / "m").exists()


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@needs_tensorboard
def test_tensorboard_mirrors_the_log_and_a_resume_rebuilds_it(tiny_cells: Path, tmp_path: Path) -> None:
    model, config = tmp_path / "m", core_config("uniform:16-32")
    with tensorboard_logging():
        train(tiny_cells, model, config, device="cpu", progress=False, stop_after=3)
    assert [s for s, _ in scalars(model / "tensorboard")["loss/train"]] == [1, 2, 3]
    # a killed run's events past its checkpoint
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(model / "tensorboard")) as writer:
        writer.add_scalar("loss/train", 99.0, 4)
    with tensorboard_logging():
        train(tiny_cells, model, config, device="cpu", progress=False, resume=True)
    got = scalars(model / "tensorboard")
    log = read_records(model)
    assert got["loss/train"] == [(r["step"], pytest.approx(r["loss"])) for r in log]
    assert [s for s, _ in got["dice/mean"]] == [2, 4, 6] and "lr/lr" in got and "patch/axis_0" in got


@needs_tensorboard
def test_cli_curves_redraws_and_rebuilds_tensorboard(tiny_cells: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    train(tiny_cells, model, core_config("16"), device="cpu", progress=False)
    first = (model / "progress.png").read_bytes()
    (model / "progress.png").unlink()
    proc = run_cli("curves", model, "--tensorboard", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["records"] == 6 and (model / "progress.png").read_bytes() == first
    assert [s for s, _ in scalars(model / "tensorboard")["dice/mean"]] == [2, 4, 6]
    assert_one_line_error(run_cli("curves", tmp_path / "none"), "not a folder")
