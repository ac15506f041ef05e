"""Patch sampling: which patch sizes and centres training sees, and the batch stream.

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
from flexpatch.sampling.sizes import (
    ChoiceSize,
    FixedSize,
    SizeSampler,
    UniformSize,
    parse_patch_spec,
    register_size_kind,
)

__all__ = [
    "CENTRE_MODES",
    "ChoiceSize",
    "FixedSize",
    "PatchStream",
    "SamplingConfig",
    "SizeSampler",
    "UniformSize",
    "compute_class_locations",
    "derive_seed",
    "draw_centre",
    "fit_patch",
    "make_loader",
    "parse_patch_spec",
    "patch_at",
    "register_size_kind",
]
