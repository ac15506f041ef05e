"""Inference in bfloat16 (``--precision``): the autocast wrapper against torch.autocast itself, the
choice of ``auto`` by the device's native support, and predict from the CLI (3D) and the Python API
(2D) against float32, with the refusals for methods that do not take it yet."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from flexpatch.data.dataset import load_dataset
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.sweep import run_sweep
from flexpatch.infer import precision as prec
from flexpatch.infer.precision import Autocast, resolve_precision, with_precision
from flexpatch.infer.predictor import load_model
from flexpatch.models import create_model
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


@pytest.mark.parametrize("ndim", [2, 3])
def test_autocast_is_torch_autocast_with_a_float32_output(ndim: int) -> None:
    net = create_model("unet", ndim=ndim, in_channels=1, out_channels=3, **TINY).eval()
    x = torch.randn(2, 1, *(16,) * ndim)
    wrapped = with_precision(net, torch.bfloat16)
    assert isinstance(wrapped, Autocast) and wrapped.divisor == net.divisor and wrapped.spec == net.spec
    assert with_precision(net, torch.float32) is net
    with torch.inference_mode():
        got = wrapped(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = net(x)
        full = net(x)
    assert got.dtype == torch.float32 and want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)
    assert not torch.equal(got, full)  # bfloat16 rounds: 8 bits of mantissa
    torch.testing.assert_close(got, full, rtol=0.05, atol=0.05 * float(full.abs().max()))


def test_auto_takes_bfloat16_only_where_the_device_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) == torch.float32
    assert resolve_precision("bfloat16", cpu) == torch.bfloat16
    monkeypatch.setattr(prec, "native_bfloat16", lambda device: True)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(prec, "native_bfloat16", lambda device: False)
    assert resolve_precision("auto", cpu) == torch.float32
    with pytest.raises(FlexPatchError, match="unknown precision 'half'; choose one of float32, bfloat16"):
        resolve_precision("half", cpu)
    assert prec.native_bfloat16(torch.device("meta")) is False


def assert_flips_only_near_ties(probs: np.ndarray, other: np.ndarray, axis: int) -> None:
    """Labels of float32 ``probs`` and bfloat16 ``other`` (classes on ``axis``) differ only where
    float32's two most probable classes are closer than twice the largest probability difference:
    a near tie that bfloat16's rounding may flip (an under-trained model has many)."""
    diff = float(np.abs(probs - other).max())
    assert 0 < diff < 0.05
    top2 = np.sort(probs, axis=axis).take([-1, -2], axis=axis)
    margin = top2.take(0, axis=axis) - top2.take(1, axis=axis)
    flipped = probs.argmax(axis) != other.argmax(axis)
    assert flipped.mean() < 0.1 and (margin[flipped] <= 2 * diff).all()


def test_cli_predicts_in_bfloat16_close_to_float32(tiny_abdomen: Path, tmp_path: Path) -> None:
    """3D from the CLI: the label maps of both precisions on the same grid, agreeing but where
    bfloat16's rounding flips a near tie; sweep in bfloat16 against float32; an unknown precision is
    one line."""
    config = TrainConfig(model_kwargs=TINY, patch="16", steps=4, batch=2, val_every=4, workers=0)
    train(tiny_abdomen, tmp_path / "m", config, device="cpu", progress=False)
    images = tiny_abdomen / "imagesTs"
    outs = {}
    for p in ("float32", "bfloat16"):
        done = run_cli("predict", tmp_path / "m", images, "--out", tmp_path / p, "--precision", p,
                       "--device", "cpu", "--probabilities", "--no-postprocess")  # fmt: skip
        assert done.returncode == 0, done.stderr
        outs[p] = sorted((tmp_path / p).glob("*.nii.gz"))
    assert [f.name for f in outs["float32"]] == [f.name for f in outs["bfloat16"]] and outs["float32"]
    for a, b in zip(outs["float32"], outs["bfloat16"], strict=True):
        la, lb = nib.load(a), nib.load(b)
        np.testing.assert_array_equal(la.affine, lb.affine)
        pa, pb = (np.asarray(nib.load(f.parent / "probabilities" / f.name).dataobj) for f in (a, b))
        np.testing.assert_array_equal(np.asarray(la.dataobj), pa.argmax(-1))  # written as probabilities say
        np.testing.assert_array_equal(np.asarray(lb.dataobj), pb.argmax(-1))
        assert_flips_only_near_ties(pa, pb, axis=-1)
    # sweep takes it too: its Dice rows against the float32 model's, row by row
    done = run_cli("sweep", tmp_path / "m", tiny_abdomen, "--sizes", "16", "--random", 0, "--precision",
                   "bfloat16", "--device", "cpu", "--out", tmp_path / "sweep", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "sweep" / "sweep.csv") as f:
        half = [(r["case"], r["class"], float(r["dice"])) for r in csv.DictReader(f)]
    cases = [c for c in load_dataset(tiny_abdomen).test if c.label is not None]
    full = run_sweep(load_model(tmp_path / "m", device="cpu"), cases, [(16, 16, 16)], progress=False)
    assert [(c, k) for c, k, _ in half] == [(r["case"], r["class"]) for r in full]
    gaps = [abs(d - r["dice"]) for (_, _, d), r in zip(half, full, strict=True) if not np.isnan(d)]
    assert 0 < max(gaps) < 0.1, gaps  # bfloat16 ran, and moved Dice by its near ties only
    bad = run_cli("predict", tmp_path / "m", images, "--out", tmp_path / "bad", "--precision", "half")
    assert_one_line_error(bad, "unknown precision 'half'")
    assert not (tmp_path / "bad").exists()


def test_api_predicts_in_bfloat16_and_other_methods_refuse_it(tiny_cells: Path, tmp_path: Path) -> None:
    """2D through load_model: probabilities within bfloat16's rounding of float32's; a patchwork (no
    bfloat16 path yet) refuses --precision in one line before any case runs."""
    from flexpatch.data.io import read_image
    from flexpatch.patchwork.config import PatchworkConfig
    from flexpatch.patchwork.train import train_patchwork

    config = TrainConfig(model_kwargs=TINY, patch="32", steps=2, batch=2, val_every=2, workers=0)
    train(tiny_cells, tmp_path / "m", config, device="cpu", progress=False)
    volume = read_image(sorted((tiny_cells / "imagesTs").iterdir())[0])
    full = load_model(tmp_path / "m", device="cpu").probabilities(volume, tta="none")
    half = load_model(tmp_path / "m", device="cpu", precision="bfloat16").probabilities(volume, tta="none")
    assert half.dtype == np.float32 and half.shape == full.shape
    assert_flips_only_near_ties(full, half, axis=0)
    pw = PatchworkConfig(scheme={"depth": 2, "matrix": [8, 8]}, block_options=TINY, rounds=1, num_patches=2,
                         batch_size=2)  # fmt: skip
    train_patchwork(tiny_cells, tmp_path / "pw", pw, device="cpu", progress=False)
    done = run_cli("predict", tmp_path / "pw", tiny_cells / "imagesTs", "--out", tmp_path / "o",
                   "--precision", "bfloat16", "--json")  # fmt: skip
    assert_one_line_error(done, "pw: --precision is for sliding-window models so far")
    assert not (tmp_path / "o").exists()  # nothing written
