"""Formats beyond NIfTI and 2D images: SimpleITK's ``.mha``/``.nrrd`` and nnU-Net's 3D TIFF.

Every reader gives what :mod:`flexpatch.data.io` gives for NIfTI: voxels in nibabel's order
(``x, y, z`` then channels) and a RAS affine, so that an image reads to the same arrays and
affine whichever format holds it.

SimpleITK (ITK) works in LPS: the world point of index ``(i, j, k)`` is
``origin + direction @ diag(spacing) @ (i, j, k)``, and ``GetArrayFromImage`` returns the axes
reversed (``z, y, x``). The RAS affine is therefore ``diag(-1, -1, 1) @ [direction * spacing |
origin]`` and the array is transposed back. A 4D scalar image holds its channels on ITK's fourth
axis, a vector image in its components (both as nnU-Net's SimpleITKIO reads them).

nnU-Net's 3D TIFF (``Tiff3DIO``): one 3D stack per file, its spacing in a JSON beside it,
``{"spacing": [sz, sy, sx]}``, in the order of the stack's axes. The JSON of a channel file
``CASE_0000.tif`` is ``CASE.json`` (nnU-Net's rule), that of a label ``CASE.tif`` is ``CASE.json``.
Without one the spacing is 1 (as nnU-Net, which warns).
"""

from __future__ import annotations

import errno
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flexpatch.data.sanity import MAX_SPACING_MM, MIN_SPACING_MM, check_shape
from flexpatch.errors import FlexPatchError

SITK_SUFFIXES = (".mha", ".nrrd")
TIFF_SUFFIXES = (".tif", ".tiff")
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse: RAS <-> LPS
_CHANNEL = re.compile(r"_\d{4}$")

# nnU-Net's reader names in dataset.json's overwrite_image_reader_writer: the endings each reads
# and the spatial dimensions it implies (None: the files say). NIfTI is read by nibabel whichever
# reader is named: SimpleITK gives the same geometry (tested), nibabel checks the header first.
READERS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "SimpleITKIO": ((".nii.gz", ".nrrd", ".mha"), None),
    "NibabelIO": ((".nii.gz", ".nii"), None),
    "NibabelIOWithReorient": ((".nii.gz", ".nii"), None),
    "Tiff3DIO": (TIFF_SUFFIXES, 3),
    "NaturalImage2DIO": ((".png", ".tif"), 2),
}


def reader_ndim(name: Any, ending: str, meta_path: Path, declared: Any = None) -> Any:
    """dataset.json's spatial dimensions: its ``ndim`` (``declared``), else what its
    ``overwrite_image_reader_writer`` implies (None: absent, ``"None"``, or the files say). An
    unknown reader, one that does not read ``ending``, or one at odds with ``ndim`` is one line
    naming dataset.json and the value."""
    if name is None or name == "None":  # nnU-Net's own "no override"
        return declared
    field = "overwrite_image_reader_writer"
    if not isinstance(name, str) or name not in READERS:
        known = ", ".join(READERS)
        raise FlexPatchError(f"{meta_path}: {field} {name!r} is not a reader flexpatch knows ({known})")
    endings, ndim = READERS[name]
    if ending.lower() not in endings:
        raise FlexPatchError(
            f"{meta_path}: {field} {name!r} does not read {ending!r} files ({', '.join(endings)})"
        )
    if ndim is not None and declared in (2, 3) and declared != ndim:
        raise FlexPatchError(f"{meta_path}: 'ndim' {declared} but {field} {name!r} reads {ndim}D images")
    return ndim if declared is None else declared


def _sitk() -> Any:
    import SimpleITK as sitk  # imported here: only datasets in its formats pay for it

    # ITK prints warnings (metadata it drops, odd headers) on stderr: errors are ours to say, in one line
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    # ITK's messages start with the source file and line of the C++ code: keep the last line
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def sitk_header(path: Path) -> tuple[tuple[int, ...], int]:
    """ITK's size ``(x, y, z[, t])`` and components per voxel, from the header alone."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise FlexPatchError(f"{path}: not a readable image ({_first_line(e)})") from None
    return tuple(int(n) for n in reader.GetSize()), int(reader.GetNumberOfComponents())


def _open_sitk(path: Path) -> tuple[Any, np.ndarray]:
    """A SimpleITK reader with the header read and checked, and the RAS affine; no voxel read."""
    if not path.exists():
        raise FlexPatchError(f"{path}: file not found")
    reader = _sitk().ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        dim = int(reader.GetDimension())
        if dim not in (2, 3, 4):
            raise FlexPatchError(f"{path}: a {dim}D image; flexpatch reads 2D and 3D images (4D: channels)")
        check_shape(reader.GetSize(), path)
        affine = itk_to_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), path)
    except RuntimeError as e:
        raise FlexPatchError(f"{path}: not a readable image ({_first_line(e)})") from None
    return reader, affine


def sitk_shape(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """The shape of the voxels :func:`load_sitk` returns and the RAS affine, from the header alone."""
    reader, affine = _open_sitk(path)
    size, components = tuple(int(n) for n in reader.GetSize()), int(reader.GetNumberOfComponents())
    return (*size[:3], *((components,) if components > 1 else ()), *size[3:]), affine


def load_sitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels ``(x, y, z[, c])`` and the RAS affine of a file SimpleITK reads; the header is
    checked before the voxels are read."""
    reader, affine = _open_sitk(path)
    dim = int(reader.GetDimension())
    try:
        array = _sitk().GetArrayFromImage(reader.Execute())
    except RuntimeError as e:
        raise FlexPatchError(f"{path}: not a readable image ({_first_line(e)})") from None
    if array.dtype.kind not in "biuf":
        raise FlexPatchError(f"{path}: voxels of type {array.dtype}; flexpatch reads real scalar images")
    spatial = min(dim, 3)
    # ITK's 4th axis (channels) comes first in numpy, vector components last: both end up last
    if dim == 4:
        array = np.moveaxis(array, 0, -1)
    order = [*reversed(range(spatial)), *range(spatial, array.ndim)]
    return np.transpose(array, order), affine


def itk_to_affine(
    spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float], path: Path
) -> np.ndarray:
    """The RAS voxel -> world affine of ITK's LPS geometry (the first three axes of a 4D image)."""
    dim = len(spacing)
    n = min(dim, 3)
    _check_spacing(np.asarray(spacing[:n], dtype=np.float64), path)
    rotation = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:n, :n]
    affine = np.eye(4)
    affine[:n, :n] = rotation * np.asarray(spacing[:n], dtype=np.float64)  # scales the columns
    affine[:n, 3] = np.asarray(origin[:n], dtype=np.float64)
    affine = _LPS_RAS @ affine
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) == 0:
        raise FlexPatchError(f"{path}: the header's direction or origin is broken: {affine[:3].tolist()}")
    return affine


def affine_to_itk(affine: np.ndarray, ndim: int) -> tuple[list[float], list[float], list[float]]:
    """ITK's spacing, origin and direction (LPS, ``ndim`` axes) of a RAS affine: the inverse of
    :func:`itk_to_affine`."""
    lps = _LPS_RAS @ np.asarray(affine, dtype=np.float64)
    columns = lps[:ndim, :ndim]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing
    return spacing.tolist(), lps[:ndim, 3].tolist(), direction.ravel().tolist()


def write_sitk(path: Path, data: np.ndarray, affine: np.ndarray, channels: bool) -> None:
    """Write ``(*spatial)`` or ``(C, *spatial)`` (channels: a vector image) with the affine's
    geometry, compressed. A 2D image whose affine leaves its plane (a slice of a volume) is
    written as 3D with one slice, so that its place in the world is kept."""
    sitk = _sitk()
    arr = np.asarray(data)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if channels:
        arr = np.moveaxis(arr, 0, -1)
    spatial = arr.ndim - int(channels)
    if spatial == 2 and not _in_plane(affine):
        arr, spatial = arr[:, :, None], 3
    order = [*reversed(range(spatial)), *range(spatial, arr.ndim)]
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, order)), isVector=channels)
    spacing, origin, direction = affine_to_itk(affine, spatial)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    try:
        sitk.WriteImage(image, str(path), True)
    except RuntimeError as e:  # ITK's write errors are RuntimeErrors: keep them OSErrors to callers
        raise OSError(errno.EIO, f"cannot write the image ({_first_line(e)})") from None


def _in_plane(affine: np.ndarray) -> bool:
    a = np.asarray(affine, dtype=np.float64)
    return bool(np.all(a[2, :2] == 0) and np.all(a[:2, 2] == 0) and a[2, 3] == 0)


def tiff_spacing_file(path: Path) -> Path | None:
    """The spacing JSON of a 3D TIFF: ``STEM.json``, else nnU-Net's ``CASE.json`` for a channel
    file ``CASE_0000.tif``; None when there is neither."""
    stem = path.name[: -len(path.suffix)]
    for name in (stem, _CHANNEL.sub("", stem)):
        candidate = path.with_name(name + ".json")
        if candidate.is_file():
            return candidate
    return None


def tiff_spacing(path: Path) -> tuple[float, float, float] | None:
    """The spacing its JSON gives a 3D TIFF (None without a JSON); a JSON that is not
    ``{"spacing": [3 positive numbers]}`` is one line naming it."""
    found = tiff_spacing_file(path)
    if found is None:
        return None
    try:
        meta = json.loads(found.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FlexPatchError(f"{found}: not a readable spacing JSON ({e})") from None
    spacing = meta.get("spacing") if isinstance(meta, dict) else None
    ok = isinstance(spacing, list) and len(spacing) == 3
    if not ok or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in spacing):
        raise FlexPatchError(f'{found}: expected {{"spacing": [z, y, x]}} with 3 numbers, found {meta!r}')
    values = np.asarray(spacing, dtype=np.float64)
    _check_spacing(values, found)
    return (float(values[0]), float(values[1]), float(values[2]))


def load_tiff3d(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D TIFF stack as stored (its axes are those of the spacing) and ``diag(spacing)``."""
    import tifffile

    if not path.exists():
        raise FlexPatchError(f"{path}: file not found")
    spacing = tiff_spacing(path) or (1.0, 1.0, 1.0)
    try:
        data = tifffile.imread(path)
    except Exception as e:  # tifffile raises many types for corrupt files
        raise FlexPatchError(f"{path}: not a readable image ({type(e).__name__})") from None
    check_shape(data.shape, path)
    if data.ndim != 3:
        shape = "x".join(map(str, data.shape))
        raise FlexPatchError(f"{path}: a 3D TIFF must hold one 3D stack, found shape {shape}")
    return data, np.diag([*spacing, 1.0])


def tiff_ndim(path: Path) -> int:
    """3 for a 3D stack (a spacing JSON beside it, or three axes that are not RGB), else 2."""
    if tiff_spacing_file(path) is not None:
        return 3
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            shape = tif.series[0].shape
    except Exception:  # unreadable here: the read says why, in its own words
        return 2
    return 3 if len(shape) == 3 and shape[-1] not in (3, 4) else 2


def _check_spacing(spacing: np.ndarray, path: Path) -> None:
    for ax, s in enumerate(spacing.tolist()):
        if not (math.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM):
            numbers = " x ".join(f"{v:g}" for v in spacing.tolist())
            raise FlexPatchError(
                f"{path}: spacing {numbers} mm: axis {ax} is not within {MIN_SPACING_MM:g} to "
                f"{MAX_SPACING_MM:g} mm; the header's geometry is broken"
            )
