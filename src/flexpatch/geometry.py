"""The geometry core: a patch is an affine plus a matrix shape.

Every method in flexpatch decides *which* patches a network sees; this module
extracts them from an image and accumulates network outputs back onto it.
Axis-aligned integer boxes (the common case) are plain slices; any other affine
goes through ``grid_sample``. All functions are N-dimensional (2D and 3D).

Conventions: images are ``(C, *spatial)`` tensors; a patch's affine maps patch
voxel indices to image voxel indices (homogeneous, ``(ndim+1, ndim+1)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from flexpatch.axes import nearest_valid, per_axis, round_up
from flexpatch.errors import FlexPatchError

Shape = tuple[int, ...]
WindowKind = Literal["constant", "gaussian", "cos", "cos2"]
WINDOW_KINDS: tuple[str, ...] = ("constant", "gaussian", "cos", "cos2")


@dataclass(frozen=True)
class Patch:
    """A window of an image: ``image_index = affine @ [patch_index, 1]``.

    Attributes:
        affine: ``(ndim+1, ndim+1)`` homogeneous matrix (float64 numpy array).
        shape: the patch's matrix shape, one int per spatial axis.
    """

    affine: np.ndarray
    shape: Shape

    def __post_init__(self) -> None:
        n = len(self.shape)
        if self.affine.shape != (n + 1, n + 1):
            raise FlexPatchError(f"patch affine has shape {self.affine.shape}, expected {(n + 1, n + 1)}")
        if any(s <= 0 for s in self.shape):
            raise FlexPatchError(f"patch shape {self.shape} must be positive on every axis")

    @classmethod
    def box(cls, start: Sequence[int], shape: Sequence[int]) -> Patch:
        """An axis-aligned box of ``shape`` voxels whose first voxel is ``start``."""
        n = len(shape)
        affine = np.eye(n + 1)
        affine[:n, n] = [int(s) for s in start]
        return cls(affine, tuple(int(s) for s in shape))

    @classmethod
    def scaled(cls, center: Sequence[float], width: Sequence[float], shape: Sequence[int]) -> Patch:
        """A box of physical ``width`` (in image voxels) about ``center``, sampled on ``shape``.

        The patch's first and last voxels sit on the box's edges (align_corners),
        so a width of ``shape - 1`` is a plain box and larger widths zoom out.
        """
        n = len(shape)
        step = [w / max(s - 1, 1) for w, s in zip(width, shape)]
        affine = np.eye(n + 1)
        affine[:n, :n] = np.diag(step)
        affine[:n, n] = [c - w / 2 for c, w in zip(center, width)]
        return cls(affine, tuple(int(s) for s in shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_box(self) -> bool:
        """True when the affine is an integer translation: extraction is plain slicing."""
        n = self.ndim
        t = self.affine[:n, n]
        return bool(np.array_equal(self.affine[:n, :n], np.eye(n)) and np.array_equal(t, np.round(t)))

    @property
    def start(self) -> Shape:
        n = self.ndim
        return tuple(int(round(v)) for v in self.affine[:n, n])

    def slices(self) -> tuple[slice, ...]:
        """Slices of a box patch (only meaningful when ``is_box``)."""
        return tuple(slice(s, s + w) for s, w in zip(self.start, self.shape))

    def inside(self, image_shape: Sequence[int]) -> bool:
        """True when the box lies entirely inside an image of ``image_shape``."""
        return all(s >= 0 and s + w <= n for s, w, n in zip(self.start, self.shape, image_shape))

    def corners(self) -> np.ndarray:
        """Image-index coordinates of the patch's first and last voxel: ``(2, ndim)``."""
        n = self.ndim
        lo = self.affine[:n, n]
        hi = self.affine[:n, :n] @ (np.asarray(self.shape) - 1) + lo
        return np.stack([lo, hi])


def nearest_box(patch: Patch, tol: float = 1e-6) -> Patch:
    """The box that nearest-neighbour sampling of ``patch`` reads, when its axes are the image's.

    A patch whose linear part is the identity (within ``tol``) samples, with nearest
    interpolation, exactly the voxels of the box at its rounded start; slicing that box is
    far cheaper than building a sampling grid. Any other patch is returned as is.
    """
    n = patch.ndim
    if patch.is_box or not np.allclose(patch.affine[:n, :n], np.eye(n), atol=tol, rtol=0):
        return patch
    return Patch.box(np.round(patch.affine[:n, n]).astype(int), patch.shape)


def _check_same_shape(patches: Sequence[Patch]) -> Shape:
    if not patches:
        raise FlexPatchError("no patches given")
    shape = patches[0].shape
    for p in patches:
        if p.shape != shape:
            raise FlexPatchError(f"patches in one batch must share a shape: {shape} vs {p.shape}")
    return shape


def _pad_box(image: torch.Tensor, patch: Patch, padding: str) -> torch.Tensor:
    """Slice a box that may leave the image, padding the outside (zeros or border)."""
    spatial = image.shape[1:]
    lo = [max(s, 0) for s in patch.start]
    hi = [min(s + w, n) for s, w, n in zip(patch.start, patch.shape, spatial)]
    if any(h <= low for low, h in zip(lo, hi)):
        if padding == "zeros":
            return image.new_zeros((image.shape[0], *patch.shape))
        # A box wholly outside: border padding repeats the nearest voxel, so clamp into range.
        lo = [min(max(s, 0), n - 1) for s, n in zip(patch.start, spatial)]
        hi = [v + 1 for v in lo]
    inner = image[(slice(None), *(slice(a, b) for a, b in zip(lo, hi)))]
    pads: list[int] = []
    for s, w, a, b in reversed(list(zip(patch.start, patch.shape, lo, hi))):
        before = a - s
        pads += [before, w - before - (b - a)]
    if padding == "zeros":
        return F.pad(inner, pads)
    # replicate padding in torch needs a batch dim and supports up to 3 spatial dims
    return F.pad(inner[None].float(), pads, mode="replicate")[0].to(image.dtype)


def patch_grid(affines: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Where every voxel of a patch lands: ``affines`` ``(B, n+1, n+1)`` applied to the voxel index
    grid of ``shape``, in C order. Returns ``(B, prod(shape), n)`` in the affines' dtype and device.

    The one place that maps patch voxels to image positions, for extraction (:func:`extract`) and
    every put-back (:mod:`flexpatch.accumulator`): computed alike, a nearest-neighbour sample and
    a nearest-voxel scatter of one patch round every voxel the same way. Pass float64 affines
    (float32 on MPS, which has no float64) so that rounding at large indices stays exact.
    """
    n = len(shape)
    axes = [torch.arange(int(s), dtype=affines.dtype, device=affines.device) for s in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, n)
    return torch.einsum("pj,bij->bpi", idx, affines[:, :n, :n]) + affines[:, None, :n, n]


def _affine_grid(
    affines: torch.Tensor, shape: Shape, spatial: Shape, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """grid_sample grids (align_corners=True) of patches ``shape`` at ``affines`` ``(B, n+1, n+1)``,
    each voxel moved by ``offsets`` ``(B, *shape, n)`` image voxels where given (a deformation).

    Computed in float64 (float32 on MPS, which has none) so that nearest rounding agrees with
    the nearest-voxel scatter of :func:`accumulate`; returns ``(B, *shape, n)`` in that dtype.
    """
    n, device = len(spatial), affines.device
    gdtype = torch.float32 if device.type == "mps" else torch.float64
    pos = patch_grid(affines.to(gdtype), shape)
    if offsets is not None:
        pos = pos + offsets.to(device=device, dtype=gdtype).reshape(pos.shape)
    scale = torch.tensor([max(s - 1, 1) for s in spatial], dtype=gdtype, device=device)
    return (2 * pos / scale - 1).flip(-1).reshape(-1, *shape, n)  # grid_sample wants reversed axes


def _sampling_grid(
    patches: Sequence[Patch], spatial: Shape, device: torch.device, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 grid_sample grids for general affines: ``(B, *shape, ndim)``."""
    gdtype = torch.float32 if device.type == "mps" else torch.float64
    affines = torch.as_tensor(np.stack([p.affine for p in patches]), dtype=gdtype, device=device)
    return _affine_grid(affines, patches[0].shape, spatial, offsets).float()


def extract(
    image: torch.Tensor,
    patches: Sequence[Patch],
    mode: Literal["nearest", "linear"] = "linear",
    padding: Literal["zeros", "border"] = "zeros",
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cut ``patches`` (all of one shape) out of ``image`` ``(C, *spatial)``.

    Args:
        offsets: ``(B, *patch_shape, ndim)`` image voxels added to where each patch voxel lands
            (an elastic deformation); None: the affines alone.

    Returns:
        ``(B, C, *patch_shape)``. Boxes are sliced (outside voxels padded);
        other affines are resampled with ``grid_sample`` (``mode`` interpolation).
    """
    shape = _check_same_shape(patches)
    spatial = tuple(image.shape[1:])
    if len(shape) != len(spatial):
        raise FlexPatchError(
            f"patch is {len(shape)}D but image {tuple(image.shape)} has {len(spatial)} spatial axes"
        )
    if offsets is None and all(p.is_box for p in patches):
        return torch.stack(
            [
                image[(slice(None), *p.slices())] if p.inside(spatial) else _pad_box(image, p, padding)
                for p in patches
            ]
        )
    if len(spatial) not in (2, 3):
        raise FlexPatchError(f"resampled patches need 2 or 3 spatial axes, got {len(spatial)}")
    grid = _sampling_grid(patches, spatial, image.device, offsets)
    src = image[None].float().expand(len(patches), *image.shape)
    gmode = "bilinear" if mode == "linear" else "nearest"
    out = F.grid_sample(src, grid, mode=gmode, padding_mode=padding, align_corners=True)
    return out.to(image.dtype) if image.dtype.is_floating_point else out.round().to(image.dtype)


def extract_each(
    sources: torch.Tensor,
    affines: torch.Tensor,
    shape: Sequence[int],
    mode: Literal["nearest", "linear"] = "nearest",
    padding: Literal["zeros", "border"] = "zeros",
) -> torch.Tensor:
    """Cut one patch out of each batch item's own source, in one ``grid_sample`` call.

    Args:
        sources: ``(B, C, *spatial)``; item ``b`` is sampled only from ``sources[b]``.
        affines: ``(B, ndim+1, ndim+1)`` patch voxel index -> source voxel index (any float dtype).
        shape: the patch matrix, one int per spatial axis.

    Returns:
        ``(B, C, *shape)``, differentiable with respect to ``sources``; equal to
        :func:`extract` of ``sources[b]`` at ``affines[b]`` (boxes included).
    """
    shape = tuple(int(s) for s in shape)
    spatial = tuple(sources.shape[2:])
    n = len(spatial)
    if n not in (2, 3) or len(shape) != n:
        raise FlexPatchError(f"extract_each needs 2 or 3 spatial axes matching patch {shape}, got {spatial}")
    if tuple(affines.shape) != (sources.shape[0], n + 1, n + 1):
        raise FlexPatchError(
            f"affines {tuple(affines.shape)} do not match sources {tuple(sources.shape)}: "
            f"expected {(sources.shape[0], n + 1, n + 1)}"
        )
    grid = _affine_grid(torch.as_tensor(affines, device=sources.device), shape, spatial)
    # half-precision grids (bfloat16 autocast) would misplace voxels by up to a tenth: sample in float32
    low = sources.dtype in (torch.float16, torch.bfloat16)
    src = sources if sources.dtype.is_floating_point and not low else sources.float()
    gmode = "bilinear" if mode == "linear" else "nearest"
    out = F.grid_sample(src, grid.to(src.dtype), mode=gmode, padding_mode=padding, align_corners=True)
    if low:
        return out.to(sources.dtype)
    return out if sources.dtype.is_floating_point else out.round().to(sources.dtype)


def accumulate(
    out_sum: torch.Tensor,
    weight_sum: torch.Tensor,
    outputs: torch.Tensor,
    patches: Sequence[Patch],
    window: torch.Tensor | None = None,
) -> None:
    """Add ``outputs * window`` into ``out_sum`` and ``window`` into ``weight_sum``, in place.

    Args:
        out_sum: ``(C, *spatial)`` running weighted sum.
        weight_sum: ``(1, *spatial)`` running sum of weights.
        outputs: ``(B, C, *patch_shape)`` network outputs for ``patches``.
        window: ``(*patch_shape)`` weights (see :func:`window_weights`); None means ones.

    Boxes are added by slicing (the parts outside the image are dropped); other
    affines are scattered to their nearest image voxel, as DNP does. This is the
    ``nearest`` mode and ``sum`` fusion of :class:`flexpatch.accumulator.Accumulator`.
    """
    shape = _check_same_shape(patches)
    if tuple(outputs.shape[2:]) != shape:
        raise FlexPatchError(f"outputs {tuple(outputs.shape)} do not match patches of shape {shape}")
    # imported here: the accumulator is built on this module (extract, patch_grid), not below it
    from flexpatch.accumulator import Accumulator

    affines = np.stack([p.affine for p in patches])
    Accumulator(out_sum, weight_sum).add(outputs, affines, "nearest", window)


def window_weights(
    shape: Sequence[int],
    kind: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Blending weights of a window, a pure function of its matrix shape.

    - ``constant``: ones.
    - ``gaussian``: ``exp(-x^2 / (2 sigma^2))`` per axis about the centre with
      ``sigma = sigma_scale * size`` (0.125 as MONAI and nnU-Net), floored at
      1e-3 so that borders still count, exactly as MONAI's importance map.
    - ``cos``: ``prod_k sin(pi i_k / (n_k - 1))`` (DNP), floored like gaussian.
    - ``cos2``: its square root (DNP's softer window).
    """
    shape = tuple(int(s) for s in shape)
    if kind not in WINDOW_KINDS:
        raise FlexPatchError(f"unknown window kind {kind!r}; choose one of {', '.join(WINDOW_KINDS)}")
    if kind == "constant":
        return torch.ones(shape, device=device, dtype=dtype)
    scales = per_axis(sigma_scale, len(shape), "sigma_scale", cast=float)
    profiles = []
    for size, scale in zip(shape, scales):
        x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
        if kind == "gaussian":
            profiles.append(torch.exp(x**2 / (-2 * (scale * size) ** 2)))
        else:
            prof = torch.sin(
                math.pi * torch.arange(size, dtype=torch.float32, device=device) / max(size - 1, 1)
            )
            profiles.append(prof if size > 1 else torch.ones(1, device=device))
    w = profiles[0]
    for prof in profiles[1:]:
        w = w.unsqueeze(-1) * prof
    if kind == "cos2":
        w = w.clamp(min=0).sqrt()  # sin(pi) rounds to a tiny negative number
    floor = max(float(w.min()), 1e-3)
    return w.clamp(min=floor).to(dtype)


def grid_starts(
    image_shape: Sequence[int], patch_shape: Sequence[int], overlap: float | Sequence[float]
) -> list[Shape]:
    """Start indices of a regular grid of windows covering the image (MONAI's order and rule).

    The step per axis is ``int(patch * (1 - overlap))`` (at least 1); the last
    window is shifted back so that it ends at the image border. A window as large
    as the image along an axis gives one position there.
    """
    n = len(image_shape)
    overlaps = per_axis(overlap, n, "overlap", cast=float)
    axis_starts: list[list[int]] = []
    for size, w, o in zip(image_shape, patch_shape, overlaps):
        if not 0.0 <= o < 1.0:
            raise FlexPatchError(f"overlap must be in [0, 1), got {o}")
        if w > size:
            raise FlexPatchError(f"window {tuple(patch_shape)} exceeds image {tuple(image_shape)}")
        step = w if w == size else max(int(w * (1 - o)), 1)
        count = 1 if w == size else math.ceil((size - w) / step) + 1
        axis_starts.append([min(i * step, size - w) for i in range(count)])
    mesh = np.meshgrid(*axis_starts, indexing="ij")
    return [tuple(int(v) for v in row) for row in np.stack([m.ravel() for m in mesh], axis=1)]


def _check_divisible(patch: Shape, divisor: Shape) -> None:
    """Every patch side must be a multiple of the divisor; name the nearest valid sizes."""
    if any(d < 1 for d in divisor):
        raise FlexPatchError(f"divisor {divisor} must be >= 1 on every axis")
    if all(p % d == 0 for p, d in zip(patch, divisor, strict=True)):
        return
    pairs = [nearest_valid(p, d) for p, d in zip(patch, divisor, strict=True)]
    lower, upper = tuple(b for b, _ in pairs), tuple(a for _, a in pairs)
    raise FlexPatchError(
        f"patch_size {patch} is not divisible by divisor {divisor}; nearest valid sizes: {lower} or {upper}"
    )


def window_layout(
    image_shape: Sequence[int],
    patch_size: int | Sequence[int],
    overlap: float = 0.5,
    divisor: int | Sequence[int] = 1,
) -> tuple[Shape, Shape, list[Shape]]:
    """The pure geometry of a sliding window: window shape, padded image shape, window starts.

    Along an axis where the patch is smaller than the image, the window is the patch
    and the image is not padded. Where the patch covers the image, the window is the
    whole image extent rounded up to a multiple of ``divisor`` (one position), and the
    image is padded to that size, never to the patch size.

    Args:
        image_shape: spatial shape of the image.
        patch_size: requested window, one int per axis (or one int for all axes).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        divisor: the network's size divisor (``2**levels`` for a U-Net), per axis or one int.

    Returns:
        ``(window, padded, starts)``: the effective window shape, the padded image shape
        and the start of every window in the padded image (MONAI's order).
    """
    spatial = tuple(int(s) for s in image_shape)
    n = len(spatial)
    patch = per_axis(patch_size, n, "patch_size")
    div = per_axis(divisor, n, "divisor")
    if any(p <= 0 for p in patch):
        raise FlexPatchError(f"patch_size {patch} must be positive on every axis")
    if any(s <= 0 for s in spatial):
        raise FlexPatchError(f"image shape {spatial} must be positive on every axis")
    if not 0.0 <= float(overlap) < 1.0:
        raise FlexPatchError(f"overlap must be in [0, 1), got {overlap}")
    _check_divisible(patch, div)
    covered = [p >= s for p, s in zip(patch, spatial, strict=True)]
    padded = tuple(round_up(s, d) if c else s for s, d, c in zip(spatial, div, covered, strict=True))
    window = tuple(q if c else p for p, q, c in zip(patch, padded, covered, strict=True))
    return window, padded, grid_starts(padded, window, overlap)


def slab_axis(
    image_shape: Sequence[int], patch_size: int | Sequence[int], overlap: float, divisor: Sequence[int] | int
) -> int:
    """The axis a streamed sliding window goes along: the one whose window is the smallest share
    of the (padded) image, so that the band it keeps, one window deep, is the smallest."""
    window, padded, _ = window_layout(image_shape, patch_size, overlap, divisor)
    shares = [w / p for w, p in zip(window, padded, strict=True)]
    return shares.index(min(shares))
