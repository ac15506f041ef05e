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


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (full connectivity: diagonals connect)."""
    return mask.astype(bool) & ~_outside_largest(mask)


def _outside_largest(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` outside its largest component (ties: the first in scan order)."""
    labelled, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if count <= 1:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labelled.ravel())
    drop = np.ones(count + 1, bool)  # a lookup by component: one bool array, not three
    drop[[0, 1 + int(np.argmax(sizes[1:]))]] = False
    return drop[labelled]


def keep_largest(seg: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """``seg`` with each of ``classes`` cut to its largest component (the rest becomes background).

    Each class is labelled within its bounding box only: a CT's label map is ~100 M voxels and
    the component labels are int32, but an organ's box is a small part of it.
    """
    out = seg.copy()
    for c in classes:
        mask = seg == c
        box = _bounding_box(mask)
        if box is not None:
            out[box][_outside_largest(mask[box])] = 0
    return out


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
