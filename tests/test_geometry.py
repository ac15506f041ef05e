"""Golden fixtures for the geometry core, checked against hand-computed values and MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, accumulate, extract, grid_starts, window_weights


def test_box_extract_golden_2d() -> None:
    img = torch.arange(16.0).reshape(1, 4, 4)
    out = extract(img, [Patch.box((1, 2), (2, 2)), Patch.box((0, 0), (2, 2))])
    assert out.shape == (2, 1, 2, 2)
    assert out[0, 0].tolist() == [[6.0, 7.0], [10.0, 11.0]]
    assert out[1, 0].tolist() == [[0.0, 1.0], [4.0, 5.0]]


def test_box_outside_is_padded() -> None:
    img = torch.arange(16.0).reshape(1, 4, 4) + 1
    zeros = extract(img, [Patch.box((-1, 3), (2, 2))], padding="zeros")[0, 0]
    assert zeros.tolist() == [[0.0, 0.0], [4.0, 0.0]]
    border = extract(img, [Patch.box((-1, 3), (2, 2))], padding="border")[0, 0]
    assert border.tolist() == [[4.0, 4.0], [4.0, 4.0]]


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_affine_resampling_equals_slicing(ndim: int) -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand((2, *([9] * ndim)), generator=g)
    box = Patch.box((1,) * ndim, (5,) * ndim)
    # the same box through grid_sample (a non-integer-free affine is forced by a tiny scale change of 1.0)
    general = Patch(box.affine.copy() + np.diag([1e-12] * ndim + [0]), box.shape)
    assert not general.is_box
    fast = extract(img, [box])
    slow = extract(img, [general], mode="linear")
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_scaled_patch_golden_linear() -> None:
    img = torch.arange(120.0).reshape(1, 10, 12)
    p = Patch.scaled(center=(4.5, 5.5), width=(4.0, 4.0), shape=(5, 5))
    out = extract(img, [p], mode="linear")[0, 0]
    # voxel (i, j) of the patch sits at image (2.5 + i, 3.5 + j); the image is linear: v = 12 y + x
    expected = torch.tensor([[12 * (2.5 + i) + 3.5 + j for j in range(5)] for i in range(5)])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("ndim", [2, 3])
def test_accumulate_boxes_weighted_mean(ndim: int) -> None:
    shape = (6,) * ndim
    out_sum = torch.zeros((1, *shape))
    w_sum = torch.zeros((1, *shape))
    patches = [Patch.box((0,) * ndim, (4,) * ndim), Patch.box((2,) * ndim, (4,) * ndim)]
    outputs = torch.stack([torch.full((1, *(4,) * ndim), 1.0), torch.full((1, *(4,) * ndim), 3.0)])
    accumulate(out_sum, w_sum, outputs, patches)
    mean = out_sum / w_sum.clamp(min=1e-8)
    centre = (slice(None), *(slice(2, 4),) * ndim)
    assert torch.all(mean[centre] == 2.0)  # both windows overlap: (1 + 3) / 2
    assert mean[(0, *(0,) * ndim)] == 1.0 and mean[(0, *(5,) * ndim)] == 3.0


def test_accumulate_clips_box_outside() -> None:
    out_sum, w_sum = torch.zeros(1, 3, 3), torch.zeros(1, 3, 3)
    accumulate(out_sum, w_sum, torch.ones(1, 1, 2, 2), [Patch.box((2, -1), (2, 2))])
    assert w_sum[0].tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]


def test_scatter_nearest_for_general_affines() -> None:
    out_sum, w_sum = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    # a 4x4 patch spread over 7x7 voxels: every other image voxel receives one patch voxel
    p = Patch.scaled(center=(3.0, 3.0), width=(6.0, 6.0), shape=(4, 4))
    accumulate(out_sum, w_sum, torch.full((1, 1, 4, 4), 2.0), [p])
    hits = (w_sum[0] > 0).nonzero().tolist()
    assert sorted(hits) == [[i, j] for i in (0, 2, 4, 6) for j in (0, 2, 4, 6)]
    assert torch.all(out_sum[0][w_sum[0] > 0] == 2.0)


@pytest.mark.parametrize("shape", [(7, 9), (16, 16, 8), (1, 5), (32, 24, 40)])
def test_gaussian_window_equals_monai(shape: tuple[int, ...]) -> None:
    torch.testing.assert_close(window_weights(shape, "gaussian"), compute_importance_map(shape, "gaussian"))
    torch.testing.assert_close(window_weights(shape, "constant"), compute_importance_map(shape, "constant"))


def test_cos_windows_golden() -> None:
    w = window_weights((5,), "cos")
    expected = torch.tensor([0.0, np.sin(np.pi / 4), 1.0, np.sin(np.pi / 4), 0.0]).float()
    # zero borders are floored at 1e-3 so that every voxel keeps some weight
    torch.testing.assert_close(w, expected.clamp(min=1e-3))
    inner = (slice(1, -1), slice(1, -1))
    cos2, cos = window_weights((5, 3), "cos2"), window_weights((5, 3), "cos")
    torch.testing.assert_close(cos2[inner] ** 2, cos[inner], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("image", "patch", "overlap"),
    [((20, 13), (8, 8), 0.5), ((17, 9, 30), (8, 9, 7), 0.25), ((64,), (32,), 0.75)],
)
def test_grid_starts_equals_monai(image, patch, overlap) -> None:
    interval = [p if p == s else max(int(p * (1 - overlap)), 1) for p, s in zip(patch, image)]
    ref = [tuple(int(sl.start) for sl in slc) for slc in dense_patch_slices(image, patch, interval)]
    assert grid_starts(image, patch, overlap) == ref


def test_bad_inputs() -> None:
    with pytest.raises(FlexPatchError, match="positive"):
        Patch.box((0, 0), (0, 4))
    with pytest.raises(FlexPatchError, match="exceeds"):
        grid_starts((4, 4), (8, 4), 0.5)
    with pytest.raises(FlexPatchError, match="share a shape"):
        extract(torch.zeros(1, 8, 8), [Patch.box((0, 0), (2, 2)), Patch.box((0, 0), (3, 3))])
    with pytest.raises(FlexPatchError, match="window kind"):
        window_weights((4, 4), "hann")
