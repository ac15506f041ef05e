"""Stitching for Deep Neural Patchworks: hand-made sums, sparse suppression, scatter kinds, level mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexpatch.accumulator import Accumulator
from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, extract, window_weights
from flexpatch.patchwork.stitch import Stitcher, mix_levels


def _line(ndim: int, size: int) -> tuple[int, ...]:
    """A grid that is a line of ``size`` voxels along the last axis."""
    return (1,) * (ndim - 1) + (size,)


def _two_overlapping(ndim: int, alpha: float) -> Stitcher:
    # boxes of 4 voxels at 0 and 2 on a line of 6: counts [1, 1, 2, 2, 1, 1], sums [1, 1, 4, 4, 3, 3]
    st = Stitcher(_line(ndim, 6), channels=1, window="constant", alpha=alpha)
    outputs = torch.stack([torch.full((1, *_line(ndim, 4)), 1.0), torch.full((1, *_line(ndim, 4)), 3.0)])
    starts = [(0,) * ndim, (0,) * (ndim - 1) + (2,)]
    affines = np.stack([Patch.box(s, _line(ndim, 4)).affine for s in starts])
    st.add(outputs, affines)
    return st


@pytest.mark.parametrize("ndim", [2, 3])
def test_sparse_suppression_hand_made(ndim: int) -> None:
    st = _two_overlapping(ndim, alpha=1.0)
    # sum / sqrt(count^2 + 3): seen once -> /2, seen twice -> /sqrt(7)
    expected = [0.5, 0.5, 1.5118578920369088, 1.5118578920369088, 1.5, 1.5]
    got = st.result().reshape(-1).tolist()
    assert got == pytest.approx(expected, abs=1e-6)
    assert st.coverage().reshape(-1).tolist() == [1.0, 1.0, 2.0, 2.0, 1.0, 1.0]
    # alpha = 1: a voxel seen once by an output of 1 never exceeds 0.5
    assert max(got[:2]) <= 0.5


@pytest.mark.parametrize("ndim", [2, 3])
def test_no_suppression_is_mean_hand_made(ndim: int) -> None:
    got = _two_overlapping(ndim, alpha=0.0).result().reshape(-1).tolist()
    once, twice = 1.00001, 2.00001  # count + 1e-5
    assert got == pytest.approx([1 / once, 1 / once, 4 / twice, 4 / twice, 3 / once, 3 / once])


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("window", ["cos", "cos2"])
def test_weighted_mean_matches_numpy(ndim: int, window: str) -> None:
    rng = np.random.default_rng(ndim)
    grid, m, c = (9,) * ndim, (4,) * ndim, 2
    starts = [tuple(int(v) for v in rng.integers(-2, 8, ndim)) for _ in range(6)]
    outputs = torch.as_tensor(rng.random((len(starts), c, *m)), dtype=torch.float32)
    affines = np.stack([Patch.box(s, m).affine for s in starts])
    st = Stitcher(grid, channels=c, window=window)
    st.add(outputs, torch.as_tensor(affines))
    # numpy reference: pad the grid by 4 on each side so boxes never leave it, then crop
    w = window_weights(m, window).numpy().astype(np.float64)
    total = np.zeros((c, *(g + 8 for g in grid)))
    count = np.zeros((1, *(g + 8 for g in grid)))
    for out, s in zip(outputs.numpy().astype(np.float64), starts):
        sl = tuple(slice(v + 4, v + 4 + k) for v, k in zip(s, m))
        total[(slice(None), *sl)] += out * w
        count[(slice(None), *sl)] += w
    inner = (slice(None), *(slice(4, 4 + g) for g in grid))
    expected = total[inner] / (count[inner] + 1e-5)
    np.testing.assert_allclose(st.result().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.coverage().numpy(), count[inner], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_nearest_identity_returns_the_image(ndim: int) -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand((2, *([7] * ndim)), generator=g)
    m = (4,) * ndim
    boxes = [Patch.box(s, m) for s in [(0,) * ndim, (3,) * ndim, (1,) + (2,) * (ndim - 1)]]
    # a flipped patch (not a box) goes through grid_sample and the nearest-voxel scatter
    flip = np.eye(ndim + 1)
    flip[0, 0], flip[0, ndim] = -1.0, 5.0
    patches = [*boxes, Patch(flip, m)]
    crops = torch.cat([extract(image, boxes), extract(image, patches[-1:], mode="nearest")])
    st = Stitcher(image.shape[1:], channels=2, window="constant", scatter="nearest")
    st.add(crops, np.stack([p.affine for p in patches]))
    covered = st.coverage()[0] > 0
    assert covered.sum() > 0 and not covered.all()
    res = st.result()
    torch.testing.assert_close(res[:, covered], image[:, covered], atol=1e-4, rtol=1e-4)
    assert torch.all(res[:, ~covered] == 0)


def test_linear_splat_weights_hand_made() -> None:
    out_sum, weight = torch.zeros(1, 4, 5), torch.zeros(1, 4, 5)
    affine = np.eye(3)[None].copy()
    affine[0, :2, 2] = [1.25, 2.5]  # one patch voxel at (1.25, 2.5)
    Accumulator(out_sum, weight).add(torch.full((1, 1, 1, 1), 2.0), affine, "linear", torch.ones(1, 1))
    expected = torch.zeros(4, 5)
    expected[1, 2] = expected[1, 3] = 0.375
    expected[2, 2] = expected[2, 3] = 0.125
    torch.testing.assert_close(weight[0], expected)
    torch.testing.assert_close(out_sum[0], 2 * expected)


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_scatter_of_constant_field(ndim: int) -> None:
    rng = np.random.default_rng(10 + ndim)
    grid, m = (12,) * ndim, (5,) * ndim
    affines = []
    for _ in range(5):
        q, _ = np.linalg.qr(rng.normal(size=(ndim, ndim)))  # a random rotation or reflection
        a = np.eye(ndim + 1)
        a[:ndim, :ndim] = q * rng.uniform(0.7, 1.0)  # patch voxels no larger than the grid's: splatted
        # centred near the middle: even the corners of a rotated, stretched patch stay inside the grid
        a[:ndim, ndim] = rng.uniform(5, 6, ndim) - a[:ndim, :ndim] @ (np.array(m) - 1) / 2
        affines.append(a)
    affines_arr = np.stack(affines)
    st = Stitcher(grid, channels=1, window="cos", scatter="linear")
    st.add(torch.full((5, 1, *m), 2.5), affines_arr)
    cov = st.coverage()[0]
    well = cov > 0.01  # the mean is sum/(count+1e-5): voxels with tiny coverage are pulled to 0
    assert well.sum() > 10
    torch.testing.assert_close(st.result()[0][well], torch.full_like(cov[well], 2.5), rtol=2e-3, atol=0)
    # with a constant window and patches inside the grid, every patch voxel adds exactly 1 of weight
    flat = Stitcher(grid, channels=1, window="constant", scatter="linear")
    flat.add(torch.ones(5, 1, *m), affines_arr)
    assert float(flat.coverage().sum()) == pytest.approx(5 * np.prod(m), rel=1e-5)


def test_mix_levels_takes_finest_covering_level() -> None:
    grid = (1, 8)
    results, coverages = [], []
    for value, start, width in [(1.0, 0, 6), (2.0, 2, 4), (3.0, 3, 2)]:
        st = Stitcher(grid, channels=1, window="constant")
        st.add(torch.full((1, 1, 1, width), value), Patch.box((0, start), (1, width)).affine[None])
        results.append(st.result())
        coverages.append(st.coverage())
    expected = [1.0, 1.0, 2.0, 3.0, 3.0, 2.0, 0.0, 0.0]  # voxels 6, 7: no level, the coarsest (empty) stays
    masks = [c > 0 for c in coverages]  # what Stitcher.covered gives
    mixed = mix_levels([r.clone() for r in results], masks)
    assert mixed.reshape(-1).tolist() == pytest.approx(expected, abs=1e-4)
    mixed = mix_levels(results, coverages)
    assert mixed.reshape(-1).tolist() == pytest.approx(expected, abs=1e-4)
    assert mixed.data_ptr() == results[0].data_ptr()  # in place: no image-sized copy
    with pytest.raises(FlexPatchError):
        mix_levels(results, coverages[:2])


def test_bad_arguments_raise() -> None:
    with pytest.raises(FlexPatchError, match="scatter"):
        Stitcher((4, 4), channels=1, scatter="cubic")
    with pytest.raises(FlexPatchError, match="window"):
        Stitcher((4, 4), channels=1, window="hann")
    with pytest.raises(FlexPatchError, match="alpha"):
        Stitcher((4, 4), channels=1, alpha=-1.0)
    st = Stitcher((4, 4), channels=2)
    with pytest.raises(FlexPatchError, match="outputs"):
        st.add(torch.ones(1, 3, 2, 2), np.eye(3)[None])
    with pytest.raises(FlexPatchError, match="affines"):
        st.add(torch.ones(2, 2, 2, 2), np.eye(3)[None])


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_equals_nearest_on_integer_boxes(ndim: int) -> None:
    g = torch.Generator().manual_seed(1)
    outputs = torch.rand((3, 2, *([3] * ndim)), generator=g)
    affines = np.stack([Patch.box(s, (3,) * ndim).affine for s in [(0,) * ndim, (2,) * ndim, (-1,) * ndim]])
    res = []
    for scatter in ("nearest", "linear"):
        st = Stitcher((5,) * ndim, channels=2, window="cos2", scatter=scatter)
        st.add(outputs, affines)
        res.append((st.result(), st.coverage()))
    torch.testing.assert_close(res[0], res[1])


def _pull_reference(values: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], order: int):
    """SciPy reference: each grid voxel inside the patch footprint samples the patch at inv(A) g."""
    from scipy import ndimage

    n = len(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, n)
    inv = np.linalg.inv(affine)
    pos = grid @ inv[:n, :n].T + inv[:n, n]
    inside = np.all((pos >= -0.5) & (pos <= np.array(values.shape) - 0.5), axis=1)
    sampled = ndimage.map_coordinates(values, pos.T, order=order, mode="nearest")
    return np.where(inside, sampled, 0.0).reshape(shape), inside.reshape(shape)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("scatter,order", [("nearest", 0), ("linear", 1)])
@pytest.mark.parametrize("slab", [1 << 18, 50])
def test_coarse_patch_covers_its_whole_footprint(ndim, scatter, order, slab, monkeypatch):
    """A patch with 3-voxel voxels (a coarse level) fills every grid voxel it covers, as SciPy samples it,
    whether sampled at once or in slabs of a few rows (``slab`` grid voxels at a time)."""
    monkeypatch.setattr("flexpatch.patchwork.stitch.PULL_SLAB_VOXELS", slab)
    m = (5, 6, 4)[:ndim]
    shape = (20, 22, 16)[:ndim]
    values = np.random.default_rng(3).random(m)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = 3 * np.eye(ndim)
    affine[:ndim, ndim] = 1.0  # patch voxel p sits at grid 3p + 1: no rounding ties
    if ndim == 2:  # an oblique patch too: the axis-aligned box around it must be masked
        c, s = np.cos(0.3), np.sin(0.3)
        affine[:2, :2] = 3 * np.array([[c, -s], [s, c]])
        affine[:2, 2] = [4.0, 2.0]
    st = Stitcher(shape, 1, window="constant", scatter=scatter)
    st.add(torch.from_numpy(values)[None, None].float(), affine[None])
    expected, inside = _pull_reference(values, affine, shape, order)
    covered = st.coverage()[0].numpy() > 0
    np.testing.assert_array_equal(covered, inside)
    assert inside.sum() > 0.9 * np.prod(np.array(m) * 3)  # the whole footprint, not one voxel in 3^n
    np.testing.assert_allclose(st.result()[0].numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_finish_is_the_result_in_place_and_ends_the_stitcher(ndim: int, alpha: float) -> None:
    st = _two_overlapping(ndim, alpha)
    expected = st.result().clone()
    running = st._sum  # finish divides the running sum itself: no second image-sized buffer
    got = st.finish()
    assert got.data_ptr() == running.data_ptr()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(FlexPatchError, match="already given its result"):
        st.finish()
    with pytest.raises(FlexPatchError, match="no more adds"):
        st.add(torch.ones((1, 1, *_line(ndim, 4))), Patch.box((0,) * ndim, _line(ndim, 4)).affine[None])


def _softmax_patches(ndim: int, kind: str, seed: int) -> tuple[tuple[int, ...], torch.Tensor, np.ndarray]:
    """Softmax outputs of 5 patches and their affines: boxes (``nearest``), shifted and rotated
    patches (``linear``) or coarse patches of 2-voxel spacing (``pull``), on a 10^n grid."""
    rng = np.random.default_rng(seed)
    grid, m = (10,) * ndim, (4,) * ndim
    outputs = torch.softmax(torch.as_tensor(rng.normal(size=(5, 3, *m)) * 3, dtype=torch.float32), 1)
    affines = np.stack([np.eye(ndim + 1)] * 5)
    affines[:, :ndim, ndim] = rng.uniform(-1, 7, (5, ndim))
    if kind == "nearest":
        affines[:, :ndim, ndim] = np.round(affines[:, :ndim, ndim])
    elif kind == "linear":
        c, s = np.cos(0.3), np.sin(0.3)
        affines[:, :2, :2] = [[c, -s], [s, c]]
    else:
        affines[:, :ndim, :ndim] *= 2.0
    return grid, outputs, affines


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", ["nearest", "linear", "pull"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_normalized_equals_full_sums(ndim: int, kind: str, alpha: float) -> None:
    # softmax outputs: recovering channel 0 from the coverage gives what summing it gives
    grid, outputs, affines = _softmax_patches(ndim, kind, seed=ndim)
    scatter = "linear" if kind == "linear" else "nearest"
    full = Stitcher(grid, channels=3, window="cos", alpha=alpha, scatter=scatter)
    lean = Stitcher(grid, channels=3, window="cos", alpha=alpha, scatter=scatter, normalized=True)
    for st in (full, lean):
        st.add(outputs[:3], affines[:3])
        st.add(outputs[3:], affines[3:])
    np.testing.assert_allclose(lean.coverage().numpy(), full.coverage().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lean.result().numpy(), full.result().numpy(), rtol=1e-5, atol=1e-6)
    expected = full.finish().numpy()
    got = lean.finish().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.min() >= 0
    assert lean._count.data_ptr() == lean._sum.data_ptr()  # the coverage lives in channel 0's slot


def test_normalized_stitcher_after_finish() -> None:
    grid, outputs, affines = _softmax_patches(2, "nearest", seed=0)
    st = Stitcher(grid, channels=3, normalized=True)
    st.add(outputs, affines)
    st.finish()
    with pytest.raises(FlexPatchError, match="coverage is gone"):
        st.coverage()
    with pytest.raises(FlexPatchError, match="already given"):
        st.result()
    with pytest.raises(FlexPatchError, match="more than one"):
        Stitcher(grid, channels=1, normalized=True)
