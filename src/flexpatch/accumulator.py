"""Putting patch outputs back into an image-sized buffer: the one accumulator every method uses.

Every method ends alike: outputs of patches, each placed by an affine (patch voxel index ->
image voxel index, see :class:`~flexpatch.geometry.Patch`), go back onto an image-sized grid and
are fused where they overlap. Only two things differ, so they are the two choices here and the
arithmetic lives once:

- the **mode**, how a patch voxel reaches the grid:
  ``box`` (an integer translation: plain slicing, clipped at the border; the fast path),
  ``nearest`` (each voxel to its nearest grid voxel; boxes among the patches still take the fast
  path), ``linear`` (each voxel splatted multilinearly onto its ``2^n`` neighbours) and ``pull``
  (each grid voxel inside the patch's footprint samples it: for patches whose voxels are larger
  than the grid's, which a scatter would leave full of holes);
- the **fusion**, how overlapping patches combine: ``sum`` (``values += output * window`` and
  ``coverage += window``; :func:`mean_` then gives the weighted mean or DNP's sparse
  suppression), ``max``, ``min`` or ``or`` (boolean; float outputs thresholded at 0.5).

The methods are policies over it: the sliding window (``box``, ``sum``, a coverage built once per
layout by :func:`grid_coverage`), :func:`flexpatch.geometry.accumulate` (``nearest``, ``sum``), the
patchwork's :class:`~flexpatch.patchwork.stitch.Stitcher` (``nearest``/``linear``/``pull``, ``sum``,
its softmax trick) and segment-then-segment's ``paste_back`` (``box``, ``or``/``max``/``min``).
Everything is N-dimensional and works in place: no image-sized temporary is ever made.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, extract, patch_grid

Shape = tuple[int, ...]
Mode = Literal["box", "nearest", "linear", "pull"]
Fusion = Literal["sum", "max", "min", "or"]
MODES: tuple[str, ...] = ("box", "nearest", "linear", "pull")
FUSIONS: tuple[str, ...] = ("sum", "max", "min", "or")
PULL_SLAB_VOXELS = 1 << 18  # grid voxels a pulled patch is sampled at in one go

__all__ = ["FUSIONS", "MODES", "PULL_SLAB_VOXELS", "Accumulator", "as_affines", "grid_coverage", "mean_"]


@dataclass(frozen=True)
class Accumulator:
    """Patch outputs fused into ``values`` ``(C, *spatial)`` in place.

    Attributes:
        values: the image-sized buffer (bool for the ``or`` fusion).
        coverage: ``(1, *spatial)`` running sum of window weights (``sum`` fusion only), or None
            when the caller knows the coverage otherwise (the sliding window builds it per layout).
        fusion: ``sum``, ``max``, ``min`` or ``or``.
    """

    values: torch.Tensor
    coverage: torch.Tensor | None = None
    fusion: str = "sum"

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise FlexPatchError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if self.fusion == "or" and self.values.dtype != torch.bool:
            raise FlexPatchError(f"fusion 'or' needs a boolean buffer, got {self.values.dtype}")
        if self.coverage is None:
            return
        if self.fusion != "sum":
            raise FlexPatchError(
                f"a coverage sums window weights: fusion 'sum' keeps one, not {self.fusion!r}"
            )
        if tuple(self.coverage.shape) != (1, *self.values.shape[1:]):
            raise FlexPatchError(
                f"coverage {tuple(self.coverage.shape)} does not match values {tuple(self.values.shape)}: "
                f"expected {(1, *self.values.shape[1:])}"
            )

    def add_boxes(
        self, outputs: torch.Tensor, starts: Sequence[Sequence[int]], window: torch.Tensor | None = None
    ) -> None:
        """Put ``outputs`` ``(B, C, *m)`` at the integer ``starts`` (first voxel of each box).

        Plain slicing, the fast path: one fused in-place op per box. The parts of a box outside
        the buffer are dropped. ``window`` ``(*m)`` weights the ``sum`` fusion (None: ones).
        """
        shape = self._check(outputs, len(starts), window)
        spatial = self.values.shape[1:]  # a torch.Size is a tuple: no conversion per call
        for o, start in zip(outputs, starts):
            self._put_box(o, tuple(start), shape, spatial, window)

    def add(
        self,
        outputs: torch.Tensor,
        affines: torch.Tensor | np.ndarray,
        mode: str = "nearest",
        window: torch.Tensor | None = None,
        *,
        sampling: Literal["nearest", "linear"] = "linear",
        slab_voxels: int = PULL_SLAB_VOXELS,
    ) -> None:
        """Put ``outputs`` ``(B, C, *m)`` placed by ``affines`` ``(B, n+1, n+1)`` with ``mode``.

        Args:
            outputs: patch outputs, one per affine.
            affines: patch voxel index -> buffer voxel index (numpy or torch, any float dtype).
            mode: ``box``, ``nearest``, ``linear`` or ``pull`` (see the module's docstring);
                ``linear`` and ``pull`` fuse by ``sum`` only.
            window: ``(*m)`` weights of the ``sum`` fusion (None: ones).
            sampling: how ``pull`` samples a patch: ``nearest`` or ``linear``.
            slab_voxels: ``pull`` samples this many grid voxels at a time, so that a patch whose
                footprint is the whole grid holds slab-sized temporaries, not grid-sized ones.
        """
        if mode not in MODES:
            raise FlexPatchError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        mats = as_affines(affines, len(outputs), outputs.ndim - 2)
        if mode == "box":
            starts = [_box_start(a) for a in mats]
            if any(s is None for s in starts):
                raise FlexPatchError("mode 'box' needs integer translations; use 'nearest' for other affines")
            self.add_boxes(outputs, starts, window)  # type: ignore[arg-type]
            return
        shape = self._check(outputs, len(mats), window)
        if mode != "nearest" and self.fusion != "sum":
            raise FlexPatchError(f"mode {mode!r} weighs voxels: it fuses by 'sum', not {self.fusion!r}")
        if mode == "linear":
            _splat_linear(self, outputs, mats, window)
            return
        spatial = tuple(self.values.shape[1:])
        for o, a in zip(outputs, mats):
            if mode == "pull":
                _pull(self, o, a, window, sampling, slab_voxels)
            elif (start := _box_start(a)) is not None:
                self._put_box(o, start, shape, spatial, window)  # in order: sums add up as they did
            else:
                _scatter_nearest(self, o, a, window)

    def _check(self, outputs: torch.Tensor, count: int, window: torch.Tensor | None) -> Shape:
        """The patch shape, after checking outputs, placements and window against the buffer."""
        c, n = self.values.shape[0], self.values.ndim - 1
        if outputs.ndim != n + 2 or outputs.shape[1] != c or len(outputs) != count:
            raise FlexPatchError(
                f"outputs {tuple(outputs.shape)} do not fit {count} patches of a buffer "
                f"{tuple(self.values.shape)}: expected ({count}, {c}, {n} spatial axes)"
            )
        shape = outputs.shape[2:]  # a torch.Size is a tuple: no conversion, cheap per batch
        if window is not None and (self.fusion != "sum" or window.shape != shape):
            raise FlexPatchError(
                f"window {tuple(window.shape)} needs fusion 'sum' and the patch shape {tuple(shape)} "
                f"(fusion is {self.fusion!r})"
            )
        return shape

    def _put_box(
        self, o: torch.Tensor, start: Shape, shape: Shape, spatial: Shape, window: torch.Tensor | None
    ) -> None:
        # per box, the Python around the one fused op is what a sliding window's speed hangs on:
        # the slicing is cached, and the common case (a weighted sum) dispatches no further
        src, dst = _clip(start, shape, spatial)
        if dst is None:
            return
        if src is not None:  # only a box crossing the border is sliced: a view costs microseconds
            o = o[src]
            window = None if window is None else window[src[1:]]
        region = self.values[dst]
        if window is not None and self.fusion == "sum":
            region.addcmul_(o, window)
        else:
            _fuse(region, o, window, self.fusion)
        if self.coverage is not None:
            self.coverage[dst] += 1 if window is None else window


@functools.lru_cache(maxsize=4096)
def _clip(
    start: Shape, shape: Shape, spatial: Shape
) -> tuple[tuple[slice, ...] | None, tuple[slice, ...] | None]:
    """Indices ``(:, *slices)`` into a ``(C, *m)`` output (source) and a ``(C, *spatial)`` buffer
    (destination) of the part of a box inside the buffer.

    The source is None when the box lies wholly inside, the destination None when wholly outside.
    Cached: a sliding window puts the same boxes back for every case.
    """
    src, dst, inside = [slice(None)], [slice(None)], True
    for s, w, n in zip(map(int, start), shape, spatial):
        a, b = max(s, 0), min(s + w, n)
        if b <= a:
            return None, None
        inside = inside and a == s and b == s + w
        src.append(slice(a - s, b - s))
        dst.append(slice(a, b))
    return (None if inside else tuple(src)), tuple(dst)


def _fuse(region: torch.Tensor, o: torch.Tensor, window: torch.Tensor | None, fusion: str) -> None:
    """Fuse one box's output ``o`` into the buffer's ``region`` (a view) in place."""
    if fusion == "sum":
        if window is None:
            region.add_(o)
        else:
            region.addcmul_(o, window)
    elif fusion == "or":
        region |= o >= 0.5 if o.is_floating_point() else o.bool()
    else:
        op = torch.maximum if fusion == "max" else torch.minimum
        op(region, o.to(region.dtype), out=region)


def _box_start(affine: np.ndarray) -> Shape | None:
    """The integer start of an axis-aligned box (as :attr:`Patch.is_box`), else None."""
    n = affine.shape[0] - 1
    t = affine[:n, n]
    if np.array_equal(affine[:n, :n], np.eye(n)) and np.array_equal(t, np.round(t)):
        return tuple(int(round(v)) for v in t)
    return None


def as_affines(affines: torch.Tensor | np.ndarray, batch: int, n: int) -> np.ndarray:
    """Affines as a float64 numpy stack ``(B, n+1, n+1)``, checked against the batch."""
    if isinstance(affines, torch.Tensor):
        affines = affines.detach().cpu().numpy()
    mats = np.asarray(affines, dtype=np.float64)
    if mats.shape != (batch, n + 1, n + 1):
        raise FlexPatchError(f"affines have shape {mats.shape}, expected {(batch, n + 1, n + 1)}")
    return mats


def _inside(pos: torch.Tensor, spatial: Shape) -> torch.Tensor:
    """Which rows of integer positions ``(P, n)`` lie inside a grid of ``spatial``."""
    return torch.all((pos >= 0) & (pos < torch.tensor(spatial, device=pos.device)), dim=1)


def _ravel(pos: torch.Tensor, spatial: Shape) -> torch.Tensor:
    """Flat (C order) indices of integer positions ``(P, n)`` inside a grid of ``spatial``."""
    flat = torch.zeros(len(pos), dtype=torch.long, device=pos.device)
    for d in range(len(spatial)):
        flat = flat * spatial[d] + pos[:, d]
    return flat


def _scatter_nearest(
    acc: Accumulator, output: torch.Tensor, affine: np.ndarray, window: torch.Tensor | None
) -> None:
    """One patch ``(C, *m)``, every voxel to its nearest buffer voxel (outside ones dropped)."""
    values = acc.values
    spatial = tuple(values.shape[1:])
    a = torch.as_tensor(affine, dtype=torch.float64, device=values.device)
    pos = torch.round(patch_grid(a[None], output.shape[1:])[0]).long()
    ok = _inside(pos, spatial)
    flat = _ravel(pos[ok], spatial)
    vals = output.reshape(output.shape[0], -1)[:, ok]
    flat_values = values.view(values.shape[0], -1)
    if acc.fusion == "or":  # thresholded before any cast to bool, as in the box path
        # every write is True, so voxels that several patch voxels reach need no reduction
        c, p = (vals >= 0.5 if vals.is_floating_point() else vals.bool()).nonzero(as_tuple=True)
        flat_values.index_put_((c, flat[p]), torch.ones((), dtype=torch.bool, device=values.device))
        return
    vals = vals.to(values.dtype)
    if acc.fusion in ("max", "min"):
        index = flat.expand(len(vals), -1)
        flat_values.scatter_reduce_(1, index, vals, "amax" if acc.fusion == "max" else "amin")
    else:
        w = None if window is None else window.reshape(-1)[ok].to(values.dtype)
        flat_values.index_add_(1, flat, vals if w is None else vals * w)
        if acc.coverage is not None:
            cover = torch.ones(len(flat), dtype=values.dtype, device=values.device) if w is None else w
            acc.coverage.view(1, -1).index_add_(1, flat, cover[None])


def _splat_linear(
    acc: Accumulator, outputs: torch.Tensor, affines: np.ndarray, window: torch.Tensor | None
) -> None:
    """Splat ``outputs * window`` (and ``window`` into the coverage) with multilinear weights.

    Each patch voxel lands at a real-valued grid position and is shared among the ``2^n``
    surrounding grid voxels with weights that sum to one (those outside the grid are dropped).
    All patches of the batch go through one ``index_add_`` per corner.
    """
    values, device = acc.values, acc.values.device
    n, channels = outputs.ndim - 2, outputs.shape[1]
    spatial = tuple(values.shape[1:])
    a = torch.as_tensor(affines, dtype=torch.float64, device=device)
    pos = patch_grid(a, outputs.shape[2:]).reshape(-1, n)  # (B*M, n)
    base = torch.floor(pos)
    frac = pos - base
    base = base.long()
    if window is None:
        window = torch.ones(outputs.shape[2:], dtype=values.dtype, device=device)
    # (C, B*M): channel-major so that one index_add_ along dim 1 serves every channel
    w_patch = window.reshape(1, -1).expand(len(outputs), -1).reshape(-1).to(values.dtype)
    vals = outputs.reshape(len(outputs), channels, -1).permute(1, 0, 2).reshape(channels, -1)
    vals = vals.to(values.dtype) * w_patch
    for bits in itertools.product((0, 1), repeat=n):
        offset = torch.tensor(bits, device=device)
        corner = base + offset
        weight = torch.prod(torch.where(offset.bool(), frac, 1 - frac), dim=1).to(values.dtype)
        ok = _inside(corner, spatial) & (weight > 0)
        flat = _ravel(corner[ok], spatial)
        w = weight[ok]
        values.view(channels, -1).index_add_(1, flat, vals[:, ok] * w)
        if acc.coverage is not None:
            acc.coverage.view(1, -1).index_add_(1, flat, (w_patch[ok] * w)[None])


def _pull(
    acc: Accumulator,
    output: torch.Tensor,
    affine: np.ndarray,
    window: torch.Tensor | None,
    sampling: str,
    slab_voxels: int,
) -> None:
    """Add one patch ``output`` ``(C, *m)`` by sampling it at the grid voxels it covers.

    The footprint is the patch's voxel extent, ``[-0.5, m - 0.5]`` per patch axis; the window is
    sampled with the output (one grid_sample of ``[output * window, window]``), so overlapping
    patches blend exactly as in a scatter. One patch at a time: a coarse patch's footprint can be
    the whole grid, and a batch of them would multiply that memory.
    """
    n = output.ndim - 1
    spatial = acc.values.shape[1:]
    m = np.array(output.shape[1:], dtype=np.float64)
    corners = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in m])))  # (2^n, n)
    grid_pos = corners @ affine[:n, :n].T + affine[:n, n]
    lo = np.maximum(np.ceil(grid_pos.min(0) - 1e-9), 0).astype(int)
    hi = np.minimum(np.floor(grid_pos.max(0) + 1e-9), np.array(spatial) - 1).astype(int)
    if np.any(hi < lo):
        return
    if window is None:
        window = torch.ones(output.shape[1:], dtype=output.dtype, device=output.device)
    parts = [output * window] + ([window[None].to(output.dtype)] if acc.coverage is not None else [])
    values = torch.cat(parts)
    oblique = np.any(np.abs(affine[:n, :n] - np.diag(np.diag(affine[:n, :n]))) > 1e-9)
    # slabs of the first axis: a coarse patch's box can be the whole grid, and sampling it at once
    # would hold (C + 1) grid-sized channels and the sampling grid on top of the sums
    size = hi - lo + 1
    rows = max(1, slab_voxels // int(np.prod(size[1:])))
    for first in range(int(lo[0]), int(hi[0]) + 1, rows):
        start = np.array([first, *lo[1:]])
        shape = (min(rows, int(hi[0]) + 1 - first), *(int(v) for v in size[1:]))
        _pull_slab(acc, values, affine, start, shape, sampling, m if oblique else None)


def _pull_slab(
    acc: Accumulator,
    values: torch.Tensor,
    affine: np.ndarray,
    start: np.ndarray,
    shape: Shape,
    sampling: str,
    oblique_extent: np.ndarray | None,
) -> None:
    """Sample ``values`` (the weighted output, then the window when a coverage is kept) on the
    grid box ``shape`` at ``start`` and add it there."""
    n = len(shape)
    to_box = np.eye(n + 1)
    to_box[:n, n] = start
    box_to_patch = np.linalg.inv(affine) @ to_box  # grid box index -> patch index
    pulled = extract(values, [Patch(box_to_patch, shape)], mode=sampling, padding="border")[0]
    if oblique_extent is not None:  # an oblique patch fills only part of its bounding box
        inside = _footprint(box_to_patch, shape, oblique_extent, values.device)
        pulled = pulled * inside.to(pulled.dtype)
    dst = tuple(slice(int(a0), int(a0) + s) for a0, s in zip(start, shape))
    c = acc.values.shape[0]
    acc.values[(slice(None), *dst)] += pulled[:c]
    if acc.coverage is not None:
        acc.coverage[(slice(None), *dst)] += pulled[c:]


def _footprint(box_to_patch: np.ndarray, shape: Shape, m: np.ndarray, device: torch.device) -> torch.Tensor:
    """Which voxels of a grid box lie inside the patch's voxel extent ``[-0.5, m - 0.5]``."""
    a = torch.as_tensor(box_to_patch, dtype=torch.float64, device=device)
    pos = patch_grid(a[None], shape)[0].reshape(*shape, len(shape))
    limit = torch.as_tensor(m - 0.5, dtype=torch.float64, device=device)
    return torch.all((pos >= -0.5 - 1e-9) & (pos <= limit + 1e-9), dim=-1)


def mean_(
    sums: torch.Tensor,
    coverage: torch.Tensor,
    eps: float = 0.0,
    alpha: float = 0.0,
    first_from_coverage: bool = False,
) -> torch.Tensor:
    """Weighted sums ``(C, *spatial)`` to their mean, in ``sums`` itself, which is returned.

    Divides by ``coverage + eps`` (``eps`` guards voxels no patch reached) or, with DNP's sparse
    suppression ``alpha > 0``, by ``sqrt(coverage^2 + 3 alpha)``, so that voxels seen by a
    single patch cannot give a confident answer.

    ``first_from_coverage``: the softmax trick. Outputs that add up to one over the channels need
    no sum of channel 0: it is the coverage minus the other channels' sums. ``coverage`` is then
    ``sums[:1]`` (the coverage was accumulated in channel 0's slot), and channel 0 is recovered
    (clamped at 0 against rounding) once the divisor is taken.
    """
    if not (eps >= 0 and alpha >= 0):
        raise FlexPatchError(f"eps {eps} and sparse suppression alpha {alpha} must be >= 0")
    if eps == 0 and alpha == 0 and not first_from_coverage:
        return sums.div_(coverage)  # the divisor is the coverage itself: one pass, no temporary
    # one slab of the first axis at a time, so that the divisor's temporaries stay slab-sized
    for i in range(sums.shape[1]):
        slab, cover = sums[:, i], coverage[:, i]
        divisor = cover + eps if alpha == 0 else torch.sqrt(cover**2 + 3 * alpha)
        if first_from_coverage:  # the divisor is taken first: channel 0 is the coverage until here
            slab[0].sub_(slab[1:].sum(0)).clamp_(min=0)
        slab.div_(divisor)
    return sums


def grid_coverage(
    window: torch.Tensor, starts: Sequence[Sequence[int]], shape: Sequence[int]
) -> torch.Tensor:
    """The coverage of boxes of ``window`` weights at ``starts``: ``(1, *shape)``, float32.

    The same as adding ``window`` at every start, when the starts are a Cartesian product of
    per-axis starts (a sliding window's grid): shifting-and-adding one axis at a time then needs
    a handful of adds instead of one per box. Any other set of starts is refused.
    """
    shape = tuple(int(s) for s in shape)
    per_axis = [sorted({int(s[axis]) for s in starts}) for axis in range(len(shape))]
    distinct = {tuple(int(v) for v in s) for s in starts}
    if not len(distinct) == len(starts) == math.prod(len(p) for p in per_axis):
        raise FlexPatchError(f"{len(starts)} box starts are not a Cartesian grid of distinct starts")
    acc = window.float()
    for axis, axis_starts in enumerate(per_axis):
        size = acc.shape[axis]
        spread_shape = list(acc.shape)
        spread_shape[axis] = shape[axis]
        spread = acc.new_zeros(spread_shape)
        for start in axis_starts:
            spread.narrow(axis, start, size).add_(acc)
        acc = spread
    return acc[None]
