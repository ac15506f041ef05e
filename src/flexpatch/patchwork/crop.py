"""Cropping a patchwork's inputs: normalisation, per-level smoothing, image and label crops.

Smoothing depends only on a level's undersampling, which is the same for every patch of
that level, so each level's source is smoothed once per image and then cropped many times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from flexpatch.geometry import Patch, extract, nearest_box
from flexpatch.patchwork.scheme import Scheme


def normalize_image(image: np.ndarray, how: str) -> np.ndarray:
    """Whole-image normalisation (``max``, ``mean``, ``m0s1``); ``patch_m0s1`` acts per patch later."""
    image = image.astype(np.float32, copy=False)
    if how == "max":
        return image / max(float(np.abs(image).max()), 1e-8)
    if how == "mean":
        return image / max(abs(float(image.mean())), 1e-8)
    if how == "m0s1":
        return (image - image.mean()) / max(float(image.std()), 1e-8)
    return image


def smooth_level(image: np.ndarray, how: float | str, under: Sequence[float]) -> np.ndarray:
    """Smooth ``(C, *s)`` before cropping at ``under`` image voxels per patch voxel (per axis).

    A number is the Gaussian sigma relative to the undersampling (sigma = how * under);
    ``boxcar``/``max`` filter over round(under) voxels; ``mixture`` stacks boxcar, max and min.
    Nothing happens where a patch voxel is not larger than an image voxel.
    """
    under = np.asarray(under, dtype=np.float64)
    size = tuple(int(v) for v in np.maximum(np.round(under), 1))
    gaussian = not isinstance(how, str)
    if gaussian and (how == 0 or not (under > 1).any()):
        return image
    if not gaussian and max(size) <= 1:  # mixture keeps its three channels, all the image itself
        return np.concatenate([image] * 3).astype(np.float32) if how == "mixture" else image
    out = []
    for channel in image:
        if gaussian:
            out.append(ndimage.gaussian_filter(channel, float(how) * np.where(under > 1, under, 0.0)))
        elif how == "boxcar":
            out.append(ndimage.uniform_filter(channel, size))
        elif how == "max":
            out.append(ndimage.maximum_filter(channel, size))
        else:  # mixture
            out += [ndimage.uniform_filter(channel, size), ndimage.maximum_filter(channel, size)]
            out.append(ndimage.minimum_filter(channel, size))
    return np.stack(out).astype(np.float32)


def level_sources(image: np.ndarray, scheme: Scheme, unders: list[np.ndarray]) -> list[torch.Tensor]:
    """The image each level crops from: normalised once, smoothed per level."""
    base = normalize_image(image, scheme.normalize)
    # unsmoothed levels share one array (from_numpy keeps it a view)
    return [torch.from_numpy(np.ascontiguousarray(smooth_level(base, scheme.smooth, u))) for u in unders]


def crop_image(
    source: torch.Tensor, affines: np.ndarray, matrix: Sequence[int], scheme: Scheme
) -> torch.Tensor:
    """``(N, C, *matrix)`` crops of a level's source (zeros outside the image)."""
    patches = [Patch(a, tuple(matrix)) for a in affines]
    if scheme.interp == "nearest":
        patches = [nearest_box(p) for p in patches]
    crops = extract(source, patches, mode=scheme.interp, padding="zeros")
    if scheme.normalize == "patch_m0s1":
        dims = tuple(range(2, crops.ndim))
        crops = (crops - crops.mean(dim=dims, keepdim=True)) / crops.std(dim=dims, keepdim=True).clamp(
            min=1e-8
        )
    return crops


def crop_label(label: torch.Tensor, affines: np.ndarray, matrix: Sequence[int]) -> torch.Tensor:
    """``(N, *matrix)`` nearest-neighbour label crops; outside the image is background (0)."""
    patches = [nearest_box(Patch(a, tuple(matrix))) for a in affines]
    return extract(label[None].float(), patches, mode="nearest", padding="zeros")[:, 0].round().long()
