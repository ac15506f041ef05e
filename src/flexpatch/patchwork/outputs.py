"""Turning stitched probabilities into the files DNP writes (its ``out_typ``).

- ``float32`` / ``uint8`` / ``int16``: foreground probabilities, one channel per label,
  channels last (the NIfTI 4th dimension); integers scale ``[0, 1]`` to the type's range.
- ``mask[:t1,t2..]``: one uint8 0/1 mask per label, thresholded at ``t`` (0.5 by default).
- ``atlas[:t1,t2..]`` (DNP spells it ``atls``): one map of the original label values.

The files themselves are written by :func:`flexpatch.data.io.write_like`, as every method's
(label names in a NIfTI header extension).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from flexpatch.axes import per_axis
from flexpatch.errors import FlexPatchError

# probability types: numpy type and the integer that stands for probability 1
PROBABILITY_TYPES: dict[str, tuple[type, int]] = {
    "float32": (np.float32, 1),
    "uint8": (np.uint8, 255),
    "int16": (np.int16, 32767),
}
THRESHOLD_TYPES: tuple[str, ...] = ("mask", "atlas")
ALIASES = {"atls": "atlas"}
DEFAULT_THRESHOLD = 0.5
SLAB_VOXELS = 1 << 18  # voxels per slab of a label map (whole rows): its int64 winners take 2 MiB
_USAGE = "use float32, uint8, int16, mask[:t1,t2,..] or atlas[:t1,t2,..]"


def parse_out_type(spec: str) -> tuple[str, list[float] | None]:
    """Split an output spec such as ``mask:0.4,0.5`` into its kind and thresholds.

    Returns:
        ``(kind, thresholds)``; kind is one of float32, uint8, int16, mask, atlas
        (``atls`` is read as atlas) and thresholds is None when none were given.
    """
    head, sep, tail = str(spec).strip().partition(":")
    kind = ALIASES.get(head.strip().lower(), head.strip().lower())
    if kind not in PROBABILITY_TYPES and kind not in THRESHOLD_TYPES:
        raise FlexPatchError(f"unknown output type {spec!r}; {_USAGE}")
    if not sep:
        return kind, None
    if kind in PROBABILITY_TYPES:
        raise FlexPatchError(f"output type {kind} takes no thresholds, got {spec!r}")
    thresholds = []
    for item in tail.split(","):
        try:
            t = float(item)
        except ValueError:
            raise FlexPatchError(f"output type {spec!r}: {item.strip()!r} is not a number") from None
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise FlexPatchError(f"output type {spec!r}: threshold {t} is outside [0, 1]")
        thresholds.append(t)
    return kind, thresholds


def _thresholds(given: list[float] | None, count: int, default: float | None) -> np.ndarray | None:
    """One threshold per label: a single value broadcasts, None falls back to ``default``."""
    if given is None:
        return None if default is None else np.full(count, default)
    message = f"got {len(given)} thresholds for {count} labels; give 1 or {count}"
    return np.asarray(per_axis(given, count, "thresholds", cast=float, message=message), dtype=np.float64)


def _label_dtype(values: Sequence[int]) -> type:
    top = max(values)
    if top > np.iinfo(np.int16).max:
        raise FlexPatchError(f"label value {top} does not fit an int16 label map")
    return np.uint8 if top <= np.iinfo(np.uint8).max else np.int16


def to_output(
    probs: torch.Tensor | np.ndarray, spec: str, categorical: bool, label_values: Sequence[int]
) -> np.ndarray:
    """Convert probabilities ``(C, *s)`` into the array that ``spec`` asks for.

    Args:
        probs: softmax output (channel 0 is background) when ``categorical``, else
            one sigmoid channel per label (labels may overlap).
        spec: an output type, see :func:`parse_out_type`.
        categorical: whether ``probs`` is a softmax over background and the labels.
        label_values: the integer value of each foreground channel, in order.

    Returns:
        ``(*s, L)`` probabilities or masks (channels last), or a ``(*s)`` label map for atlas.
    """
    kind, given = parse_out_type(spec)
    values = [int(v) for v in label_values]
    if not values or min(values) <= 0 or len(set(values)) != len(values):
        raise FlexPatchError(f"label values must be distinct positive integers, got {values}")
    shape = tuple(probs.shape)
    want = len(values) + int(categorical)
    if len(shape) < 2 or shape[0] != want:
        kindword = "background + labels" if categorical else "labels"
        raise FlexPatchError(f"probabilities have shape {shape}, expected {want} channels ({kindword})")
    lut = np.asarray([0, *values], dtype=_label_dtype(values))
    if kind == "atlas" and categorical:
        return _categorical_atlas(probs, lut, _thresholds(given, len(values), None))
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().numpy()
    p = np.asarray(probs, dtype=np.float32)
    fg = p[1:] if categorical else p
    if kind in PROBABILITY_TYPES:
        dtype, scale = PROBABILITY_TYPES[kind]
        out = fg if scale == 1 else np.round(np.clip(fg, 0.0, 1.0) * np.float32(scale))
        return np.moveaxis(out, 0, -1).astype(dtype)
    expand = (slice(None),) + (None,) * (p.ndim - 1)  # thresholds broadcast over space
    if kind == "mask":
        thr = _thresholds(given, len(values), DEFAULT_THRESHOLD)
        return np.moveaxis(fg >= thr[expand], 0, -1).astype(np.uint8)
    # multi-label: among the labels that pass their threshold, the most probable wins (as DNP)
    thr = _thresholds(given, len(values), DEFAULT_THRESHOLD)
    passing = fg >= thr[expand]
    win = np.argmax(np.where(passing, fg, -1.0), axis=0) + 1
    return lut[np.where(passing.any(axis=0), win, 0)]


def labelling_bytes(shape: Sequence[int]) -> int:
    """Most bytes a categorical atlas of spatial ``shape`` allocates besides the label map: in one
    slab, the running maximum (float32), the winners (int64), and a comparison (bool) or the labels
    gathered for it (at most int16)."""
    return _slab_rows(shape) * int(np.prod(shape[1:])) * (4 + 8 + 2)


def _slab_rows(shape: Sequence[int]) -> int:
    """Rows of the first axis in one slab: as many as SLAB_VOXELS hold, at least one."""
    return min(int(shape[0]), max(1, SLAB_VOXELS // max(1, int(np.prod(shape[1:])))))


def _categorical_atlas(
    probs: torch.Tensor | np.ndarray, lut: np.ndarray, thr: np.ndarray | None
) -> np.ndarray:
    """The most probable label of each voxel, as ``lut`` values; with DNP's ``ce_threshold``
    a foreground winner below its threshold gives background.

    Computed slab by slab on the probabilities' own device, so that only the label map leaves
    it: no copy of every channel to the host, and no image-sized int64 index map.
    """
    # numpy arrays are shared, not copied
    p = probs.detach() if isinstance(probs, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(probs))
    lut_t = torch.as_tensor(lut, device=p.device)
    need = None if thr is None else torch.tensor([0.0, *thr], dtype=torch.float64, device=p.device)
    out = np.empty(p.shape[1:], dtype=lut.dtype)
    step = _slab_rows(p.shape[1:])
    for i in range(0, p.shape[1], step):
        win, best = _first_argmax(p[:, i : i + step])
        if need is not None:
            win = torch.where(best.double() < need[win], 0, win)
        out[i : i + step] = lut_t[win].cpu().numpy()
    return out


def _first_argmax(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and value of the maximum over the first axis; the first of equal maxima wins, as
    ``np.argmax``. A running maximum over the channels: on the CPU ``torch.argmax`` over the
    outer axis is about 7x slower, and most of a large image's labelling time."""
    best = p[0].clone()
    win = torch.zeros(p.shape[1:], dtype=torch.int64, device=p.device)
    for c in range(1, p.shape[0]):
        win.masked_fill_(p[c] > best, c)  # strictly greater: an earlier channel keeps a tie
        torch.maximum(best, p[c], out=best)
    return win, best
