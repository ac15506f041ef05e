"""Largest-connected-component post-processing, decided on validation as nnU-Net does.

A class that is one object (a liver, a spleen) is often predicted with a few stray islands
elsewhere; keeping its largest connected component removes them. It hurts classes with many
objects (lesions, cells), so it is decided per class on the validation cases: kept only where
it raises that class's mean Dice. The decision is saved beside the model
(``postprocessing.json``) and applied by every prediction of the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from flexpatch.data.io import load_json, save_json
from flexpatch.errors import FlexPatchError

POSTPROCESSING = "postprocessing.json"
# a class keeps the rule only when it raises the mean Dice by more than this (noise is not a gain)
MIN_GAIN = 1e-4


# voxels per pass when counting component sizes: np.bincount casts its input to int64 (8 bytes a
# voxel), so the whole label image at once cost more than the labelling itself
SIZE_CHUNK_VOXELS = 1 << 22
# bytes per voxel of a class's bounding box while it is cut: the mask and its int32 component
# labels (see cut_to_largest_); per voxel of a chunk: bincount's int64 copy and the lookup's bool;
# per component: its size (int64), a chunk's counts (int64) and the lookup (bool)
BYTES_PER_VOXEL = 5
BYTES_PER_CHUNK_VOXEL = 9
BYTES_PER_COMPONENT = 17


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (full connectivity: diagonals connect)."""
    labelled, count = _components(np.asarray(mask, dtype=bool))
    return labelled == _largest(labelled, count) if count else np.zeros(labelled.shape, bool)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of ``mask`` (full connectivity) in int32. Why not uint16 when they fit:
    SciPy finds out they do not only by labelling again in int32 and comparing (7 bytes a voxel),
    and an untrained or noisy model's class has millions of components."""
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool), output=np.int32)


def _largest(labelled: np.ndarray, count: int) -> int:
    """The label of the largest component (ties: the first in scan order), its sizes counted a
    chunk of rows at a time (see :data:`SIZE_CHUNK_VOXELS`)."""
    sizes = np.zeros(count + 1, np.int64)
    flat = labelled.reshape(len(labelled), -1)
    rows = max(1, SIZE_CHUNK_VOXELS // max(1, flat.shape[1]))
    for i in range(0, len(flat), rows):
        sizes += np.bincount(flat[i : i + rows].ravel(), minlength=count + 1)
    return 1 + int(np.argmax(sizes[1:]))


def keep_largest(seg: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """``seg`` with each of ``classes`` cut to its largest component (the rest becomes
    background), as a new array; :func:`cut_to_largest_` cuts in place."""
    return cut_to_largest_(seg.copy(), classes)


def cut_to_largest_(seg: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """``seg`` itself, each of ``classes`` cut to its largest component.

    Each class is labelled within its bounding box only, and besides ``seg`` at most
    :func:`working_bytes` are held (a ``--memory`` budget counts them): about 5 bytes per voxel of
    the box, where the copy, a second mask, int64 sizes and int32 labels of the next class beside
    the last's took 14.
    """
    for c in classes:
        _cut_class(seg, c)  # a function per class: its labels are freed before the next's are made
    return seg


def _cut_class(seg: np.ndarray, c: int) -> None:
    box = _bounding_box(seg == c)
    if box is None:
        return
    view = seg[box]
    labelled, count = _components(view == c)
    if count <= 1:
        return
    drop = np.ones(count + 1, bool)  # a lookup by component: the voxels to clear
    drop[[0, _largest(labelled, count)]] = False
    rows = max(1, SIZE_CHUNK_VOXELS // max(1, labelled[0].size))
    for i in range(0, len(labelled), rows):  # a chunk at a time: no image-sized boolean
        part = view[i : i + rows]
        part[drop[labelled[i : i + rows]]] = 0


def working_bytes(shape: Sequence[int], classes: Sequence[int]) -> int:
    """The most :func:`cut_to_largest_` holds besides a label map of ``shape`` (none without
    ``classes``): a class's box may be the whole image, and with full connectivity it has at most
    one component per 2^ndim voxels (isolated voxels with a gap on every axis)."""
    if not len(classes):
        return 0
    voxels = int(np.prod(shape))
    components = -(-voxels // 2 ** len(shape))
    return (
        BYTES_PER_VOXEL * voxels
        + BYTES_PER_CHUNK_VOXEL * min(SIZE_CHUNK_VOXELS, voxels)
        + BYTES_PER_COMPONENT * components
    )


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding ``mask``'s voxels; None when it has none."""
    box = []
    for axis in range(mask.ndim):
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(along):
            return None
        box.append(slice(int(along[0]), int(along[-1]) + 1))
    return tuple(box)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / total if total else float("nan")


def decide(cases: Iterable[tuple[np.ndarray, np.ndarray]], classes: Sequence[int]) -> dict[str, Any]:
    """For each class, mean Dice over ``cases`` ``(prediction, truth)`` without and with the largest
    component kept; the classes it helps (by more than :data:`MIN_GAIN`) are ``largest_component``."""
    return decision([case_decision(pred, truth, classes) for pred, truth in cases], classes)


def case_decision(
    pred: np.ndarray, truth: np.ndarray, classes: Sequence[int]
) -> tuple[list[float], list[float]]:
    """One case's Dice per class without and with the largest component kept (see :func:`decision`)."""
    scores = [
        (_dice(pred == c, truth == c), _dice(largest_component(pred == c), truth == c)) for c in classes
    ]
    return [b for b, _ in scores], [a for _, a in scores]


def decision(cases: Sequence[tuple[list[float], list[float]]], classes: Sequence[int]) -> dict[str, Any]:
    """:func:`decide` from the cases' :func:`case_decision` scores (gathered from the processes of a
    torchrun run, each of which scored its share of the cases)."""
    before = {c: [case[0][i] for case in cases] for i, c in enumerate(classes)}
    after = {c: [case[1][i] for case in cases] for i, c in enumerate(classes)}
    mean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")  # noqa: E731
    kept = [c for c in classes if mean(after[c]) > mean(before[c]) + MIN_GAIN]
    return {
        "largest_component": kept,
        "dice_before": {str(c): mean(before[c]) for c in classes},
        "dice_after": {str(c): mean(after[c]) for c in classes},
    }


def read_postprocessing(model_dir: Path) -> list[int]:
    """The classes a model folder keeps the largest component of (none without the file)."""
    path = Path(model_dir) / POSTPROCESSING
    if not path.is_file():
        return []
    kept = load_json(path).get("largest_component") if isinstance(load_json(path), dict) else None
    if not isinstance(kept, list) or not all(type(c) is int and c > 0 for c in kept):
        raise FlexPatchError(f"{path}: 'largest_component' must be a list of label values > 0")
    return kept


def write_postprocessing(model_dir: Path, decision: dict[str, Any]) -> Path:
    save_json(Path(model_dir) / POSTPROCESSING, decision)
    return Path(model_dir) / POSTPROCESSING
