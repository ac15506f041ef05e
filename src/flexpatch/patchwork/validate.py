"""Validation while a patchwork trains: held-out cases segmented as ``predict`` does, Dice per label.

The held-out share follows the core trainer (``val_fraction``, the same seeded split); every
``val_every`` rounds and after the last one the whole cases are segmented with the default
application options (tree generation, no lazy evaluation) and scored with the same metric as
``flexpatch evaluate``. The best round's weights are kept beside the last ones, as nnU-Net and
the core trainer keep ``model_best.pt``; with them, each label's mask threshold that maximises the
validation Dice (DNP: ``mask`` outputs use "the optimal threshold on the validation set").

Under torchrun each process segments its share of the cases (:meth:`Dist.split`) and the scores are
gathered in case order, so every process gets what one process computes, to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flexpatch.data.dataset import Case, load_case
from flexpatch.data.io import Volume
from flexpatch.distributed import Dist
from flexpatch.evaluate.metrics import segmentation_metrics
from flexpatch.patchwork.apply import ApplyOptions
from flexpatch.patchwork.losses import LabelEmbedding
from flexpatch.patchwork.model import PatchworkNet
from flexpatch.patchwork.predict import LoadedPatchwork, label_map, stitched
from flexpatch.patchwork.scheme import Scheme


@dataclass
class Validator:
    """Held-out cases in memory and what scoring them needs."""

    cases: list[tuple[Volume, np.ndarray]]  # image, label map in the dataset's values
    values: list[int]  # the labels learnt
    ignore: int | None  # the don't-care value: scored as neither hit nor miss
    opts: ApplyOptions
    dist: Dist = field(default_factory=Dist)  # under torchrun ``cases`` are this process's share

    @classmethod
    def load(
        cls,
        cases: list[Case],
        ndim: int,
        values: list[int],
        ignore: int | None,
        batch_size: int,
        dist: Dist = Dist(),
    ) -> Validator:
        loaded = [load_case(c, ndim) for c in dist.split(cases)]
        opts = ApplyOptions(batch_size=batch_size)
        return cls([(img, lab.data) for img, lab in loaded], values, ignore, opts, dist)

    def score(self, model: LoadedPatchwork) -> tuple[dict[str, float], list[float] | None]:
        """Mean Dice per label value over the cases (a label absent from a case and its prediction is
        skipped there), and the mask threshold per label that maximises the Dice over all cases
        (None for a label embedding, whose outputs are no probabilities). Leaves the net in eval mode."""
        model.net.eval()
        per_case = self.dist.gather([self._score_case(model, image, label) for image, label in self.cases])
        counts = np.zeros((len(self.values), len(THRESHOLDS), 3))  # hits, predicted, labelled
        for _, case_counts in per_case:  # summed in case order, as one process sums them
            counts = counts + case_counts if case_counts is not None else counts
        dice = {str(v): _nanmean([case_dice[v] for case_dice, _ in per_case]) for v in self.values}
        return dice, None if model.embedding is not None else best_thresholds(counts)

    def _score_case(
        self, model: LoadedPatchwork, image: Volume, label: np.ndarray
    ) -> tuple[dict[int, float], np.ndarray | None]:
        """One case's Dice per label value and its threshold counts (None for a label embedding)."""
        applied = stitched(model, image, self.opts)
        seg = label_map(model, applied.values)
        care = np.ones(label.shape, bool) if self.ignore is None else label != self.ignore
        metrics = segmentation_metrics(outside_as(seg, care), label, self.values, hd95=False)
        dice = {v: metrics[v]["dice"] for v in self.values}
        if model.embedding is not None:
            return dice, None
        fg = applied.values.cpu().numpy()[int(model.categorical) :]
        return dice, threshold_counts(fg, label, self.values, care)


def outside_as(seg: np.ndarray, care: np.ndarray, fill: int = -1) -> np.ndarray:
    """``seg`` with ``fill`` where ``care`` is False, as int32: atlases are uint8, which cannot hold -1
    (NumPy 2.4 wraps it to 255, a valid label value; 2.5 raises OverflowError)."""
    return np.where(care, seg.astype(np.int32, copy=False), np.int32(fill))


THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)  # the candidates for each label's mask threshold


def threshold_counts(fg: np.ndarray, label: np.ndarray, values: list[int], care: np.ndarray) -> np.ndarray:
    """``(labels, thresholds, 3)``: voxels in mask and label, in the mask, in the label, per threshold."""
    out = np.zeros((len(values), len(THRESHOLDS), 3))
    for i, v in enumerate(values):
        truth = (label == v) & care
        out[i, :, 0] = _at_least(fg[i][truth])
        out[i, :, 1] = _at_least(fg[i][care])
        out[i, :, 2] = truth.sum()
    return out


def _at_least(p: np.ndarray) -> np.ndarray:
    """How many of ``p`` are >= each threshold, in one pass (not one comparison per threshold)."""
    below_or_at = np.searchsorted(THRESHOLDS, p, side="right")  # thresholds <= each value
    hist = np.bincount(below_or_at.ravel(), minlength=len(THRESHOLDS) + 1)
    return hist[::-1].cumsum()[::-1][1:]


def best_thresholds(counts: np.ndarray) -> list[float]:
    """Per label, the threshold of the highest Dice 2 hits / (predicted + labelled) over all cases;
    0.5 for a label no case holds or predicts (its Dice says nothing)."""
    out = []
    for label_counts in counts:
        hits, predicted, labelled = label_counts.T
        total = predicted + labelled
        if not total.any():
            out.append(0.5)
            continue
        dice = np.where(total > 0, 2 * hits / np.maximum(total, 1), 0.0)
        out.append(float(THRESHOLDS[int(np.argmax(dice))]))
    return out


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def mean_dice(dice: dict[str, float]) -> float:
    return _nanmean(list(dice.values()))


def loaded_view(
    net: PatchworkNet,
    scheme: Scheme,
    config: dict[str, Any],
    values: list[int],
    channels: int,
    embedding: LabelEmbedding | None,
    device: torch.device,
) -> LoadedPatchwork:
    """The training network seen as a loaded model (the same object), so validation applies it as predict."""
    meta = {"config": config, "label_values": values, "in_channels": channels}
    return LoadedPatchwork(net, scheme, meta, embedding, device)
