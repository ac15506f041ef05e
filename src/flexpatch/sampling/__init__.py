"""Patch sampling: which patch sizes and centres training sees, and the batch stream.

Patch sizes are fixed, drawn (patch-size augmentation) or scheduled over the run
(progressive growing, :mod:`flexpatch.sampling.progressive`).

Random draws use an explicit ``torch.Generator`` and feed deterministic functions,
so every draw can be logged and replayed (TorchIO's random/deterministic split).
"""

from __future__ import annotations

from flexpatch.sampling.centres import (
    CENTRE_MODES,
    compute_class_locations,
    draw_centre,
    fit_patch,
    patch_at,
)
from flexpatch.sampling.loader import PatchStream, SamplingConfig, derive_seed, make_loader
from flexpatch.sampling.progressive import (
    ProgressiveSchedule,
    Stage,
    make_schedule,
    pools_from_divisor,
)
from flexpatch.sampling.sizes import (
    ChoiceSize,
    FixedSize,
    SizeSampler,
    StepSizeSampler,
    UniformSize,
    batch_for_step,
    parse_patch_spec,
    register_size_kind,
    size_for_step,
)

__all__ = [
    "CENTRE_MODES",
    "ChoiceSize",
    "FixedSize",
    "PatchStream",
    "ProgressiveSchedule",
    "SamplingConfig",
    "SizeSampler",
    "Stage",
    "StepSizeSampler",
    "UniformSize",
    "batch_for_step",
    "compute_class_locations",
    "derive_seed",
    "draw_centre",
    "fit_patch",
    "make_loader",
    "make_schedule",
    "parse_patch_spec",
    "patch_at",
    "pools_from_divisor",
    "register_size_kind",
    "size_for_step",
]
