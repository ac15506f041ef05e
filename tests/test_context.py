"""Location context: coordinate channels against a hand-computed grid (oblique affine included),
the body's frame, and a model trained with them predicting without a flag, in 2D and 3D."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flexpatch.data.context import body_box, context_channels, coordinates, with_context
from flexpatch.data.io import read_image
from flexpatch.errors import FlexPatchError
from flexpatch.infer.predictor import load_model, predict_files
from flexpatch.train.config import TrainConfig
from flexpatch.train.loop import train

TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


def test_body_box_is_the_part_unlike_the_border() -> None:
    image = np.full((1, 20, 16, 12), -1.0, np.float32)
    image[0, 3:15, 5:11, 2:9] = 2.0
    lo, hi = body_box(image)
    assert lo.tolist() == [3, 5, 2] and hi.tolist() == [14, 10, 8]
    lo, hi = body_box(np.zeros((1, 5, 6), np.float32))  # nothing stands out: all body
    assert lo.tolist() == [0, 0] and hi.tolist() == [4, 5]


@pytest.mark.parametrize("ndim", [2, 3])
def test_coordinates_match_a_hand_computed_grid_on_an_oblique_affine(ndim: int) -> None:
    shape = (6, 5, 4)[:ndim]
    rot = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    rot[:2, :2] = [[c, -s], [s, c]]
    affine = rot @ np.diag([2.0, 1.5, 3.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    box = (np.zeros(ndim, int), np.array(shape) - 1)
    got = coordinates(shape, affine, box)
    a, t = affine[:ndim, :ndim], affine[:ndim, 3]
    corners = [a @ (np.array(k) * (np.array(shape) - 1)) + t for k in np.ndindex(*(2,) * ndim)]
    lo, hi = np.min(corners, 0), np.max(corners, 0)
    for index in np.ndindex(*shape):
        world = a @ np.array(index, float) + t
        want = (world - (lo + hi) / 2) / ((hi - lo) / 2)
        assert np.allclose(got[(slice(None), *index)], want, atol=1e-5)


def test_the_frame_follows_the_body_not_the_field_of_view() -> None:
    """The same body in a wider, shifted scan gets the same coordinates."""
    body = np.zeros((1, 10, 10), np.float32)
    body[0, 2:8, 3:9] = 5.0
    wide = np.zeros((1, 16, 14), np.float32)
    wide[0, 5:15, 1:11] = body[0]
    small = with_context(body, np.eye(4), "coords")
    large = with_context(wide, np.eye(4), "coords")
    assert small.shape == (3, 10, 10) and large.shape == (3, 16, 14)
    assert np.allclose(small[1:, 2:8, 3:9], large[1:, 7:13, 4:10])
    assert np.allclose(small[1:, 2, 3], [-1, -1]) and np.allclose(small[1:, 7, 8], [1, 1])
    assert with_context(body, np.eye(4), "none") is body
    assert context_channels("coords", 3) == 3 and context_channels("none", 3) == 0
    with pytest.raises(FlexPatchError, match="unknown location context 'xyz'"):
        TrainConfig(context="xyz")


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_context_model_trains_and_predicts_without_a_flag(
    ndim: int, tiny_abdomen: Path, tiny_cells: Path, tmp_path: Path
) -> None:
    data = tiny_abdomen if ndim == 3 else tiny_cells
    patch = "16" if ndim == 3 else "32"
    config = TrainConfig(model_kwargs=TINY, patch=patch, steps=2, batch=2, val_every=2, workers=0,
                         context="coords")  # fmt: skip
    train(data, tmp_path / "m", config, device="cpu", progress=False)
    model = load_model(tmp_path / "m", device="cpu")
    assert model.context == "coords" and model.spec.in_channels == 1 + ndim
    image = sorted((data / "imagesTs").iterdir())[0]
    (written,) = predict_files(model, [image], tmp_path / "out", progress=False, tta="none")
    assert written.is_file()
    prepared, _ = model.prepare(read_image(image, ndim=ndim))
    assert prepared.shape[1] == 1 + ndim and torch.all(prepared[0, 1:].abs() < 3)
