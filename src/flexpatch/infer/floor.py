"""What a sliding-window prediction holds on the CPU besides the window, and the floor a
``--memory`` budget must clear there (where it bounds the whole process).

The floor is checked twice: from each case's headers before any voxel is read
(:func:`check_floor`: a budget below it costs no read of a large image), and with the case in
memory (:meth:`~flexpatch.infer.predictor.LoadedModel._cpu_budget`, which also gives the sliding
window its share).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from flexpatch.data.header import read_header
from flexpatch.data.resample import RESTORE_CHUNK_VOXELS, resampled_shape
from flexpatch.errors import FlexPatchError, format_shape
from flexpatch.evaluate.postprocess import read_postprocessing, working_bytes
from flexpatch.geometry import slab_axis
from flexpatch.infer.runner import label_dtype
from flexpatch.plan.budget import format_bytes, resident_bytes

if TYPE_CHECKING:
    from flexpatch.infer.predictor import LoadedModel


def outputs_bytes(
    lm: LoadedModel,
    original: Sequence[int],
    shape: Sequence[int],
    patch_size: Sequence[int] | None,
    overlap: float,
    probabilities: bool,
) -> int:
    """The label map on the input's grid ``original`` (and the probabilities when asked for),
    and one restore chunk of the streamed slabs of the prepared image ``shape``, for the
    largest window."""
    window = lm.window(patch_size)
    axis = slab_axis(tuple(shape), window, overlap, lm.divisor)
    voxels = math.prod(original)
    rest = voxels // original[axis]
    rows = math.ceil(min(window[axis], shape[axis]) * original[axis] / shape[axis]) + 2
    rows = min(rows, max(1, RESTORE_CHUNK_VOXELS // rest))  # restored a chunk at a time
    c_out = lm.plan.out_channels
    # a chunk's rows taken, interpolated and resampled in float32, and its argmax in int64
    slabs = rows * rest * (3 * c_out * 4 + 8)
    outputs = voxels * np.dtype(label_dtype(lm.largest_value + 1)).itemsize
    return outputs + (voxels * c_out * 4 if probabilities else 0) + slabs


def postprocess_bytes(lm: LoadedModel, original: Sequence[int]) -> int:
    """What the model's post-processing (its classes cut to their largest component) holds besides
    the label map, counted whenever the folder has one (``--no-postprocess`` skips the work, not
    this count: the window's share is never smaller for it, only the floor higher)."""
    return working_bytes(original, read_postprocessing(lm.model_dir))


def weight_bytes(net: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


def cpu_share(
    budget: int,
    held: int,
    outputs: int,
    original: Sequence[int],
    path: Path | None = None,
    unread: int = 0,
    after: int = 0,
) -> int:
    """What is left of a CPU budget for the sliding window once what the process holds (``held``,
    with the image's ``unread`` bytes when checked from its header) and the outputs are set
    aside; a budget below them, or one whose share is below what runs ``after`` the window in its
    place (the post-processing), is one line, naming the image's ``path`` when given."""
    left = budget - held - outputs
    if left > 0 and left >= after:
        return left
    where = f"{path}: " if path is not None else ""
    unread_note = f" (the image's {format_bytes(unread)} counted from its header, not read)" if unread else ""
    then = f", and keeping each class's largest component afterwards {format_bytes(after)}" if after else ""
    raise FlexPatchError(
        f"{where}memory budget {format_bytes(budget)} is below what predicting image "
        f"{format_shape(tuple(original))} needs besides the sliding window: the process holds "
        f"{format_bytes(held)}{unread_note}, the outputs take {format_bytes(outputs)}{then}"
    )


def check_floor(
    lm: LoadedModel,
    files: Sequence[Path],
    budget: int,
    patch_size: Sequence[int] | None,
    overlap: float,
    probabilities: bool,
    held: int,
) -> None:
    """On the CPU, refuse a budget below what a case needs besides the sliding window, from its
    files' headers (:func:`~flexpatch.data.header.read_header`): the input volume is counted as
    the float32 array the read will make, on top of what the process ``held`` (besides the weights).

    Why: checked only with the case in memory, a budget too small for the image was refused
    after the process had grown by the whole image. A PNG or 2D TIFF (small, no header step) is
    left to that later check.
    """
    if lm.device.type != "cpu":
        return
    headers = [h for h in (read_header(f, lm.plan.ndim) for f in files) if h is not None]
    if len(headers) != len(files):
        return
    original = headers[0].spatial_shape
    shape = resampled_shape(original, headers[0].spacing, lm.plan.target_spacing)
    volume = sum(h.data.size for h in headers) * np.dtype(np.float32).itemsize
    outputs = outputs_bytes(lm, original, shape, patch_size, overlap, probabilities)
    after = postprocess_bytes(lm, original)
    cpu_share(budget, held + volume, outputs, original, Path(files[0]), unread=volume, after=after)


def check_floors(
    lm: LoadedModel, cases: dict[str, list[Path]], budget: int, patch_size: Sequence[int] | None,
    overlap: float, probabilities: bool,
) -> None:  # fmt: skip
    """:func:`check_floor` of every case, before any image is read."""
    for files in cases.values():
        held = resident_bytes() - weight_bytes(lm.net)
        check_floor(lm, files, budget, patch_size, overlap, probabilities, held)
