"""Segmentation metrics per class (Dice, IoU, precision, recall, HD95) and folder evaluation.

Conventions for empty sets follow nnU-Net: a ratio whose denominator is empty is NaN
(so a class absent from both prediction and label gets NaN Dice, not 1, and drops out
of the means), while a class predicted where the label has none gets Dice 0. HD95 is
MONAI's: the larger of the two directed 95th percentiles of distances (in mm) between
the boundary voxels of prediction and label, NaN when either is empty.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from flexpatch.data.io import NIFTI_SUFFIXES, PLAIN_2D_SUFFIXES, Volume, read_label, suffix_of
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.report import METRICS, EvaluationReport

__all__ = [
    "METRICS",
    "EvaluationReport",
    "dice_torch",
    "evaluate_folders",
    "hausdorff95",
    "read_declared_labels",
    "segmentation_metrics",
]


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else math.nan


def _overlap(p: np.ndarray, lab: np.ndarray) -> dict[str, float]:
    tp = int(np.count_nonzero(p & lab))
    n_p, n_l = int(np.count_nonzero(p)), int(np.count_nonzero(lab))
    return {
        "dice": _ratio(2 * tp, n_p + n_l),
        "iou": _ratio(tp, n_p + n_l - tp),
        "precision": _ratio(tp, n_p),
        "recall": _ratio(tp, n_l),
    }


def _union_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by one voxel (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    # Voxels lost by one erosion; erosion treats outside the array as background (like MONAI),
    # so clipping the margin at the border does not change the surface.
    return mask ^ ndimage.binary_erosion(mask)


def hausdorff95(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two binary masks.

    Matches ``monai.metrics.compute_hausdorff_distance(percentile=95, spacing=...)``:
    the maximum of the two directed 95th percentiles of surface-to-surface distances.
    NaN when either mask is empty.

    Args:
        pred: boolean mask.
        label: boolean mask of the same shape.
        spacing: voxel size in mm per axis (1 when None).
    """
    pred, label = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    if not pred.any() or not label.any():
        return math.nan
    box = _union_box(pred | label)  # distance transforms cost the volume, so skip the empty part
    sp, sl = _surface(pred[box]), _surface(label[box])
    to_label = ndimage.distance_transform_edt(~sl, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sl]
    return float(max(np.percentile(to_label, 95), np.percentile(to_pred, 95)))


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise FlexPatchError(f"spacing {sp} must have {ndim} positive values, one per spatial axis")
    return sp


def segmentation_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    classes: Sequence[int],
    spacing: Sequence[float] | None = None,
    hd95: bool = True,
) -> dict[int, dict[str, float]]:
    """Dice, IoU, precision, recall and (optionally) HD95 of each class.

    Args:
        pred: integer label map ``(*spatial)``.
        label: reference label map, same shape.
        classes: the label values to score (the caller leaves background out).
        spacing: voxel size in mm per axis, for HD95 (1 when None).
        hd95: compute HD95 (the slow part); when False the key is absent.

    Returns:
        ``{class: {metric: value}}``; NaN where a metric is undefined (see module docstring).
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise FlexPatchError(f"prediction has shape {pred.shape} but label has shape {label.shape}")
    sp = _check_spacing(spacing, label.ndim)
    out: dict[int, dict[str, float]] = {}
    for c in classes:
        p, lab = pred == c, label == c
        out[int(c)] = _overlap(p, lab)
        if hd95:
            out[int(c)]["hd95"] = hausdorff95(p, lab, sp)
    return out


def dice_torch(pred_onehot: torch.Tensor, label_onehot: torch.Tensor) -> torch.Tensor:
    """Batched Dice of one-hot maps ``(N, C, *spatial)`` -> ``(N, C)``; NaN where both are empty.

    A class predicted where the label has none scores 0, as in :func:`segmentation_metrics`.
    """
    if pred_onehot.shape != label_onehot.shape or pred_onehot.ndim < 3:
        raise FlexPatchError(
            f"dice needs two (N, C, *spatial) tensors of the same shape, got "
            f"{tuple(pred_onehot.shape)} and {tuple(label_onehot.shape)}"
        )
    dims = tuple(range(2, pred_onehot.ndim))
    p, lab = pred_onehot.float(), label_onehot.float()
    inter = (p * lab).sum(dims)
    denom = p.sum(dims) + lab.sum(dims)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-12), torch.full_like(denom, math.nan))


def _case_files(folder: Path, role: str) -> dict[str, Path]:
    """Map case id (file name without its suffix) to file, for the image formats we read."""
    if not folder.is_dir():
        raise FlexPatchError(f"{folder}: {role} folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = suffix_of(path)
        if path.name.startswith(".") or suffix not in NIFTI_SUFFIXES + PLAIN_2D_SUFFIXES:
            continue  # hidden temporaries, plans.json and the like
        case = path.name[: -len(suffix)]
        if case in files:
            raise FlexPatchError(f"{path}: case '{case}' also appears as {files[case].name}")
        files[case] = path
    if not files:
        raise FlexPatchError(f"{folder}: no {role} files (.nii.gz, .nii, .png, .tif)")
    return files


def _pair(pred_dir: Path, label_dir: Path) -> list[tuple[str, Path, Path]]:
    preds, labels = _case_files(pred_dir, "prediction"), _case_files(label_dir, "label")
    for case, path in preds.items():
        if case not in labels:
            raise FlexPatchError(f"{path}: no label for case '{case}' in {label_dir}")
    for case, path in labels.items():
        if case not in preds:
            raise FlexPatchError(f"{path}: no prediction for case '{case}' in {pred_dir}")
    return [(case, preds[case], labels[case]) for case in sorted(preds)]


def _class_names(labels: Mapping[str, int] | None) -> dict[int, str] | None:
    """Foreground value -> name from a dataset.json-style ``{name: value}``; None to discover them."""
    if labels is None:
        return None
    names: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise FlexPatchError(f"label '{name}' has value {value!r}; expected a non-negative integer")
        if value > 0:
            names[int(value)] = name
    if not names:
        raise FlexPatchError(f"labels {dict(labels)} name no foreground class (value > 0)")
    return names


def read_declared_labels(path: str | Path) -> dict[str, int]:
    """``{name: value}`` from the ``labels`` of a dataset.json: nnU-Net's ``{"liver": 1}`` or the
    Medical Segmentation Decathlon's ``{"1": "liver"}``; anything else is refused naming the file."""
    from flexpatch.data.io import load_json

    meta = load_json(path)
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict):
        raise FlexPatchError(f"{path}: has no 'labels' mapping")
    try:
        if all(str(v).isdigit() for v in labels.values()):
            return {str(k): int(v) for k, v in labels.items()}
        return {str(v): int(k) for k, v in labels.items()}
    except (TypeError, ValueError):  # region lists ({"tumour": [1, 2]}) or names on both sides
        raise FlexPatchError(f"{path}: 'labels' must map each name to one integer label value") from None


def evaluate_folders(
    pred_dir: Path,
    label_dir: Path,
    labels: dict[str, int] | None = None,
    hd95: bool = True,
    progress: bool = True,
    labels_source: str | Path | None = None,
) -> EvaluationReport:
    """Score every prediction in ``pred_dir`` against the label of the same case in ``label_dir``.

    Files pair by case id (name without ``.nii.gz``/``.nii``/``.png``/``.tif``); each
    side must have a partner on the same grid: the same shape and, for NIfTI, the same affine
    (a prediction shifted in the world is not scored voxel by voxel as if it were not). HD95
    uses the label's voxel spacing.

    Args:
        pred_dir: folder of predicted label maps.
        label_dir: folder of reference label maps.
        labels: ``{name: value}`` as in nnU-Net's dataset.json (background skipped); every
            value > 0 in a prediction or label must be one of them. When None, every value > 0
            found is a class ``class_<v>``.
        hd95: also compute HD95.
        progress: show a progress bar on stderr.
        labels_source: the file ``labels`` came from, named when a value is not declared.
    """
    from flexpatch.runtime import track

    names = _class_names(labels)
    pairs = _pair(Path(pred_dir), Path(label_dir))
    results: dict[str, dict[int, dict[str, float]]] = {}
    bar = track(pairs, "evaluating", disable=not progress)
    for case, pred_path, label_path in bar:
        label = read_label(label_path)
        pred = read_label(pred_path, ndim=label.ndim)
        _check_same_grid(pred, label)
        if names is not None:
            for volume in (label, pred):
                _check_declared(volume, names, labels_source)
        classes = sorted(names) if names is not None else _present(pred.data, label.data)
        results[case] = segmentation_metrics(pred.data, label.data, classes, label.spacing, hd95)
    if names is None:
        names = {c: f"class_{c}" for c in sorted({c for res in results.values() for c in res})}
    metrics = METRICS if hd95 else tuple(m for m in METRICS if m != "hd95")
    return EvaluationReport(_rows(results, names, metrics), metrics)


# Farthest two grids may lie apart (at any corner) and still be the same: float32 headers round.
GRID_TOLERANCE_MM = 1e-3


def _check_same_grid(pred: Volume, label: Volume) -> None:
    """A prediction must lie on its label's grid: the same shape and, where both files carry a
    world placement (NIfTI), the same voxels in the same places."""
    if pred.data.shape != label.data.shape:
        raise FlexPatchError(
            f"{pred.path}: shape {pred.data.shape} differs from label {label.path} "
            f"with shape {label.data.shape}"
        )
    if not all(p is not None and suffix_of(p) in NIFTI_SUFFIXES for p in (pred.path, label.path)):
        return  # PNG/TIFF have no geometry to compare
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in label.spatial_shape])), np.float64)
    corners = np.pad(corners, ((0, 0), (0, 3 - corners.shape[1])))  # 2D: the singleton third axis
    world = [corners @ v.affine[:3, :3].T + v.affine[:3, 3] for v in (pred, label)]
    apart = float(np.linalg.norm(world[0] - world[1], axis=1).max())
    if apart > GRID_TOLERANCE_MM:
        raise FlexPatchError(
            f"{pred.path}: lies up to {apart:.3g} mm away from label {label.path} (their affines differ); "
            "resample the prediction onto the label's grid"
        )


def _check_declared(volume: Volume, names: Mapping[int, str], source: str | Path | None) -> None:
    """Every value > 0 of a map must be a declared class: scoring only some would drop the rest."""
    found = np.flatnonzero(np.bincount(volume.data.ravel()))  # read_label: int16, never negative
    undeclared = [int(v) for v in found if v > 0 and v not in names]
    if undeclared:
        declared = ", ".join(str(v) for v in sorted(names))
        raise FlexPatchError(
            f"{source or 'the labels given'}: declares the foreground labels {declared}, but "
            f"{volume.path} holds {', '.join(map(str, undeclared))} too; every class must be declared"
        )


def _present(*maps: np.ndarray) -> list[int]:
    return sorted({int(v) for m in maps for v in np.unique(m) if v > 0})


def _rows(
    results: dict[str, dict[int, dict[str, float]]], names: dict[int, str], metrics: tuple[str, ...]
) -> list[dict]:
    # A class absent from both maps of a case was not scored there: every metric is NaN by definition.
    missing = dict.fromkeys(metrics, math.nan)
    return [
        {"case": case, "class": names[c], "label": c, **res.get(c, missing)}
        for case, res in results.items()
        for c in sorted(names)
    ]
