"""Validation while a patchwork trains: held-out cases segmented as ``predict`` does, Dice per label.

The held-out share follows the core trainer (``val_fraction``, the same seeded split); every
``val_every`` rounds and after the last one the whole cases are segmented with the default
application options (tree generation, no lazy evaluation) and scored with the same metric as
``flexpatch evaluate``. The best round's weights are kept beside the last ones, as nnU-Net and
the core trainer keep ``model_best.pt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flexpatch.data.dataset import Case, load_case
from flexpatch.data.io import Volume
from flexpatch.evaluate.metrics import segmentation_metrics
from flexpatch.patchwork.apply import ApplyOptions, LoadedPatchwork, segment_volume


@dataclass
class Validator:
    """Held-out cases in memory and what scoring them needs."""

    cases: list[tuple[Volume, np.ndarray]]  # image, label map in the dataset's values
    values: list[int]  # the labels learnt
    ignore: int | None  # the don't-care value: scored as neither hit nor miss
    opts: ApplyOptions

    @classmethod
    def load(
        cls, cases: list[Case], ndim: int, values: list[int], ignore: int | None, batch_size: int
    ) -> Validator:
        loaded = [load_case(c, ndim) for c in cases]
        return cls(
            [(img, lab.data) for img, lab in loaded], values, ignore, ApplyOptions(batch_size=batch_size)
        )

    def dice(self, model: LoadedPatchwork) -> dict[str, float]:
        """Mean Dice per label value over the cases (a label absent from a case and its prediction is
        skipped there); the network is left in eval mode."""
        model.net.eval()
        scores: dict[int, list[float]] = {v: [] for v in self.values}
        for image, label in self.cases:
            seg, _, _ = segment_volume(model, image, self.opts)
            if self.ignore is not None:
                seg = np.where(label == self.ignore, self.ignore, seg)
            metrics = segmentation_metrics(seg, label, self.values, hd95=False)
            for v in self.values:
                scores[v].append(metrics[v]["dice"])
        return {str(v): _nanmean(d) for v, d in scores.items()}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def mean_dice(dice: dict[str, float]) -> float:
    return _nanmean(list(dice.values()))


def loaded_view(net: Any, scheme: Any, config: dict[str, Any], values: list[int], channels: int,
                embedding: Any, device: Any) -> LoadedPatchwork:  # fmt: skip
    """The training network seen as a loaded model, so validation applies it exactly as predict."""
    meta = {"config": config, "label_values": values, "in_channels": channels}
    return LoadedPatchwork(net, scheme, meta, embedding, device)
