"""The ViT token size for a class of objects, from the sizes of its connected components.

Seed 02 finds that the best token size of a UNETR follows the mean lesion volume but
publishes no formula. The one used here: the token edge is the diameter of the sphere
(a circle in 2D) with the class's mean component volume,

    d = (6 V / pi) ** (1/3)        (3D)        d = 2 * (A / pi) ** (1/2)        (2D)

in millimetres, divided by the training spacing of each axis (so anisotropic voxels get
anisotropic tokens) and snapped, per axis, to the nearest allowed size on a log scale
(ties go to the smaller token), among those that divide the input window when one is
given. A token the size of the typical object keeps each object in about one token: a
larger token mixes it with its surroundings before attention sees it, a smaller one
splits it over many tokens and makes attention quadratically dearer. ``benchmarks/
planning.py`` checks the rule by a sweep over tokens 8, 12, 16 and 24.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from flexpatch.axes import round_nearest
from flexpatch.errors import FlexPatchError, format_shape

ALLOWED_TOKENS: tuple[int, ...] = (4, 8, 12, 16, 24, 32)
DEFAULT_WINDOW = 96  # MONAI's UNETR input; divisible by every allowed token


@dataclass(frozen=True)
class TokenPlan:
    """A token size for one class, and how it was derived.

    Attributes:
        class_name: the class whose objects set the size.
        count: its connected components in the training set.
        mean_volume_mm3: their mean volume (mm^2 in 2D).
        diameter_mm: the equivalent-sphere (circle) diameter of that volume.
        diameter_voxels: the diameter in voxels of each axis at ``spacing``.
        spacing: the training spacing (mm).
        token_size: the snapped token edge per axis.
        window: the input window, a multiple of ``token_size`` on every axis.
    """

    class_name: str
    count: int
    mean_volume_mm3: float
    diameter_mm: float
    diameter_voxels: tuple[float, ...]
    spacing: tuple[float, ...]
    token_size: tuple[int, ...]
    window: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("diameter_voxels", "spacing", "token_size", "window"):
            d[key] = list(d[key])
        return d

    def describe(self) -> str:
        return (
            f"class {self.class_name!r}: {self.count} objects, "
            f"mean {self.mean_volume_mm3:.1f} mm^{len(self.spacing)}, "
            f"equivalent diameter {self.diameter_mm:.1f} mm = "
            f"{'x'.join(f'{d:.1f}' for d in self.diameter_voxels)} voxels -> token "
            f"{format_shape(self.token_size)}, window {format_shape(self.window)}"
        )


def equivalent_diameter(volume: float, ndim: int) -> float:
    """Diameter of the sphere (3D) or circle (2D) of the given volume (area)."""
    if volume <= 0 or not math.isfinite(volume):
        raise FlexPatchError(f"object volume must be positive, got {volume}")
    if ndim == 3:
        return (6.0 * volume / math.pi) ** (1.0 / 3.0)
    if ndim == 2:
        return 2.0 * math.sqrt(volume / math.pi)
    raise FlexPatchError(f"ndim must be 2 or 3, got {ndim}")


def snap_token(diameter: float, allowed: Sequence[int] = ALLOWED_TOKENS, window: int | None = None) -> int:
    """The allowed size nearest ``diameter`` on a log scale (ties: the smaller) that divides ``window``."""
    options = sorted(t for t in allowed if window is None or window % t == 0)
    if not options:
        raise FlexPatchError(f"no token size in {tuple(allowed)} divides the window side {window}")
    return min(options, key=lambda t: (abs(math.log(t / diameter)), t))


def plan_tokens(
    fingerprint: dict[str, Any],
    class_name: str,
    spacing: Sequence[float] | None = None,
    window: Sequence[int] | None = None,
    allowed: Sequence[int] = ALLOWED_TOKENS,
) -> TokenPlan:
    """The token size for ``class_name`` from a dataset fingerprint (``fingerprint.json``).

    Args:
        fingerprint: from :func:`flexpatch.data.preprocess.compute_fingerprint`; its
            ``components[class_name]`` gives the objects' volumes in mm^3.
        class_name: a foreground class with at least one object in the training set.
        spacing: the training spacing in mm; default the fingerprint's median spacing.
        window: the input window; the token must divide it. Default: the multiple of the
            token nearest :data:`DEFAULT_WINDOW` on each axis.
        allowed: the token sizes to choose from.
    """
    components = fingerprint.get("components") or {}
    if class_name not in components:
        known = ", ".join(components) or "none"
        raise FlexPatchError(f"fingerprint has no class {class_name!r}; its foreground classes: {known}")
    entry = components[class_name]
    if not entry.get("count") or not entry.get("mean_mm3"):
        raise FlexPatchError(f"class {class_name!r} has no object in the training set: no size to plan from")
    spacing = tuple(float(s) for s in (spacing if spacing is not None else fingerprint["median_spacing"]))
    ndim = len(spacing)
    if window is not None and len(window) != ndim:
        raise FlexPatchError(f"window {tuple(window)} has {len(window)} axes, the spacing {spacing} {ndim}")
    diameter = equivalent_diameter(float(entry["mean_mm3"]), ndim)
    in_voxels = tuple(diameter / s for s in spacing)
    sides = window or (None,) * ndim
    tokens = tuple(snap_token(d, allowed, w) for d, w in zip(in_voxels, sides, strict=True))
    chosen = tuple(window) if window else tuple(max(t, round_nearest(DEFAULT_WINDOW, t)) for t in tokens)
    return TokenPlan(
        class_name,
        int(entry["count"]),
        float(entry["mean_mm3"]),
        diameter,
        in_voxels,
        spacing,
        tokens,
        chosen,
    )
