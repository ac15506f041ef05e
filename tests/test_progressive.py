"""Progressive growing of the patch size: the schedule and the stream that follows it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.sampling import (
    FixedSize,
    PatchStream,
    ProgressiveSchedule,
    SamplingConfig,
    StepSizeSampler,
    make_loader,
    make_schedule,
    parse_patch_spec,
    pools_from_divisor,
)
from flexpatch.sampling.progressive import growth_sizes

# the authors' PGPS trainers: 128^3 with 5 pools per axis.
PAPER_SIZES = [
    (64, 32, 32),
    (64, 64, 32),
    (64, 64, 64),
    (96, 64, 64),
    (96, 96, 64),
    (96, 96, 96),
    (128, 96, 96),
    (128, 128, 96),
    (128, 128, 128),
]
PAPER_BATCHES = [24, 12, 6, 4, 3, 2, 2, 2, 2]
# Hand-grown 40x192x160 with pools 3,5,5 (steps 8,32,32; axes 1,2,0,...; full axes skipped).
ANISO_SIZES = [
    (16, 32, 32),
    (16, 64, 32),
    (16, 64, 64),
    (24, 64, 64),
    (24, 96, 64),
    (24, 96, 96),
    (32, 96, 96),
    (32, 128, 96),
    (32, 128, 128),
    (40, 128, 128),
    (40, 160, 128),
    (40, 160, 160),
    (40, 192, 160),
]
CASES = [
    ((128, 128, 128), (5, 5, 5)),
    ((40, 192, 160), (3, 5, 5)),
    ((48, 160), (3, 5)),
    ((512, 448), (6, 6)),
    ((8, 64, 64), (0, 4, 4)),
]


def _authors_stage_count(top: tuple[int, ...], pools: tuple[int, ...]) -> int:
    """The authors' num_stages: sum over axes of ceil((max - min) / 2**pools) + 1."""
    mins = [2 ** (p + 1) if axis == 0 else 2**p for axis, p in enumerate(pools)]
    return sum(math.ceil((m - lo) / 2**p) for m, lo, p in zip(top, mins, pools, strict=True)) + 1


def _authors_batches(sizes: list[tuple[int, ...]], batch: int) -> list[int]:
    """The authors' float form: int(ratio * next batch), backwards from the largest size."""
    out = [batch]
    for i in range(len(sizes) - 2, -1, -1):
        out.append(max(int(math.prod(sizes[i + 1]) / math.prod(sizes[i]) * out[-1]), batch))
    return out[::-1]


def test_paper_schedule_stage_by_stage() -> None:
    schedule = make_schedule((128, 128, 128), 5, "performance", batch=2, steps=1000)
    stages = schedule.stages()
    assert [s.patch for s in stages] == PAPER_SIZES
    assert [s.batch for s in stages] == PAPER_BATCHES
    assert [s.index for s in stages] == list(range(9))
    # the authors switch every int(1000 / 9) = 111 epochs; the last size keeps the remainder
    assert [s.start for s in stages] == [111 * i for i in range(9)]
    assert [s.steps for s in stages] == [111] * 8 + [112]
    assert schedule.max_size() == (128, 128, 128)
    resource = make_schedule((128, 128, 128), 5, "resource", batch=2, steps=1000)
    assert [s.patch for s in resource.stages()] == PAPER_SIZES
    assert {s.batch for s in resource.stages()} == {2}
    assert {resource.batch_at(k) for k in range(0, 1000, 37)} == {2}


@pytest.mark.parametrize(("top", "pools"), CASES)
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_any_maximum_gives_valid_growing_sizes(
    top: tuple[int, ...], pools: tuple[int, ...], batch: int
) -> None:
    schedule = make_schedule(top, pools, "performance", batch=batch, steps=500)
    stages = schedule.stages()
    sizes = [s.patch for s in stages]
    assert len(stages) == _authors_stage_count(top, pools)
    assert sizes[-1] == top and len(set(sizes)) == len(sizes)
    for size in sizes:
        assert all(s % 2**p == 0 and 0 < s <= m for s, p, m in zip(size, pools, top, strict=True))
    for prev, nxt in zip(sizes, sizes[1:], strict=False):  # one axis grows per stage, by at most 2**pools
        grown = [(a, b - x) for a, (x, b) in enumerate(zip(prev, nxt, strict=True)) if b != x]
        assert len(grown) == 1 and 0 < grown[0][1] <= 2 ** pools[grown[0][0]]
    batches = [s.batch for s in stages]
    assert batches == _authors_batches(sizes, batch)
    assert batches[-1] == batch and batches == sorted(batches, reverse=True)
    # a batch never holds more voxels than one at the largest size (the memory it was planned for)
    assert all(b * math.prod(s) <= batch * math.prod(top) for b, s in zip(batches, sizes, strict=True))
    assert sum(s.steps for s in stages) == 500


def test_anisotropic_maximum_matches_hand_grown_list() -> None:
    schedule = make_schedule((40, 192, 160), (3, 5, 5), "resource", batch=2, steps=130)
    assert [s.patch for s in schedule.stages()] == ANISO_SIZES
    grown_2d = [(16, 32), (16, 64), (24, 64), (24, 96), (32, 96), (32, 128), (40, 128), (40, 160), (48, 160)]
    assert growth_sizes((48, 160), (3, 5)) == grown_2d


@pytest.mark.parametrize("steps", [9, 10, 17, 100, 1001])
def test_stage_lengths_sum_to_the_run_and_stage_at_agrees(steps: int) -> None:
    schedule = make_schedule((128, 128, 128), 5, "performance", batch=2, steps=steps)
    stages = schedule.stages()
    assert sum(s.steps for s in stages) == steps
    assert all(a.end == b.start for a, b in zip(stages, stages[1:], strict=False))
    assert stages[0].start == 0 and stages[-1].end == steps
    for stage in stages:
        for step in (stage.start, stage.end - 1):
            assert schedule.stage_at(step) == stage
            assert schedule.batch_at(step) == stage.batch
            assert schedule.size_at(step, torch.Generator()) == stage.patch
    assert schedule.stage_at(steps + 50) == stages[-1]  # past the run: the largest size
    with pytest.raises(FlexPatchError, match="step must be >= 0"):
        schedule.stage_at(-1)


def test_random_mode_draws_listed_sizes_reproducibly() -> None:
    schedule = make_schedule((40, 192, 160), (3, 5, 5), "random", batch=3, steps=200)
    listed = {s.patch for s in schedule.stages()}

    def draws(seed: int) -> list[tuple[int, ...]]:
        return [schedule.size_at(k, torch.Generator().manual_seed(seed * 1000 + k)) for k in range(200)]

    first = draws(0)
    assert set(first) == listed  # only listed sizes, and every one of them over 200 steps
    assert draws(0) == first and draws(1) != first
    assert {schedule.batch_at(k) for k in range(200)} == {3}
    # the steps' sizes are uniform over the 13 sizes, not in growing order
    assert first[:13] != sorted(first[:13], key=math.prod)


def test_foreground_ratio_json_and_protocols() -> None:
    schedule = make_schedule((128, 128, 128), 5, "performance", batch=2, steps=90)
    assert isinstance(schedule, StepSizeSampler)
    assert not isinstance(FixedSize((8, 8)), StepSizeSampler)
    assert [schedule.foreground_ratio_at(k) for k in (0, 79, 80, 89, 90)] == [0.5] * 4 + [None]
    data = json.loads(json.dumps(schedule.to_json()))
    assert data["spec"] == "progressive:performance:128x128x128"
    assert [s["batch"] for s in data["stages"]] == PAPER_BATCHES
    assert [tuple(s["patch"]) for s in data["stages"]] == PAPER_SIZES
    assert data["stages"][4] == {"index": 4, "patch": [96, 96, 64], "batch": 3, "start": 40, "steps": 10}
    assert schedule.draw(torch.Generator().manual_seed(0)) in PAPER_SIZES


def test_pools_from_divisor() -> None:
    assert pools_from_divisor((16, 32, 32)) == (4, 5, 5)
    assert pools_from_divisor((1, 8)) == (0, 3)
    with pytest.raises(FlexPatchError, match="24 .* not a power of two"):
        pools_from_divisor((24, 32))


@pytest.mark.parametrize("ndim", [2, 3])
def test_spec_parses_with_the_runs_batch_and_steps(ndim: int) -> None:
    top = (128,) * ndim
    sampler = parse_patch_spec("progressive:performance:128", ndim, 32, batch=2, steps=300)
    assert sampler == make_schedule(top, (5,) * ndim, "performance", 2, 300)
    again = parse_patch_spec(sampler.describe(), ndim, 32, batch=2, steps=300)
    assert again == sampler and again.stages() == sampler.stages()
    aniso = parse_patch_spec("progressive:random:40x192x160", 3, (8, 32, 32), batch=2, steps=100)
    assert isinstance(aniso, ProgressiveSchedule) and aniso.pools == (3, 5, 5) and aniso.mode == "random"


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("progressive:performance", {"batch": 2, "steps": 100}, "needs the largest patch size"),
        ("progressive:fast:128", {"batch": 2, "steps": 100}, "unknown mode 'fast'"),
        ("progressive:resource:128", {}, "with the run's batch and steps"),
        ("progressive:resource:100", {"batch": 2, "steps": 100}, "100 .*not divisible by 32"),
        ("progressive:resource:128", {"batch": 2, "steps": 5}, "9 stages but the run has 5 steps"),
        ("progressive:resource:128x128", {"batch": 2, "steps": 100}, "2 axes but the data are 3D"),
    ],
)
def test_spec_errors_name_the_problem(spec: str, kwargs: dict, message: str) -> None:
    with pytest.raises(FlexPatchError, match=message):
        parse_patch_spec(spec, 3, 32, **kwargs)


def test_schedule_validation() -> None:
    with pytest.raises(
        FlexPatchError, match="not a positive multiple of 2\\*\\*5 = 32; nearest valid 96 or 128"
    ):
        make_schedule((128, 100, 128), 5, "resource", 2, 100)
    with pytest.raises(FlexPatchError, match="same number of axes"):
        make_schedule((128, 128), (5, 5, 5), "resource", 2, 100)
    with pytest.raises(FlexPatchError, match="unknown progressive mode"):
        make_schedule((128,) * 3, 5, "perf", 2, 100)
    with pytest.raises(FlexPatchError, match="batch size must be >= 1"):
        make_schedule((128,) * 3, 5, "resource", 0, 100)
    with pytest.raises(FlexPatchError, match="pools"):
        make_schedule((128,) * 3, (5, -1, 5), "resource", 2, 100)
    tiny = make_schedule((32, 32), 5, "performance", 2, 1)  # first axis already full at its minimum
    assert [s.patch for s in tiny.stages()] == [(32, 32)]


# ---------------------------------------------------------------- the stream


def _write_cases(folder: Path, ndim: int) -> list[Path]:
    rng = np.random.default_rng(ndim)
    paths = []
    for i in range(3):
        shape = (16 + 2 * i,) * ndim
        label = np.zeros(shape, np.int16)
        label[tuple(slice(4, 9) for _ in shape)] = 1
        path = folder / f"case{i}.npz"
        np.savez(path, image=rng.normal(size=(1, *shape)).astype(np.float32), label=label)
        paths.append(path)
    return paths


def _same(a: dict, b: dict) -> bool:
    return (
        torch.equal(a["image"], b["image"])
        and torch.equal(a["label"], b["label"])
        and all(a[k] == b[k] for k in ("size", "step", "cases", "starts", "centres"))
    )


@pytest.mark.parametrize(("ndim", "mode"), [(2, "performance"), (3, "performance"), (3, "random")])
def test_stream_follows_the_schedule_and_resumes_mid_stage(tmp_path: Path, ndim: int, mode: str) -> None:
    paths = _write_cases(tmp_path, ndim)
    # divisor 4: 3D grows 8x4x4 -> ... -> 16^3 in 9 stages (batches 4,2,1,...), 2D 8x4 -> 16x16 in 6
    schedule = parse_patch_spec(f"progressive:{mode}:16", ndim, 4, batch=1, steps=20)
    cfg = SamplingConfig(batch_size=5, divisor=(4,) * ndim, foreground_ratio=0.5)

    def stream(**kwargs) -> PatchStream:
        return PatchStream(paths, schedule, cfg, seed=3, **kwargs)

    full = list(stream(steps=20))
    for step, b in enumerate(full):
        assert b["step"] == step
        assert b["image"].shape == (schedule.batch_at(step), 1, *b["size"])  # the schedule's batch, not cfg's
        assert b["label"].shape == (schedule.batch_at(step), *b["size"])
        if mode != "random":
            assert b["size"] == schedule.stage_at(step).patch
    if mode == "random":
        assert {b["size"] for b in full} <= {s.patch for s in schedule.stages()}
        assert len({b["size"] for b in full}) > 3
    else:
        want = [4, 2, 1, 1, 1, 1, 1, 1, 1] if ndim == 3 else [2, 1, 1, 1, 1, 1]
        assert [s.batch for s in schedule.stages()] == want
        assert [b["image"].shape[0] for b in full[:4]] == ([4, 4, 2, 2] if ndim == 3 else [2, 2, 2, 1])
        assert full[-1]["size"] == (16,) * ndim
    if ndim == 3 and mode == "performance":  # loader workers see the same per-step batch sizes
        multi = list(make_loader(stream(steps=20), workers=2))
        assert all(_same(a, b) for a, b in zip(full, multi, strict=True))
    middle = schedule.stages()[2].start + 1  # inside stage 2
    resumed = list(stream(start_step=middle, steps=20 - middle))
    assert all(_same(a, b) for a, b in zip(full[middle:], resumed, strict=True))


@pytest.mark.parametrize("ndim", [2, 3])
def test_every_stage_is_checked_before_training_and_none_leaves_a_one_voxel_bottleneck(ndim):
    """smallest_sizes lists each stage; the authors' extra step on the first axis keeps the bottleneck > 1."""
    from flexpatch.models.registry import check_trainable
    from flexpatch.sampling.sizes import smallest_sizes

    schedule = ProgressiveSchedule((32,) * ndim, (3,) * ndim, "performance", 2, 90)
    sizes = smallest_sizes(schedule)
    assert sizes == [stage.patch for stage in schedule.stages()]
    assert sizes[0] == (16,) + (8,) * (ndim - 1)
    for size in sizes:
        check_trainable(size, (8,) * ndim, "stage", "unet")  # raises on a one-voxel bottleneck
