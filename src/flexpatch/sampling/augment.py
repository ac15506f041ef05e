"""Data augmentation of training patches, at any patch size, reproducible from (seed, step).

Spatial augmentation goes through the patch's own affine (:class:`~flexpatch.geometry.Patch`):
a rotated, zoomed patch is sampled directly from the whole case, so it has no border artefacts
from a rotated crop and needs no larger crop first. Mirroring flips the extracted patch (exact,
and cheap). Intensity augmentation follows on the extracted image channels, as nnU-Net orders it.

The default set and probabilities are nnU-Net's (v2, ``get_training_transforms``): rotation
(p 0.2, +-30 degrees per axis, +-180 in 2D), zoom (p 0.2, 0.7-1.4), Gaussian noise (p 0.1,
variance up to 0.1), Gaussian blur (p 0.2, sigma 0.5-1, each channel with p 0.5), brightness
(p 0.15, x0.75-1.25), contrast (p 0.15, x0.75-1.25), simulated low resolution (p 0.25,
zoom 0.5-1), gamma (p 0.3, 0.7-1.5, and inverted with p 0.1), mirroring (p 0.5 per axis).

Every parameter of a step is drawn from one ``torch.Generator`` of (seed, step), in a fixed
order and whether or not the transform applies, so a resumed run draws exactly what the
uninterrupted run did, with any number of loader workers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, extract

PRESETS: tuple[str, ...] = ("none", "default", "heavy")
# Strongly anisotropic data (nnU-Net's "dummy 2D" threshold) rotates in-plane only.
ANISOTROPY = 3.0


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (``p_*``, per sample) and ranges of every augmentation; ``none`` is all zeros.

    Attributes:
        p_rotation, rotation: rotate by angles uniform in +-``rotation`` degrees about each axis
            (3D; in-plane only for strongly anisotropic spacing) or about the plane (2D:
            ``rotation_2d``).
        p_zoom, zoom: zoom by a factor uniform in ``zoom`` (content drawn that many times larger).
        p_mirror: flip each axis with this probability (0 when the dataset declares side pairs).
        p_elastic, elastic: smooth random displacement, ``(magnitude in voxels, smoothness in voxels)``.
        p_noise, noise_variance: add Gaussian noise of a variance uniform in ``(0, noise_variance)``.
        p_blur, blur_sigma, p_blur_channel: Gaussian blur, sigma uniform in range, per channel.
        p_brightness, brightness: multiply by a factor uniform in range.
        p_contrast, contrast: scale about the mean, clipped to the patch's range.
        p_lowres, lowres: downsample by a factor uniform in range (nearest), upsample back (linear).
        p_gamma, gamma, p_gamma_invert: nnU-Net's gamma on the range-normalised patch, statistics kept.
    """

    p_rotation: float = 0.2
    rotation: float = 30.0
    rotation_2d: float = 180.0
    p_zoom: float = 0.2
    zoom: tuple[float, float] = (0.7, 1.4)
    p_mirror: float = 0.5
    p_elastic: float = 0.0
    elastic: tuple[float, float] = (4.0, 8.0)
    p_noise: float = 0.1
    noise_variance: float = 0.1
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_blur_channel: float = 0.5
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres: tuple[float, float] = (0.5, 1.0)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_gamma_invert: float = 0.1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, value := tuple(value))
            if f.name.startswith("p_") and not 0.0 <= float(value) <= 1.0:
                raise FlexPatchError(f"augmentation {f.name} must be a probability in [0, 1], got {value}")
            if isinstance(value, tuple) and (len(value) != 2 or not 0 <= value[0] <= value[1]):
                raise FlexPatchError(f"augmentation {f.name} must be a range [low, high] >= 0, got {value}")

    @property
    def spatial(self) -> bool:
        """Whether any patch may be sampled off the voxel grid (rotation, zoom, elastic)."""
        return self.p_rotation > 0 or self.p_zoom > 0 or self.p_elastic > 0

    def without_mirroring(self) -> AugmentConfig:
        return dataclasses.replace(self, p_mirror=0.0)


def _preset(name: str) -> AugmentConfig:
    if name == "default":
        return AugmentConfig()
    if name == "heavy":  # wider ranges, more often, elastic on: for small datasets
        return AugmentConfig(
            p_rotation=0.4, p_zoom=0.4, zoom=(0.6, 1.6), p_elastic=0.2, p_noise=0.2, p_blur=0.3,
            p_brightness=0.3, brightness=(0.6, 1.4), p_contrast=0.3, contrast=(0.6, 1.4),
            p_lowres=0.3, lowres=(0.4, 1.0), p_gamma=0.4,
        )  # fmt: skip
    zero = {f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")}
    return AugmentConfig(**zero)


def parse_augment(spec: str) -> AugmentConfig:
    """``none``, ``default`` (nnU-Net's set), ``heavy``, or a JSON object of fields changed from the
    default (``{"p_mirror": 0, "rotation": 15}``)."""
    spec = spec.strip()
    if spec in PRESETS:
        return _preset(spec)
    try:
        changes = json.loads(spec)
    except json.JSONDecodeError:
        raise FlexPatchError(
            f"augmentation {spec!r} is not one of {', '.join(PRESETS)} nor a JSON object of settings"
        ) from None
    if not isinstance(changes, dict):
        raise FlexPatchError(f"augmentation {spec!r} must be a preset name or a JSON object")
    base = _preset(str(changes.pop("preset", "default")))
    known = {f.name for f in dataclasses.fields(AugmentConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise FlexPatchError(
            f"unknown augmentation setting {unknown[0]!r}; known: {', '.join(sorted(known))}"
        )
    try:
        return dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as e:
        raise FlexPatchError(f"augmentation {spec!r}: {e}") from None


def _uniform(g: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


def _rotation(angles: Sequence[float], ndim: int) -> np.ndarray:
    """Rotation matrix from one angle (2D) or angles about the three axes, applied in turn (3D)."""
    if ndim == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    out = np.eye(3)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        out = r @ out
    return out


@dataclass(frozen=True)
class SpatialDraw:
    """One sample's spatial draw: the linear map patch -> image voxel offsets, axes to flip,
    and an optional elastic displacement seed."""

    linear: np.ndarray
    flips: tuple[int, ...]
    elastic: tuple[float, float, int] | None


def draw_spatial(
    cfg: AugmentConfig, g: torch.Generator, ndim: int, spacing: Sequence[float] | None = None
) -> SpatialDraw:
    """Draw one sample's rotation, zoom, mirroring and elastic settings (always the same draws).

    Rotation acts in millimetres (``spacing``, voxel size per axis), so an anisotropic image is
    not sheared; with a spacing ratio above :data:`ANISOTROPY` only the in-plane rotation (about
    the coarsest axis) is applied, as nnU-Net does for such data.
    """
    u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
    limit = math.radians(cfg.rotation_2d if ndim == 2 else cfg.rotation)
    angles = _uniform(g, -limit, limit, 1 if ndim == 2 else 3).tolist()
    zoom = float(_uniform(g, *cfg.zoom)[0])
    flip_u = torch.rand(ndim, generator=g, dtype=torch.float64).tolist()
    elastic_seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    sp = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=float)
    linear = np.eye(ndim)
    if u[0] < cfg.p_rotation:
        if ndim == 3 and sp.max() / sp.min() > ANISOTROPY:
            coarse = int(np.argmax(sp))
            angles = [a if axis == coarse else 0.0 for axis, a in enumerate(angles)]
        linear = np.diag(1 / sp) @ _rotation(angles, ndim) @ np.diag(sp)
    if u[1] < cfg.p_zoom:
        linear = linear / zoom
    flips = tuple(axis for axis, v in enumerate(flip_u) if v < cfg.p_mirror)
    elastic = (*cfg.elastic, elastic_seed) if u[2] < cfg.p_elastic else None
    return SpatialDraw(linear, flips, elastic)


def augmented_patch(box: Patch, linear: np.ndarray) -> Patch:
    """The patch of ``box``'s shape about ``box``'s centre whose voxel steps are ``linear``."""
    n = box.ndim
    half = (np.asarray(box.shape, dtype=float) - 1) / 2
    affine = np.eye(n + 1)
    affine[:n, :n] = linear
    affine[:n, n] = np.asarray(box.start, dtype=float) + half - linear @ half
    return Patch(affine, box.shape)


def elastic_offsets(shape: Sequence[int], magnitude: float, smooth: float, seed: int) -> torch.Tensor:
    """A smooth random displacement ``(*shape, ndim)`` in voxels: noise on a coarse grid of spacing
    ``smooth`` voxels, upsampled linearly, scaled so its largest value is ``magnitude``."""
    g = torch.Generator().manual_seed(seed)
    n = len(shape)
    coarse = [max(2, math.ceil(s / smooth) + 1) for s in shape]
    noise = torch.randn(1, n, *coarse, generator=g)
    mode = "bilinear" if n == 2 else "trilinear"
    field = F.interpolate(noise, size=tuple(shape), mode=mode, align_corners=True)[0]
    field = field * (magnitude / field.abs().amax().clamp_min(1e-6))
    return field.movedim(0, -1)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one channel ``(*spatial)``, edges repeated (scipy's ``nearest``,
    truncated at 3 sigma)."""
    k = _gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    out = x.float()
    for axis in range(x.ndim):
        moved = out.movedim(axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        flat = F.conv1d(F.pad(flat, (r, r), mode="replicate"), k.view(1, 1, -1))
        out = flat.reshape(moved.shape).movedim(-1, axis)
    return out.to(x.dtype)


def simulate_lowres(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Downsample one channel ``(*spatial)`` by ``factor`` (nearest) and upsample back (linear)."""
    small = [max(1, round(s * factor)) for s in x.shape]
    mode = "bilinear" if x.ndim == 2 else "trilinear"
    down = F.interpolate(x[None, None].float(), size=small, mode="nearest")
    return F.interpolate(down, size=tuple(x.shape), mode=mode, align_corners=False)[0, 0].to(x.dtype)


def adjust_gamma(x: torch.Tensor, gamma: float, invert: bool, eps: float = 1e-7) -> torch.Tensor:
    """nnU-Net's gamma: ``x`` normalised to [0, 1] by its range, raised to ``gamma``, mapped back,
    its mean and standard deviation restored (MONAI's ``AdjustContrast(retain_stats=True)``)."""
    y = -x if invert else x
    mean, std = y.mean(), y.std()
    lo, span = y.min(), y.max() - y.min()
    y = ((y - lo) / (span + eps)).pow(gamma) * span + lo
    y = (y - y.mean()) / (y.std() + 1e-8) * std + mean
    return -y if invert else y


@dataclass(frozen=True)
class IntensityDraw:
    """One sample's intensity draws (always all drawn, applied where ``apply`` says)."""

    apply: tuple[bool, ...]  # noise, blur, brightness, contrast, lowres, gamma
    noise_std: float
    noise_seed: int
    blur_sigma: float
    blur_channels: tuple[bool, ...]
    brightness: float
    contrast: float
    lowres: float
    gamma: float
    invert: bool


def draw_intensity(cfg: AugmentConfig, g: torch.Generator, channels: int) -> IntensityDraw:
    """Draw one sample's intensity settings, in a fixed order."""
    u = torch.rand(6, generator=g, dtype=torch.float64).tolist()
    probs = (cfg.p_noise, cfg.p_blur, cfg.p_brightness, cfg.p_contrast, cfg.p_lowres, cfg.p_gamma)
    values = _uniform(g, 0, 1, 6).tolist()
    ranges = ((0.0, cfg.noise_variance), cfg.blur_sigma, cfg.brightness, cfg.contrast, cfg.lowres, cfg.gamma)
    v = [lo + (hi - lo) * t for (lo, hi), t in zip(ranges, values, strict=True)]
    per_channel = torch.rand(channels, generator=g, dtype=torch.float64).tolist()
    invert = float(torch.rand(1, generator=g, dtype=torch.float64)) < cfg.p_gamma_invert
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    return IntensityDraw(
        apply=tuple(t < p for t, p in zip(u, probs, strict=True)),
        noise_std=math.sqrt(v[0]),
        noise_seed=seed,
        blur_sigma=v[1],
        blur_channels=tuple(c < cfg.p_blur_channel for c in per_channel),
        brightness=v[2],
        contrast=v[3],
        lowres=v[4],
        gamma=v[5],
        invert=invert,
    )


def apply_intensity(image: torch.Tensor, d: IntensityDraw) -> torch.Tensor:
    """Apply one sample's draws to its image channels ``(C, *spatial)`` (a new tensor)."""
    noise, blur, bright, contrast, lowres, gamma = d.apply
    x = image.float().clone()
    if noise:
        x += torch.randn(x.shape, generator=torch.Generator().manual_seed(d.noise_seed)) * d.noise_std
    for c in range(x.shape[0]):
        if blur and d.blur_channels[c]:
            x[c] = gaussian_blur(x[c], d.blur_sigma)
        if bright:
            x[c] *= d.brightness
        if contrast:
            lo, hi, mean = x[c].min(), x[c].max(), x[c].mean()
            x[c] = ((x[c] - mean) * d.contrast + mean).clamp(lo, hi)
        if lowres:
            x[c] = simulate_lowres(x[c], d.lowres)
        if gamma:
            x[c] = adjust_gamma(x[c], d.gamma, d.invert)
    return x.to(image.dtype)


def augmented_sample(
    image: torch.Tensor,
    label: torch.Tensor,
    box: Patch,
    cfg: AugmentConfig,
    g: torch.Generator,
    padding: str = "border",
    spacing: Sequence[float] | None = None,
    fixed_channels: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training sample cut from ``image`` ``(C, *S)`` and ``label`` ``(*S)`` at ``box``, augmented:
    ``(1, C, *box)`` and ``(1, *box)``. The last ``fixed_channels`` image channels (coordinates)
    move with the patch but get no intensity change. Every method's trainer augments through here.
    """
    d = draw_spatial(cfg, g, box.ndim, spacing)
    offsets = None if d.elastic is None else elastic_offsets(box.shape, *d.elastic)[None]
    patch = augmented_patch(box, d.linear)
    pad: Any = padding
    out = extract(image, [patch], mode="linear", padding=pad, offsets=offsets)
    lab = extract(label[None], [patch], mode="nearest", padding=pad, offsets=offsets)[:, 0]
    if d.flips:
        out, lab = out.flip([2 + a for a in d.flips]), lab.flip([1 + a for a in d.flips])
    channels = out.shape[1] - fixed_channels
    out[0, :channels] = apply_intensity(out[0, :channels], draw_intensity(cfg, g, channels))
    return out, lab


def skip_sample(cfg: AugmentConfig, g: torch.Generator, ndim: int, channels: int) -> None:
    """Draw from ``g`` what :func:`augmented_sample` draws for one sample of ``channels`` augmented
    channels, and do nothing else: a sample of the batch that another process cuts, so that this
    process's samples get the draws they get in one process."""
    draw_spatial(cfg, g, ndim)
    draw_intensity(cfg, g, channels)


def describe(cfg: AugmentConfig) -> dict[str, Any]:
    """The settings as saved beside a model (JSON types)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
