"""nnU-Net's region-based labels: classes that overlap, each a union of label values.

A region dataset's ``dataset.json`` declares, e.g. for brain tumours::

    "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": 3},
    "regions_class_order": [1, 2, 3]

The label files still hold one value per voxel. The network predicts one sigmoid per region
(region ``r`` is on where the voxel's value is one of its values), trained with Dice + binary
cross entropy; a prediction is written back as a label map: zeros, then region by region in
order, the voxels whose sigmoid exceeds 0.5 get that region's ``regions_class_order`` value.
Later regions overwrite earlier ones, so nested regions are listed from the outside in.

The functions take numpy arrays or torch tensors alike where they compare values, so the loss
(torch, on the device) and the metrics (numpy) share one definition of a region.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from flexpatch.errors import FlexPatchError

# (name, label values) per region, in dataset.json's order: the order of the network's channels
Regions = tuple[tuple[str, tuple[int, ...]], ...]
THRESHOLD = 0.5  # a region is on where its sigmoid exceeds this (nnU-Net's)

A = TypeVar("A")  # np.ndarray or torch.Tensor


def region_mask(label: A, values: Sequence[int]) -> A:
    """Where ``label`` holds one of ``values`` (a boolean array of ``label``'s shape and type)."""
    mask: Any = label == values[0]
    for v in values[1:]:
        mask = mask | (label == v)
    return mask


def region_masks(label: np.ndarray, regions: Regions) -> np.ndarray:
    """``(R, *S)`` boolean masks of a ``(*S)`` label map, one per region."""
    return np.stack([region_mask(label, values) for _, values in regions])


def write_back(probs: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """nnU-Net's label map of region probabilities ``(R, *S)``: zeros, then for each region ``i``
    in order, the voxels with ``probs[i] > 0.5`` set to ``order[i]`` (later regions win)."""
    if len(probs) != len(order):
        raise FlexPatchError(f"{len(probs)} region channels, but regions_class_order has {len(order)} values")
    seg = np.zeros(probs.shape[1:], dtype=np.int64)
    for p, value in zip(probs, order, strict=True):
        seg[p > THRESHOLD] = value
    return seg


def to_labels(probs: np.ndarray, order: Sequence[int] = ()) -> np.ndarray:
    """The label map of a model's probabilities ``(C, *S)``: the write-back of region sigmoids
    (a model with ``regions_class_order``), else the most probable class (softmax)."""
    return write_back(probs, order) if len(order) else probs.argmax(0)


def written_truth(label: np.ndarray, regions: Regions, order: Sequence[int]) -> np.ndarray:
    """What a perfect region prediction writes back for a ``(*S)`` label map: the reference a
    written-back prediction is scored against (its values are ``order``'s, not the files')."""
    return write_back(region_masks(label, regions).astype(np.float32), order)


def written_names(regions: Regions, order: Sequence[int], background: str = "background") -> dict[int, str]:
    """Value -> name of a written-back label map: ``order[i]`` is named after region ``i`` (the
    last region writing a value names it, as it wins the voxels)."""
    names = {0: background}
    for (name, _), value in zip(regions, order, strict=True):
        names[int(value)] = name
    return names


def regions_to_json(regions: Regions) -> list[list[Any]]:
    """``[[name, [values]], ...]``: the order is the network's channels, and plan.json's reader
    checks each field against its annotated type (:mod:`flexpatch.schema`)."""
    return [[name, list(values)] for name, values in regions]


def regions_from_json(raw: Sequence[Sequence[Any]]) -> Regions:
    return tuple((str(name), tuple(int(v) for v in values)) for name, values in raw)


def parse_regions(raw: Any, order: Any, path: Path) -> tuple[dict[str, int], Regions, tuple[int, ...]]:
    """dataset.json's ``labels`` and ``regions_class_order`` of a region dataset.

    Returns:
        The label values the files hold, as ``DatasetInfo.labels`` has them for a plain dataset
        (background, ``label_<v>`` for each value a region lists, ``ignore``): the files are
        checked against them and sampled by them. Then the regions and ``regions_class_order``.
    """
    if not isinstance(raw, dict) or not raw:
        raise FlexPatchError(f"{path}: 'labels' must be a non-empty object like {{\"background\": 0}}")
    background = [str(n) for n, v in raw.items() if _is_int(v) and v == 0]
    if len(background) != 1:
        raise FlexPatchError(f"{path}: 'labels' must declare background as value 0 once, found {raw}")
    regions = tuple(
        (str(name), _region_values(name, value, path))
        for name, value in raw.items()
        if name not in ("ignore", background[0])
    )
    if not regions:
        raise FlexPatchError(f"{path}: 'labels' declares no region besides background")
    values = sorted({v for _, vs in regions for v in vs})
    labels = {background[0]: 0, **{f"label_{v}": v for v in values}}
    if "ignore" in raw:
        ignore = raw["ignore"]
        if not _is_int(ignore) or ignore <= values[-1]:
            raise FlexPatchError(
                f"{path}: the 'ignore' label must be one integer larger than every region value "
                f"(as nnU-Net's), found {ignore!r}"
            )
        labels["ignore"] = ignore
    return labels, regions, _class_order(order, len(regions), path)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _region_values(name: Any, value: Any, path: Path) -> tuple[int, ...]:
    values = [value] if _is_int(value) else value
    if not isinstance(values, list) or not values or not all(_is_int(v) and v > 0 for v in values):
        raise FlexPatchError(
            f"{path}: region {name!r} has value {value!r}; expected a label value > 0 or a non-empty "
            "list of them"
        )
    return tuple(values)


def _class_order(order: Any, regions: int, path: Path) -> tuple[int, ...]:
    if not isinstance(order, list) or not all(_is_int(v) and v > 0 for v in order):
        raise FlexPatchError(
            f"{path}: 'regions_class_order' must be a list of label values > 0, found {order!r}"
        )
    if len(order) != regions:
        raise FlexPatchError(
            f"{path}: 'regions_class_order' has {len(order)} values for {regions} regions "
            "(one value per region, in the order of 'labels')"
        )
    return tuple(order)
