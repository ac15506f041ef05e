"""The ``flexpatch`` command: happy paths in-process, the error contract as a real subprocess.

Error contract: a bad input gives exit code 2 and exactly one line on stderr,
``error: ...`` naming the file or size involved, without a traceback, and leaves
no partial output behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_one_line_error, run_cli
from flexpatch.cli import app

torch.set_num_threads(1)

CASE = "phantom_001"  # the case the dataset mutations damage


def invoke(*args: object) -> dict:
    """Run the CLI in-process and parse its ``--json`` output."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.stderr}\n{result.exception!r}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """phantom -> train -> predict -> evaluate through the CLI, in-process; the folders it made."""
    root = tmp_path_factory.mktemp("cli")
    ds, model, pred = root / "ds", root / "model", root / "pred"
    shape = "32,32,32"
    out = invoke(
        "phantom", ds, "--cases", 3, "--shape", shape, "--spacing", "6,6,6", "--test-cases", 1, "--json"
    )
    assert out == {"dataset_dir": str(ds)}
    train_args = ["--patch", "16", "--steps", 2, "--batch", 1, "--val-every", 2, "--val-patch", "32"]
    out = invoke("train", ds, "--out", model, *train_args, "--workers", 0, "--device", "cpu", "--json")
    flow = {"ds": ds, "model": model, "pred": pred, "train": out}
    flow["resume"] = invoke("train", ds, "--out", model, "--resume", "--device", "cpu", "--json")
    flow["predict"] = invoke(
        "predict",
        model,
        ds / "imagesTs",
        "--out",
        pred,
        "--patch-size",
        "48,48,48",
        "--overlap",
        0.5,
        "--blend",
        "gaussian",
        "--batch",
        4,
        "--device",
        "cpu",
        "--probabilities",
        "--json",
    )
    flow["evaluate"] = invoke(
        "evaluate", pred, ds / "labelsTs", "--labels-from", ds / "dataset.json", "--json"
    )
    return flow


def test_train_reports_json_and_writes_a_model_folder(flow: dict) -> None:
    assert flow["train"]["steps"] == 2 and flow["train"]["model_dir"] == str(flow["model"])
    assert 0.0 <= flow["train"]["best_val_dice"] <= 1.0 and flow["train"]["last_loss"] > 0
    assert {"model_best.pt", "model_last.pt", "config.json", "plan.json", "fingerprint.json"} <= {
        p.name for p in flow["model"].iterdir()
    }
    log = [json.loads(line) for line in (flow["model"] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and "val_dice" in log[1]
    config = json.loads((flow["model"] / "config.json").read_text())
    assert config["val_patch"] == [32] and config["patch"] == "16"
    # resuming a finished run: nothing to do, and valid JSON (null, not NaN, for the loss)
    assert flow["resume"]["steps"] == 2 and flow["resume"]["last_loss"] is None


def test_predict_writes_labels_on_the_input_grid(flow: dict) -> None:
    [seg_path] = map(Path, flow["predict"]["segmentations"])
    image = nib.load(str(flow["ds"] / "imagesTs" / "phantom_test_000_0000.nii.gz"))
    seg = nib.load(str(seg_path))
    assert seg_path == flow["pred"] / "phantom_test_000.nii.gz"
    assert seg.shape == image.shape and np.array_equal(seg.affine, image.affine)
    probs = nib.load(str(flow["pred"] / "probabilities" / "phantom_test_000.nii.gz"))
    assert probs.shape == (*image.shape, 7)
    np.testing.assert_allclose(np.asarray(probs.dataobj).sum(-1), 1.0, atol=1e-5)


def test_evaluate_json_scores_the_predictions(flow: dict) -> None:
    report = flow["evaluate"]
    assert report["summary"]["n_cases"] == 1
    assert set(report["summary"]["classes"]) == {
        "liver",
        "spleen",
        "stomach",
        "kidney_right",
        "kidney_left",
        "lesion",
    }
    liver = report["summary"]["classes"]["liver"]["dice"]["mean"]
    assert 0.0 <= liver <= 1.0


def test_models_json_lists_every_network_with_its_divisor() -> None:
    rows = invoke("models", "--json")
    assert rows["unet"] == {"divisor_3d": [8, 8, 8], "divisor_2d": [8, 8]}
    assert {"unet", "dynunet", "segresnet", "basicunet"} <= set(rows)


def test_help_is_instant_and_every_entry_point_works() -> None:
    start = time.perf_counter()
    proc = run_cli("--help")
    assert time.perf_counter() - start < 2.0
    assert proc.returncode == 0 and "predict" in proc.stdout and "train" in proc.stdout
    module = subprocess.run([sys.executable, "-m", "flexpatch.cli", "models", "--help"], capture_output=True)
    assert module.returncode == 0 and b"--json" in module.stdout
    script = Path(sys.executable).with_name("flexpatch")
    if script.exists():  # the console script of an installed package
        assert subprocess.run([script, "--help"], capture_output=True).returncode == 0


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["predict", "M", "IN", "--out", "O", "--overlap", "abc"], ["flexpatch predict: ", "'--overlap'"]),
        (["train", "DS", "--out", "M", "--nosuch", "1"], ["flexpatch train: ", "No such option: --nosuch"]),
        (["predict", "M", "--out", "O"], ["flexpatch predict: ", "Missing argument"]),
        (["nosuch"], ["flexpatch: ", "No such command 'nosuch'"]),
    ],
    ids=["bad-float", "unknown-option", "missing-argument", "unknown-command"],
)
def test_command_line_mistakes_are_one_line_errors(args: list[str], needles: list[str]) -> None:
    """What the parser refuses follows the error contract too: one line, exit code 2, no usage box."""
    proc = run_cli(*args)
    assert_one_line_error(proc, *needles)
    assert proc.stdout == ""


def test_help_of_a_command_exits_0() -> None:
    proc = run_cli("predict", "--help")
    assert proc.returncode == 0 and "--overlap" in proc.stdout and proc.stderr == ""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    ("name", "code", "line"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")]
)
def test_ctrl_c_and_sigterm_are_one_line(tmp_path: Path, name: str, code: int, line: str) -> None:
    import signal

    out = tmp_path / "ph"
    args = ["phantom", out, "--cases", 2000, "--shape", "32,32,32", "--test-cases", 0, "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flexpatch", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # Ctrl-C as a terminal sends it (a non-interactive shell's background job would ignore SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not (out / "labelsTr" / "phantom_000.nii.gz").exists():  # the command is running
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(getattr(signal, name))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code and stderr.splitlines() == [line] and stdout == "", stderr
    # what was being written when the signal came is removed, not left half-written
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


def test_cli_modules_import_only_downward() -> None:
    """The command modules share ``flexpatch.cli.common``; none imports the package that assembles them."""
    import ast

    import flexpatch.cli

    package = Path(flexpatch.cli.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        if path.stem in ("__init__", "__main__"):
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        assert "flexpatch.cli" not in names, f"{path.name} imports the package that imports it"
        imports[path.stem] = {n.split(".")[2] for n in names if n.startswith("flexpatch.cli.")} & {
            p.stem for p in package.glob("*.py")
        }
    done: set[str] = set()
    while len(done) < len(imports):  # peel off modules whose imports are all done: a cycle never peels
        ready = {m for m, deps in imports.items() if m not in done and deps <= done}
        assert ready, f"import cycle among {sorted(set(imports) - done)}"
        done |= ready
    assert imports["common"] == set()


# ---------------------------------------------------------------- bad datasets for train


def _rewrite(path: Path, fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    img = nib.load(str(path))
    data, affine = fn(np.asarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _label(ds: Path) -> Path:
    return ds / "labelsTr" / f"{CASE}.nii.gz"


def _image(ds: Path) -> Path:
    return ds / "imagesTr" / f"{CASE}_0000.nii.gz"


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a NIfTI file")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:2000])


def _shift(affine: np.ndarray) -> np.ndarray:
    affine[:3, 3] += 5.0
    return affine


def _set_voxel(data: np.ndarray, value: float) -> np.ndarray:
    data = data.astype(np.float32)
    data[3, 4, 5] = value
    return data


def _drop_labels_field(ds: Path) -> None:
    meta = json.loads((ds / "dataset.json").read_text())
    del meta["labels"]
    (ds / "dataset.json").write_text(json.dumps(meta))


def _empty(ds: Path) -> None:
    for f in (ds / "labelsTr").iterdir():
        f.unlink()


DATASET_FAULTS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing-image": (lambda ds: _image(ds).unlink(), [f"{CASE}_0000.nii.gz", "not found"]),
    "corrupt-label": (lambda ds: _corrupt(_label(ds)), [f"{CASE}.nii.gz", "not a readable NIfTI"]),
    "truncated-image": (lambda ds: _truncate(_image(ds)), [f"{CASE}_0000.nii.gz", "not a readable NIfTI"]),
    "label-shape": (
        lambda ds: _rewrite(_label(ds), lambda d, a: (d[:, :, :16], a)),
        [f"{CASE}.nii.gz", "label shape (32, 32, 16) differs"],
    ),
    "label-affine": (
        lambda ds: _rewrite(_label(ds), lambda d, a: (d, _shift(a))),
        [f"{CASE}.nii.gz", "affine"],
    ),
    "nan-image": (
        lambda ds: _rewrite(_image(ds), lambda d, a: (_set_voxel(d, np.nan), a)),
        [f"{CASE}_0000.nii.gz", "NaN or Inf"],
    ),
    "fractional-label": (
        lambda ds: _rewrite(_label(ds), lambda d, a: (_set_voxel(d, 0.5), a)),
        [f"{CASE}.nii.gz", "non-integer"],
    ),
    "undeclared-label": (
        lambda ds: _rewrite(_label(ds), lambda d, a: (_set_voxel(d, 9).astype(np.uint8), a)),
        [f"{CASE}.nii.gz", "[9] are not declared"],
    ),
    "dataset-json-field": (_drop_labels_field, ["dataset.json", "'labels'"]),
    "empty-dataset": (_empty, ["dataset.json", "no training cases"]),
}


@pytest.mark.parametrize("fault", list(DATASET_FAULTS))
def test_train_rejects_a_bad_dataset(flow: dict, tmp_path: Path, fault: str) -> None:
    ds = shutil.copytree(flow["ds"], tmp_path / "ds", ignore=shutil.ignore_patterns(".flexpatch_cache"))
    damage, needles = DATASET_FAULTS[fault]
    damage(ds)
    out = tmp_path / "model"
    proc = run_cli(
        "train", ds, "--out", out, "--patch", "16", "--steps", 1, "--workers", 0, "--device", "cpu"
    )
    assert_one_line_error(proc, *needles)
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--model", "nosuchnet"], ["unknown model 'nosuchnet'", "unet"]),
        (["--patch", "0"], ["patch size '0'", "positive"]),
        (["--patch", "20"], ["patch size 20", "nearest valid sizes 16 or 24"]),
        (["--options", "[1]"], ["--options '[1]'", "must be a JSON object"]),
        (["--options", "{token"], ["--options '{token'", "is not JSON"]),
        (["--options", '{"nosuch": 1}'], ["model unet", "'nosuch'", "'channels'"]),
    ],
    ids=["unknown-model", "patch-zero", "patch-not-divisible", "options-not-object", "options-not-json",
         "options-unknown"],
)  # fmt: skip
def test_train_rejects_bad_options(flow: dict, tmp_path: Path, args: list[str], needles: list[str]) -> None:
    proc = run_cli("train", flow["ds"], "--out", tmp_path / "m", "--steps", 1, "--device", "cpu", *args)
    assert_one_line_error(proc, *needles)


def test_train_options_configure_the_network(flow: dict, tmp_path: Path) -> None:
    """Seed 02 from the command line: a UNETR with token size 8, built from --options."""
    vit = {"token_size": 8, "img_size": 16, "hidden_size": 24, "mlp_dim": 48, "num_heads": 2, "num_layers": 1,
           "feature_size": 4}  # fmt: skip
    out = tmp_path / "vit"
    invoke("train", flow["ds"], "--out", out, "--model", "unetr", "--options", json.dumps(vit),
           "--patch", "16", "--steps", 1, "--batch", 1, "--val-every", 1, "--val-patch", "32", "--workers", 0,
           "--device", "cpu", "--json")  # fmt: skip
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"] == "unetr" and saved["model_kwargs"] == vit
    from flexpatch import load_model

    assert load_model(out, device="cpu").net.token_size == (8, 8, 8)


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """An output folder that cannot be written: read-only parent, or (as root, who ignores
    permissions) a parent that is a file."""
    if os.geteuid() != 0:
        parent = tmp_path / "read_only"
        parent.mkdir()
        parent.chmod(0o500)
        yield parent / "out"
        parent.chmod(0o700)
    else:
        parent = tmp_path / "a_file"
        parent.write_text("a file, not a folder")
        yield parent / "out"


def test_train_rejects_an_unwritable_model_folder(flow: dict, unwritable: Path) -> None:
    proc = run_cli("train", flow["ds"], "--out", unwritable, "--patch", "16", "--steps", 1, "--device", "cpu")
    assert_one_line_error(proc, str(unwritable))


# ---------------------------------------------------------------- bad inputs for predict


def _bad_input(tmp_path: Path, flow: dict, kind: str) -> Path:
    good = flow["ds"] / "imagesTs" / "phantom_test_000_0000.nii.gz"
    path = tmp_path / f"{kind}_0000.nii.gz"
    if kind == "corrupt":
        _corrupt(path)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes())
        _truncate(path)
    elif kind == "inf":
        shutil.copy(good, path)
        _rewrite(path, lambda d, a: (_set_voxel(d, np.inf), a))
    return path  # "missing": never written


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("missing", "file not found"),
        ("corrupt", "not a readable NIfTI"),
        ("truncated", "not a readable NIfTI"),
        ("inf", "NaN or Inf"),
    ],
)
def test_predict_rejects_a_bad_image_and_writes_nothing(
    flow: dict, tmp_path: Path, kind: str, needle: str
) -> None:
    image = _bad_input(tmp_path, flow, kind)
    out = tmp_path / "pred"
    out.mkdir()
    proc = run_cli("predict", flow["model"], image, "--out", out, "--patch-size", "16", "--device", "cpu")
    assert_one_line_error(proc, image.name, needle)
    assert list(out.iterdir()) == []  # no partial file, no .tmp-* left behind


def test_predict_keeps_finished_cases_whole_when_a_later_one_fails(flow: dict, tmp_path: Path) -> None:
    good = flow["ds"] / "imagesTs" / "phantom_test_000_0000.nii.gz"
    bad = _bad_input(tmp_path, flow, "truncated")
    out = tmp_path / "pred"
    proc = run_cli("predict", flow["model"], good, bad, "--out", out, "--patch-size", "16", "--device", "cpu")
    assert_one_line_error(proc, bad.name)
    assert [p.name for p in out.iterdir()] == ["phantom_test_000.nii.gz"]
    assert nib.load(str(out / "phantom_test_000.nii.gz")).shape == (32, 32, 32)


@pytest.mark.parametrize(
    ("size", "needles"),
    [("0", ["patch size '0'", "positive"]), ("20", ["(20, 20, 20)", "nearest valid sizes 16 or 24"])],
    ids=["zero", "not-divisible"],
)
def test_predict_rejects_a_bad_patch_size(flow: dict, tmp_path: Path, size: str, needles: list[str]) -> None:
    image = flow["ds"] / "imagesTs" / "phantom_test_000_0000.nii.gz"
    proc = run_cli(
        "predict", flow["model"], image, "--out", tmp_path / "p", "--patch-size", size, "--device", "cpu"
    )
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "p").exists()


def test_predict_rejects_an_unwritable_output_and_a_missing_model(
    flow: dict, tmp_path: Path, unwritable: Path
) -> None:
    image = flow["ds"] / "imagesTs" / "phantom_test_000_0000.nii.gz"
    proc = run_cli("predict", flow["model"], image, "--out", unwritable, "--device", "cpu")
    assert_one_line_error(proc, str(unwritable))
    proc = run_cli("predict", tmp_path / "no_model", image, "--out", tmp_path / "p", "--device", "cpu")
    assert_one_line_error(proc, "no_model", "model folder not found")


def test_train_never_replaces_a_folder_unasked_and_resume_steps_extends(flow: dict, tmp_path: Path) -> None:
    model = shutil.copytree(flow["model"], tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    args = ["--patch", "16", "--steps", 1, "--batch", 1, "--workers", 0, "--device", "cpu"]
    assert_one_line_error(run_cli("train", flow["ds"], "--out", model, *args), "not empty", "--overwrite")
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    both = run_cli("train", flow["ds"], "--out", model, "--resume", "--overwrite", "--device", "cpu")
    assert_one_line_error(both, "--resume continues the folder's run, --overwrite replaces it")
    longer = invoke("train", flow["ds"], "--out", model, "--resume", "--steps", 3, "--json")
    assert longer["steps"] == 3
    assert [json.loads(x)["step"] for x in (model / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    replaced = invoke("train", flow["ds"], "--out", model, *args, "--overwrite", "--json")
    assert replaced["steps"] == 1 and not (model / "transfer.json").exists()


def test_phantom_never_writes_into_another_dataset(flow: dict) -> None:
    proc = run_cli("phantom", flow["ds"], "--cases", 1, "--shape", "16,16,16")
    assert_one_line_error(proc, "holds a phantom already; --overwrite replaces it")
