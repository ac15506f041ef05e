"""Patchwork end to end: a tiny patchwork trains and predicts through the CLI in 2D and 3D."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flexpatch.cli import app
from flexpatch.data.io import read_image
from flexpatch.patchwork import train as pw_train
from flexpatch.patchwork.outputs import read_label_names
from flexpatch.patchwork.train import CONFIG, PatchworkConfig, RoundSource, label_table, load_state

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}  # divisor 4


def invoke(*args: object) -> dict:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.stderr}\n{result.exception!r}"
    return json.loads(result.stdout)


def _options(tmp: Path, **extra: object) -> Path:
    path = tmp / "options.json"
    path.write_text(json.dumps({"block_options": TINY, "workers": 0, **extra}))
    return path


@pytest.mark.parametrize("fixture", ["tiny_cells", "tiny_abdomen"])
def test_tiny_patchwork_trains_and_predicts_through_the_cli(fixture, request, tmp_path):
    ds = request.getfixturevalue(fixture)
    ndim = 2 if fixture == "tiny_cells" else 3
    opts = _options(tmp_path, dphi=0.2, hard_mining=1.0, flip=[1] * ndim)
    model = tmp_path / "model"
    summary = invoke(
        "train", ds, "--out", model, "--patchwork", "--depth", 2, "--matrix", 8, "--fov-rel", 0.8,
        "--rounds", 2, "--num-patches", 3, "--batch", 4, "--patchwork-options", opts,
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert summary["rounds"] == 2 and np.isfinite(summary["last_loss"])
    meta = json.loads((model / CONFIG).read_text())
    assert meta["scheme"]["depth"] == 2 and meta["config"]["hard_mining"] == 1.0
    log = json.loads((model / "log.json").read_text())
    assert log[1]["patches"] > log[0]["patches"]  # hard mining kept half of round 0 beside the new ones
    pred = tmp_path / "pred"
    out = invoke("predict", model, ds / "imagesTs", "--out", pred, "--lazy", 0.5, "--device", "cpu", "--json")
    assert len(out["segmentations"]) == 2
    first = Path(out["segmentations"][0])
    image = read_image(ds / "imagesTs" / first.name.replace(".nii.gz", "_0000.nii.gz"), ndim)
    seg = nib.load(first)
    assert seg.shape[:ndim] == image.spatial_shape
    np.testing.assert_allclose(
        seg.affine,
        nib.load(ds / "imagesTs" / first.name.replace(".nii.gz", "_0000.nii.gz")).affine,
        atol=1e-5,
    )
    names = read_label_names(first)
    assert names and all(isinstance(v, str) for v in names.values())
    stats = out["stats"][first.name.replace(".nii.gz", "")]
    assert len(stats["patches"]) == 2
    probs = invoke("predict", model, ds / "imagesTs", "--out", tmp_path / "prob", "--out-type", "uint8",
                   "--device", "cpu", "--json")  # fmt: skip
    arr = np.asarray(nib.load(probs["segmentations"][0]).dataobj)
    assert arr.dtype == np.uint8 and arr.shape[-1] == len(meta["label_values"])


def test_rounds_are_the_same_with_and_without_a_worker_process(tiny_abdomen):
    from flexpatch.data.dataset import load_dataset

    ds = load_dataset(tiny_abdomen)
    config = PatchworkConfig(scheme={"depth": 2, "matrix": [[8, 8, 8]], "fov_rel": [0.8] * 3}, num_patches=2,
                             ratio=0.5, dphi=0.1)  # fmt: skip
    values, ignore = label_table(ds, config)
    scheme = config.scheme_obj(3)
    pw_train._STATES = [load_state(c, 3, scheme, config, values, ignore) for c in ds.training[:2]]
    pw_train._SCHEME, pw_train._CONFIG = scheme, config
    try:
        inline, forked = RoundSource(0), RoundSource(1)
        a, b = inline.get(3), forked.get(3)
        forked.close()
    finally:
        pw_train._STATES = []
    assert set(a) == {"x0", "y0", "x1", "y1", "rel1"}
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_patchwork_input_is_one_line_and_exit_2(tiny_abdomen, tmp_path):
    cmd = [sys.executable, "-m", "flexpatch", "train", str(tiny_abdomen), "--out", str(tmp_path / "m"),
           "--patchwork", "--matrix", "13", "--device", "cpu"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "13" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no_such_option": 1}))
    r = subprocess.run(
        cmd[:-4] + ["--patchwork-options", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "no_such_option" in r.stderr
