"""The accumulator against NumPy loops (every mode and fusion, 2D and 3D) and hand-computed 4x4 goldens."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flexpatch.accumulator import FUSIONS, MODES, Accumulator, grid_coverage, mean_
from flexpatch.errors import FlexPatchError

GRID, CHANNELS = 4, 2  # a 4^n image: every case below is small enough to check voxel by voxel
# linear and pull weigh voxels, so they fuse by sum only (their refusal: test_refusals)
COMBOS = [(m, f) for m in MODES for f in FUSIONS if f == "sum" or m in ("box", "nearest")]


def _index_grid(shape) -> np.ndarray:
    """Every voxel index of ``shape`` in C order: ``(prod(shape), n)``."""
    return np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, len(shape))


def _affines(ndim: int, mode: str, rng: np.random.Generator, count: int) -> np.ndarray:
    """Placements each mode is for: integer boxes (some crossing the border), rotated and scaled
    patches (a box among them, which takes the fast path), patches of 2-voxel spacing (pull)."""
    mats = np.stack([np.eye(ndim + 1)] * count)
    if mode == "box":
        mats[:, :ndim, ndim] = rng.integers(-2, GRID, (count, ndim))
        return mats
    for a in mats:
        q, _ = np.linalg.qr(rng.normal(size=(ndim, ndim)))  # a random rotation or reflection
        scale = {"nearest": 1.3, "linear": 0.8, "pull": 2.0}[mode]
        a[:ndim, :ndim] = q * scale
        a[:ndim, ndim] = rng.uniform(0, GRID - 1, ndim) - a[:ndim, :ndim] @ np.ones(ndim)
    if mode == "nearest":
        mats[0] = np.eye(ndim + 1)
        mats[0, :ndim, ndim] = [1, -1, 2][:ndim]
    return mats


def _fuse(values, c, g, v, w, fusion) -> None:
    """One patch voxel's value ``v`` (weight ``w``) into buffer voxel ``g`` of channel ``c``."""
    if fusion == "sum":
        values[(c, *g)] += v * w
    elif fusion == "max":
        values[(c, *g)] = max(values[(c, *g)], v)
    elif fusion == "min":
        values[(c, *g)] = min(values[(c, *g)], v)
    else:
        values[(c, *g)] = values[(c, *g)] or v >= 0.5


def _reference_scatter(values, coverage, outputs, affines, window, mode, fusion) -> None:
    """NumPy loops: every patch voxel to its nearest buffer voxel (round half to even, as torch),
    or ``linear``: shared among its 2^n neighbours with multilinear weights."""
    n, spatial = affines.shape[-1] - 1, values.shape[1:]
    for out, a in zip(outputs, affines):
        for idx in _index_grid(out.shape[1:]):
            pos = a[:n, :n] @ idx + a[:n, n]
            if mode == "linear":
                base = np.floor(pos)
                corners = [(base + bits, np.prod(np.where(bits, pos - base, 1 - pos + base)))
                           for bits in itertools.product((0, 1), repeat=n)]  # fmt: skip
            else:
                corners = [(np.round(pos), 1.0)]
            for corner, share in corners:
                g = tuple(int(v) for v in corner)
                if share <= 0 or not all(0 <= v < s for v, s in zip(g, spatial)):
                    continue
                for c in range(len(out)):
                    _fuse(values, c, g, out[(c, *idx)], share * window[tuple(idx)], fusion)
                if coverage is not None:
                    coverage[(0, *g)] += share * window[tuple(idx)]


def _sample(values: np.ndarray, p: np.ndarray, sampling: str) -> float:
    """grid_sample with border padding: clamp into the patch, then nearest or multilinear."""
    p = np.clip(p, 0, np.array(values.shape) - 1)
    if sampling == "nearest":
        return float(values[tuple(int(v) for v in np.round(p))])
    base = np.minimum(np.floor(p), np.array(values.shape) - 1)
    total = 0.0
    for bits in itertools.product((0, 1), repeat=len(p)):
        corner = np.minimum(base + bits, np.array(values.shape) - 1).astype(int)
        total += np.prod(np.where(bits, p - base, 1 - p + base)) * values[tuple(corner)]
    return total


def _reference_pull(values, coverage, outputs, affines, window, sampling) -> None:
    """NumPy loops: every buffer voxel inside a patch's voxel extent samples the patch."""
    n = affines.shape[-1] - 1
    for out, a in zip(outputs, affines):
        inv = np.linalg.inv(a)
        m = np.array(out.shape[1:])
        for g in _index_grid(values.shape[1:]):
            p = inv[:n, :n] @ g + inv[:n, n]
            if np.all(p >= -0.5 - 1e-9) and np.all(p <= m - 0.5 + 1e-9):
                for c in range(len(out)):
                    values[(c, *g)] += _sample(out[c] * window, p, sampling)
                coverage[(0, *g)] += _sample(window, p, sampling)


def _case(ndim: int, mode: str, fusion: str, seed: int):
    rng = np.random.default_rng(seed)
    m = (2,) * ndim if mode == "pull" else (3,) * ndim
    outputs = rng.random((4, CHANNELS, *m))
    affines = _affines(ndim, mode, rng, len(outputs))
    window = rng.uniform(0.2, 1.0, m) if fusion == "sum" else np.ones(m)
    if fusion == "or":
        values = rng.random((CHANNELS, *(GRID,) * ndim)) > 0.8
    else:
        values = rng.random((CHANNELS, *(GRID,) * ndim))
    return outputs, affines, window, values


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode,fusion", COMBOS)
def test_every_mode_and_fusion_equals_numpy_loops(ndim: int, mode: str, fusion: str) -> None:
    outputs, affines, window, values = _case(ndim, mode, fusion, seed=10 * ndim + len(mode))
    coverage = np.zeros((1, *values.shape[1:])) if fusion == "sum" else None
    got = torch.as_tensor(values.copy(), dtype=torch.bool if fusion == "or" else torch.float64)
    got_cov = None if coverage is None else torch.zeros(coverage.shape, dtype=torch.float64)
    acc = Accumulator(got, got_cov, fusion)
    w = torch.as_tensor(window) if fusion == "sum" else None
    acc.add(torch.as_tensor(outputs), affines, mode, w, sampling="linear")
    if mode == "pull":
        _reference_pull(values, coverage, outputs, affines, window, "linear")
    else:
        _reference_scatter(values, coverage, outputs, affines, window, mode, fusion)
    tol = 1e-5 if mode == "pull" else 1e-9  # pull samples with grid_sample, in float32
    np.testing.assert_allclose(got.numpy(), values, rtol=tol, atol=tol)
    if coverage is not None:
        assert coverage.max() > 0
        np.testing.assert_allclose(got_cov.numpy(), coverage, rtol=tol, atol=tol)
    if fusion != "or":
        assert not np.allclose(values, _case(ndim, mode, fusion, seed=10 * ndim + len(mode))[3])  # it did add


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("slab", [1 << 18, 3])
def test_pull_nearest_in_slabs_equals_numpy_loops(ndim: int, slab: int) -> None:
    outputs, affines, window, values = _case(ndim, "pull", "sum", seed=ndim)
    coverage = np.zeros((1, *values.shape[1:]))
    got, got_cov = torch.as_tensor(values.copy()), torch.zeros(coverage.shape, dtype=torch.float64)
    Accumulator(got, got_cov).add(
        torch.as_tensor(outputs),
        affines,
        "pull",
        torch.as_tensor(window),
        sampling="nearest",
        slab_voxels=slab,
    )
    _reference_pull(values, coverage, outputs, affines, window, "nearest")
    np.testing.assert_allclose(got.numpy(), values, rtol=1e-5, atol=1e-5)  # grid_sample: float32
    np.testing.assert_allclose(got_cov.numpy(), coverage, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_add_boxes_equals_the_box_mode_and_needs_no_coverage(ndim: int) -> None:
    outputs, affines, window, values = _case(ndim, "box", "sum", seed=5)
    starts = [tuple(int(v) for v in a[:ndim, ndim]) for a in affines]
    by_mode, by_starts = torch.as_tensor(values.copy()), torch.as_tensor(values.copy())
    Accumulator(by_mode).add(torch.as_tensor(outputs), affines, "box", torch.as_tensor(window))
    Accumulator(by_starts).add_boxes(torch.as_tensor(outputs), starts, torch.as_tensor(window))
    assert torch.equal(by_mode, by_starts)
    _reference_scatter(values, None, outputs, affines, window, "box", "sum")
    np.testing.assert_allclose(by_starts.numpy(), values, rtol=1e-6, atol=1e-6)


def test_box_sum_golden_4x4() -> None:
    values, coverage = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    window = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    outputs = torch.tensor([1.0, 3.0, 5.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
    # boxes at (0, 0) and (1, 1) overlap on voxel (1, 1); the one at (3, 3) keeps only its first voxel
    Accumulator(values, coverage).add_boxes(outputs, [(0, 0), (1, 1), (3, 3)], window)
    expected_cov = torch.tensor([[1, 2, 0, 0], [3, 4 + 1, 2, 0], [0, 3, 4, 0], [0, 0, 0, 1.0]])
    expected = torch.tensor([[1, 2, 0, 0], [3, 4 + 3, 6, 0], [0, 9, 12, 0], [0, 0, 0, 5.0]])
    torch.testing.assert_close(coverage[0], expected_cov, rtol=0, atol=0)
    torch.testing.assert_close(values[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(mean_(values, coverage.clamp(min=1))[0, 1, 1], torch.tensor(7 / 5))


def test_or_max_min_golden_4x4x4() -> None:
    crop = torch.tensor([[[0.2, 0.7], [0.5, 0.1]], [[0.9, 0.0], [0.49, 0.51]]])[None]  # (1, 2, 2, 2)
    masks = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    masks[0, 1, 1, 1] = True  # already set: OR keeps it although the crop says 0.2 there
    Accumulator(masks, fusion="or").add_boxes(crop[None], [(1, 1, 1)])
    expected = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    expected[0, 1:3, 1:3, 1:3] = torch.tensor([[[1, 1], [1, 0]], [[1, 0], [0, 1]]], dtype=torch.bool)
    assert torch.equal(masks, expected)
    probs = torch.full((1, 4, 4, 4), 0.5)
    Accumulator(probs, fusion="max").add_boxes(crop[None], [(2, 2, 2)])
    assert probs[0, 2:, 2:, 2:].flatten().tolist() == pytest.approx([0.5, 0.7, 0.5, 0.5, 0.9, 0.5, 0.5, 0.51])
    assert float(probs.sum()) == pytest.approx(0.5 * 64 + 0.2 + 0.4 + 0.01)
    Accumulator(probs, fusion="min").add_boxes(crop[None], [(0, 0, 0)])
    assert probs[0, :2, :2, :2].flatten().tolist() == pytest.approx([0.2, 0.5, 0.5, 0.1, 0.5, 0.0, 0.49, 0.5])


def test_mean_golden_with_suppression_and_the_softmax_trick() -> None:
    sums, cover = torch.tensor([[2.0, 4.0, 0.0]]), torch.tensor([[1.0, 2.0, 0.0]])
    assert mean_(sums.clone(), cover, eps=0.5).tolist()[0] == pytest.approx([2 / 1.5, 4 / 2.5, 0.0])
    # sparse suppression: voxels seen once by an output of 1 get 1/2, twice 2/sqrt(7)
    got = mean_(sums.clone(), cover, alpha=1.0).tolist()[0]
    assert got == pytest.approx([1.0, 4 / np.sqrt(7), 0.0])
    # softmax outputs: channel 0's slot held the coverage; its sum is recovered as coverage - others
    lean = torch.tensor([[1.0, 2.0], [0.25, 1.5]])  # coverage [1, 2]; channel 1 sums [0.25, 1.5]
    got = mean_(lean, lean[:1], eps=0.0, alpha=0.0, first_from_coverage=True)
    assert got.tolist() == [[0.75, 0.25], [0.25, 0.75]]


@pytest.mark.parametrize("ndim", [2, 3])
def test_grid_coverage_equals_adding_every_box(ndim: int) -> None:
    window = torch.rand((3,) * ndim, generator=torch.Generator().manual_seed(ndim))
    starts = list(itertools.product(*[[0, 2, 3]] * ndim))  # a Cartesian grid on a 6^n image
    expected = torch.zeros(1, *(6,) * ndim)
    Accumulator(torch.zeros(1, *(6,) * ndim), expected).add_boxes(
        torch.zeros(len(starts), 1, *(3,) * ndim), starts, window
    )
    torch.testing.assert_close(grid_coverage(window, starts, (6,) * ndim), expected)
    with pytest.raises(FlexPatchError, match="Cartesian"):
        grid_coverage(window, starts[:-1], (6,) * ndim)
    with pytest.raises(FlexPatchError, match="Cartesian"):
        grid_coverage(window, [*starts, starts[0]], (6,) * ndim)


def test_refusals() -> None:
    with pytest.raises(FlexPatchError, match="unknown fusion"):
        Accumulator(torch.zeros(1, 4, 4), fusion="mean")
    with pytest.raises(FlexPatchError, match="boolean"):
        Accumulator(torch.zeros(1, 4, 4), fusion="or")
    with pytest.raises(FlexPatchError, match="coverage"):
        Accumulator(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), fusion="max")
    with pytest.raises(FlexPatchError, match="coverage"):
        Accumulator(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))
    acc = Accumulator(torch.zeros(1, 4, 4), fusion="max")
    with pytest.raises(FlexPatchError, match="unknown mode"):
        acc.add(torch.ones(1, 1, 2, 2), np.eye(3)[None], "cubic")
    with pytest.raises(FlexPatchError, match="fuses by 'sum'"):
        acc.add(torch.ones(1, 1, 2, 2), np.eye(3)[None], "linear")
    with pytest.raises(FlexPatchError, match="window"):
        acc.add_boxes(torch.ones(1, 1, 2, 2), [(0, 0)], torch.ones(2, 2))
    with pytest.raises(FlexPatchError, match="outputs"):
        acc.add_boxes(torch.ones(1, 2, 2, 2), [(0, 0)])
    with pytest.raises(FlexPatchError, match="affines"):
        acc.add(torch.ones(2, 1, 2, 2), np.eye(3)[None])
    rotated = np.eye(3)[None].copy()
    rotated[0, :2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    with pytest.raises(FlexPatchError, match="integer translations"):
        acc.add(torch.ones(1, 1, 2, 2), rotated, "box")
    with pytest.raises(FlexPatchError, match="alpha"):
        mean_(torch.ones(1, 2), torch.ones(1, 2), alpha=-1.0)
