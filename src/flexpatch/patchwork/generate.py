"""Where a patchwork's patches go: random or tree generation, snapping, augmentation, balance.

Patches live in the scheme's physical frame (see :mod:`flexpatch.patchwork.scheme`). A level
is a set of patches with their parents in the level above; training draws chains (one child
per parent), application draws trees (many children per kept parent). All randomness comes
from an explicit ``numpy.random.Generator``, so a round of patches replays from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flexpatch.axes import per_axis
from flexpatch.errors import FlexPatchError
from flexpatch.patchwork.scheme import ImageFrame, Scheme

CANDIDATES = 128  # centre candidates per child when drawing inside a parent by label balance


@dataclass
class Level:
    """One level's patches.

    Attributes:
        centre: ``(N, n)`` centres in the frame (mm).
        frame: ``(N, n, n)`` orientation and scaling (identity without augmentation).
        parent: ``(N,)`` index of each patch's parent in the level above (-1 at level 0).
        affine: ``(N, n+1, n+1)`` patch voxel index -> image voxel index (the core's affine).
    """

    centre: np.ndarray
    frame: np.ndarray
    parent: np.ndarray
    affine: np.ndarray

    def __len__(self) -> int:
        return len(self.centre)


@dataclass(frozen=True)
class Augment:
    """Patch-affine augmentation, frame = R1 @ diag(scale * flip) @ R2.

    Attributes:
        dphi: rotation width in radians (normal angle in 2D; normal quaternion in 3D).
        flip: per axis, 1 flips that axis with probability 1/2.
        dscale: per axis, the log-normal width of the scaling (0 = none).
        independent: draw each level's transformation on its own (True) or share the chain's.
    """

    dphi: float = 0.0
    flip: tuple[int, ...] = ()
    dscale: tuple[float, ...] | float = 0.0
    independent: bool = True

    @property
    def active(self) -> bool:
        return bool(self.dphi) or any(self.flip) or bool(np.any(np.asarray(self.dscale)))

    def draw(self, rng: np.random.Generator, count: int, ndim: int) -> np.ndarray:
        """``(count, n, n)`` frames."""
        frames = np.tile(np.eye(ndim), (count, 1, 1))
        if not self.active:
            return frames
        dscale = np.asarray(per_axis(self.dscale, ndim, "dscale", cast=float))
        scale = np.exp(rng.standard_normal((count, ndim)) * dscale)
        flips = np.asarray(per_axis(self.flip or False, ndim, "flip", cast=bool))
        sign = np.where(flips & (rng.random((count, ndim)) < 0.5), -1.0, 1.0)
        diag = np.einsum("ni,ij->nij", scale * sign, np.eye(ndim))
        return rotations(rng, count, ndim, self.dphi) @ diag @ rotations(rng, count, ndim, self.dphi)


def rotations(rng: np.random.Generator, count: int, ndim: int, dphi: float) -> np.ndarray:
    """Random rotations: 2D angle ~ N(0, dphi); 3D from a quaternion (1, N(0, dphi/2)^3), normalised.

    A unit quaternion's vector part is sin(angle/2) * axis, so dphi/2 makes the angle's
    spread about dphi for small angles.
    """
    if not dphi:
        return np.tile(np.eye(ndim), (count, 1, 1))
    if ndim == 2:
        a = rng.standard_normal(count) * dphi
        c, s = np.cos(a), np.sin(a)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    q = np.concatenate([np.ones((count, 1)), rng.standard_normal((count, 3)) * dphi / 2], axis=1)
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def balance_offset(ratio: float, positive: float, voxels: int) -> float | None:
    """DNP's b: centre probability ~ label + b puts about ``ratio`` of centres on labels.

    b = (1 - ratio) * pos / (N * ratio - pos). None (draw uniformly) when there is no
    label, ratio is off, or the labels already fill more than ``ratio`` of the image.
    """
    if ratio <= 0 or positive <= 0 or voxels * ratio <= positive:
        return None
    return (1 - ratio) * positive / (voxels * ratio - positive)


def autoweight(counts: Sequence[float], power: float) -> np.ndarray:
    """Label weights that equalise how often labels are drawn (DNP's autoweight p).

    w = sum(f) / sum((f + 1)^(1 - p)) / (f + 1)^p with f the per-label voxel counts; p = 1
    makes every label equally likely, p = 0 leaves volumes as they are.
    """
    f = np.asarray(counts, dtype=np.float64)
    return f.sum() / np.sum((f + 1) ** (1 - power)) / (f + 1) ** power


class CentreSampler:
    """Draws centres with probability ``weight_map + b`` (label balance), or uniformly.

    Args:
        geom: the image's geometry.
        label: integer label map (spatial); None draws uniformly.
        ratio: the wanted fraction of centres on labelled voxels (DNP's balance ratio).
        label_weight: weight per foreground label value 1..K (index 0 = label 1); None = ones;
            ignored when ``autoweight_power`` is given.
        autoweight_power: p of :func:`autoweight` over the labels present.
    """

    def __init__(
        self,
        geom: ImageFrame,
        label: np.ndarray | None = None,
        ratio: float = 0.0,
        label_weight: Sequence[float] | None = None,
        autoweight_power: float | None = None,
    ) -> None:
        self.geom = geom
        self.weights: np.ndarray | None = None
        if label is None or ratio <= 0:
            return
        lab = np.asarray(label)
        top = int(lab.max(initial=0))
        counts = np.bincount(np.clip(lab, 0, None).ravel(), minlength=top + 1)[1:]
        if autoweight_power is not None:
            per = autoweight(counts, autoweight_power)
        elif label_weight is not None:
            per = np.resize(np.asarray(label_weight, dtype=np.float64), top)
        else:
            per = np.ones(top)
        table = np.concatenate([[0.0], per])
        wmap = table[np.clip(lab, 0, top)]
        b = balance_offset(ratio, float(wmap.sum()), wmap.size)
        if b is not None:
            self.weights = (wmap + b).astype(np.float32)

    def in_boxes(self, rng: np.random.Generator, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
        """One centre per box: ``centre (N, n)``, ``axes (N, n, n)`` maps [-0.5, 0.5]^n into the box."""
        n = centre.shape[1]
        if self.weights is None:
            u = rng.random((len(centre), n)) - 0.5
            return centre + np.einsum("nij,nj->ni", axes, u)
        u = rng.random((len(centre), CANDIDATES, n)) - 0.5
        pts = centre[:, None] + np.einsum("nij,nkj->nki", axes, u)
        inv = np.linalg.inv(self.geom.to_frame)
        w = _weights_at(self.weights, pts @ inv[:n, :n].T + inv[:n, n]) + 1e-12
        cum = np.cumsum(w, axis=1)
        pick = (cum < rng.random((len(centre), 1)) * cum[:, -1:]).sum(axis=1)
        return pts[np.arange(len(centre)), np.minimum(pick, CANDIDATES - 1)]

    def in_image(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` centres over the whole image (exact per-voxel draw when balanced)."""
        n = self.geom.ndim
        if self.weights is None:
            centre, width = self.geom.box()
            return self.in_boxes(rng, np.tile(centre, (count, 1)), np.tile(np.diag(width), (count, 1, 1)))
        p = self.weights.ravel().astype(np.float64)
        flat = rng.choice(p.size, size=count, p=p / p.sum())
        idx = np.stack(np.unravel_index(flat, self.geom.shape), axis=1) + rng.random((count, n)) - 0.5
        return idx @ self.geom.to_frame[:n, :n].T + self.geom.to_frame[:n, n]


def _weights_at(weights: np.ndarray, index_points: np.ndarray) -> np.ndarray:
    """Nearest-voxel values of ``weights`` at image index points ``(..., n)``; 0 outside the image."""
    shape = np.asarray(weights.shape)
    idx = np.round(index_points).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < shape), axis=-1)
    idx = np.clip(idx, 0, shape - 1)
    return np.where(inside, weights[tuple(np.moveaxis(idx, -1, 0))], 0.0)


def snap(
    centre: np.ndarray,
    frame: np.ndarray,
    width: np.ndarray,
    p_centre: np.ndarray,
    p_axes: np.ndarray,
    full: bool,
) -> np.ndarray:
    """Move child centres so the child lies inside its parent (``full``) or its centre does.

    Args:
        centre, frame: children ``(N, n)``, ``(N, n, n)``; width: the children's level width.
        p_centre, p_axes: the parents' centres and axes ``(N, n, n)`` mapping [-0.5, 0.5]^n
            into the parent box.
    Where a child is wider than its parent along an axis, it is centred there.
    """
    inv = np.linalg.inv(p_axes)
    u = np.einsum("nij,nj->ni", inv, centre - p_centre)
    if full:
        half = 0.5 * np.abs(inv @ frame @ np.diag(width)).sum(axis=-1)
        lim = np.maximum(0.5 - half, 0.0)
    else:
        lim = np.full_like(u, 0.5)
    return p_centre + np.einsum("nij,nj->ni", p_axes, np.clip(u, -lim, lim))


def parent_axes(level: Level, width: np.ndarray) -> np.ndarray:
    """``(N, n, n)`` maps from [-0.5, 0.5]^n to each patch's box."""
    return level.frame @ np.diag(width)


def image_parent(geom: ImageFrame, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole image as the parent of level 0: centres and axes, ``count`` times."""
    centre, width = geom.box()
    return np.tile(centre, (count, 1)), np.tile(np.diag(width), (count, 1, 1))


def make_level(
    scheme: Scheme,
    geom: ImageFrame,
    widths: list[np.ndarray],
    k: int,
    centre: np.ndarray,
    frame: np.ndarray,
    parent: np.ndarray,
    p_centre: np.ndarray,
    p_axes: np.ndarray,
) -> Level:
    """Snap the centres into their parents and compute the core affines of level ``k``."""
    centre = snap(centre, frame, widths[k], p_centre, p_axes, bool(scheme.snapper[k]))
    return Level(centre, frame, parent, geom.to_index(centre, frame, widths[k], scheme.matrix[k]))


def draw_chains(
    scheme: Scheme,
    geom: ImageFrame,
    widths: list[np.ndarray],
    count: int,
    rng: np.random.Generator,
    sampler: CentreSampler | None = None,
    augment: Augment | None = None,
) -> list[Level]:
    """Training: ``count`` chains, one patch per level, each child inside its parent."""
    n = geom.ndim
    sampler = sampler or CentreSampler(geom)
    augment = augment or Augment()
    shared = augment.draw(rng, count, n)
    p_centre, p_axes = image_parent(geom, count)
    levels: list[Level] = []
    for k in range(scheme.depth):
        frame = augment.draw(rng, count, n) if augment.independent else shared
        centre = sampler.in_image(rng, count) if k == 0 else sampler.in_boxes(rng, p_centre, p_axes)
        parent = np.arange(count) if k else np.full(count, -1)
        level = make_level(scheme, geom, widths, k, centre, frame, parent, p_centre, p_axes)
        levels.append(level)
        p_centre, p_axes = level.centre, parent_axes(level, widths[k])
    return levels


def grid_offsets(ratio: np.ndarray, overlap: float) -> np.ndarray:
    """Tree generation's children in parent units: floor(1/w + 1) per axis, centres (i + 0.5)/n - 0.5.

    w = (1 - overlap) * child_width / parent_width; a child as wide as its parent gets one
    position (the formula's two would put both half outside).
    """
    per_axis = []
    for r in ratio:
        w = (1 - overlap) * r
        count = 1 if r >= 1 else int(np.floor(1 / w + 1))
        per_axis.append((np.arange(count) + 0.5) / count - 0.5)
    mesh = np.meshgrid(*per_axis, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def tree_children(
    p_centre: np.ndarray,
    p_axes: np.ndarray,
    ratio: np.ndarray,
    overlap: float,
    jitter: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Tree generation's children of each parent (:func:`grid_offsets`), jittered by ``jitter`` grid steps.

    Returns the children's centres and the index (into ``p_centre``) of each one's parent.
    """
    offsets = grid_offsets(ratio, overlap)
    parent = np.repeat(np.arange(len(p_centre)), len(offsets))
    step = max(1, round(len(offsets) ** (1 / p_centre.shape[1])))
    u = (
        np.tile(offsets, (len(p_centre), 1))
        + jitter * rng.standard_normal((len(parent), p_centre.shape[1])) / step
    )
    return p_centre[parent] + np.einsum("nij,nj->ni", p_axes[parent], u), parent


def first_level(
    scheme: Scheme,
    geom: ImageFrame,
    widths: list[np.ndarray],
    generate: str,
    num_patches: int,
    rng: np.random.Generator,
    jitter: float = 0.0,
) -> Level:
    """Application's level 0: a covering grid (``tree``) or ``num_patches`` uniform centres."""
    n = geom.ndim
    if generate == "tree":
        box_centre, box_width = geom.box()
        ratio = widths[0] / box_width
        centre, _ = tree_children(
            box_centre[None], np.diag(box_width)[None], ratio, scheme.overlap, jitter, rng
        )
    elif generate == "random":
        centre = CentreSampler(geom).in_image(rng, num_patches)
    else:
        raise FlexPatchError(f"generate must be 'tree' or 'random', got {generate!r}")
    count = len(centre)
    p_centre, p_axes = image_parent(geom, count)
    frame = np.tile(np.eye(n), (count, 1, 1))
    return make_level(scheme, geom, widths, 0, centre, frame, np.full(count, -1), p_centre, p_axes)


def next_level(
    scheme: Scheme,
    geom: ImageFrame,
    widths: list[np.ndarray],
    k: int,
    parents: Level,
    keep: np.ndarray,
    generate: str,
    branch_factor: int,
    rng: np.random.Generator,
    jitter: float = 0.0,
) -> Level:
    """Application's level ``k``: children of the kept parents (tree grid or ``branch_factor`` random)."""
    p_axes_all = parent_axes(parents, widths[k - 1])
    if generate == "tree":
        ratio = widths[k] / widths[k - 1]
        centre, which = tree_children(
            parents.centre[keep], p_axes_all[keep], ratio, scheme.overlap, jitter, rng
        )
        parent = keep[which]
    else:
        parent = np.repeat(keep, branch_factor)
        centre = CentreSampler(geom).in_boxes(rng, parents.centre[parent], p_axes_all[parent])
    frame = parents.frame[parent]
    return make_level(
        scheme, geom, widths, k, centre, frame, parent, parents.centre[parent], p_axes_all[parent]
    )


def relative_affines(parent_affine: np.ndarray, child_affine: np.ndarray) -> np.ndarray:
    """Child patch index -> parent patch index: inv(A_parent) @ A_child, ``(N, n+1, n+1)``."""
    return np.linalg.inv(parent_affine) @ child_affine
