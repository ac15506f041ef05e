"""Largest-component post-processing: hand-computed fixtures in 2D and 3D, the decision on
validation, and a trained model applying it in predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flexpatch.errors import FlexPatchError
from flexpatch.evaluate import postprocess
from flexpatch.evaluate.postprocess import decide, keep_largest, largest_component, read_postprocessing
from flexpatch.infer.predictor import load_model, predict_files
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train


def test_largest_component_by_hand_2d_with_diagonals() -> None:
    mask = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 0, 0, 0, 1],
            [0, 1, 0, 0, 1],  # (2,1) touches (1,0) diagonally: one component of 4
            [0, 0, 0, 0, 0],
        ],
        bool,
    )
    want = np.zeros_like(mask)
    want[0, 0] = want[0, 1] = want[1, 0] = want[2, 1] = True
    assert np.array_equal(largest_component(mask), want)
    assert not largest_component(np.zeros((3, 3), bool)).any()


def test_keep_largest_per_class_in_3d() -> None:
    seg = np.zeros((6, 6, 6), np.uint8)
    seg[:3, :3, :3] = 1
    seg[5, 5, 5] = 1  # a stray island of class 1
    seg[4:, :2, 4:] = 2
    seg[0, 5, 0] = 2  # and one of class 2, which is not post-processed
    out = keep_largest(seg, [1])
    assert out[5, 5, 5] == 0 and out[0, 5, 0] == 2 and (out[:3, :3, :3] == 1).all()
    assert (out == 2).sum() == (seg == 2).sum()


def _reference_cut(seg: np.ndarray, classes: list[int]) -> np.ndarray:
    """SciPy's labelling of each whole class and NumPy's counts, with no box and no chunks."""
    from scipy import ndimage

    out = seg.copy()
    for c in classes:
        labelled, count = ndimage.label(seg == c, structure=np.ones((3,) * seg.ndim, bool))
        if count > 1:
            values, sizes = np.unique(labelled[labelled > 0], return_counts=True)
            out[(labelled > 0) & (labelled != values[np.argmax(sizes)])] = 0
    return out


@pytest.mark.parametrize("shape", [(61, 47), (23, 19, 17)])
def test_cutting_in_place_by_chunks_is_the_reference(shape: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Noisy classes (many components, some touching the borders) cut in place a few rows at a time
    equal the whole-image reference; keep_largest leaves its input alone."""
    rng = np.random.default_rng(len(shape))
    seg = (rng.integers(0, 4, shape) * (rng.random(shape) < 0.6)).astype(np.uint8)
    want = _reference_cut(seg, [1, 3])
    assert np.array_equal(keep_largest(seg, [1, 3]), want)
    monkeypatch.setattr(postprocess, "SIZE_CHUNK_VOXELS", 50)  # chunks of one or two rows
    mine = seg.copy()
    assert postprocess.cut_to_largest_(mine, [1, 3]) is mine and np.array_equal(mine, want)


@pytest.mark.parametrize("kind", ["connected", "isolated"])
def test_cutting_holds_at_most_what_a_budget_counts(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The post-processing's working set, which a --memory budget counts (``working_bytes``), bounds
    what it holds: measured by tracemalloc (NumPy reports its buffers) for a class spread over the
    whole volume (its box is the image) in few large components, and in the most components there
    can be (a voxel every other row on each axis)."""
    import tracemalloc

    monkeypatch.setattr(postprocess, "SIZE_CHUNK_VOXELS", 4096)  # the per-voxel terms dominate
    shape = (64, 64, 48)
    if kind == "connected":
        seg = (np.random.default_rng(0).random(shape) < 0.2).astype(np.uint8) * 2
    else:
        seg = np.zeros(shape, np.uint8)
        seg[::2, ::2, ::2] = 2
    tracemalloc.start()
    try:
        postprocess.cut_to_largest_(seg, [2, 1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = postprocess.working_bytes(shape, [2])
    assert peak <= bound, (peak / seg.size, bound / seg.size)
    if kind == "connected":  # the components' share is small: about 5 bytes a voxel
        assert peak < 5.5 * seg.size
    else:  # every component one voxel: the first in scan order is kept
        assert (seg == 2).sum() == 1 and seg[0, 0, 0] == 2
    assert postprocess.working_bytes(shape, []) == 0


def test_decide_keeps_the_rule_only_where_it_helps() -> None:
    truth = np.zeros((10, 10), np.int64)
    truth[1:4, 1:4] = 1  # one liver
    truth[6, 6] = truth[8, 2] = 2  # two lesions
    pred = truth.copy()
    pred[8, 8] = 1  # a stray liver island: the rule removes it
    decision = decide([(pred, truth)], [1, 2])
    assert decision["largest_component"] == [1]
    assert decision["dice_after"]["1"] == 1.0 and decision["dice_before"]["1"] == pytest.approx(18 / 19)
    assert decision["dice_after"]["2"] == pytest.approx(2 / 3)  # it would drop a lesion


def test_training_decides_and_predict_applies(tiny_abdomen: Path, tmp_path: Path) -> None:
    config = TrainConfig(model_kwargs={"channels": 4, "levels": 2, "convs_per_level": 2}, patch="16",
                         steps=2, batch=2, val_every=2, workers=0)  # fmt: skip
    train(tiny_abdomen, tmp_path / "m", config, device="cpu", progress=False)
    decision = json.loads((tmp_path / "m" / "postprocessing.json").read_text())
    assert set(decision["dice_before"]) == {str(c) for c in range(1, 7)}
    (tmp_path / "m" / "postprocessing.json").write_text(json.dumps({"largest_component": [1, 2, 3, 4, 5, 6]}))
    model = load_model(tmp_path / "m", device="cpu")
    image = sorted((tiny_abdomen / "imagesTs").iterdir())[:1]
    (raw,) = predict_files(model, image, tmp_path / "raw", progress=False, tta="none", postprocess=False)
    (post,) = predict_files(model, image, tmp_path / "post", progress=False, tta="none")
    import nibabel as nib

    a, b = np.asarray(nib.load(str(raw)).dataobj), np.asarray(nib.load(str(post)).dataobj)
    assert np.array_equal(b, keep_largest(a, range(1, 7)))
    (tmp_path / "m" / "postprocessing.json").write_text(json.dumps({"largest_component": ["liver"]}))
    with pytest.raises(FlexPatchError, match="postprocessing.json: 'largest_component' must be"):
        read_postprocessing(tmp_path / "m")
