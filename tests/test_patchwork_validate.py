"""Validation while a patchwork trains: held-out cases, Dice per label, the best round's weights (2D, 3D)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flexpatch.data.dataset import load_case, load_dataset
from flexpatch.patchwork.apply import ApplyOptions
from flexpatch.patchwork.config import PatchworkConfig
from flexpatch.patchwork.files import BEST
from flexpatch.patchwork.predict import load_patchwork, segment_volume
from flexpatch.patchwork.train import train_patchwork
from flexpatch.train.loop import split_cases

torch.set_num_threads(1)

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


def _config(ndim: int, **extra: object) -> PatchworkConfig:
    scheme = {"depth": 2, "matrix": [[8] * ndim], "fov_rel": [0.8] * ndim}
    return PatchworkConfig(
        scheme=scheme, block_options=TINY, rounds=3, num_patches=3, batch_size=4, workers=0, lr=3e-3, **extra
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice by its definition, NaN where the label is in neither (the metric's convention)."""
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")


@pytest.mark.parametrize("fixture", ["tiny_cells", "tiny_abdomen"])
def test_validation_logs_dice_per_label_and_keeps_the_best_round(fixture, request, tmp_path):
    ds_dir = request.getfixturevalue(fixture)
    ndim = 2 if fixture == "tiny_cells" else 3
    model = tmp_path / "model"
    summary = train_patchwork(ds_dir, model, _config(ndim, val_fraction=0.25, val_every=1), "cpu", False)
    log = json.loads((model / "log.json").read_text())
    assert all("val_dice" in r for r in log)  # every round (val_every 1)
    means = [r["val_mean"] for r in log]
    best_round = int(np.nanargmax(means))
    assert summary["best_val_dice"] == pytest.approx(means[best_round])
    saved = torch.load(model / BEST, map_location="cpu", weights_only=False)
    assert saved["round"] == best_round and saved["val_mean"] == pytest.approx(means[best_round])
    # the logged Dice is what predicting the held-out case with the best weights gives, by definition
    ds = load_dataset(ds_dir)
    _, val = split_cases(list(ds.training), 0.25, 0)
    assert len(val) == 1
    image, label = load_case(val[0], ndim)
    seg, _, _ = segment_volume(load_patchwork(model, "cpu"), image, ApplyOptions(batch_size=4))
    for value, logged in log[best_round]["val_dice"].items():
        expected = _dice(seg == int(value), label.data == int(value))
        assert logged == pytest.approx(expected, abs=1e-6, nan_ok=True)


def test_without_validation_there_is_no_best_and_predict_takes_the_last_weights(tiny_cells, tmp_path):
    model = tmp_path / "model"
    summary = train_patchwork(tiny_cells, model, _config(2, val_fraction=0.0), "cpu", False)
    assert summary["best_val_dice"] is None and not (model / BEST).exists()
    assert all("val_dice" not in r for r in json.loads((model / "log.json").read_text()))
    last = torch.load(model / "patchwork.pt", map_location="cpu", weights_only=False)["net"]
    loaded = load_patchwork(model, "cpu").net.state_dict()
    assert all(torch.equal(last[k], loaded[k].cpu()) for k in last)


def test_threshold_counts_match_a_comparison_per_threshold():
    from flexpatch.patchwork.validate import THRESHOLDS, threshold_counts

    rng = np.random.default_rng(0)
    fg = rng.random((2, 30, 20)).astype(np.float32)
    fg[0, 0, :5] = THRESHOLDS[:5]  # values exactly at a threshold count as >= it
    label = rng.integers(0, 4, (30, 20))
    care = label != 3  # 3 = don't care
    got = threshold_counts(fg, label, [1, 2], care)
    for i, v in enumerate([1, 2]):
        truth = (label == v) & care
        for j, t in enumerate(THRESHOLDS):
            expected = [((fg[i] >= t) & truth).sum(), ((fg[i] >= t) & care).sum(), truth.sum()]
            np.testing.assert_array_equal(got[i, j], expected)


def test_best_threshold_is_where_the_dice_peaks():
    from flexpatch.patchwork.validate import best_thresholds, threshold_counts

    # label 1 is where the probability is 0.3 or 0.35; background voxels sit at 0.2: any threshold in
    # (0.2, 0.3] separates them perfectly, and the first such candidate is 0.25
    fg = np.array([[0.2, 0.2, 0.3, 0.35, 0.2, 0.3]])
    label = np.array([0, 0, 1, 1, 0, 1])
    counts = threshold_counts(fg, label, [1], np.ones(6, bool))
    assert best_thresholds(counts) == [0.25]
    # a label nobody holds or predicts keeps the default 0.5
    assert best_thresholds(np.zeros((1, counts.shape[1], 3))) == [0.5]


def test_mask_output_uses_the_validation_thresholds(tiny_cells, tmp_path):
    model = tmp_path / "model"
    train_patchwork(tiny_cells, model, _config(2, val_fraction=0.25, val_every=1), "cpu", False)
    loaded = load_patchwork(model, "cpu")
    saved = torch.load(model / BEST, map_location="cpu", weights_only=False)
    assert loaded.thresholds == saved["thresholds"] and len(loaded.thresholds) == len(
        loaded.meta["label_values"]
    )
    image, _ = load_case(load_dataset(tiny_cells).test[0], 2)
    opts = ApplyOptions(batch_size=4)
    probs, _, _ = segment_volume(loaded, image, opts, "float32")
    mask, _, _ = segment_volume(loaded, image, opts, "mask")
    np.testing.assert_array_equal(mask, (probs >= np.asarray(loaded.thresholds)).astype(np.uint8))
    loaded.thresholds = [0.3]  # whatever validation found (this run's best round happened to pick 0.5)
    mask, _, _ = segment_volume(loaded, image, opts, "mask")
    np.testing.assert_array_equal(mask, (probs >= 0.3).astype(np.uint8))
    mask, _, _ = segment_volume(loaded, image, opts, "mask:0.7")  # given thresholds win
    np.testing.assert_array_equal(mask, (probs >= 0.7).astype(np.uint8))
    loaded.thresholds = None  # no validation: 0.5, as DNP
    mask, _, _ = segment_volume(loaded, image, opts, "mask")
    np.testing.assert_array_equal(mask, (probs >= 0.5).astype(np.uint8))


def test_ignored_voxels_of_a_uint8_atlas_become_minus_one_not_a_label() -> None:
    from flexpatch.patchwork.validate import outside_as

    seg = np.array([[0, 255], [3, 255]], np.uint8)  # an atlas as label_map writes it
    care = np.array([[True, False], [True, True]])
    out = outside_as(seg, care)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[0, -1], [3, 255]])
