"""flexpatch: medical image segmentation that stays accurate at any patch size.

The public surface is small; heavy modules load on first use so that
``import flexpatch`` (and ``flexpatch --help``) stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flexpatch.errors import FlexPatchError

if TYPE_CHECKING:  # what type checkers see of the lazy names below (nothing is imported at run time)
    from flexpatch.export import export_model as export_model
    from flexpatch.infer.arrays import Segmentation as Segmentation
    from flexpatch.infer.arrays import predict_array as predict_array
    from flexpatch.infer.arrays import segment as segment

__version__ = "0.1.0"

_LAZY = {
    "Patch": "flexpatch.geometry",
    "extract": "flexpatch.geometry",
    "accumulate": "flexpatch.geometry",
    "window_weights": "flexpatch.geometry",
    "create_model": "flexpatch.models",
    "list_models": "flexpatch.models",
    "sliding_window": "flexpatch.infer.sliding_window",
    "load_model": "flexpatch.infer.predictor",
    "predict_files": "flexpatch.infer.predictor",
    "predict_array": "flexpatch.infer.arrays",
    "segment": "flexpatch.infer.arrays",
    "Segmentation": "flexpatch.infer.arrays",
    "export_model": "flexpatch.export",
    "plan_dataset": "flexpatch.plan.dataset",
    "train": "flexpatch.train.loop",
    "TrainConfig": "flexpatch.train.config",
    "read_image": "flexpatch.data.io",
    "read_label": "flexpatch.data.io",
    "write_image": "flexpatch.data.io",
    "load_dataset": "flexpatch.data.dataset",
    "make_phantom": "flexpatch.data.phantom",
    "evaluate_folders": "flexpatch.evaluate.metrics",
    "segmentation_metrics": "flexpatch.evaluate.metrics",
    "PatchworkConfig": "flexpatch.patchwork.config",
    "train_patchwork": "flexpatch.patchwork.train",
    "ApplyOptions": "flexpatch.patchwork.apply",
    "load_patchwork": "flexpatch.patchwork.predict",
    "predict_patchwork_files": "flexpatch.patchwork.predict",
    "CascadeConfig": "flexpatch.cascade.config",
    "train_cascade": "flexpatch.cascade.train",
    "load_cascade": "flexpatch.cascade.infer",
    "predict_cascade_files": "flexpatch.cascade.infer",
    "AugmentConfig": "flexpatch.sampling.augment",
    "parse_augment": "flexpatch.sampling.augment",
}

__all__ = ["FlexPatchError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexpatch' has no attribute {name!r}")
