"""Geometry that cannot be right, refused before any work: image headers, resampled grids, patches.

A NIfTI header is trusted for the voxel size, and the voxel size decides how large the resampled
image is. A zero spacing made a 1x1x1 image (and a 1x1x1 feature map deep in the network); a huge
one an attempt to allocate 1.8 PiB. :func:`check_nifti_header` refuses such a header when the file
is opened, before its voxels are read; :func:`check_grid` refuses a resampled grid that could not
be held in memory, before it is allocated. Each message names the file and gives the numbers.

:func:`warn_patch_clipped` is the one warning here: a training patch larger than every image is
not wrong (the sampler clips it, as inference does), but the user should know what was trained.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flexpatch.errors import FlexPatchError, format_shape

if TYPE_CHECKING:
    from nibabel.nifti1 import Nifti1Header

    from flexpatch.data.io import Volume
    from flexpatch.data.preprocess import Plan
    from flexpatch.sampling.sizes import SizeSampler

# 10 m per voxel: no scanner makes it; a header in another unit, or a corrupt one, does.
MAX_SPACING_MM = 1e4
# 1 nm: electron microscopy stored in mm still passes; below it the header is broken.
MIN_SPACING_MM = 1e-6
# Larger grids overflow 32-bit indexing in some kernels and are beyond any dataset flexpatch plans.
MAX_VOXELS = 2**31


def _numbers(values: Sequence[float]) -> str:
    return " x ".join(f"{float(v):g}" for v in values)


def open_nifti(path: Path) -> Any:
    """``nibabel.load`` with the header checked (:func:`check_nifti_header`); no voxel is read.

    nibabel repairs some header fields as it reads them and logs each repair on stderr, which
    would break the one-line error contract; those logs are dropped, and what they were about
    (a zero or negative pixdim) is checked as the file holds it.
    """
    import nibabel as nib

    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)  # nibabel still raises what it cannot read
    try:
        img = nib.load(str(path))
    finally:
        logger.setLevel(level)
    check_nifti_header(img.header, path)
    return img


def check_shape(shape: Sequence[int], path: Path) -> tuple[int, ...]:
    """``shape`` as ints; an image with no voxels along an axis (or none at all) is refused."""
    shape = tuple(int(n) for n in shape)
    if not shape or min(shape) < 1:
        raise FlexPatchError(f"{path}: image shape {format_shape(shape) or '()'} has an empty axis")
    return shape


def check_nifti_header(header: Nifti1Header, path: Path) -> None:
    """Refuse a NIfTI header with an empty axis or a zero, negative, NaN/Inf or absurd spacing.

    Spacings are the column norms of the affine nibabel reads (sform, else qform, else pixdim).
    Axes of length 1 are left alone: nnU-Net's 2D files carry any value there (often 999) and a
    single voxel's size never decides a grid's size. When no sform is set the ``pixdim`` decides
    the geometry; nibabel silently turns a zero there into 1 and a negative into its absolute
    value, so those are checked as the file holds them.
    """
    shape = check_shape(header.get_data_shape(), path)
    spatial = [ax for ax, n in enumerate(shape[:3]) if n > 1]
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    _check_spacings(path, "spacing", np.linalg.norm(affine[:3, :3], axis=0)[: len(shape)], spatial)
    if int(header["sform_code"]) == 0:
        _check_spacings(path, "header pixdim", _raw_pixdim(path, header), spatial)
    if not np.isfinite(affine).all():  # a NaN origin or a NaN along a single-voxel axis
        raise FlexPatchError(f"{path}: the header's affine holds NaN or Inf: {affine[:3].tolist()}")


def _raw_pixdim(path: Path, header: Nifti1Header) -> np.ndarray:
    """The voxel sizes as written (a second, unchecked read of the header's few hundred bytes)."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f:
        raw = type(header).from_fileobj(f, check=False)
    return np.asarray(raw["pixdim"][1:4], dtype=np.float64)


def _check_spacings(path: Path, what: str, spacing: np.ndarray, axes: Sequence[int]) -> None:
    for ax in axes:
        s = float(spacing[ax])
        if not math.isfinite(s):
            why = "is not finite"
        elif s <= 0:
            why = "is zero" if s == 0 else "is negative"
        elif not MIN_SPACING_MM <= s <= MAX_SPACING_MM:
            why = f"is outside {MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm"
        else:
            continue
        raise FlexPatchError(
            f"{path}: {what} {_numbers(spacing)} mm: axis {ax} {why}; the header's geometry is broken"
        )


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where the OS does not say); psutil is not a dependency."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf; some names are absent
        return None


def _bytes(n: float) -> str:
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def check_grid(new_shape: tuple[int, ...], image: Volume, plan: Plan) -> tuple[int, ...]:
    """``new_shape``, the image's grid after resampling to the plan's spacing, if it can be held;
    else a one-line error.

    The resampled float32 image alone must fit in this machine's memory and stay under
    :data:`MAX_VOXELS`; everything after it (network input, probabilities) is larger still.
    """
    voxels = math.prod(int(n) for n in new_shape)
    need = voxels * int(image.data.shape[0]) * 4
    memory = physical_memory()
    if voxels <= MAX_VOXELS and (memory is None or need <= memory):
        return new_shape
    limit = f"{MAX_VOXELS:.3g} voxels" if voxels > MAX_VOXELS else f"this machine's {_bytes(memory or 0)}"
    raise FlexPatchError(
        f"{image.path or 'image'}: resampling {format_shape(image.spatial_shape)} voxels of "
        f"{_numbers(image.spacing)} mm to {_numbers(plan.target_spacing)} mm gives {format_shape(new_shape)} "
        f"({voxels:.3g} voxels, {_bytes(need)} as float32), more than {limit}; "
        "check the header's spacing or choose a coarser target spacing"
    )


def clipped_patch(
    patch: Sequence[int], image_shapes: Sequence[Sequence[int]], divisor: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(largest image, patch clipped to it)`` when ``patch`` exceeds every image on some axis,
    else None. The clipping is the sampler's (:func:`~flexpatch.sampling.centres.fit_patch`)."""
    from flexpatch.sampling.centres import fit_patch

    largest = tuple(int(max(axis)) for axis in zip(*image_shapes, strict=True))
    fitted = fit_patch(patch, largest, divisor)
    return None if fitted == tuple(int(p) for p in patch) else (largest, fitted)


def warn_patch_clipped(
    sizes: SizeSampler, fingerprint: dict[str, Any], target_spacing: Sequence[float], divisor: Sequence[int]
) -> str | None:
    """Print (and return) one warning line when the training patch is larger than every image
    after resampling; the run goes on with the patch clipped, as the sampler does it."""
    from flexpatch.data.resample import resampled_shape
    from flexpatch.runtime import console
    from flexpatch.sampling.sizes import FixedSize

    shapes = [
        resampled_shape(shape, spacing, target_spacing)
        for shape, spacing in zip(fingerprint["shapes"], fingerprint["spacings"], strict=True)
    ]
    patch = sizes.max_size()
    found = clipped_patch(patch, shapes, divisor) if shapes else None
    if found is None:
        return None
    largest, fitted = found
    fixed = isinstance(sizes, FixedSize)
    what = f"patch {format_shape(patch)} is" if fixed else f"patches up to {format_shape(patch)} are"
    line = (
        f"warning: {what} larger than every image (at most {format_shape(largest)} voxels at "
        f"{_numbers(target_spacing)} mm); training patches are clipped to {format_shape(fitted)} or less"
    )
    console.print(line, markup=False, highlight=False, soft_wrap=True)
    return line
