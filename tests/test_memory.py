"""Memory planning: budgets, the byte tracker, calibrated estimates, planners, OOM fallback, token sizes.

References: hand-counted bytes for the tracker; the tracker's measurement of the real
call for the estimates (prediction within 15%) and for the plans checked by
measurement (within the budget); the direct sliding window for the fallback's output;
hand-computed diameters for the token planner.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flexpatch.data.preprocess import Plan
from flexpatch.errors import FlexPatchError
from flexpatch.infer.predictor import LoadedModel
from flexpatch.infer.sliding_window import sliding_window, sliding_window_slabs
from flexpatch.infer.within import sliding_window_within
from flexpatch.models import check_patch_size, create_model
from flexpatch.models.tokens import equivalent_diameter, plan_tokens, snap_token
from flexpatch.plan.budget import format_bytes, parse_budget, resident_bytes
from flexpatch.plan.memory import MemoryModel, Prober, calibrate, measure_peak
from flexpatch.plan.planner import (
    WindowChoice,
    initial_patch,
    plan_training,
    plan_window,
    shrink,
    sliding_window_peak,
)
from flexpatch.train.config import TrainConfig

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}  # divisor 4
ACCURACY = 0.15


def tiny_net(ndim: int, out_channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("unet", ndim, 1, out_channels, **TINY)


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def models(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, MemoryModel, MemoryModel]:
    """A tiny U-Net with its training and inference memory models (calibrated once per ndim)."""
    net = tiny_net(request.param)
    return net, calibrate(net, "train"), calibrate(net, "infer")


# --- budgets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8 * 10**9), ("2GiB", 2 * 2**30), ("512 MB", 512 * 10**6), ("1.5gb", 1.5e9), (1234, 1234)],
)
def test_budgets_in_decimal_and_binary_units(text: str | int, expected: float) -> None:
    assert parse_budget(text) == int(expected)


def test_auto_budget_is_what_is_free_and_bad_budgets_are_errors() -> None:
    assert parse_budget("auto", "cpu") > 10**6
    for bad in ("8XB", "lots", "0GB", "-1GB"):
        with pytest.raises(FlexPatchError, match="memory budget"):
            parse_budget(bad)
    assert format_bytes(2.5e9) == "2.50 GB"


# --- measurement ---------------------------------------------------------------------------


def test_tracker_counts_allocations_not_views_or_in_place_ops() -> None:
    kept = torch.ones(250)  # 1000 bytes held before the call, declared as existing

    def run() -> None:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(2000)  # 8000 B: peak 1000 + 12000
        a.view(10, 100).add_(1)  # a view and an in-place op allocate nothing
        del a
        c = torch.empty(500)  # 2000 B, after a is freed: below the peak
        del b, c

    assert measure_peak(run, "cpu", [kept]) == 13000
    assert measure_peak(run, "cpu") == 12000


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_estimate_within_15_percent_of_the_measured_peak(models, mode: str) -> None:
    net, train_mm, infer_mm = models
    mm = train_mm if mode == "train" else infer_mm
    assert mm.ndim == net.spec.ndim and mm.mode == mode
    big = (48, 40, 32)[: net.spec.ndim] if net.spec.ndim == 3 else (96, 64)
    measured = Prober(net, mode).peak(big, batch=2)
    assert abs(mm.peak(big, 2) / measured - 1) < ACCURACY, (
        format_bytes(mm.peak(big, 2)),
        format_bytes(measured),
    )


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_attention_pairs_leave_out_a_first_call_workspace(mode: str) -> None:
    """A block that allocates a buffer once, on its first call (as cuBLAS does its workspace on a
    process's first matrix product on CUDA), gives the same bytes per pair as the plain block."""
    from monai.networks.blocks.selfattention import SABlock

    from flexpatch.plan.memory import attention_pairs

    class FirstCallWorkspace(SABlock):
        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
            if not hasattr(self, "workspace"):
                self.workspace = torch.empty(2**22)  # 16 MiB, kept: 341 B per pair at 128 tokens
            return super().forward(x, attn_mask)

    torch.manual_seed(0)
    plain = SABlock(32, 2)
    once = FirstCallWorkspace(32, 2)
    once.load_state_dict(plain.state_dict())
    expected = attention_pairs(plain, mode, torch.device("cpu"), amp=False)
    got = attention_pairs(once, mode, torch.device("cpu"), amp=False)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # fp32 softmax matrices: 4 bytes per pair and head are held in training, 2 heads here
    assert expected[0] == pytest.approx(8.0 if mode == "train" else 0.0, abs=0.5)


def test_memory_model_round_trips_through_json(models) -> None:
    _, mm, _ = models
    again = MemoryModel.from_json(mm.to_json())
    assert again == mm and again.peak((16,) * mm.ndim, 3) == mm.peak((16,) * mm.ndim, 3)


def streamed_prediction(net: torch.nn.Module, image: torch.Tensor, window, batch: int) -> None:
    """What the predictor runs on the network's device: the streamed sliding window, each slab's
    softmax in place (:meth:`LoadedModel._activate`)."""
    for _, slab in sliding_window_slabs(net, image, window, 0.5, "gaussian", batch, divisor=net.divisor):
        slab.sub_(slab.amax(0, keepdim=True)).exp_()
        slab.div_(slab.sum(0, keepdim=True))


def test_sliding_window_estimate_within_15_percent(models) -> None:
    net, _, mm = models
    ndim = net.spec.ndim
    image_shape = (36, 40, 28)[:ndim] if ndim == 3 else (90, 70)
    image = torch.randn(1, 1, *image_shape)
    for window, batch in (((16,) * ndim, 4), ((24,) * ndim, 1), ((40,) * ndim, 2)):

        def run(window=window, batch=batch) -> None:
            streamed_prediction(net, image, window, batch)

        measured = measure_peak(run, "cpu", list(net.parameters()) + [image])
        predicted = sliding_window_peak(mm, window, batch, image_shape, net.divisor)
        assert abs(predicted / measured - 1) < ACCURACY, (window, predicted, measured)


# --- planners ------------------------------------------------------------------------------


def test_initial_patch_follows_spacing_and_median_like_nnunet() -> None:
    # 256^3 voxels shaped by 1/spacing: (1, 1, 2) mm gives 322 x 322 x 161, capped at the median
    assert initial_patch((400, 400, 400), (1, 1, 2), (8, 8, 8)) == (328, 328, 168)
    assert initial_patch((200, 180, 50), (1, 1, 2), (8, 8, 8)) == (200, 184, 56)
    assert initial_patch((4000, 4000), (0.5, 1.0), (16, 16)) == (2896, 1456)  # 2048^2 in 2D
    assert initial_patch((1000, 1000), (0.5, 1.0), (16, 16)) == (1008, 1008)
    # the axis with the largest patch / median ratio loses one divisor
    assert shrink((64, 64, 64), (128, 128, 32), (8, 8, 8)) == (64, 64, 56)
    assert shrink((8, 16), (100, 100), (8, 8)) is None  # never the divisor on every axis


@pytest.mark.parametrize("budget", [20e6, 60e6, 200e6])
def test_training_plan_fits_and_the_model_takes_it(models, budget: float) -> None:
    net, mm, _ = models
    ndim = net.spec.ndim
    median, spacing = (64, 56, 40)[:ndim], (1.0, 1.0, 2.0)[:ndim]
    choice = plan_training(mm, int(budget), median, spacing, net.divisor, max_batch=4)
    check_patch_size(choice.patch, net.divisor)
    assert choice.predicted <= budget * 0.9 and 1 <= choice.batch <= 4
    smaller = shrink(choice.patch, median, net.divisor)  # the search is monotone: smaller never costs more
    assert smaller is None or mm.peak(smaller, choice.batch) <= mm.peak(choice.patch, choice.batch)
    measured = Prober(net, "train").peak(choice.patch, choice.batch)
    assert measured <= budget, f"measured {format_bytes(measured)} over the budget {format_bytes(budget)}"


def test_window_plan_fits_the_model_and_the_budget(models) -> None:
    net, _, mm = models
    ndim = net.spec.ndim
    image_shape = (50, 44, 30)[:ndim] if ndim == 3 else (150, 130)
    whole = plan_window(mm, 10**10, image_shape, net.divisor)
    assert whole.window == tuple(math.ceil(s / 4) * 4 for s in image_shape) and whole.batch == 1
    small = sliding_window_peak(mm, (16,) * ndim, 1, image_shape, net.divisor)
    budget = int(small / 0.9 * 1.3)
    choice = plan_window(mm, budget, image_shape, net.divisor)
    check_patch_size(choice.window, net.divisor)
    assert choice.predicted <= budget * 0.9 and choice.window != whole.window
    image = torch.randn(1, 1, *image_shape)

    def run() -> None:
        streamed_prediction(net, image, choice.window, choice.batch)

    assert measure_peak(run, "cpu", list(net.parameters()) + [image]) <= budget
    capped = plan_window(mm, 10**10, image_shape, net.divisor, max_window=(16,) * ndim, max_batch=3)
    assert capped.window == (16,) * ndim and capped.batch == 3


def test_budget_below_the_smallest_size_is_an_error(models) -> None:
    net, train_mm, infer_mm = models
    ndim = net.spec.ndim
    with pytest.raises(FlexPatchError, match=r"below the smallest patch .* with batch 1"):
        plan_training(train_mm, 10**5, (64,) * ndim, (1.0,) * ndim, net.divisor)
    with pytest.raises(FlexPatchError, match=r"below the smallest window"):
        plan_window(infer_mm, 10**4, (64,) * ndim, net.divisor)  # streamed, 10^5 fits a 2D window


# --- check by measurement -----------------------------------------------------------------


def test_anchored_model_predicts_its_measurement_and_scales_the_rest(models) -> None:
    net, mm, _ = models
    ndim = net.spec.ndim
    at, other = (24,) * ndim, (32, 16, 8)[:ndim]
    measured = int(mm.peak(at, 2) * 1.3)
    anchored = mm.anchored(at, 2, measured)
    assert anchored.peak(at, 2) == pytest.approx(measured, rel=1e-12)
    for patch, batch in ((other, 1), (other, 3), (at, 1)):
        above = (anchored.peak(patch, batch) - mm.static) / (mm.peak(patch, batch) - mm.static)
        assert above == pytest.approx(anchored.scale)
    assert anchored.probes == (*mm.probes, (at, 2, measured)) and mm.scale == 1.0
    # the scale is set afresh, not compounded
    assert anchored.anchored(at, 2, measured).scale == pytest.approx(anchored.scale)
    again = MemoryModel.from_json(json.loads(json.dumps(anchored.to_json())))
    assert again == anchored and again.scale == anchored.scale != 1.0
    older = {k: v for k, v in mm.to_json().items() if k != "scale"}  # a plan written before the check
    assert MemoryModel.from_json(older) == mm


def train_case(ndim: int) -> tuple[tuple[int, ...], tuple[float, ...], int]:
    """A median shape, spacing and budget where the budget, not the median, bounds the patch."""
    return ((64, 56, 40), (1.0, 1.0, 2.0), 20 * 10**6) if ndim == 3 else ((256, 224), (1.0, 1.0), 20 * 10**6)


def test_check_keeps_an_under_predicting_model_within_the_budget(models) -> None:
    net, mm, _ = models
    median, spacing, budget = train_case(net.spec.ndim)
    prober, wrong = Prober(net, "train"), dataclasses.replace(mm, scale=0.5)  # predicts half the bytes
    plain = plan_training(wrong, budget, median, spacing, net.divisor, max_batch=4)
    assert plain.measured is None and prober.peak(plain.patch, plain.batch) > budget  # unchecked: over
    choice = plan_training(wrong, budget, median, spacing, net.divisor, max_batch=4, measure=prober.peak)
    assert choice.measured is not None and choice.measured <= 0.9 * budget
    assert prober.peak(choice.patch, choice.batch) == choice.measured
    assert choice.model.probes[-1] == (choice.patch, choice.batch, choice.measured)
    assert choice.predicted == int(wrong.peak(choice.patch, choice.batch))  # the given model's estimate
    assert choice.to_json()["measured"] == choice.measured and "model" not in choice.to_json()


def test_check_gives_an_over_predicting_model_a_larger_patch(models) -> None:
    net, mm, _ = models
    median, spacing, budget = train_case(net.spec.ndim)
    prober, wrong = Prober(net, "train"), dataclasses.replace(mm, scale=2.0)
    plain = plan_training(wrong, budget, median, spacing, net.divisor, max_batch=4)
    choice = plan_training(wrong, budget, median, spacing, net.divisor, max_batch=4, measure=prober.peak)
    assert math.prod(choice.patch) * choice.batch > math.prod(plain.patch) * plain.batch
    assert choice.measured <= 0.9 * budget and choice.predicted > choice.measured


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_checked_window_is_measured_and_fits(models, scale: float) -> None:
    net, _, mm = models
    ndim = net.spec.ndim
    image_shape = (50, 44, 30)[:ndim] if ndim == 3 else (150, 130)
    budget = int(sliding_window_peak(mm, (16,) * ndim, 1, image_shape, net.divisor) / 0.9 * 1.3)
    wrong = dataclasses.replace(mm, scale=scale)
    plain = plan_window(wrong, budget, image_shape, net.divisor)
    choice = plan_window(wrong, budget, image_shape, net.divisor, measure=Prober(net, "infer").peak)
    image = torch.randn(1, 1, *image_shape)

    def peak(c: WindowChoice) -> int:  # the whole prediction, measured
        def run() -> None:
            streamed_prediction(net, image, c.window, c.batch)

        return measure_peak(run, "cpu", list(net.parameters()) + [image])

    measured = peak(choice)
    assert choice.measured is not None and abs(choice.measured / measured - 1) < ACCURACY
    assert measured <= 0.9 * budget * (1 + ACCURACY)
    if scale < 1:
        assert peak(plain) > 0.9 * budget and math.prod(choice.window) < math.prod(plain.window)
    else:
        assert math.prod(choice.window) > math.prod(plain.window)


def test_cli_plan_checks_by_measurement_and_no_check_skips_it(
    tiny_cells: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from flexpatch.cli import main

    out = tmp_path / "plan.json"
    args = ["flexpatch", "plan", str(tiny_cells), "--options", json.dumps(TINY), "--device", "cpu"]
    args += ["--memory", "3MB", "--out", str(out)]
    for extra in ([], ["--no-check", "--json"]):
        monkeypatch.setattr(sys, "argv", [*args, *extra])
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code in (0, None)
        plan, printed = json.loads(out.read_text()), capsys.readouterr().out
        train, infer, models = plan["train"], plan["infer"], plan["memory_models"]
        if not extra:
            assert train["measured"] <= 0.9 * 3e6 and infer["measured"] <= 0.9 * 3e6
            assert models["train"]["probes"][-1] == [train["patch"], train["batch"], train["measured"]]
            assert printed.count(", measured ") == 2
        else:
            assert train["measured"] is None and infer["measured"] is None
            assert models["train"]["scale"] == models["infer"]["scale"] == 1.0
            assert json.loads(printed)["train"]["measured"] is None


def test_cli_plan_writes_the_plan_and_a_tiny_budget_exits_2(
    tiny_cells: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import json

    from flexpatch.cli import main

    options = '{"channels": 4, "levels": 2, "convs_per_level": 2}'
    args = ["flexpatch", "plan", str(tiny_cells), "--options", options, "--device", "cpu", "--json"]
    args += ["--token-class", "nucleus"]
    out = tmp_path / "plan.json"
    monkeypatch.setattr(sys, "argv", [*args, "--memory", "200MB", "--out", str(out)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    plan = json.loads(out.read_text())
    assert plan["model_kwargs"] == json.loads(options) and plan["budget_bytes"] == 200 * 10**6
    check_patch_size(plan["train"]["patch"], (4, 4))
    assert plan["train"]["predicted"] <= 0.9 * 200e6 and "--plan" in plan["train_command"]
    # the ViT window of the token plan is the largest multiple of the token within the planned patch
    token, window = plan["tokens"]["token_size"], plan["tokens"]["window"]
    for t, w, p in zip(token, window, plan["train"]["patch"], strict=True):
        assert w % t == 0 and w <= p < w + t
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [*args, "--memory", "1kB", "--out", str(tmp_path / "no.json")])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error: memory budget 1.00 kB")
    assert not (tmp_path / "no.json").exists()


# --- out-of-memory fallback ------------------------------------------------------------------


class FailsAbove(torch.nn.Module):
    """Raises CUDA's out-of-memory error for batches above ``batch`` or windows above ``voxels``."""

    def __init__(self, net: torch.nn.Module, batch: int = 10**9, voxels: int = 10**12) -> None:
        super().__init__()
        self.net, self.batch, self.voxels = net, batch, voxels
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        if x.shape[0] > self.batch or math.prod(x.shape[2:]) > self.voxels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


@pytest.mark.parametrize("ndim", [2, 3])
def test_fallback_to_a_smaller_batch_gives_the_direct_output(ndim: int) -> None:
    net = tiny_net(ndim).eval()
    image = torch.randn(1, 1, *((40, 36, 28)[:ndim]))
    window = (16,) * ndim
    lines: list[str] = []
    choice = WindowChoice(window, 4, "cpu", 0, 0)
    failing = FailsAbove(net, batch=1)
    out, ran = sliding_window_within(failing, image, choice, net.divisor, device="cpu", log=lines.append)
    direct = sliding_window(net, image, window, 0.5, "gaussian", 1, divisor=net.divisor)
    assert ran == WindowChoice(window, 1, "cpu", 0, 0)
    assert (
        len(lines) == 2
        and "4 per batch" in lines[0]
        and lines[1].endswith("window " + "x".join(["16"] * ndim) + ", 1 per batch, stitching on cpu")
    )
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-6)


def test_fallback_shrinks_the_window_last_and_not_a_fixed_one() -> None:
    net = tiny_net(3).eval()
    image = torch.randn(1, 1, 32, 32, 24)
    failing = FailsAbove(net, batch=1, voxels=16 * 16 * 16)
    out, ran = sliding_window_within(
        failing, image, WindowChoice((24, 24, 24), 2, "cpu", 0, 0), net.divisor, device="cpu"
    )
    assert ran.batch == 1 and math.prod(ran.window) <= 16**3 and out.shape == (1, 3, 32, 32, 24)
    torch.testing.assert_close(
        out, sliding_window(net, image, ran.window, 0.5, "gaussian", 1, divisor=net.divisor)
    )
    with pytest.raises(FlexPatchError, match=r"out of memory at window 24x24x24.*the window is fixed"):
        sliding_window_within(
            failing,
            image,
            WindowChoice((24, 24, 24), 2, "cpu", 0, 0),
            net.divisor,
            device="cpu",
            fixed_window=True,
        )


def test_other_errors_are_not_mistaken_for_out_of_memory() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        sliding_window_within(
            broken, torch.randn(1, 1, 16, 16), WindowChoice((8, 8), 2, "cpu", 0, 0), (4, 4), device="cpu"
        )


def test_predictor_within_a_budget_matches_the_direct_run(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the whole budget for the sliding window: what the process holds is another test's
    monkeypatch.setattr(LoadedModel, "_cpu_budget", lambda self, budget, *args: budget)
    net = tiny_net(3, out_channels=2).eval()
    plan = Plan(3, 1, 2, {"background": 0, "organ": 1}, (1.0, 1.0, 1.0), ("none",), (None,), (40, 36, 28))
    config = dataclasses.asdict(TrainConfig(model="unet", model_kwargs=TINY, patch="uniform:8-32"))
    method = {"method": "sliding-window", "window": [32, 32, 32], "fixed_size": False}  # uniform:8-32
    lm = LoadedModel(net, net.spec, plan, config, torch.device("cpu"), Path("."), method)
    image = torch.randn(1, 1, 40, 36, 28)
    props = {"original_shape": (40, 36, 28)}
    # a budget that holds 16^3 windows two at a time, not the whole image
    small = sliding_window_peak(calibrate(net, "infer"), (16, 16, 16), 2, (40, 36, 28), net.divisor)
    tight = int(small / 0.9 * 1.05)
    choice = lm.plan_window((40, 36, 28), tight)
    assert not lm.fixed_size and math.prod(choice.window) < 40 * 36 * 28
    with_budget = lm.probabilities((image, props), memory=tight, batch_size=4)
    direct = lm.probabilities((image, props), choice.window, batch_size=choice.batch)
    np.testing.assert_allclose(with_budget, direct, rtol=1e-5, atol=1e-6)
    lm.probabilities((image, props), memory=tight, batch_size=4)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"memory {format_bytes(tight)}: window")


def test_cli_predict_within_a_budget_reports_its_choice(tiny_abdomen: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flexpatch.cli import app
    from flexpatch.train.loop import train

    config = TrainConfig(model="unet", model_kwargs=TINY, patch="uniform:8-32", steps=1, batch=1, workers=0)
    train(tiny_abdomen, tmp_path / "model", config, device="cpu", progress=False)
    args = ["predict", tmp_path / "model", tiny_abdomen / "imagesTs", "--out", tmp_path / "pred"]
    # on the CPU the budget bounds the process: what this one holds, and 60 MB for the prediction
    budget = f"{(resident_bytes() + 60 * 10**6) // 10**6}MB"
    result = CliRunner().invoke(
        app, [str(a) for a in [*args, "--memory", budget, "--device", "cpu", "--json"]]
    )
    assert result.exit_code == 0, f"{result.stderr}\n{result.exception!r}"
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 2
    said = f"memory {format_bytes(parse_budget(budget))}: window"
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(said)]
    assert len(lines) == 1, result.stderr  # one line for both cases: the same shape, the same choice


# --- token size -------------------------------------------------------------------------------


def fingerprint(mean_mm3: float | None, count: int = 5, spacing=(1.0, 1.0, 1.0)) -> dict:
    return {
        "median_spacing": list(spacing),
        "components": {"lesion": {"count": count, "mean_mm3": mean_mm3, "sizes_mm3": [mean_mm3] * count}},
    }


def sphere(diameter: float) -> float:
    return math.pi / 6 * diameter**3


def test_equivalent_diameter_inverts_sphere_and_circle() -> None:
    assert equivalent_diameter(sphere(10.0), 3) == pytest.approx(10.0)
    assert equivalent_diameter(math.pi * 6.0**2, 2) == pytest.approx(12.0)


@pytest.mark.parametrize(
    ("diameter", "window", "expected"),
    [(8.0, None, 8), (11.0, None, 12), (3.0, None, 4), (50.0, None, 32), (12.0, 64, 16), (12.0, 48, 12),
     (math.sqrt(8 * 12), None, 8)],  # the last is equidistant on a log scale: the smaller wins
)  # fmt: skip
def test_snap_to_the_nearest_allowed_token_on_a_log_scale(diameter: float, window, expected: int) -> None:
    assert snap_token(diameter, window=window) == expected


def test_token_plan_from_hand_made_fingerprints() -> None:
    plan = plan_tokens(fingerprint(sphere(16.0)), "lesion")
    assert plan.token_size == (16, 16, 16) and plan.window == (96, 96, 96)
    assert plan.diameter_mm == pytest.approx(16.0) and plan.count == 5
    # anisotropic voxels: 16 mm is 32, 32 and 4 voxels
    aniso = plan_tokens(fingerprint(sphere(16.0)), "lesion", spacing=(0.5, 0.5, 4.0))
    assert aniso.token_size == (32, 32, 4) and aniso.window == (96, 96, 96)
    # the window constrains the choice: 12 does not divide 64
    assert plan_tokens(fingerprint(sphere(12.0)), "lesion", window=(64, 64, 64)).token_size == (16, 16, 16)
    assert "token 16x16x16" in plan.describe()
    assert plan_tokens(fingerprint(math.pi * 4.0**2, spacing=(1.0, 1.0)), "lesion").token_size == (8, 8)


def test_token_plan_errors_name_the_class() -> None:
    with pytest.raises(FlexPatchError, match="no class 'tumour'.*lesion"):
        plan_tokens(fingerprint(100.0), "tumour")
    with pytest.raises(FlexPatchError, match="'lesion' has no object"):
        plan_tokens(fingerprint(None, count=0), "lesion")
    with pytest.raises(FlexPatchError, match="no token size .* divides the window side 20"):
        plan_tokens(fingerprint(sphere(8.0)), "lesion", window=(20, 20, 20), allowed=(8, 16))


def test_a_cpu_budget_bounds_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU ``memory`` is the whole process's: what it holds besides the prepared image and
    the weights, the label map, the probabilities when asked for and the slabs' restore are set
    aside before the sliding window's share; a budget below them is one line."""
    net = tiny_net(3, out_channels=3).eval()
    plan = Plan(3, 1, 3, {"background": 0, "a": 1, "b": 2}, (1.0, 1.0, 1.0), ("none",), (None,), (40, 36, 28))
    method = {"method": "sliding-window", "window": [16, 16, 16], "fixed_size": False}
    lm = LoadedModel(net, net.spec, plan, {}, torch.device("cpu"), Path("."), method)
    image, props = torch.randn(1, 1, 40, 36, 28), {"original_shape": (40, 36, 28)}
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    share = {}
    for held in (10**8, 2 * 10**8):  # the prepared image and the weights are the plan's to count
        monkeypatch.setattr(
            "flexpatch.infer.predictor.resident_bytes", lambda h=held: h + image.numel() * 4 + weights
        )
        share[held] = lm._cpu_budget(10**9, image, props, None, 0.5, probabilities=False)
    assert share[10**8] - share[2 * 10**8] == 10**8
    with_probs = lm._cpu_budget(10**9, image, props, None, 0.5, probabilities=True)
    assert share[2 * 10**8] - with_probs == 3 * 40 * 36 * 28 * 4  # float32 per class and voxel
    with pytest.raises(
        FlexPatchError, match=r"^memory budget .* besides the sliding window: the process holds"
    ):
        lm._cpu_budget(2 * 10**8, image, props, None, 0.5, probabilities=False)
