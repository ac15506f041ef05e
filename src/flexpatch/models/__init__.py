"""Networks behind one interface: ``create_model(name, ndim, in_channels, out_channels, **options)``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexpatch.axes import nearest_valid
from flexpatch.models.registry import (
    ModelSpec,
    build,
    check_patch_size,
    create_model,
    list_models,
    model_description,
    model_divisor,
    register_model,
)

if TYPE_CHECKING:
    from flexpatch.models.hyper import HyperConfig, PatchSizeHypernet

__all__ = [
    "HyperConfig",
    "PatchSizeHypernet",
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


def __getattr__(name: str) -> object:
    # The hypernetwork imports torch; keep ``import flexpatch.models`` (and ``flexpatch models``) light.
    if name in ("HyperConfig", "PatchSizeHypernet"):
        from flexpatch.models import hyper

        return getattr(hyper, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
