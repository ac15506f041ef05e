"""A patchwork's batch from a memory budget, in 2D and 3D: the plan against the tracker's measurement
of the whole application, the largest batch that fits, too small a budget, out-of-memory retries,
and ``predict --memory`` through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import run_cli
from flexpatch.cli import app
from flexpatch.errors import FlexPatchError
from flexpatch.patchwork.apply import ApplyOptions, apply_image
from flexpatch.patchwork.config import PatchworkConfig
from flexpatch.patchwork.outputs import to_output
from flexpatch.patchwork.train import build_net
from flexpatch.plan.memory import measure_peak

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}  # divisor 4
SIDE = {2: 96, 3: 24}


def _patchwork(ndim: int, channels: int = 4) -> tuple[torch.nn.Module, object]:
    config = PatchworkConfig(
        scheme={"depth": 3, "matrix": [[8] * ndim], "fov_rel": [1.0] * ndim, "destvox_rel": [1.0] * ndim},
        block_options={**TINY, "channels": channels},
    )
    scheme = config.scheme_obj(ndim)
    torch.manual_seed(0)
    return build_net(config, scheme, 1, 3).eval(), scheme


def _apply(ndim: int, opts: ApplyOptions, channels: int = 4) -> tuple[torch.Tensor, dict, int]:
    """Stitched softmax outputs, statistics and the measured peak bytes of one application and its
    label map, with the image's bytes (a NumPy array, which the tracker does not see)."""
    net, scheme = _patchwork(ndim, channels)
    image = np.random.default_rng(ndim).random((1, *([SIDE[ndim]] * ndim)), dtype=np.float32)
    got = {}

    def run() -> None:
        got["applied"] = apply_image(
            net, image, np.eye(4), scheme, opts, lambda y: torch.softmax(y, 1), normalized=True
        )
        to_output(got["applied"].values, "atlas", True, [1, 2, 3])

    peak = measure_peak(run, "cpu") + image.nbytes
    return got["applied"].values, got["applied"].stats, peak


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("level", ["last", "mix"])
def test_plan_bounds_the_measured_peak_and_keeps_the_output(ndim: int, level: str) -> None:
    plain, _, _ = _apply(ndim, ApplyOptions(batch_size=4, level=level))
    values, stats, peak = _apply(ndim, ApplyOptions(batch_size=4, level=level, memory=10**12))
    assert stats["batch_size"] == 4  # a budget that holds everything leaves the batch
    torch.testing.assert_close(values, plain, rtol=1e-5, atol=1e-6)
    # never below what the run held, and close to it
    assert peak <= stats["predicted_peak"] <= 1.3 * peak
    assert stats["memory_line"].startswith("memory 1000.00 GB: patchwork batch 4; predicted peak")


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_largest_batch_that_fits_is_chosen(ndim: int) -> None:
    # wide blocks, so that a batch's activations outweigh the label map's temporaries
    opts = ApplyOptions(batch_size=12, memory=10**12)
    predicted = {b: _apply(ndim, replace(opts, batch_size=b), 48)[1]["predicted_peak"] for b in (3, 4)}
    assert predicted[4] > predicted[3]
    _, stats, peak = _apply(ndim, replace(opts, memory=predicted[4] - 1), 48)
    assert stats["batch_size"] == 3 and stats["predicted_peak"] == predicted[3]
    assert peak <= predicted[4] - 1  # within the budget, by the tracker's measurement


def test_a_budget_below_one_patch_is_refused() -> None:
    with pytest.raises(FlexPatchError, match="below the patchwork's smallest need: .* at one patch"):
        _apply(2, ApplyOptions(memory=1000))


@pytest.mark.parametrize("ndim", [2, 3])
def test_out_of_memory_halves_the_batch_with_the_same_output(ndim: int, monkeypatch) -> None:
    plain, _, _ = _apply(ndim, ApplyOptions(batch_size=2))
    net_forward = type(_patchwork(ndim)[0]).forward_level
    calls = {"failed": 0}

    def forward_level(self, level, image_crop, parent_out=None, rel=None):  # noqa: ANN001, ANN202
        if len(image_crop) > 2 and not torch.is_grad_enabled() and calls["planned"]:
            calls["failed"] += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")  # what CUDA says
        return net_forward(self, level, image_crop, parent_out, rel)

    import flexpatch.patchwork.apply as apply_module

    planned = apply_module._plan

    def plan(job, opts, memory):  # noqa: ANN001, ANN202
        result = planned(job, opts, memory)
        calls["planned"] = True  # the plan's own measurements run; the application then fails
        return result

    calls["planned"] = False
    monkeypatch.setattr(apply_module, "_plan", plan)
    monkeypatch.setattr(type(_patchwork(ndim)[0]), "forward_level", forward_level)
    values, stats, _ = _apply(ndim, ApplyOptions(batch_size=8, memory=10**12))
    assert calls["failed"] >= 1 and stats["batch_size"] == 2
    assert stats["memory_line"] == "out of memory; retried at batch 2"
    torch.testing.assert_close(values, plain, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="out of memory"):  # without a budget: no retry
        _apply(ndim, ApplyOptions(batch_size=8))


def test_predict_memory_through_the_cli(tiny_cells, tmp_path) -> None:
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"block_options": TINY, "workers": 0}))
    model = tmp_path / "model"
    runner = CliRunner()
    train = ["train", tiny_cells, "--out", model, "--patchwork", "--depth", 2, "--matrix", 8, "--rounds", 1,
             "--num-patches", 2, "--patchwork-options", options, "--device", "cpu", "--json"]  # fmt: skip
    assert runner.invoke(app, [str(a) for a in train]).exit_code == 0
    base = ["predict", str(model), str(tiny_cells / "imagesTs"), "--device", "cpu", "--batch", "8"]
    plain = runner.invoke(app, [*base, "--out", str(tmp_path / "plain")])
    budgeted = runner.invoke(app, [*base, "--out", str(tmp_path / "budget"), "--memory", "1GB"])
    assert plain.exit_code == 0 and budgeted.exit_code == 0, budgeted.stderr
    assert "memory 1.00 GB: patchwork batch 8; predicted peak" in budgeted.stderr
    for path in sorted((tmp_path / "plain").iterdir()):
        other = tmp_path / "budget" / path.name
        np.testing.assert_array_equal(np.asarray(nib.load(other).dataobj), np.asarray(nib.load(path).dataobj))
    tiny = run_cli(*base, "--out", tmp_path / "tiny", "--memory", "1kB", timeout=120)
    assert tiny.returncode == 2 and len(tiny.stderr.strip().splitlines()) == 1
    assert "below the patchwork's smallest need" in tiny.stderr and "Traceback" not in tiny.stderr
    assert not (tmp_path / "tiny").exists() or not any((tmp_path / "tiny").iterdir())


def test_images_of_one_grid_are_planned_once(monkeypatch) -> None:
    import flexpatch.patchwork.apply as apply_module

    calls = []
    planned = apply_module._plan
    monkeypatch.setattr(apply_module, "_plan", lambda *args: calls.append(1) or planned(*args))
    net, scheme = _patchwork(2)
    plans: dict = {}
    opts = ApplyOptions(memory=10**12)
    for seed, side in ((0, 96), (1, 96), (2, 64)):
        image = np.random.default_rng(seed).random((1, side, side), dtype=np.float32)
        apply_image(net, image, np.eye(4), scheme, opts, lambda y: torch.softmax(y, 1), plans=plans)
    assert len(calls) == 2 and len(plans) == 2  # the second 96^2 image reuses the first one's plan
