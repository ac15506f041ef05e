"""Patch sampling: size samplers, centre draws, boxes and the reproducible batch stream."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, extract
from flexpatch.sampling import (
    ChoiceSize,
    FixedSize,
    PatchStream,
    SamplingConfig,
    StepSizeSampler,
    UniformSize,
    batch_for_step,
    compute_class_locations,
    draw_centre,
    fit_patch,
    make_loader,
    parse_patch_spec,
    patch_at,
    register_size_kind,
    size_for_step,
)
from flexpatch.sampling import sizes as sizes_module

SEED01_SIZES = set(range(32, 193, 8))  # seed 01: {32, 40, ..., 192}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("ndim", [2, 3])
def test_uniform_sizes_valid_reproducible_and_anisotropic(ndim: int) -> None:
    sampler = parse_patch_spec("uniform:32-192", ndim, 8)
    g = _gen(0)
    draws = [sampler.draw(g) for _ in range(400)]
    assert all(len(d) == ndim and set(d) <= SEED01_SIZES for d in draws)
    assert {v for d in draws for v in d} == SEED01_SIZES  # every allowed value is reachable
    assert any(len(set(d)) > 1 for d in draws)  # axes are drawn independently
    g_again, g_other = _gen(0), _gen(1)
    assert [sampler.draw(g_again) for _ in range(400)] == draws
    assert [sampler.draw(g_other) for _ in range(400)] != draws
    assert sampler.max_size() == (192,) * ndim


@pytest.mark.parametrize("ndim", [2, 3])
def test_isotropic_and_list_sizes(ndim: int) -> None:
    iso = parse_patch_spec("uniform-iso:30-70", ndim, 8)
    g = _gen(3)
    draws = [iso.draw(g) for _ in range(200)]
    assert all(len(set(d)) == 1 and d[0] in {32, 40, 48, 56, 64} for d in draws)
    assert {d[0] for d in draws} == {32, 40, 48, 56, 64}
    choice = parse_patch_spec(f"list:{'x'.join(['16'] * ndim)},32", ndim, 8)
    assert choice == ChoiceSize(((16,) * ndim, (32,) * ndim))
    assert {choice.draw(g) for _ in range(100)} == {(16,) * ndim, (32,) * ndim}
    assert parse_patch_spec("64", ndim, 8) == FixedSize((64,) * ndim)


def test_per_axis_ranges_and_divisors() -> None:
    sampler = parse_patch_spec("uniform:32-64,16-32,8-8", 3, (16, 8, 8))
    g = _gen(0)
    draws = {sampler.draw(g) for _ in range(300)}
    assert {d[0] for d in draws} == {32, 48, 64}
    assert {d[1] for d in draws} == {16, 24, 32}
    assert {d[2] for d in draws} == {8}
    assert sampler.max_size() == (64, 32, 8)


@pytest.mark.parametrize(
    "spec",
    ["64,32,16", "48", "uniform:32-192", "uniform:32-64,16-32,8-16", "uniform-iso:16-64", "list:32x16x8,64"],
)
def test_describe_reads_back(spec: str) -> None:
    sampler = parse_patch_spec(spec, 3, 8)
    assert parse_patch_spec(sampler.describe(), 3, 8) == sampler


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("50", "patch size 50 is not divisible by 8: nearest valid sizes 48 or 56"),
        ("5", "nearest valid size 8"),
        ("64,60,64", "nearest valid sizes 56 or 64"),
        ("list:32x50x32", "nearest valid sizes 48 or 56"),
        ("uniform:33-39", "holds no multiple of 8: nearest valid sizes 32 or 40"),
        ("uniform:64-32", "empty"),
        ("uniform:32", "LOW-HIGH"),
        ("64,64", "has 2 axes but the data are 3D"),
        ("0", "positive"),
        ("abc", "not a comma-separated list of integers"),
        ("grow:64", "known kinds: fixed"),
        ("", "empty"),
    ],
)
def test_parse_errors_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(FlexPatchError, match=message):
        parse_patch_spec(spec, 3, 8)


def test_new_kinds_plug_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sizes_module, "_KINDS", dict(sizes_module._KINDS))
    register_size_kind("const", lambda body, n, d: FixedSize((int(body),) * n), "const:8")
    assert parse_patch_spec("const:24", 2, 8) == FixedSize((24, 24))
    with pytest.raises(FlexPatchError, match="const"):
        parse_patch_spec("nope:1", 2, 8)
    # a kind that schedules over the run gets the run's batch and steps as keywords
    register_size_kind(
        "run", lambda body, n, d, batch, steps: FixedSize((batch * steps,) * n), "run:", needs_run=True
    )
    assert parse_patch_spec("run:", 2, 8, batch=2, steps=4) == FixedSize((8, 8))


def test_plain_samplers_ignore_the_step() -> None:
    sampler = parse_patch_spec("uniform:8-64", 3, 8)
    assert not isinstance(sampler, StepSizeSampler)
    g1, g2 = _gen(5), _gen(5)
    assert [size_for_step(sampler, k, g1) for k in range(20)] == [sampler.draw(g2) for _ in range(20)]
    assert {batch_for_step(sampler, k, 3) for k in range(20)} == {3}


def test_sampler_constructors_validate() -> None:
    with pytest.raises(FlexPatchError):
        UniformSize((32, 32), (64,), (8, 8))
    with pytest.raises(FlexPatchError, match="no single value"):
        UniformSize((32, 8), (64, 16), (8, 8), isotropic=True)
    with pytest.raises(FlexPatchError):
        ChoiceSize(((32, 32), (32, 32, 32)))
    with pytest.raises(FlexPatchError):
        FixedSize((32, 0))


# ---------------------------------------------------------------- centres and boxes


@pytest.mark.parametrize("ndim", [2, 3])
def test_fit_patch_rounds_up_to_divisor(ndim: int) -> None:
    image = (50, 100, 20)[:ndim]
    expected = (56, 64, 24)[:ndim]  # 50 -> 56 and 20 -> 24; 64 fits in 100
    assert fit_patch((64,) * ndim, image, 8) == expected
    assert fit_patch((64,) * ndim, (64,) * ndim, 8) == (64,) * ndim
    assert fit_patch((32,) * ndim, (17,) * ndim, (16,) * ndim) == (32,) * ndim  # ceil(17/16)*16


@pytest.mark.parametrize("ndim", [2, 3])
def test_patch_at_keeps_boxes_inside(ndim: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        image = tuple(int(v) for v in rng.integers(8, 40, ndim))
        patch = tuple(int(rng.integers(1, n + 1)) for n in image)
        centre = tuple(int(rng.integers(0, n)) for n in image)
        box = patch_at(centre, patch, image)
        assert box.is_box and box.shape == patch and box.inside(image)
        assert all(
            s <= c < s + p for s, c, p in zip(box.start, centre, patch, strict=True)
        )  # centre stays in the box
    # an axis where the patch exceeds the image starts at 0 (extract pads the end)
    box = patch_at((5,) * ndim, (24,) + (4,) * (ndim - 1), (20,) * ndim)
    assert box.start == (0, 3, 3)[:ndim]


def _blob_label(ndim: int) -> np.ndarray:
    """Class 1: 10 voxels, class 3: 90 voxels, in a 2D 32x32 or 3D 16^3 image."""
    shape = (32, 32) if ndim == 2 else (16, 16, 16)
    label = np.zeros(shape, np.int16)
    flat = label.reshape(-1)
    flat[100:110] = 1
    flat[500:590] = 3
    return label


@pytest.mark.parametrize("ndim", [2, 3])
def test_balanced_picks_foreground_at_the_ratio(ndim: int) -> None:
    label = _blob_label(ndim)
    fg_fraction = (label > 0).mean()
    ratio = 0.33
    g = _gen(0)
    hits = [label[draw_centre(label, (8,) * ndim, g, "balanced", ratio)] > 0 for _ in range(2000)]
    expected = ratio + (1 - ratio) * fg_fraction  # uniform draws also land on foreground sometimes
    assert abs(np.mean(hits) - expected) < 0.05
    # With every draw forced to foreground, classes come in proportion to their size (10 : 90).
    g = _gen(1)
    classes = [label[draw_centre(label, (8,) * ndim, g, "balanced", 1.0)] for _ in range(2000)]
    assert set(classes) == {1, 3}
    assert abs(np.mean(np.array(classes) == 1) - 0.1) < 0.05


@pytest.mark.parametrize("ndim", [2, 3])
def test_per_class_picks_each_present_class_equally(ndim: int) -> None:
    label = _blob_label(ndim)  # class 2 is absent
    g = _gen(2)
    classes = np.array([label[draw_centre(label, (8,) * ndim, g, "per_class", 1.0)] for _ in range(2000)])
    assert set(classes.tolist()) == {1, 3}
    assert abs(np.mean(classes == 1) - 0.5) < 0.05
    only3 = {int(label[draw_centre(label, (8,) * ndim, g, "per_class", 1.0, classes=[3])]) for _ in range(50)}
    assert only3 == {3}


def test_precomputed_locations_replay_the_same_centres() -> None:
    label = _blob_label(3)
    locs = compute_class_locations(label, max_per_class=None)
    for mode in ("balanced", "per_class", "uniform"):
        a, b = _gen(5), _gen(5)
        scanned = [draw_centre(label, (8, 8, 8), a, mode, 0.5) for _ in range(100)]
        cached = [
            draw_centre(None, (8, 8, 8), b, mode, 0.5, class_locations=locs, image_shape=label.shape)
            for _ in range(100)
        ]
        assert scanned == cached


def test_centres_without_foreground_and_uniform_cover_the_image() -> None:
    label = np.zeros((12, 10), np.int16)
    g = _gen(0)
    centres = np.array([draw_centre(label, (4, 4), g, "balanced", 1.0) for _ in range(3000)])
    counts = np.zeros(label.shape)
    np.add.at(counts, tuple(centres.T), 1)
    assert counts.min() > 0  # every voxel reachable; uniform fallback when no foreground
    assert abs(centres[:, 0].mean() - 5.5) < 0.3 and abs(centres[:, 1].mean() - 4.5) < 0.3
    with pytest.raises(FlexPatchError, match="unknown centre mode"):
        draw_centre(label, (4, 4), g, "random")
    with pytest.raises(FlexPatchError, match="foreground ratio"):
        draw_centre(label, (4, 4), g, "balanced", 1.5)
    with pytest.raises(FlexPatchError, match="3 axes"):
        draw_centre(label, (4, 4, 4), g)


def test_class_locations_match_numpy_and_subsample_like_nnunet() -> None:
    rng = np.random.default_rng(0)
    label = rng.choice([0, 1, 2], size=(20, 20, 20), p=[0.6, 0.35, 0.05]).astype(np.int16)
    full = compute_class_locations(label, max_per_class=None)
    assert sorted(full) == [1, 2]
    for c, locs in full.items():
        np.testing.assert_array_equal(locs, np.argwhere(label == c))
    sub = compute_class_locations(label, max_per_class=300, seed=4)
    n1, n2 = (label == 1).sum(), (label == 2).sum()
    assert len(sub[1]) == 300 and len(sub[2]) == min(300, n2)
    assert all(label[tuple(v)] == 1 for v in sub[1])
    assert len({tuple(v) for v in sub[1]}) == 300  # drawn without replacement
    np.testing.assert_array_equal(sub[1], compute_class_locations(label, 300, seed=4)[1])
    cover = compute_class_locations(label, max_per_class=10, seed=0)  # at least 1% of each class
    assert len(cover[1]) == math.ceil(n1 * 0.01)


# ---------------------------------------------------------------- the batch stream


def _write_cases(folder: Path, ndim: int) -> list[Path]:
    shapes = [(32, 32), (30, 27), (32, 24)] if ndim == 2 else [(16, 20, 24), (24, 16, 16), (20, 24, 18)]
    rng = np.random.default_rng(ndim)
    paths = []
    for i, shape in enumerate(shapes):
        image = rng.normal(size=(2, *shape)).astype(np.float32)
        label = np.zeros(shape, np.int16)
        label[tuple(slice(n // 4, n // 2) for n in shape)] = 1
        label[tuple(slice(n // 2, n // 2 + 3) for n in shape)] = 2 + i
        path = folder / f"case{i}.npz"
        np.savez(path, image=image, label=label)
        paths.append(path)
    return paths


def _stream(paths: list[Path], ndim: int, **kwargs) -> PatchStream:
    cfg = SamplingConfig(batch_size=3, divisor=(8,) * ndim, mode="balanced", foreground_ratio=0.5)
    return PatchStream(paths, parse_patch_spec("uniform:8-40", ndim, 8), cfg, seed=7, **kwargs)


def _same(a: dict, b: dict) -> bool:
    return (
        torch.equal(a["image"], b["image"])
        and torch.equal(a["label"], b["label"])
        and all(a[k] == b[k] for k in ("size", "step", "cases", "starts", "centres"))
    )


@pytest.mark.parametrize("ndim", [2, 3])
def test_stream_batches_match_extract_on_the_source(tmp_path: Path, ndim: int) -> None:
    paths = _write_cases(tmp_path, ndim)
    sources = {str(p): np.load(p) for p in paths}
    batches = list(_stream(paths, ndim, steps=6))
    assert [b["step"] for b in batches] == list(range(6))
    assert len({b["size"] for b in batches}) > 1  # the size changes between steps
    for b in batches:
        size = b["size"]
        assert all(s % 8 == 0 for s in size)
        assert b["image"].shape == (3, 2, *size) and b["image"].dtype == torch.float32
        assert b["label"].shape == (3, *size) and b["label"].dtype == torch.int64
        for i, (case, start) in enumerate(zip(b["cases"], b["starts"], strict=True)):
            image, label = sources[case]["image"], sources[case]["label"]
            # never more padding than the divisor round-up
            assert all(s >= 0 and s + p - n < 8 for s, p, n in zip(start, size, label.shape, strict=True))
            box = [Patch.box(start, size)]
            want_img = extract(torch.from_numpy(image), box, padding="border")[0]
            want_lab = extract(torch.from_numpy(label)[None], box, padding="border")[0, 0]
            assert torch.equal(b["image"][i], want_img)
            assert torch.equal(b["label"][i], want_lab.long())
            assert set(b["label"][i].unique().tolist()) <= set(np.unique(label).tolist())
            assert all(s <= c < s + p for s, c, p in zip(start, b["centres"][i], size, strict=True))


def test_stream_is_the_same_with_workers_and_on_resume(tmp_path: Path) -> None:
    paths = _write_cases(tmp_path, 3)
    full = list(make_loader(_stream(paths, 3, steps=6), workers=0))
    multi = list(make_loader(_stream(paths, 3, steps=6), workers=2))
    assert [b["step"] for b in multi] == list(range(6))
    assert all(_same(a, b) for a, b in zip(full, multi, strict=True))
    resumed = list(make_loader(_stream(paths, 3, start_step=3, steps=3), workers=2))
    assert [b["step"] for b in resumed] == [3, 4, 5]
    assert all(_same(a, b) for a, b in zip(full[3:], resumed, strict=True))
    endless = iter(_stream(paths, 3, start_step=4))
    assert _same(next(endless), full[4]) and _same(next(endless), full[5])


def test_stream_depends_on_the_seed_and_foreground_ratio(tmp_path: Path) -> None:
    paths = _write_cases(tmp_path, 2)
    cfg = SamplingConfig(batch_size=4, divisor=(8, 8), mode="balanced", foreground_ratio=1.0)
    a = PatchStream(paths, FixedSize((16, 16)), cfg, seed=1, steps=3, cache_size=1)
    b = PatchStream(paths, FixedSize((16, 16)), cfg, seed=2, steps=3)
    batches = list(a)
    assert not any(_same(x, y) for x, y in zip(batches, b, strict=True))
    for batch in batches:  # every centre on foreground when the ratio is 1
        for case, centre in zip(batch["cases"], batch["centres"], strict=True):
            assert np.load(case)["label"][centre] > 0
    assert all(_same(x, y) for x, y in zip(batches, a, strict=True))  # a tiny LRU cache changes nothing


def test_stream_and_config_errors(tmp_path: Path) -> None:
    paths = _write_cases(tmp_path, 2)
    cfg = SamplingConfig(batch_size=2, divisor=(8, 8))
    with pytest.raises(FlexPatchError, match="missing.npz"):
        PatchStream([tmp_path / "missing.npz"], FixedSize((16, 16)), cfg, seed=0)
    with pytest.raises(FlexPatchError, match="not 2D"):
        PatchStream(paths, FixedSize((16, 16, 16)), cfg, seed=0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((1, 8, 8), np.float32))
    with pytest.raises(FlexPatchError, match="bad.npz lacks array 'label'"):
        PatchStream([bad], FixedSize((16, 16)), cfg, seed=0).batch(0)
    with pytest.raises(FlexPatchError, match="not divisible by 8"):
        PatchStream(paths, FixedSize((12, 16)), cfg, seed=0).batch(0)
    for kwargs in ({"batch_size": 0}, {"mode": "nope"}, {"pad_mode": "reflect"}, {"foreground_ratio": 2.0}):
        with pytest.raises(FlexPatchError):
            SamplingConfig(**{"batch_size": 2, "divisor": (8, 8), **kwargs})
