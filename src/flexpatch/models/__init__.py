"""Networks behind one interface: ``create_model(name, ndim, in_channels, out_channels, **options)``."""

from __future__ import annotations

from flexpatch.models.registry import (
    ModelSpec,
    build,
    check_patch_size,
    create_model,
    list_models,
    model_description,
    model_divisor,
    nearest_valid,
    register_model,
)

__all__ = [
    "ModelSpec",
    "build",
    "check_patch_size",
    "create_model",
    "list_models",
    "model_description",
    "model_divisor",
    "nearest_valid",
    "register_model",
]
