"""Segment-then-segment end to end: the CLI on 2D cells, the Python API and the benchmark's scoring in 3D."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import run_cli
from flexpatch.cascade.config import CascadeConfig
from flexpatch.cascade.infer import load_cascade
from flexpatch.cascade.train import train_cascade
from flexpatch.cli import app
from flexpatch.data.dataset import load_case, load_dataset
from flexpatch.data.io import read_image, read_label
from flexpatch.data.phantom import make_phantom
from flexpatch.errors import FlexPatchError

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}  # divisor 4


def invoke(*args: object) -> dict:
    """Run the CLI in-process and parse its ``--json`` output."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.stderr}\n{result.exception!r}"
    return json.loads(result.stdout)


def numpy_dice(pred: np.ndarray, label: np.ndarray) -> float:
    """Foreground Dice by hand, the reference the library's metrics are checked against."""
    p, t = pred > 0, label > 0
    return 2 * np.count_nonzero(p & t) / (np.count_nonzero(p) + np.count_nonzero(t))


@pytest.fixture(scope="module")
def benchmark() -> ModuleType:
    """benchmarks/segment_then_segment.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "segment_then_segment", ROOT / "benchmarks" / "segment_then_segment.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64^2 cells phantom written by the CLI: 4 training and 2 test images."""
    out = tmp_path_factory.mktemp("sts_cli") / "cells"
    args = ("--kind", "cells", "--ndim", 2, "--shape", "64,64", "--cases", 4, "--test-cases", 2, "--json")
    assert invoke("phantom", out, *args) == {"dataset_dir": str(out)}
    return out


def test_cli_trains_predicts_and_evaluates_a_cascade(cells: Path, tmp_path: Path) -> None:
    model, pred = tmp_path / "sts", tmp_path / "pred"
    summary = invoke(
        "train", cells, "--out", model, "--cascade", "sts", "--input-size", 16, "--steps", 3,
        "--batch", 2, "--device", "cpu", "--options", '{"channels": 8}',
        "--cascade-options", '{"jitter": 4, "min_side": 3, "fine_steps": 2}', "--json",
    )  # fmt: skip
    assert summary["model_dir"] == str(model) and summary["steps"] == 5  # 3 rough + 2 fine
    saved = json.loads((model / "cascade.json").read_text())
    assert saved["min_side"] == 3 and saved["config"]["jitter"] == 4 and saved["config"]["fine_steps"] == 2
    for stage in ("rough", "fine"):  # --options reach both networks
        assert json.loads((model / stage / "model.json").read_text())["kwargs"]["channels"] == 8
    assert 0 <= summary["best_val_dice"] <= 1 and 0 <= summary["baseline_val_dice"] <= 1
    assert (model / "cascade.json").is_file() and (model / "rough").is_dir() and (model / "fine").is_dir()

    written = invoke("predict", model, cells / "imagesTs", "--out", pred, "--device", "cpu", "--json")
    names = sorted(Path(p).name for p in written["segmentations"])
    assert names == ["phantom_test_000.nii.gz", "phantom_test_001.nii.gz"]
    # boxes.json is written by the cascade path only: the folder was recognised as a cascade
    boxes = json.loads((pred / "boxes.json").read_text())
    assert sorted(boxes) == ["phantom_test_000", "phantom_test_001"]
    cascade = load_cascade(model, device="cpu")
    for name in names:
        image = read_image(cells / "imagesTs" / name.replace(".nii.gz", "_0000.nii.gz"), ndim=2)
        seg = read_label(pred / name, ndim=2)
        # on the input grid: same shape and affine; binary, and what the Python API gives
        assert seg.spatial_shape == image.spatial_shape and np.allclose(seg.affine, image.affine)
        assert set(np.unique(seg.data)) <= {0, 1}
        expected = cascade.predict(image, tta="auto")  # predict's default: mirrored when trained so
        assert np.array_equal(seg.data, expected.labels)
        case = name.removesuffix(".nii.gz")
        assert len(boxes[case]) == len(expected.boxes)
        for box in boxes[case]:  # every crop inside the (preprocessed, here identical) grid
            assert all(
                s >= 0 and s + w <= n for s, w, n in zip(box["start"], box["size"], (64, 64), strict=True)
            )

    # the other fusion and the paper's baseline, from the command line, as the Python API gives them
    image = read_image(cells / "imagesTs" / names[0].replace(".nii.gz", "_0000.nii.gz"), ndim=2)
    for flags, kwargs in ((["--fuse", "max"], {"fuse": "max"}), (["--baseline"], {"baseline": True})):
        other = tmp_path / flags[-1].strip("-")
        invoke("predict", model, cells / "imagesTs", "--out", other, *flags, "--device", "cpu", "--json")
        expected = cascade.predict(image, tta="auto", **kwargs)
        assert np.array_equal(read_label(other / names[0], ndim=2).data, expected.labels)
        if "baseline" in kwargs:
            assert not expected.boxes and not json.loads((other / "boxes.json").read_text())[names[0][:-7]]

    refused = CliRunner().invoke(app, ["predict", str(model), str(cells / "imagesTs"), "--out",
                                       str(tmp_path / "m"), "--memory", "1GB"])  # fmt: skip
    assert "--memory is for sliding-window models and patchworks" in str(refused.exception)
    assert not (tmp_path / "m").exists()

    report = invoke(
        "evaluate", pred, cells / "labelsTs", "--labels-from", cells / "dataset.json", "--no-hd95", "--json"
    )
    assert report["metrics"] == ["dice", "iou", "precision", "recall"]
    for row in report["per_case"]:
        assert row["class"] == "nucleus" and row["label"] == 1
        ours = read_label(pred / f"{row['case']}.nii.gz", 2).data
        truth = read_label(cells / "labelsTs" / f"{row['case']}.nii.gz", 2).data
        assert row["dice"] == pytest.approx(numpy_dice(ours, truth))


def test_cascade_options_on_a_plain_model_are_refused(cells: Path, tmp_path: Path) -> None:
    model = tmp_path / "plain"
    invoke("train", cells, "--out", model, "--patch", "16", "--steps", 1, "--batch", 1, "--val-every", 1,
           "--options", '{"channels": 4, "levels": 2, "convs_per_level": 2}', "--workers", 0,
           "--device", "cpu", "--json")  # fmt: skip
    result = CliRunner().invoke(app, ["predict", str(model), str(cells / "imagesTs"), "--out",
                                      str(tmp_path / "p"), "--fuse", "max", "--device", "cpu"])  # fmt: skip
    # CliRunner calls the app itself; flexpatch.cli.main turns this error into one line and exit code 2
    assert isinstance(result.exception, FlexPatchError)
    assert "--fuse and --baseline are for segment-then-segment models" in str(result.exception)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("options", "needle"),
    [('{"steps": 5}', "flag-only setting(s) steps"), ('{"jiter": 5}', "jiter; it takes"),
     ('{"min_side": "a"}', "--cascade-options: "), ('[1]', "must be a JSON object")],
    ids=["flag-only", "unknown", "wrong-type", "not-object"],
)  # fmt: skip
def test_bad_cascade_options_are_one_line_errors(
    cells: Path, tmp_path: Path, options: str, needle: str
) -> None:
    args = ["train", str(cells), "--out", str(tmp_path / "m"), "--cascade-options", options]
    result = CliRunner().invoke(app, args)  # without --cascade: refused whatever the options
    assert isinstance(result.exception, FlexPatchError) and "is for --cascade sts" in str(result.exception)
    args += ["--cascade", "sts"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, FlexPatchError) and needle in str(result.exception)
    assert "\n" not in str(result.exception) and not (tmp_path / "m").exists()


def test_unknown_cascade_exits_2_with_one_line(cells: Path, tmp_path: Path) -> None:
    proc = run_cli("train", cells, "--out", tmp_path / "m", "--cascade", "patchwork", "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "'patchwork'" in lines[0] and "'sts'" in lines[0]
    assert not (tmp_path / "m").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def lesions(tmp_path_factory: pytest.TempPathFactory, benchmark: ModuleType) -> tuple[Path, Path]:
    """A 32^3 abdomen phantom and the benchmark's lesion-vs-rest copy of it."""
    root = tmp_path_factory.mktemp("sts_3d")
    abdomen = make_phantom(
        root / "abdomen", cases=3, shape=(32,) * 3, ndim=3, seed=0, test_cases=6,
        spacing=(6.0,) * 3, lesion_radius=(2.0, 4.0), progress=False,
    )  # fmt: skip
    return abdomen, benchmark.lesion_dataset(abdomen, root / "lesions")


def test_lesion_dataset_is_binary_and_keeps_test_cases_with_lesions(lesions: tuple[Path, Path]) -> None:
    abdomen, out = lesions
    src, ds = load_dataset(abdomen), load_dataset(out)
    assert ds.labels == {"background": 0, "lesion": 1} and ds.ndim == 3
    assert [c.id for c in ds.training] == [c.id for c in src.training]
    with_lesion = [c.id for c in src.test if (read_label(c.label, 3).data == 6).any()]
    assert [c.id for c in ds.test] == with_lesion and 0 < len(with_lesion) < len(src.test)
    for case in (*ds.training, *ds.test):
        original = next(c for c in (*src.training, *src.test) if c.id == case.id)
        assert np.array_equal(read_label(case.label, 3).data, read_label(original.label, 3).data == 6)
        assert case.images[0].read_bytes() == original.images[0].read_bytes()


def test_3d_cascade_api_and_benchmark_scores(
    lesions: tuple[Path, Path], tmp_path: Path, benchmark: ModuleType
) -> None:
    _, data = lesions
    config = CascadeConfig.of(
        input_size=16, steps=2, batch=2, jitter=2, val_every=2, model_kwargs=TINY, min_side=2
    )
    summary = train_cascade(data, tmp_path / "sts", config, device="cpu", progress=False)
    assert summary["steps"] == 4 and np.isfinite(summary["last_loss"])
    cascade = load_cascade(tmp_path / "sts", device="cpu")
    assert cascade.input_size == 16 and cascade.rules["min_side"] == 2
    cases = list(load_dataset(data).test)
    dice = {"baseline": [], "cascade": []}
    for case in cases:
        volume, label = load_case(case, 3)
        for method in dice:
            seg = cascade.predict(volume, baseline=method == "baseline")
            assert seg.labels.shape == volume.spatial_shape == label.spatial_shape
            assert seg.probabilities.shape == (2, *volume.spatial_shape)
            assert np.allclose(seg.probabilities.sum(0), 1, atol=1e-4)
            assert set(np.unique(seg.labels)) <= {0, 1}
            if method == "baseline":
                assert seg.boxes == []
            for _, box in seg.boxes:  # 32^3 at 6 mm: the preprocessed grid is the input grid
                assert all(s >= 0 and s + w <= 32 for s, w in zip(box.start, box.size, strict=True))
            dice[method].append(numpy_dice(seg.labels, label.data))
    scores = benchmark.score(cascade, cases, 3, torch.device("cpu"), cpu_memory=False)
    for method, values in dice.items():
        row = scores[method]
        assert row["dice"] == pytest.approx(np.mean(values)) and row["images"] == len(cases)
        assert row["dice_std"] == pytest.approx(np.std(values)) and row["seconds"] > 0
        assert np.isnan(row["peak_mib"])  # CPU memory is measured in a subprocess, switched off here
    # seeded: the rough mask of this run yields crops, so the fine pass and the fusion ran too
    assert scores["baseline"]["boxes"] == 0 and scores["cascade"]["boxes"] > 0


def test_benchmark_targets_and_table(benchmark: ModuleType) -> None:
    def row(task: str, size: int, method: str, dice: float, recall: float) -> dict:
        return {"task": task, "S": size, "method": method, "dice": dice, "dice_std": 0.1, "iou": 0.5,
                "precision": 0.6, "recall": recall, "boxes": 3.0, "seconds": 0.2, "peak_mib": 12.0,
                "val_dice": 0.4}  # fmt: skip

    rows = [
        row("cells 2D", 32, "baseline", 0.573, 0.6), row("cells 2D", 32, "cascade", 0.806, 0.8),
        row("cells 2D", 64, "baseline", 0.7, 0.7), row("cells 2D", 64, "cascade", 0.7, 0.6),
        row("lesions 3D", 32, "baseline", 0.5, 0.6), row("lesions 3D", 32, "cascade", 0.75, 0.5),
    ]  # fmt: skip
    cells, lesions = benchmark.targets(rows)
    assert "+0.233" in cells and cells.endswith(": met)")  # the paper's own numbers meet it
    assert "+0.250" in lesions and lesions.endswith(": MISSED)")  # higher Dice, lower recall
    table = benchmark.results_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and "| cells 2D | 32 | cascade | 0.806 ± 0.100 |" in table[3]


def test_cli_resumes_an_interrupted_cascade(tiny_cells, tmp_path):
    config = CascadeConfig.of(input_size=16, steps=2, batch=2, jitter=4, val_every=2, min_side=2,
                           model_kwargs={"channels": 4, "levels": 2, "convs_per_level": 2})  # fmt: skip
    train_cascade(tiny_cells, tmp_path / "sts", config, device="cpu", progress=False, stop_after=3)
    assert not (tmp_path / "sts" / "cascade.json").exists()
    proc = run_cli("train", tiny_cells, "--out", tmp_path / "sts", "--resume", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 4 and (tmp_path / "sts" / "cascade.json").is_file()
