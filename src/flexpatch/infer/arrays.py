"""Segment from Python: a NumPy array with its affine (:func:`predict_array`), or an image file
(:func:`segment`), with a sliding-window model: the label map ``predict`` would write, as an array.

Both run what ``flexpatch predict`` runs for a case: the model's resampling and normalisation,
the sliding window at any window (:meth:`~flexpatch.infer.predictor.LoadedModel.segment`, streamed),
test-time mirroring when asked, and the model's post-processing (``postprocessing.json``). The
label map lies on the input's grid. A model folder given as a path is loaded on every call: load
it once with :func:`~flexpatch.infer.predictor.load_model` to segment many images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flexpatch.data.io import Volume
from flexpatch.errors import FlexPatchError, format_shape
from flexpatch.evaluate.postprocess import cut_to_largest_, read_postprocessing
from flexpatch.infer.predictor import LoadedModel, load_model
from flexpatch.infer.runner import read_case
from flexpatch.plan.budget import parse_budget

__all__ = ["Segmentation", "as_volume", "predict_array", "segment"]


class Segmentation(NamedTuple):
    """A label map and the voxel -> world (RAS, mm) affine of its grid: ``labels, affine = ...``."""

    labels: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class _Options:
    """How to predict: :func:`predict_array`'s keyword arguments."""

    patch_size: Sequence[int] | None
    overlap: float
    blend: str
    batch_size: int
    memory: str | int | None
    tta: str
    postprocess: bool
    progress: bool


def predict_array(
    model: LoadedModel | str | Path,
    array: Any,
    affine: Any = None,
    patch_size: Sequence[int] | None = None,
    *,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    device: str = "auto",
    memory: str | int | None = None,
    tta: str = "auto",
    postprocess: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """The label map of an image array, on the array's grid (what ``predict`` writes for it).

    Args:
        model: a :class:`~flexpatch.infer.predictor.LoadedModel` or a model folder.
        array: ``(C, *spatial)``, or ``(*spatial)`` for a one-channel model; 2D or 3D as the model.
            Channels in the order of the training dataset's ``channel_names``; never modified.
        affine: the 4x4 voxel -> world (mm) matrix of the array's spatial axes (a 2D array's third
            axis is its unit); None: the identity (1 mm voxels). Its spacing decides the resampling
            to the model's, as a file's header does.
        patch_size: the window (one number: every axis); None: the training patch, or with
            ``memory`` the largest that fits.
        overlap, blend, batch_size, memory, tta, postprocess: as ``flexpatch predict``'s options
            (``tta="auto"`` mirrors when the model was trained with mirroring).
        device: where a model folder is loaded (ignored for a loaded model).
        progress: a progress bar over the windows.

    Returns:
        The labels ``(*spatial)`` (uint8, or int16 beyond 255 values).
    """
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    volume = as_volume(array, affine, lm)
    options = _Options(patch_size, overlap, blend, batch_size, memory, tta, postprocess, progress)
    return _labels(lm, volume, options)


def segment(
    model: LoadedModel | str | Path,
    image: str | Path | Sequence[str | Path],
    patch_size: Sequence[int] | None = None,
    *,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    device: str = "auto",
    memory: str | int | None = None,
    tta: str = "auto",
    postprocess: bool = True,
    progress: bool = False,
) -> Segmentation:
    """The label map of an image file and its affine (the file's): ``labels, affine = segment(...)``.

    ``image``: one file, or a case's channel files (nnU-Net's ``CASE_0000``, ``CASE_0001``, ...),
    read as ``predict`` reads them. The other arguments are :func:`predict_array`'s.
    """
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    files = [Path(image)] if isinstance(image, (str, Path)) else [Path(f) for f in image]
    if not files:
        raise FlexPatchError("segment: no image file given")
    volume = read_case(files, lm.plan.ndim)
    options = _Options(patch_size, overlap, blend, batch_size, memory, tta, postprocess, progress)
    return Segmentation(_labels(lm, volume, options), np.asarray(volume.affine, dtype=np.float64))


def _labels(lm: LoadedModel, volume: Volume, o: _Options) -> np.ndarray:
    """:func:`~flexpatch.infer.predictor.predict_files`'s steps for one case, without the file."""
    budget = parse_budget(o.memory, lm.device) if o.memory is not None else None
    # as predict: a given window is kept; with a budget and none given, the budget picks it
    window = lm.window(o.patch_size) if budget is None or o.patch_size is not None else None
    labels, _ = lm.segment(
        volume, window, o.overlap, o.blend, o.batch_size, memory=budget, tta=o.tta, progress=o.progress
    )
    kept = read_postprocessing(lm.model_dir) if o.postprocess else []
    return cut_to_largest_(labels, kept) if kept else labels  # segment's own array: no copy


def as_volume(array: Any, affine: Any, model: LoadedModel) -> Volume:
    """``array`` as the model's input volume ``(C, *spatial)`` float32, checked in one line each:
    real numbers, finite, the model's dimensions and channels, a usable affine."""
    data = np.asarray(array)
    if data.dtype.kind not in "biuf":
        raise FlexPatchError(f"array of type {data.dtype}: flexpatch segments real-valued images")
    ndim, channels = model.plan.ndim, model.plan.in_channels
    shape = format_shape(data.shape) or "()"
    if data.ndim == ndim:
        if channels != 1:
            raise FlexPatchError(
                f"array {shape} has no channel axis; the model expects {channels} channels: "
                f"pass ({channels}, *spatial)"
            )
        data = data[None]
    elif data.ndim != ndim + 1:
        raise FlexPatchError(
            f"array {shape} has {data.ndim} axes; this {ndim}D model takes (C, *spatial) with "
            f"{ndim} spatial axes, or (*spatial) for one channel"
        )
    elif data.shape[0] != channels:
        raise FlexPatchError(
            f"array {shape} has {data.shape[0]} channels (axis 0), the model expects {channels}"
        )
    if min(data.shape) < 1:
        raise FlexPatchError(f"array {shape} has an empty axis")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise FlexPatchError(f"array {shape}: {int((~np.isfinite(data)).sum())} voxels are NaN or Inf")
    return Volume(data, _affine(affine, ndim), ndim)


def _affine(affine: Any, ndim: int) -> np.ndarray:
    """A 4x4 float64 affine (the identity for None) whose spatial axes have a finite, non-zero size."""
    if affine is None:
        return np.eye(4)
    matrix = np.asarray(affine, dtype=np.float64) if _is_numeric(affine) else None
    if matrix is None or matrix.shape != (4, 4):
        got = "not numbers" if matrix is None else f"shape {format_shape(matrix.shape) or '()'}"
        raise FlexPatchError(f"affine must be a 4x4 voxel -> world matrix, got {got}")
    spacing = np.linalg.norm(matrix[:3, :ndim], axis=0)
    if not np.isfinite(matrix).all() or not (spacing > 0).all():
        raise FlexPatchError(
            f"affine {matrix[:3].tolist()} must be finite with a non-zero voxel size on every axis"
        )
    return matrix


def _is_numeric(value: Any) -> bool:
    try:
        return np.asarray(value).dtype.kind in "biuf"
    except (TypeError, ValueError):  # ragged nested lists
        return False
