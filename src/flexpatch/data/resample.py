"""Resampling between a case's own grid and the plan's: linear for images and probabilities,
nearest for labels (voxel centres aligned, edges extended), whole or slab by slab."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from flexpatch.errors import FlexPatchError


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, ...]:
    """``round(shape * spacing / target)``, at least one voxel per axis."""
    return tuple(
        max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing, strict=True)
    )


def resample(data: np.ndarray, zoom_to_shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample ``(C, *S)`` or ``(*S)`` data to spatial shape ``zoom_to_shape``.

    Voxel centres are aligned (PyTorch's ``align_corners=False``) and edges are
    extended, so linear resampling equals ``torch.nn.functional.interpolate``.

    Args:
        data: the array; a leading channel axis is kept.
        zoom_to_shape: the new spatial shape.
        order: 1 (linear) for images and probabilities, 0 (nearest) for labels.
    """
    n = len(zoom_to_shape)
    if data.ndim not in (n, n + 1):
        raise FlexPatchError(
            f"cannot resample an array of shape {data.shape} to spatial shape {zoom_to_shape}"
        )
    if order not in (0, 1):
        raise FlexPatchError(f"resampling order must be 0 or 1, found {order}")
    if data.ndim == n + 1:
        return np.stack([resample(c, zoom_to_shape, order) for c in data])
    if tuple(data.shape) == tuple(zoom_to_shape):
        return data.copy()
    zoom = [t / s for t, s in zip(zoom_to_shape, data.shape, strict=True)]
    out = ndimage.zoom(data, zoom, order=order, mode="nearest", grid_mode=True, prefilter=False)
    if out.shape != tuple(zoom_to_shape):  # scipy rounds the output shape itself; make sure it agrees
        raise FlexPatchError(f"resampling {data.shape} to {zoom_to_shape} produced {out.shape}")
    return out


def restore(array: np.ndarray, props: dict[str, Any], is_label: bool) -> np.ndarray:
    """Bring a prediction back onto the original grid of a case.

    Args:
        array: probabilities ``(C, *S')`` or labels ``(*S')`` on the resampled grid.
        props: the properties returned by ``preprocess_case``.
        is_label: labels use nearest neighbour, probabilities linear interpolation.
    """
    return resample(array, tuple(int(s) for s in props["original_shape"]), order=0 if is_label else 1)


RESTORE_CHUNK_VOXELS = 1 << 22  # target rows restored at a time: ~16 MB per channel in float32


def restore_slabs(
    slabs: Iterable[tuple[int, np.ndarray]],
    source_rows: int,
    props: dict[str, Any],
    axis: int,
    chunk_voxels: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`restore` of probabilities that come slab by slab along ``axis``: ``(first row,
    (C, rows, ...))`` on the resampled grid in row order in, the same on the original grid out,
    a few rows at a time (``chunk_voxels`` per channel, :data:`RESTORE_CHUNK_VOXELS` by default).

    Why: the whole prediction need never be held, nor a copy of a slab (a window deep, it can be
    a GB); target rows come back as soon as the rows they interpolate from have arrived. Linear
    resampling is separable: ``axis`` is interpolated here (voxel centres aligned, edges
    extended, as :func:`resample`), the other axes by :func:`resample` itself, so the values are
    :func:`restore`'s within float rounding.
    """
    source = int(source_rows)  # along axis, on the resampled grid
    target = tuple(int(s) for s in props["original_shape"])
    # the source coordinate of each target row, and the two rows it interpolates between
    x = np.clip((np.arange(target[axis]) + 0.5) * source / target[axis] - 0.5, 0, source - 1)
    lo = np.floor(x).astype(int)
    hi = np.where(x > lo, np.minimum(lo + 1, source - 1), lo)  # a row on a source row needs no next
    per_chunk = RESTORE_CHUNK_VOXELS if chunk_voxels is None else chunk_voxels
    chunk = max(1, per_chunk // max(1, int(np.prod(target)) // target[axis]))
    carry: list[tuple[int, np.ndarray]] = []  # (first row, rows) kept from the last slab: one or two
    row = 0  # the next target row
    for start, slab in slabs:
        parts = [*carry, (start, slab)]
        arrived = start + slab.shape[axis + 1]
        end = int(np.searchsorted(hi, arrived))  # rows whose sources have all come
        for first in range(row, end, chunk):
            stop = min(end, first + chunk)
            rows = _take_rows(parts, lo[first:stop], axis)
            if source != target[axis]:
                t = (x[first:stop] - lo[first:stop]).astype(np.float32)
                t = t.reshape([-1 if d == axis + 1 else 1 for d in range(rows.ndim)])
                rows *= 1 - t
                rows += _take_rows(parts, hi[first:stop], axis) * t
            shape = (*target[:axis], stop - first, *target[axis + 1 :])
            yield first, rows if rows.shape[1:] == shape else resample(rows, shape, order=1)
        row = max(row, end)
        keep_from = min(int(lo[row]), arrived) if row < target[axis] else arrived
        carry = [(keep_from, _take_rows(parts, np.arange(keep_from, arrived), axis))]
    if row != target[axis]:
        raise FlexPatchError(f"slabs ended at row {row} of {target[axis]} along axis {axis}")


def restore_chunked(array: np.ndarray, props: dict[str, Any], axis: int = 0) -> np.ndarray:
    """:func:`restore` of probabilities ``(C, *S')`` held whole, a chunk of rows at a time
    (:func:`restore_slabs`): besides the input, the output and one chunk's temporaries, where
    :func:`restore` holds every channel's output twice (each channel's, then their stack).
    A chunk holds :data:`RESTORE_CHUNK_VOXELS` values of all channels together, not of each."""
    target = tuple(int(s) for s in props["original_shape"])
    out = np.empty((array.shape[0], *target), dtype=array.dtype)
    source = array.shape[axis + 1]
    per_chunk = max(1, RESTORE_CHUNK_VOXELS // array.shape[0])
    rows = max(1, per_chunk // max(1, array[0].size // source))

    def rows_from(i: int, n: int) -> tuple[slice, ...]:
        return (slice(None),) * (axis + 1) + (slice(i, i + n),)

    slabs = ((i, array[rows_from(i, rows)]) for i in range(0, source, rows))  # views, not copies
    for first, part in restore_slabs(slabs, source, props, axis, per_chunk):
        out[rows_from(first, part.shape[axis + 1])] = part
    return out


def _take_rows(parts: list[tuple[int, np.ndarray]], rows: np.ndarray, axis: int) -> np.ndarray:
    """The source ``rows`` (ascending, absolute) from ``parts``, ``(first row, (C, n, ...))`` in
    order that together hold them: a copy of those rows only."""
    pieces = []
    for first, array in parts:
        n = array.shape[axis + 1]
        inside = rows[(rows >= first) & (rows < first + n)] - first
        if len(inside):
            pieces.append(array.take(inside, axis=axis + 1))
    if not pieces:  # no rows: an empty array of the parts' other dimensions
        shape = list(parts[-1][1].shape)
        shape[axis + 1] = 0
        return np.empty(shape, dtype=parts[-1][1].dtype)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=axis + 1)
