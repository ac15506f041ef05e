"""An image's shape and grid from its header alone, before any voxel is read: what
:func:`~flexpatch.data.io.read_image` would return, so that memory can be planned (and a budget
refused) without reading the image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flexpatch.data.io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, Volume, _spatial, spatial_ndim, suffix_of
from flexpatch.data.readers import SITK_SUFFIXES, TIFF_SUFFIXES, sitk_shape, tiff_spacing
from flexpatch.data.sanity import open_nifti
from flexpatch.errors import FlexPatchError


def read_header(path: str | Path, ndim: int | None = None) -> Volume | None:
    """:func:`~flexpatch.data.io.read_image` without the voxels: its ``data`` is a zero-byte
    stand-in (``np.broadcast_to``, read-only) of the image's shape ``(C, *spatial)`` and type
    (float32, as the read gives), its affine the image's.

    None for a 2D PNG or TIFF (small images, read whole by their libraries); a header that
    cannot be read is the one-line error the read would give.
    """
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in IMAGE_SUFFIXES:
        raise FlexPatchError(f"{path}: unsupported image format (use {', '.join(IMAGE_SUFFIXES)})")
    if not path.is_file():
        raise FlexPatchError(f"{path}: file not found")
    if ndim is None and suffix in SITK_SUFFIXES + TIFF_SUFFIXES:
        ndim = spatial_ndim(path)
    if suffix in NIFTI_SUFFIXES:
        img = _nifti(path)
        shape, affine = tuple(img.shape), np.asarray(img.affine, dtype=np.float64)
    elif suffix in SITK_SUFFIXES:
        shape, affine = sitk_shape(path)
    elif suffix in TIFF_SUFFIXES and ndim == 3:
        shape, affine = _tiff_shape(path), np.diag([*(tiff_spacing(path) or (1.0, 1.0, 1.0)), 1.0])
    else:
        return None
    stand_in = np.broadcast_to(np.zeros((), dtype=np.float32), shape)
    data, nd = _spatial(stand_in, ndim, path, channels_last=suffix not in TIFF_SUFFIXES)
    return Volume(data, affine, nd, path)


def _nifti(path: Path) -> Any:
    try:
        return open_nifti(path)  # the header, checked as the read checks it
    except FlexPatchError:
        raise
    except Exception as e:  # nibabel raises many types for corrupt or truncated files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlexPatchError(f"{path}: not a readable NIfTI file ({reason})") from None


def _tiff_shape(path: Path) -> tuple[int, ...]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(int(n) for n in tif.series[0].shape)
    except Exception as e:  # tifffile raises many types for corrupt files
        raise FlexPatchError(f"{path}: not a readable image ({type(e).__name__})") from None
