"""The patching scheme of a deep neural patchwork: nested patches from coarse to fine.

A level's patches are described in a physical frame ``F`` (millimetres): in the ``matrix``
system ``F`` is the image's voxel grid scaled by the voxel size (patches follow the
image matrix); in the ``world`` system ``F`` is the world (RAS) frame of the image affine
(patches stay upright in the world, whatever the scan's orientation). A patch is a centre
``c``, a frame ``M`` (rotation, scaling, flips from augmentation; identity without) and the
level's width ``w`` (mm per patch axis) sampled on the level's matrix ``m``:

    x_F(i) = c + M @ diag(w / (m - 1)) @ (i - (m - 1) / 2)

and :meth:`ImageFrame.to_index` turns that into the geometry core's affine (patch voxel index
-> image voxel index). Widths are geometric between the coarsest field of view and the
finest voxel size, exactly as the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from flexpatch.axes import per_axis
from flexpatch.errors import FlexPatchError

SYSTEMS = ("matrix", "world")
INTERPS = ("nearest", "linear")
SMOOTHINGS = ("boxcar", "max", "mixture")
NORMALIZATIONS = ("none", "max", "mean", "m0s1", "patch_m0s1")


def _axes(value: float | Sequence[float] | None, ndim: int, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    message = f"{what} must be {ndim} positive numbers, got {value!r}"
    vals = per_axis(value, ndim, what, cast=float, message=message)
    if any(v <= 0 for v in vals):
        raise FlexPatchError(message)
    return vals


@dataclass(frozen=True)
class Scheme:
    """Every option of DNP's CropGenerator that flexpatch offers.

    Attributes:
        ndim: 2 or 3.
        depth: number of levels (>= 1).
        matrix: the matrix shape of every level (one per level after normalisation).
        fov_mm / fov_rel: the coarsest patch's width in mm, or relative to the image's extent.
        destvox_mm / destvox_rel: the finest level's voxel size in mm, or relative to the image's.
        system: ``matrix`` or ``world`` (see the module docstring).
        snapper: per level, 1 keeps a child wholly inside its parent, 0 only its centre.
        interp: cropping interpolation (``nearest``, as the authors found best, or ``linear``).
        scatter: interpolation when scattering outputs back (``nearest`` or ``linear``).
        smooth: smoothing of the image before cropping a level: a Gaussian width relative to
            the level's undersampling (0 = none), or ``boxcar``, ``max``, ``mixture``
            (boxcar, max and min pooling stacked as channels).
        normalize: ``none``, ``max``, ``mean``, ``m0s1`` (whole image) or ``patch_m0s1``.
        overlap: tree generation's overlap (0 = the fewest boxes that still cover).
    """

    ndim: int = 3
    depth: int = 3
    matrix: tuple[tuple[int, ...], ...] = ()
    fov_mm: tuple[float, ...] | None = None
    fov_rel: tuple[float, ...] | None = None
    destvox_mm: tuple[float, ...] | None = None
    destvox_rel: tuple[float, ...] | None = None
    system: str = "matrix"
    snapper: tuple[int, ...] = ()
    interp: str = "nearest"
    scatter: str = "nearest"
    smooth: float | str = 0.0
    normalize: str = "none"
    overlap: float = 0.0

    def __post_init__(self) -> None:
        n, d = self.ndim, self.depth
        if n not in (2, 3) or d < 1:
            raise FlexPatchError(f"patchwork needs ndim 2 or 3 and depth >= 1, got ndim {n}, depth {d}")
        matrix = self.matrix or ((32,) * n,)
        if all(isinstance(v, (int, np.integer)) for v in matrix):
            matrix = (tuple(int(v) for v in matrix),)  # one shape given flat
        message = f"matrix must be one shape or {d} shapes of {n} sizes >= 2, got {self.matrix}"

        def shape(m: Any) -> tuple[int, ...]:
            return per_axis(m, n, "matrix", message=message)

        matrix = per_axis(matrix, d, "matrix", cast=shape, message=message)
        if any(min(m) < 2 for m in matrix):
            raise FlexPatchError(message)
        object.__setattr__(self, "matrix", matrix)
        self._set_pair("fov", (1.0,) * n if self.fov_mm is None and self.fov_rel is None else None)
        self._set_pair(
            "destvox", (1.0,) * n if self.destvox_mm is None and self.destvox_rel is None else None
        )
        snapper = tuple(int(s) for s in self.snapper) or (0,) + (1,) * (d - 1)
        if len(snapper) != d:
            raise FlexPatchError(f"snapper needs {d} entries (one per level), got {self.snapper}")
        object.__setattr__(self, "snapper", snapper)
        self._check_choice("system", SYSTEMS)
        self._check_choice("interp", INTERPS)
        self._check_choice("scatter", INTERPS)
        self._check_choice("normalize", NORMALIZATIONS)
        if isinstance(self.smooth, str) and self.smooth not in SMOOTHINGS:
            raise FlexPatchError(
                f"smooth must be a number or one of {', '.join(SMOOTHINGS)}, got {self.smooth!r}"
            )
        if not 0 <= self.overlap < 1:
            raise FlexPatchError(f"overlap must be in [0, 1), got {self.overlap}")

    def _set_pair(self, name: str, default: tuple[float, ...] | None) -> None:
        mm, rel = getattr(self, f"{name}_mm"), getattr(self, f"{name}_rel")
        if mm is not None and rel is not None:
            raise FlexPatchError(f"give {name}_mm or {name}_rel, not both")
        object.__setattr__(self, f"{name}_mm", _axes(mm, self.ndim, f"{name}_mm"))
        object.__setattr__(
            self, f"{name}_rel", _axes(rel if default is None else default, self.ndim, f"{name}_rel")
        )

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise FlexPatchError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    @property
    def smooth_channels(self) -> int:
        """How many channels smoothing makes of one (mixture stacks three)."""
        return 3 if self.smooth == "mixture" else 1

    def to_json(self) -> dict[str, Any]:
        return {k: (list(map(list, v)) if k == "matrix" else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scheme:
        d = dict(d)
        matrix = d.get("matrix", ())
        d["matrix"] = tuple(tuple(m) if isinstance(m, (list, tuple)) else int(m) for m in matrix)
        for key in ("fov_mm", "fov_rel", "destvox_mm", "destvox_rel", "snapper"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise FlexPatchError(f"unknown patching scheme option(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class ImageFrame:
    """An image's place in the physical frame ``F`` of a scheme's system (its voxel grid in mm).

    Attributes:
        shape: the image's spatial shape.
        to_frame: ``(n+1, n+1)`` image voxel index -> ``F`` (mm).
        spacing: voxel size per image axis (mm).
    """

    shape: tuple[int, ...]
    to_frame: np.ndarray
    spacing: tuple[float, ...]

    @classmethod
    def of(cls, shape: Sequence[int], affine: np.ndarray, system: str) -> ImageFrame:
        """The frame of an image with ``affine`` (a NIfTI 4x4, or ``(n+1, n+1)``)."""
        n = len(shape)
        a = np.asarray(affine, dtype=np.float64)
        lin = a[:n, :n]
        trans = a[:n, -1]
        spacing = tuple(float(v) for v in np.linalg.norm(lin, axis=0))
        to_frame = np.eye(n + 1)
        if system == "world":
            to_frame[:n, :n], to_frame[:n, n] = lin, trans
        else:
            to_frame[:n, :n] = np.diag(spacing)
        return cls(tuple(int(s) for s in shape), to_frame, spacing)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """Centre and width (mm, along ``F``'s axes) of the box around the whole image."""
        n = self.ndim
        corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in self.shape], indexing="ij")).reshape(n, -1)
        pts = self.to_frame[:n, :n] @ corners + self.to_frame[:n, n : n + 1]
        lo, hi = pts.min(axis=1), pts.max(axis=1)
        return (lo + hi) / 2, hi - lo

    def to_index(
        self, centre: np.ndarray, frame: np.ndarray, width: np.ndarray, matrix: Sequence[int]
    ) -> np.ndarray:
        """Core affines (patch voxel index -> image voxel index) of patches: ``(N, n+1, n+1)``.

        Args:
            centre: ``(N, n)`` centres in ``F``; frame: ``(N, n, n)``; width: ``(n,)`` mm.
        """
        n = self.ndim
        m = np.asarray(matrix, dtype=np.float64)
        step = np.diag(np.asarray(width, dtype=np.float64) / np.maximum(m - 1, 1))
        lin = frame @ step  # (N, n, n): patch index -> F
        trans = centre - lin @ ((m - 1) / 2)
        inv = np.linalg.inv(self.to_frame)
        out = np.tile(np.eye(n + 1), (len(centre), 1, 1))
        out[:, :n, :n] = inv[:n, :n] @ lin
        out[:, :n, n] = trans @ inv[:n, :n].T + inv[:n, n]
        return out


def level_widths(scheme: Scheme, geom: ImageFrame) -> list[np.ndarray]:
    """Width (mm) of each level's patches: geometric from the field of view to the finest voxel.

    final = (m_last - 1) * destvox, fac = (final / fov) ** (1 / (depth - 1)), width_k = fov * fac**k.
    """
    _, extent = geom.box()
    fov = np.asarray(scheme.fov_mm) if scheme.fov_mm is not None else np.asarray(scheme.fov_rel) * extent
    destvox = (
        np.asarray(scheme.destvox_mm)
        if scheme.destvox_mm is not None
        else np.asarray(scheme.destvox_rel) * np.asarray(geom.spacing)
    )
    final = (np.asarray(scheme.matrix[-1]) - 1) * destvox
    if scheme.depth == 1:
        return [fov]
    fac = (final / fov) ** (1.0 / (scheme.depth - 1))
    return [fov * fac**k for k in range(scheme.depth)]


def undersampling(scheme: Scheme, geom: ImageFrame, widths: list[np.ndarray]) -> list[np.ndarray]:
    """Per level, how many image voxels one patch voxel spans along each axis (for smoothing)."""
    out = []
    for w, m in zip(widths, scheme.matrix):
        step = w / np.maximum(np.asarray(m) - 1, 1)
        out.append(step / np.asarray(geom.spacing))
    return out
