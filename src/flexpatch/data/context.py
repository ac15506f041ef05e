"""Location context: coordinate channels that tell a patch where in the body it lies.

A small window sees too little to know left from right (a kidney is a kidney on either side);
its position does. Each voxel gets ``ndim`` extra input channels: its world position (the
image's affine, so that a flipped or oblique storage order means the same thing) relative to
the body's bounding box, scaled to [-1, 1] across the box. The body, not the image, sets the
frame, so a scan with a wider or shifted field of view gives the same anatomy the same
coordinates (LocBAM, ISBI 2026, reports that such context matters most when the patch covers
little of the volume).

The channels are appended to the preprocessed image, before any patch is cut: training patches
(rotated, zoomed, mirrored alike) and inference windows then carry their true coordinates
without any method knowing about them, and intensity augmentation leaves them alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flexpatch.errors import FlexPatchError

CONTEXTS: tuple[str, ...] = ("none", "coords")
# a voxel is body where channel 0 differs from the border's typical value by this share of its range
BODY_THRESHOLD = 0.1


def check_context(kind: str) -> str:
    if kind not in CONTEXTS:
        raise FlexPatchError(f"unknown location context {kind!r}; choose one of {', '.join(CONTEXTS)}")
    return kind


def context_channels(kind: str, ndim: int) -> int:
    """Input channels a context adds."""
    return ndim if check_context(kind) == "coords" else 0


def body_box(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last voxel index per axis of the body in ``image`` ``(C, *S)`` (channel 0).

    Background is what fills the image's border (air in CT, the dark surround in MR); body is
    every voxel that differs from the border's median by more than :data:`BODY_THRESHOLD` of the
    1st-99th percentile range. An image with no such voxel is all body.
    """
    x = np.asarray(image[0], dtype=np.float32)
    shape = np.array(x.shape)
    border = np.concatenate([np.take(x, [0, -1], axis=a).ravel() for a in range(x.ndim)])
    lo_p, hi_p = np.percentile(x, [1, 99])
    span = float(hi_p - lo_p)
    mask = np.abs(x - np.median(border)) > BODY_THRESHOLD * span if span > 0 else np.zeros(x.shape, bool)
    if not mask.any():
        return np.zeros(x.ndim, int), shape - 1
    found = np.nonzero(mask)
    return np.array([f.min() for f in found]), np.array([f.max() for f in found])


def _world(affine: np.ndarray, index: np.ndarray, ndim: int) -> np.ndarray:
    """World positions ``(..., ndim)`` of voxel indices ``(..., ndim)``; a 2D case uses the
    in-plane block of its (4x4) affine."""
    a = np.asarray(affine, dtype=np.float64)
    return index @ a[:ndim, :ndim].T + a[:ndim, -1]


def coordinates(shape: Sequence[int], affine: np.ndarray, box: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``(ndim, *shape)`` float32: each voxel's world position, centred on the body box and scaled
    so the box spans [-1, 1] along each world axis (values go beyond outside the box)."""
    n = len(shape)
    lo, hi = box
    corners = np.array(np.meshgrid(*[[lo[a], hi[a]] for a in range(n)], indexing="ij")).reshape(n, -1).T
    world_corners = _world(affine, corners.astype(np.float64), n)
    mid = (world_corners.max(0) + world_corners.min(0)) / 2
    half = np.maximum((world_corners.max(0) - world_corners.min(0)) / 2, 1e-6)
    index = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    coords = (_world(affine, index, n) - mid) / half
    return np.moveaxis(coords, -1, 0).astype(np.float32)


def with_context(image: np.ndarray, affine: np.ndarray, kind: str) -> np.ndarray:
    """The preprocessed image ``(C, *S)`` with its context channels appended (``none``: as is).

    Args:
        affine: the world affine of the preprocessed grid (``props["resampled_affine"]``).
    """
    if check_context(kind) == "none":
        return image
    coords = coordinates(image.shape[1:], np.asarray(affine), body_box(image))
    return np.concatenate([image, coords.astype(image.dtype)], axis=0)
