"""Reading and writing images: NIfTI (3D or 2D), SimpleITK's ``.mha``/``.nrrd``, 2D PNG/TIFF
and nnU-Net's 3D TIFF (spacing in a JSON beside it), always keeping the affine (RAS, nibabel's
voxel order whatever the format: :mod:`flexpatch.data.readers`).

Arrays come back channels-first: images ``(C, *spatial)`` float32, labels
``(*spatial)`` int16. 2D data are ``(C, H, W)``; a 2D NIfTI is stored as
nnU-Net does, with a trailing axis of length 1. Writes are atomic: a temporary
file in the target folder, renamed when complete, so nothing half-written is
ever left behind.

Every prediction is written by :func:`write_like`: on the input's grid (or a grid of the
method's, such as a patchwork's finer one) with the input's NIfTI orientation header, and with
the label names in a header extension (:func:`label_names_extension`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

import numpy as np

from flexpatch.data.readers import (
    SITK_SUFFIXES,
    TIFF_SUFFIXES,
    load_sitk,
    load_tiff3d,
    sitk_header,
    tiff_ndim,
    write_sitk,
)
from flexpatch.data.sanity import check_shape, open_nifti
from flexpatch.errors import FlexPatchError

if TYPE_CHECKING:
    from nibabel.nifti1 import Nifti1Extension, Nifti1Header, Nifti1Image

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PLAIN_2D_SUFFIXES = (".png", ".tif", ".tiff")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES + PLAIN_2D_SUFFIXES  # every ending read and written
COMMENT_CODE = 6  # NIfTI 'comment' extension: kept by every reader and writer


@dataclass
class Volume:
    """Voxel data with the affine that places it in the world (RAS, mm)."""

    data: np.ndarray
    affine: np.ndarray
    ndim: int
    path: Path | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[-self.ndim :])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis (column norms of the affine)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(v) for v in norms[: self.ndim])


def suffix_of(path: Path) -> str:
    """The file ending that decides the format (``.nii.gz`` counts as one)."""
    name = path.name.lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


# Temporary files start so: hidden, and recognisable when a killed run left one behind.
TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    On any failure the temporary file is removed and ``path`` is left as it was; a failed write
    (disk full, quota, permission, I/O error) is an OSError naming ``path``, not the temporary file
    the user never asked for (the CLI prints ``path: No space left on device``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlexPatchError(f"{path.parent}: cannot create output folder ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise FlexPatchError(f"{path.parent}: output folder is not writable")
    try:
        # keep the full suffix so that writers (nibabel, PIL) pick the right format
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix_of(path), dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def _write_error(path: Path, e: OSError) -> OSError:
    """The same error (its errno, so its subclass) naming ``path`` instead of the temporary file."""
    return OSError(e.errno, e.strerror or str(e), str(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _check_finite(data: np.ndarray, path: Path) -> None:
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise FlexPatchError(f"{path}: {bad} voxels are NaN or Inf")


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise FlexPatchError(f"{path}: file not found")
    try:
        img = open_nifti(path)  # the header checked before the voxels are read: a bad one costs nothing
        data = np.asarray(img.dataobj)
    except FlexPatchError:
        raise
    except Exception as e:  # nibabel raises many types for corrupt or truncated files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlexPatchError(f"{path}: not a readable NIfTI file ({reason})") from None
    if data.dtype.kind not in "biuf":  # complex, RGB (structured) or object voxels
        kind = f"voxels of type {data.dtype} (complex or RGB)"
        raise FlexPatchError(f"{path}: {kind}; flexpatch reads real scalar images")
    return data, np.asarray(img.affine, dtype=np.float64)


def _load_plain_2d(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise FlexPatchError(f"{path}: file not found")
    try:
        if suffix_of(path) == ".png":
            from PIL import Image

            with Image.open(path) as im:
                data = np.asarray(im)
        else:
            import tifffile

            data = tifffile.imread(path)
    except Exception as e:
        raise FlexPatchError(f"{path}: not a readable image ({type(e).__name__})") from None
    check_shape(data.shape, path)
    if data.ndim == 3 and data.shape[-1] in (3, 4):  # RGB(A) -> channels first
        data = np.moveaxis(data[..., :3], -1, 0)
    # PNG/TIFF rows are y: store (H, W) with unit spacing; the affine is the identity.
    return data, np.eye(4)


def _spatial(data: np.ndarray, ndim: int | None, path: Path, channels_last: bool) -> tuple[np.ndarray, int]:
    """Split raw data into (C, *spatial) with the requested number of spatial axes."""
    if ndim is None:
        ndim = 2 if data.ndim == 2 or (data.ndim == 3 and data.shape[-1] == 1) else min(data.ndim, 3)
    if ndim == 2 and data.ndim >= 3 and data.shape[2] == 1 and channels_last:
        data = data[:, :, 0, ...]  # nnU-Net's 2D NIfTI: (X, Y, 1[, C])
    if data.ndim == ndim:
        return data[None], ndim
    if data.ndim == ndim + 1:
        return (np.moveaxis(data, -1, 0) if channels_last else data), ndim
    raise FlexPatchError(f"{path}: has shape {data.shape}, expected {ndim} spatial axes (plus channels)")


def read_image(path: str | Path, ndim: int | None = None) -> Volume:
    """Read an image as ``(C, *spatial)`` float32 with its affine.

    Args:
        path: a ``.nii``/``.nii.gz`` or ``.mha``/``.nrrd`` file (3D, 2D, or 4D with channels
            last, as MSD's multi-channel images; an ITK vector image's components are channels),
            a PNG/TIFF, or a 3D TIFF (nnU-Net's, with its spacing JSON).
        ndim: spatial dimensions wanted (2 or 3); inferred when None (a TIFF is 3D when it is a
            stack: :func:`spatial_ndim`).
    """
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in IMAGE_SUFFIXES:
        raise FlexPatchError(f"{path}: unsupported image format (use {', '.join(IMAGE_SUFFIXES)})")
    if ndim is None and suffix in SITK_SUFFIXES + TIFF_SUFFIXES and path.is_file():
        ndim = spatial_ndim(path)  # the header says: a vector image's components are not an axis
    if suffix in NIFTI_SUFFIXES or suffix in SITK_SUFFIXES:
        data, affine = _load_nifti(path) if suffix in NIFTI_SUFFIXES else load_sitk(path)
        channels_last = True
    else:
        data, affine = load_tiff3d(path) if ndim == 3 else _load_plain_2d(path)
        channels_last = False
    data, nd = _spatial(data, ndim, path, channels_last=channels_last)
    data = data.astype(np.float32, copy=False)
    _check_finite(data, path)
    return Volume(data, affine, nd, path)


def spatial_ndim(path: Path) -> int:
    """Spatial dimensions from the header alone: nnU-Net stores 2D NIfTI as ``(X, Y, 1)`` (an ITK
    image of one slice is 2D too); a TIFF is 3D when it is a stack
    (:func:`~flexpatch.data.readers.tiff_ndim`)."""
    suffix = suffix_of(path)
    if suffix in TIFF_SUFFIXES:
        return tiff_ndim(path)
    if suffix in SITK_SUFFIXES:
        shape = sitk_header(path)[0]
    elif suffix in NIFTI_SUFFIXES:
        shape = _nifti_shape(path)
    else:
        return 2
    return 2 if len(shape) == 2 or (len(shape) >= 3 and shape[2] == 1) else 3


def _nifti_shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    try:
        return tuple(nib.load(str(path)).shape)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise FlexPatchError(f"{path}: not a readable NIfTI file ({type(e).__name__})") from None


def channel_count(path: Path) -> int:
    """The channels one file holds, from its header: a 4D NIfTI's or ITK image's last axis (MSD's
    multi-channel images), an ITK vector image's components, an RGB image's 3, else 1."""
    suffix = suffix_of(path)
    if suffix in SITK_SUFFIXES:
        size, components = sitk_header(path)
        return components * (size[3] if len(size) == 4 else 1)
    if suffix in NIFTI_SUFFIXES:
        shape = _nifti_shape(path)
        return int(shape[3]) if len(shape) == 4 else 1
    if suffix in TIFF_SUFFIXES and tiff_ndim(path) == 3:
        return 1
    return int(read_image(path, 2).data.shape[0])  # a 2D image: reading it costs little


def read_label(path: str | Path, ndim: int | None = None) -> Volume:
    """Read a label map as ``(*spatial)`` int16; fails on non-integer values."""
    path = Path(path)
    vol = read_image(path, ndim)
    if vol.data.shape[0] != 1:
        raise FlexPatchError(f"{path}: a label map must have one channel, found {vol.data.shape[0]}")
    data = vol.data[0]
    if not np.array_equal(data, np.round(data)):
        raise FlexPatchError(f"{path}: label map has non-integer values")
    if data.min() < 0:
        raise FlexPatchError(f"{path}: label map has negative values")
    top = np.iinfo(np.int16).max
    if data.max() > top:  # checked before the cast, which would wrap 65537 round to 1
        fix = "number the labels 0, 1, 2, ..."
        raise FlexPatchError(f"{path}: label value {int(data.max())} is beyond {top}; {fix}")
    return Volume(data.astype(np.int16), vol.affine, vol.ndim, path)


def write_image(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    channels: bool = False,
    extensions: Sequence[Any] = (),
) -> None:
    """Write ``(*spatial)`` data, or ``(C, *spatial)`` with ``channels=True``, atomically.

    NIfTI, ``.mha`` and ``.nrrd`` keep ``affine`` (identity when None); 2D NIfTI gets nnU-Net's
    trailing singleton axis; channels go last. PNG/TIFF take 2D data; a 3D TIFF is a stack with
    its spacing in ``STEM.json`` beside it (nnU-Net's Tiff3DIO). ``extensions``
    (``nibabel.nifti1.Nifti1Extension`` objects) go into a NIfTI header.
    """
    import nibabel as nib

    path = Path(path)
    suffix = suffix_of(path)
    if extensions and suffix not in NIFTI_SUFFIXES:
        raise FlexPatchError(f"{path}: header extensions need a NIfTI output (.nii.gz, .nii)")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    with atomic_path(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            arr = np.asarray(data)
            img = nib.Nifti1Image(_to_nifti_layout(arr, channels), affine)
            for ext in extensions:
                img.header.extensions.append(ext)
            nib.save(img, str(tmp))
        elif suffix == ".png":
            from PIL import Image

            Image.fromarray(np.asarray(data)).save(tmp, format="PNG")
        elif suffix in SITK_SUFFIXES:
            write_sitk(tmp, np.asarray(data), affine, channels)
        elif suffix in TIFF_SUFFIXES:
            import tifffile

            arr = np.asarray(data)
            if arr.ndim == 3 and not channels:  # a 3D stack: its spacing beside it, as nnU-Net's
                spacing = np.linalg.norm(affine[:3, :3], axis=0).tolist()
                save_json(path.with_name(path.name[: -len(suffix)] + ".json"), {"spacing": spacing})
            tifffile.imwrite(tmp, arr)
        else:
            raise FlexPatchError(f"{path}: unsupported output format (use {', '.join(IMAGE_SUFFIXES)})")


def _to_nifti_layout(arr: np.ndarray, channels: bool) -> np.ndarray:
    """Channels go last; 2D spatial data gains nnU-Net's singleton z axis."""
    if channels:
        arr = np.moveaxis(arr, 0, -1)
        return arr[:, :, None, :] if arr.ndim == 3 else arr
    return arr[:, :, None] if arr.ndim == 2 else arr


def write_like(
    path: str | Path,
    data: np.ndarray,
    reference: Volume,
    *,
    channels: bool = False,
    label_names: Mapping[int, str] | None = None,
    affine: np.ndarray | None = None,
) -> Path:
    """Write a prediction for ``reference`` atomically: ``(*spatial)``, or ``(C, *spatial)`` with
    ``channels`` (stored channels last).

    A NIfTI output of a NIfTI input keeps the input's qform, sform, their codes and the units:
    some viewers read the qform, some the sform, and only copying both places the output on the
    input in every one. ``affine`` puts the output on another grid (a patchwork's
    ``sampling_factor``): both forms then hold it, under the input's codes. ``label_names``
    (value -> name) go into a NIfTI header extension; a PNG or TIFF has no place for them and
    is written without (:func:`write_image`), so every method makes the same call whatever the
    input's format.
    """
    path = Path(path)
    arr = np.asarray(data)
    if arr.ndim != reference.ndim + int(channels):
        what = f"{reference.ndim} spatial axes" + (" after the channels" if channels else "")
        raise FlexPatchError(f"{path}: data of shape {arr.shape}, expected {what}")
    if arr.dtype == np.int64:  # nibabel refuses int64 without an explicit header type
        arr = arr.astype(np.int32)
    grid = reference.affine if affine is None else np.asarray(affine, dtype=np.float64)
    nifti = suffix_of(path) in NIFTI_SUFFIXES
    extensions = [label_names_extension(label_names)] if label_names and nifti else []
    ref = reference.path
    if not nifti or ref is None or suffix_of(ref) not in NIFTI_SUFFIXES:
        write_image(path, arr, grid, channels=channels, extensions=extensions)
        return path
    import nibabel as nib

    img = nib.Nifti1Image(_to_nifti_layout(arr, channels), grid)
    same = affine is None or np.allclose(grid, reference.affine, rtol=0, atol=1e-6)
    _copy_orientation(img, nib.load(str(ref)).header, same)
    for ext in extensions:
        img.header.extensions.append(ext)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def _copy_orientation(img: Nifti1Image, header: Nifti1Header, same_grid: bool) -> None:
    """The input's qform and sform (on its grid) or the output's affine under the input's codes."""
    (qform, qcode), (sform, scode) = header.get_qform(coded=True), header.get_sform(coded=True)
    if not same_grid:
        if not (qcode or scode):
            return  # an input without orientation codes: nibabel's default (sform 'aligned')
        qform = sform = img.affine
    img.set_qform(qform, int(qcode))
    img.set_sform(sform, int(scode))
    img.header.set_xyzt_units(*header.get_xyzt_units())


def label_names_extension(names: Mapping[int, str]) -> Nifti1Extension:
    """An XML label table (``<LabelTable><Label Key="1">liver</Label>..``) as a NIfTI comment
    extension: viewers and :func:`read_label_names` show names, not bare numbers."""
    import nibabel as nib

    rows = []
    for key in sorted(names):
        name = str(names[key])
        if any(ord(c) < 32 and c not in "\t\n\r" for c in name):
            raise FlexPatchError(f"label name for {key} has control characters, which XML cannot hold")
        rows.append(f'<Label Key="{int(key)}">{escape(name)}</Label>')
    xml = "<LabelTable>" + "".join(rows) + "</LabelTable>"
    return nib.nifti1.Nifti1Extension(COMMENT_CODE, xml.encode("utf-8"))


def read_label_names(path: str | Path) -> dict[int, str]:
    """The label table written by :func:`write_like`, or ``{}`` when the file has none."""
    import nibabel as nib

    path = Path(path)
    if suffix_of(path) not in NIFTI_SUFFIXES:
        raise FlexPatchError(f"{path}: label names live in NIfTI files only")
    if not path.is_file():
        raise FlexPatchError(f"{path}: file not found")
    try:
        extensions = nib.load(str(path)).header.extensions
    except Exception as e:  # nibabel raises many types for corrupt files
        raise FlexPatchError(f"{path}: not a readable NIfTI file ({type(e).__name__})") from None
    for ext in extensions:
        if ext.get_code() != COMMENT_CODE:
            continue
        # NIfTI pads extensions to 16 bytes with NULs
        text = ext.get_content().decode("utf-8", errors="replace").strip("\x00 \t\r\n")
        if not text.startswith("<LabelTable"):
            continue  # some other comment
        try:
            table = ET.fromstring(text)
        except ET.ParseError:
            continue
        return {int(el.get("Key", "0")): el.text or "" for el in table.iter("Label")}
    return {}


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically; numpy values and paths become plain JSON."""
    write_text(Path(path), json.dumps(obj, indent=2, default=_json_default) + "\n")


def load_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file is a ``FlexPatchError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FlexPatchError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlexPatchError(f"{path}: invalid JSON ({e})") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
