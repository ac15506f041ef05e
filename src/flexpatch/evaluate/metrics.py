"""Segmentation metrics per class (Dice, IoU, precision, recall, HD95, NSD) and folder evaluation.

Conventions for empty sets follow nnU-Net: a ratio whose denominator is empty is NaN
(so a class absent from both prediction and label gets NaN Dice, not 1, and drops out
of the means), while a class predicted where the label has none gets Dice 0. HD95 is
MONAI's: the larger of the two directed 95th percentiles of distances (in mm) between
the boundary voxels of prediction and label, NaN when either is empty. NSD (Normalised
Surface Dice, Nikolov et al. 2021) is MONAI's ``compute_surface_dice`` with voxel-counted
boundaries: the share of both boundaries' voxels that lie within a tolerance (mm) of the
other boundary. Like Dice it is NaN when both masks are empty and 0 when only one is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from flexpatch.data.io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, Volume, read_label, suffix_of
from flexpatch.data.readers import SITK_SUFFIXES
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.report import METRICS, EvaluationReport
from flexpatch.methods import fold_folders

__all__ = [
    "METRICS",
    "EvaluationReport",
    "dice_torch",
    "evaluate_folders",
    "hausdorff95",
    "normalized_surface_dice",
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


def _surface_distances(
    pred: np.ndarray, label: np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each boundary voxel of ``pred`` to the nearest of ``label``'s, and back.

    Both masks must be non-empty; HD95 and NSD share these two distance transforms.
    """
    box = _union_box(pred | label)  # distance transforms cost the volume, so skip the empty part
    sp, sl = _surface(pred[box]), _surface(label[box])
    to_label = ndimage.distance_transform_edt(~sl, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sl]
    return to_label, to_pred


def _hd95(to_label: np.ndarray, to_pred: np.ndarray) -> float:
    return float(max(np.percentile(to_label, 95), np.percentile(to_pred, 95)))


# NIfTI stores spacing in float32: a neighbour one 0.8 mm voxel away lies 0.80000001 mm away,
# and a tolerance of 0.8 mm must still count it. Far below any meaningful tolerance.
NSD_SLACK_MM = 1e-5
NSD_TOLERANCE_MM = 1.0


def _nsd(to_label: np.ndarray, to_pred: np.ndarray, tolerance: float) -> float:
    within = np.count_nonzero(to_label <= tolerance + NSD_SLACK_MM)
    within += np.count_nonzero(to_pred <= tolerance + NSD_SLACK_MM)
    return float(within / (to_label.size + to_pred.size))


def _check_tolerance(tolerance: float) -> float:
    tol = float(tolerance)
    if not math.isfinite(tol) or tol < 0:
        raise FlexPatchError(f"NSD tolerance must be a finite distance >= 0 mm, got {tolerance!r}")
    return tol


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
    return _hd95(*_surface_distances(pred, label, spacing))


def normalized_surface_dice(
    pred: np.ndarray,
    label: np.ndarray,
    tolerance: float = NSD_TOLERANCE_MM,
    spacing: Sequence[float] | None = None,
) -> float:
    """Normalised Surface Dice of two binary masks: the share of boundary voxels of both that
    lie within ``tolerance`` mm of the other's boundary.

    Matches ``monai.metrics.compute_surface_dice(class_thresholds=[tolerance], spacing=...)``
    (boundaries counted in voxels, ``use_subvoxels=False``), except that a distance within
    ``NSD_SLACK_MM`` above the tolerance still counts (float32 spacings). NaN when both masks
    are empty, 0 when only one is (as Dice).

    Args:
        pred: boolean mask.
        label: boolean mask of the same shape.
        tolerance: the boundary deviation accepted, in mm (>= 0).
        spacing: voxel size in mm per axis (1 when None).
    """
    pred, label = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    if pred.shape != label.shape:
        raise FlexPatchError(f"prediction has shape {pred.shape} but label has shape {label.shape}")
    tol, sp = _check_tolerance(tolerance), _check_spacing(spacing, label.ndim)
    has_p, has_l = bool(pred.any()), bool(label.any())
    if not (has_p and has_l):
        return 0.0 if has_p or has_l else math.nan
    return _nsd(*_surface_distances(pred, label, sp), tol)


def _surface_metrics(
    p: np.ndarray, lab: np.ndarray, spacing: tuple[float, ...], nsd_tolerance: float | None
) -> dict[str, float]:
    """HD95 and (when a tolerance is given) NSD, from one pair of distance transforms."""
    has_p, has_l = bool(p.any()), bool(lab.any())
    out = {"hd95": math.nan}
    if nsd_tolerance is not None:
        out["nsd"] = 0.0 if has_p or has_l else math.nan  # the empty conventions, as Dice
    if has_p and has_l:
        to_label, to_pred = _surface_distances(p, lab, spacing)
        out["hd95"] = _hd95(to_label, to_pred)
        if nsd_tolerance is not None:
            out["nsd"] = _nsd(to_label, to_pred, nsd_tolerance)
    return out


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
    nsd_tolerance: float | None = NSD_TOLERANCE_MM,
) -> dict[int, dict[str, float]]:
    """Dice, IoU, precision, recall and (optionally) the surface metrics HD95 and NSD of each class.

    Args:
        pred: integer label map ``(*spatial)``.
        label: reference label map, same shape.
        classes: the label values to score (the caller leaves background out).
        spacing: voxel size in mm per axis, for HD95 and NSD (1 when None).
        hd95: compute the surface metrics, HD95 and NSD (the slow part: they share two distance
            transforms); when False their keys are absent.
        nsd_tolerance: NSD's tolerance in mm; None leaves NSD out (HD95 alone).

    Returns:
        ``{class: {metric: value}}``; NaN where a metric is undefined (see module docstring).
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise FlexPatchError(f"prediction has shape {pred.shape} but label has shape {label.shape}")
    sp = _check_spacing(spacing, label.ndim)
    tol = None if nsd_tolerance is None else _check_tolerance(nsd_tolerance)
    out: dict[int, dict[str, float]] = {}
    for c in classes:
        p, lab = pred == c, label == c
        out[int(c)] = _overlap(p, lab)
        if hd95:
            out[int(c)].update(_surface_metrics(p, lab, sp, tol))
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
    """Map case id (file name without its ending) to file, for every format the readers read.

    As nnU-Net, a case is its id whatever the format, so ``case.mha`` pairs with ``case.nii.gz``;
    the same id in two formats of one folder is refused, as neither may be silently scored.
    """
    if not folder.is_dir():
        raise FlexPatchError(f"{folder}: {role} folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = suffix_of(path)
        if path.name.startswith(".") or suffix not in IMAGE_SUFFIXES:
            continue  # hidden temporaries, plans.json, a 3D TIFF's spacing JSON and the like
        case = path.name[: -len(suffix)]
        if case in files:
            raise FlexPatchError(
                f"{path}: case '{case}' is also {files[case].name} in this {role} folder; "
                "keep one file per case"
            )
        files[case] = path
    if not files:
        raise FlexPatchError(f"{folder}: no {role} files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _prediction_files(pred_dir: Path) -> dict[str, Path]:
    """The predictions of a folder; of a parent of folds, every fold's validation predictions
    together: nnU-Net's cross-validation result, each case predicted by the fold that held it out.
    A case two folds predicted (an edited splits file) is refused: which one counts is not clear."""
    folds = fold_folders(pred_dir) if pred_dir.is_dir() else []
    folders = [f / "validation" for f in folds if (f / "validation").is_dir()]
    if not folders:
        return _case_files(pred_dir, "prediction")
    files: dict[str, Path] = {}
    for folder in folders:
        for case, path in _case_files(folder, "prediction").items():
            if case in files:
                raise FlexPatchError(f"{path}: case '{case}' is also predicted by {files[case]}")
            files[case] = path
    return files


def _pair(
    pred_dir: Path, label_dir: Path, partial: bool = False
) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(case, prediction, label) for every prediction, and the reference cases without one.

    A prediction without a label is always an error (there is nothing to score it against);
    a label without a prediction is one unless ``partial`` (nnU-Net's ``chill``).
    """
    preds, labels = _prediction_files(pred_dir), _case_files(label_dir, "label")
    for case, path in preds.items():
        if case not in labels:
            raise FlexPatchError(f"{path}: no label for case '{case}' in {label_dir}")
    missing = [case for case in labels if case not in preds]
    if missing and not partial:
        more = f" (nor for {len(missing) - 1} more of the {len(labels)} cases)" if len(missing) > 1 else ""
        raise FlexPatchError(
            f"{labels[missing[0]]}: no prediction for case '{missing[0]}' in {pred_dir}{more}; "
            f"--partial (partial=True) scores the {len(preds)} predictions present"
        )
    return [(case, preds[case], labels[case]) for case in sorted(preds)], missing


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
    nsd_tolerance: float | None = NSD_TOLERANCE_MM,
    partial: bool = False,
) -> EvaluationReport:
    """Score every prediction in ``pred_dir`` against the label of the same case in ``label_dir``.

    Files pair by case id (the name without its ending: ``.nii.gz``, ``.nii``, ``.mha``,
    ``.nrrd``, ``.png``, ``.tif``, ``.tiff``), whatever the format of each side; each side must
    have a partner on the same grid: the same shape and, where both formats place voxels in the
    world (NIfTI, ITK), the same affine (a prediction shifted in the world is not scored voxel
    by voxel as if it were not). HD95 and NSD use the label's voxel spacing (the column norms of
    its affine).

    Args:
        pred_dir: folder of predicted label maps, or a parent of cross-validation folds: every
            ``fold_K/validation`` together (:func:`~flexpatch.methods.fold_folders`).
        label_dir: folder of reference label maps.
        labels: ``{name: value}`` as in nnU-Net's dataset.json (background skipped); every
            value > 0 in a prediction or label must be one of them. When None, every value > 0
            found is a class ``class_<v>``.
        hd95: also compute the surface metrics, HD95 and NSD.
        progress: show a progress bar on stderr.
        labels_source: the file ``labels`` came from, named when a value is not declared.
        nsd_tolerance: NSD's tolerance in mm; None leaves NSD out.
        partial: score the predictions present when some reference cases have none (nnU-Net's
            ``chill``); the report lists the cases left out. Otherwise a missing one is an error.
    """
    from flexpatch.distributed import current
    from flexpatch.runtime import track

    names = _class_names(labels)
    tol = None if nsd_tolerance is None else _check_tolerance(nsd_tolerance)
    pairs, missing = _pair(Path(pred_dir), Path(label_dir), partial)
    dist = current()  # under torchrun each process scores its share of the cases
    dist.start()
    scored = []
    for case, pred_path, label_path in track(
        dist.split(pairs), "evaluating", disable=not progress or not dist.main
    ):
        label = read_label(label_path)
        pred = read_label(pred_path, ndim=label.ndim)
        _check_same_grid(pred, label)
        if names is not None:
            for volume in (label, pred):
                _check_declared(volume, names, labels_source)
        classes = sorted(names) if names is not None else _present(pred.data, label.data)
        scored.append((case, segmentation_metrics(pred.data, label.data, classes, label.spacing, hd95, tol)))
    results: dict[str, dict[int, dict[str, float]]] = dict(dist.gather(scored))
    if names is None:
        names = {c: f"class_{c}" for c in sorted({c for res in results.values() for c in res})}
    left_out = {"hd95", "nsd"} if not hd95 else {"nsd"} if tol is None else set()
    metrics = tuple(m for m in METRICS if m not in left_out)
    nsd_mm = tol if "nsd" in metrics else None
    return EvaluationReport(_rows(results, names, metrics), metrics, missing, nsd_mm)


# Farthest two grids may lie apart (at any corner) and still be the same: float32 headers round.
GRID_TOLERANCE_MM = 1e-3


def _check_same_grid(pred: Volume, label: Volume) -> None:
    """A prediction must lie on its label's grid: the same shape and, where both files carry a
    world placement (NIfTI, ITK: the readers give both a RAS affine), the same voxels in the same
    places; between PNGs or TIFFs the affines (identity, or a stack's spacing) are compared too."""
    if pred.data.shape != label.data.shape:
        raise FlexPatchError(
            f"{pred.path}: shape {pred.data.shape} differs from label {label.path} "
            f"with shape {label.data.shape}"
        )
    if len({_placed(v.path) for v in (pred, label)}) != 1:
        return  # a PNG or TIFF has no world placement to compare with a NIfTI's or ITK's
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in label.spatial_shape])), np.float64)
    corners = np.pad(corners, ((0, 0), (0, 3 - corners.shape[1])))  # 2D: the singleton third axis
    world = [corners @ v.affine[:3, :3].T + v.affine[:3, 3] for v in (pred, label)]
    apart = float(np.linalg.norm(world[0] - world[1], axis=1).max())
    if apart > GRID_TOLERANCE_MM:
        raise FlexPatchError(
            f"{pred.path}: lies up to {apart:.3g} mm away from label {label.path} (their affines differ); "
            "resample the prediction onto the label's grid"
        )


def _placed(path: Path | None) -> bool:
    """Whether a file places its voxels in the world (a RAS affine from its header)."""
    return path is not None and suffix_of(path) in NIFTI_SUFFIXES + SITK_SUFFIXES


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
