"""Where a training patch goes: centre draws (uniform or label-balanced) and boxes.

Random draws take an explicit ``torch.Generator``; turning a centre into a box
(:func:`patch_at`) and fitting a size to an image (:func:`fit_patch`) are
deterministic, so a logged centre replays exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from flexpatch.axes import per_axis, round_up
from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch
from flexpatch.runtime import numpy_rng

Shape = tuple[int, ...]
CENTRE_MODES: tuple[str, ...] = ("uniform", "balanced", "per_class")


def fit_patch(patch: Sequence[int], image_shape: Sequence[int], divisor: int | Sequence[int]) -> Shape:
    """Shrink a patch to an image that is smaller than it, as inference does.

    Along an axis where the patch exceeds the image, the patch becomes the whole
    axis rounded up to the divisor, so the image is padded by less than one
    divisor there and a training batch never sees more padding than inference.
    """
    patch = tuple(int(p) for p in patch)
    image_shape = tuple(int(n) for n in image_shape)
    if len(patch) != len(image_shape):
        raise FlexPatchError(f"patch {patch} and image {image_shape} differ in number of axes")
    divs = per_axis(divisor, len(patch), "divisor")
    return tuple(round_up(n, d) if p > n else p for p, n, d in zip(patch, image_shape, divs, strict=True))


def patch_at(centre: Sequence[int], patch: Sequence[int], image_shape: Sequence[int]) -> Patch:
    """The box of shape ``patch`` centred on ``centre``, moved inside the image.

    Along axes where the image holds the patch, the box is clamped to lie inside
    (so a foreground voxel near the border stays in the patch); where the patch is
    larger (after :func:`fit_patch`), it starts at 0 and ``extract`` pads the end.
    """
    if not len(centre) == len(patch) == len(image_shape):
        raise FlexPatchError(
            f"centre {tuple(centre)}, patch {tuple(patch)}, image {tuple(image_shape)} differ in axes"
        )
    start = [
        min(max(int(c) - p // 2, 0), n - p) if p <= n else 0
        for c, p, n in zip(centre, patch, image_shape, strict=True)
    ]
    return Patch.box(start, patch)


def compute_class_locations(
    label: np.ndarray, max_per_class: int | None = 10000, seed: int = 0, min_coverage: float = 0.01
) -> dict[int, np.ndarray]:
    """Voxel coordinates of each foreground class, subsampled like nnU-Net.

    Args:
        label: integer label map ``(*spatial)``.
        max_per_class: keep at most this many voxels per class (None keeps all), but
            never fewer than ``min_coverage`` of the class, so big classes stay well spread.
        seed: seed of the subsampling (numpy), so the cache is reproducible.

    Returns:
        ``{class: (k, ndim) int64 array}`` for every class > 0 present in ``label``.
    """
    flat = np.flatnonzero(label > 0)
    values = label.reshape(-1)[flat]
    rng = numpy_rng(seed)
    out: dict[int, np.ndarray] = {}
    for c in np.unique(values):
        idx = flat[values == c]
        if max_per_class is not None:
            keep = max(min(max_per_class, len(idx)), math.ceil(len(idx) * min_coverage))
            if keep < len(idx):
                idx = np.sort(rng.choice(idx, keep, replace=False))
        out[int(c)] = np.stack(np.unravel_index(idx, label.shape), axis=1).astype(np.int64)
    return out


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def _uniform_voxel(shape: Shape, generator: torch.Generator) -> Shape:
    return tuple(_randint(n, generator) for n in shape)


def _foreground_voxel(
    locations: dict[int, np.ndarray],
    classes: Sequence[int] | None,
    per_class: bool,
    generator: torch.Generator,
) -> Shape | None:
    """A foreground voxel, or None when no wanted class is present."""
    present = sorted(
        c for c, v in locations.items() if c > 0 and len(v) and (classes is None or c in classes)
    )
    if not present:
        return None
    if per_class:
        locs = locations[present[_randint(len(present), generator)]]
        return tuple(int(v) for v in locs[_randint(len(locs), generator)])
    # Pick among all foreground voxels without concatenating the per-class arrays.
    counts = np.cumsum([len(locations[c]) for c in present])
    i = _randint(int(counts[-1]), generator)
    k = int(np.searchsorted(counts, i, side="right"))
    locs = locations[present[k]]
    return tuple(int(v) for v in locs[i - (int(counts[k - 1]) if k else 0)])


def draw_centre(
    label: np.ndarray | None,
    patch: Sequence[int],
    generator: torch.Generator,
    mode: str = "balanced",
    foreground_ratio: float = 0.33,
    classes: Sequence[int] | None = None,
    class_locations: dict[int, np.ndarray] | None = None,
    image_shape: Sequence[int] | None = None,
) -> Shape:
    """Draw the centre voxel of a training patch.

    Args:
        label: label map ``(*spatial)``; None allows only uniform draws (unless
            ``class_locations`` is given) and then needs ``image_shape``.
        patch: the patch shape the centre is for (checked against the label's axes;
            :func:`patch_at` then places the box).
        generator: the only source of randomness.
        mode: ``uniform`` (any voxel); ``balanced`` (with probability
            ``foreground_ratio`` a random voxel of any class > 0, else uniform:
            nnU-Net's oversampling); ``per_class`` (with that probability a class
            drawn uniformly among those present, then one of its voxels).
        foreground_ratio: probability of a foreground draw in the label-aware modes.
        classes: restrict foreground draws to these classes.
        class_locations: precomputed :func:`compute_class_locations` (fast path);
            without it the label is scanned at every call.
        image_shape: spatial shape when ``label`` is None.

    Returns:
        The centre's voxel index. Foreground draws fall back to uniform when no
        wanted class is present.
    """
    if mode not in CENTRE_MODES:
        raise FlexPatchError(f"unknown centre mode {mode!r}; choose one of {', '.join(CENTRE_MODES)}")
    if not 0.0 <= foreground_ratio <= 1.0:
        raise FlexPatchError(f"foreground ratio must be in [0, 1], got {foreground_ratio}")
    if image_shape is None and label is None:
        raise FlexPatchError("draw_centre needs a label or an image_shape")
    shape = tuple(int(n) for n in (image_shape if image_shape is not None else label.shape))
    if len(patch) != len(shape):
        raise FlexPatchError(
            f"patch {tuple(patch)} has {len(patch)} axes but the image {shape} has {len(shape)}"
        )
    if mode != "uniform" and (label is not None or class_locations is not None):
        if float(torch.rand(1, generator=generator)) < foreground_ratio:
            if class_locations is None:
                class_locations = compute_class_locations(label, max_per_class=None)
            voxel = _foreground_voxel(class_locations, classes, mode == "per_class", generator)
            if voxel is not None:
                return voxel
    return _uniform_voxel(shape, generator)
