"""From raw cases to network input: fingerprint, plan, resampling, intensity normalisation, cache.

The flow follows nnU-Net: ``compute_fingerprint`` measures the dataset (spacings,
shapes, foreground intensities, object sizes), ``make_plan`` turns it into a
``Plan`` (target spacing, normalisation), ``preprocess_case`` applies the plan to
one case and ``restore`` brings a prediction back onto the original grid.

Resampling only rescales voxels along the image axes (no reorientation), with
voxel centres aligned (``align_corners=False`` in PyTorch terms), so an integer
upsampling followed by ``restore`` gives the original labels back exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from flexpatch.data.dataset import DatasetInfo, load_case
from flexpatch.data.io import Volume, atomic_path, save_json
from flexpatch.data.regions import Regions, regions_from_json, regions_to_json
from flexpatch.data.resample import resample, resampled_shape
from flexpatch.data.sanity import check_grid
from flexpatch.errors import FlexPatchError
from flexpatch.runtime import numpy_rng, track

# Per channel: CT window to [0, 1]; z-score; none; min-max to [0, 1]; 8-bit colour / 255.
NORMALIZATIONS = ("ct", "zscore", "none", "rescale", "rgb")
# nnU-Net draws at most this many foreground voxels in all for its intensity percentiles
MAX_INTENSITY_SAMPLES = 10_000_000


@dataclass(frozen=True)
class Plan:
    """Everything needed to turn a raw case into network input; saved as ``plan.json``.

    Attributes:
        ndim: spatial dimensions (2 or 3).
        in_channels: input channels.
        num_classes: output classes (background included).
        labels: class name -> label value.
        target_spacing: voxel size in mm per spatial axis after resampling.
        normalization: one scheme per channel (:data:`NORMALIZATIONS`), from ``channel_names``.
        ct_window: per channel, ``(lo, hi)`` for a CT channel (clip, then scale to [0, 1]), else None.
        median_shape: the dataset's median shape after resampling.
        regions: nnU-Net's region-based labels, ``(name, label values)`` per network output;
            empty for a softmax model (see :mod:`flexpatch.data.regions`).
        regions_class_order: the value each region writes back into a label map.
    """

    ndim: int
    in_channels: int
    num_classes: int
    labels: dict[str, int]
    target_spacing: tuple[float, ...]
    normalization: tuple[str, ...]
    ct_window: tuple[tuple[float, float] | None, ...]
    median_shape: tuple[int, ...]
    regions: Regions = ()
    regions_class_order: tuple[int, ...] = ()

    @property
    def out_channels(self) -> int:
        """The network's outputs: one sigmoid per region, else one softmax channel per class."""
        return len(self.regions) or self.num_classes

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3):
            raise FlexPatchError(f"plan: ndim must be 2 or 3, found {self.ndim}")
        if len(self.target_spacing) != self.ndim or min(self.target_spacing) <= 0:
            raise FlexPatchError(
                f"plan: target_spacing {self.target_spacing} must hold {self.ndim} positive values"
            )
        if len(self.normalization) != self.in_channels or len(self.ct_window) != self.in_channels:
            raise FlexPatchError(
                f"plan: normalization and ct_window need one entry per channel ({self.in_channels})"
            )
        for scheme, window in zip(self.normalization, self.ct_window, strict=True):
            if scheme not in NORMALIZATIONS:
                raise FlexPatchError(
                    f"plan: normalization {scheme!r} is not one of {', '.join(NORMALIZATIONS)}"
                )
            if scheme == "ct" and (window is None or len(window) != 2):
                raise FlexPatchError("plan: CT normalization needs ct_window (lo, hi)")
        if len(self.regions) != len(self.regions_class_order):
            raise FlexPatchError(
                f"plan: {len(self.regions)} regions but {len(self.regions_class_order)} values in "
                "regions_class_order"
            )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_spacing"] = list(self.target_spacing)
        d["median_shape"] = list(self.median_shape)
        d["normalization"] = list(self.normalization)
        d["ct_window"] = [None if w is None else list(w) for w in self.ct_window]
        # a plain plan keeps the JSON (and so the digest naming its cache) it had before regions
        del d["regions"], d["regions_class_order"]
        if self.regions:
            d["regions"] = regions_to_json(self.regions)
            d["regions_class_order"] = list(self.regions_class_order)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        # fields with a default came later: plans saved before them load without
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if missing:
            raise FlexPatchError(f"plan: missing field(s) {', '.join(missing)}")
        try:
            return cls(
                ndim=int(d["ndim"]),
                in_channels=int(d["in_channels"]),
                num_classes=int(d["num_classes"]),
                labels={str(k): int(v) for k, v in d["labels"].items()},
                target_spacing=tuple(float(s) for s in d["target_spacing"]),
                **_channel_schemes(d["normalization"], d["ct_window"], int(d["in_channels"])),
                median_shape=tuple(int(s) for s in d["median_shape"]),
                regions=regions_from_json(d.get("regions", [])),
                regions_class_order=tuple(int(v) for v in d.get("regions_class_order", [])),
            )
        except (TypeError, ValueError, AttributeError, IndexError) as e:
            raise FlexPatchError(f"plan: malformed field ({e})") from None

    def digest(self) -> str:
        """A short, stable digest of the plan: names its cache folder."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]


def _channel_schemes(norm: Any, windows: Any, channels: int) -> dict[str, Any]:
    """``normalization`` and ``ct_window`` of a plan.json; one of a version with one scheme for all
    channels is read as that scheme on every channel, so its models keep their behaviour."""
    if isinstance(norm, str):
        norm, windows = [norm] * channels, [windows] * channels
    return {
        "normalization": tuple(str(n) for n in norm),
        "ct_window": tuple(None if w is None else (float(w[0]), float(w[1])) for w in windows),
    }


def _pair(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = values
    return float(lo), float(hi)


def compute_fingerprint(ds: DatasetInfo, progress: bool = False) -> dict[str, Any]:
    """Measure a dataset's training cases (JSON-serialisable).

    Returns a dict with per-case ``case_ids``, ``spacings`` and ``shapes``; their
    ``median_spacing`` and ``median_shape``; ``intensity_per_channel``: statistics of each
    channel over foreground voxels (``mean``, ``std``, ``percentile_00_5``,
    ``percentile_99_5``, ``min``, ``max``; None when no label has foreground), and
    ``intensity``, channel 0's;
    ``voxel_counts`` per class name; and ``components`` per foreground class: the
    sizes of its connected components (full connectivity) in voxels and in mm^3
    (mm^2 for 2D) over all cases, with their mean and median.
    """
    # fixed: the same dataset gives the same fingerprint; channel 0 draws as when it was the only one
    rngs = [numpy_rng(1234)] + [numpy_rng(1234, c) for c in range(1, len(ds.channel_names))]
    cap = max(1, MAX_INTENSITY_SAMPLES // len(ds.training))
    parts: list[list[tuple]] = [[] for _ in ds.channel_names]
    values = max(ds.labels.values()) + 1  # the ignore label's voxels are counted too
    counts = np.zeros(values, dtype=np.int64)
    sizes: dict[int, list[int]] = {v: [] for v in ds.labels.values() if v != 0}
    volumes: dict[int, list[float]] = {v: [] for v in sizes}
    spacings, shapes = [], []
    for case in _track(ds.training, "fingerprint", progress):
        image, label = load_case(case, ds.ndim, ds.labels)
        if label is None:  # unreachable for training cases; keeps the types honest
            continue
        spacings.append(list(image.spacing))
        shapes.append(list(image.spatial_shape))
        foreground = label.data > 0
        for c, rng in enumerate(rngs):
            part = _intensity_part(image.data[c][foreground], cap, rng)
            parts[c] += [part] if part else []
        counts += np.bincount(label.data.ravel(), minlength=values)
        voxel_mm = float(np.prod(image.spacing))
        for value in sizes:
            s = component_sizes(label.data == value)
            sizes[value] += s
            volumes[value] += [n * voxel_mm for n in s]
    names = {v: k for k, v in ds.labels.items()}
    return {
        "case_ids": [c.id for c in ds.training],
        "spacings": spacings,
        "shapes": shapes,
        "median_spacing": [float(v) for v in np.median(np.array(spacings), axis=0)],
        "median_shape": [float(v) for v in np.median(np.array(shapes), axis=0)],
        "intensity": _intensity_stats(parts[0]),
        "intensity_per_channel": [_intensity_stats(p) for p in parts],
        "voxel_counts": {names[v]: int(counts[v]) for v in sorted(names)},
        "components": {names[v]: _component_summary(sizes[v], volumes[v]) for v in sizes},
    }


def component_sizes(mask: np.ndarray) -> list[int]:
    """Voxel counts of the connected components of a boolean mask (full connectivity)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labelled, n = ndimage.label(mask, structure=structure)
    return [int(c) for c in np.bincount(labelled.ravel(), minlength=n + 1)[1:]]


def _component_summary(voxels: list[int], mm3: list[float]) -> dict[str, Any]:
    summary: dict[str, Any] = {"count": len(voxels), "sizes_voxels": voxels, "sizes_mm3": mm3}
    for unit, sizes in (("voxels", voxels), ("mm3", mm3)):
        summary[f"mean_{unit}"] = float(np.mean(sizes)) if sizes else None
        summary[f"median_{unit}"] = float(np.median(sizes)) if sizes else None
    return summary


def _intensity_part(values: np.ndarray, cap: int, rng: np.random.Generator) -> tuple | None:
    """One case's foreground: count, mean, sum of squared deviations, min, max, and a capped sample."""
    if values.size == 0:
        return None
    v = values.astype(np.float64)
    sample = v if v.size <= cap else rng.choice(v, cap, replace=False)
    return v.size, v.mean(), float(((v - v.mean()) ** 2).sum()), v.min(), v.max(), sample


def _intensity_stats(parts: list[tuple]) -> dict[str, float] | None:
    """Merge per-case parts (Chan et al.'s pairwise update: no cancellation for large CT values)."""
    if not parts:
        return None
    n, mean, m2 = 0, 0.0, 0.0
    for nb, mb, m2b, *_ in parts:
        delta = mb - mean
        mean += delta * nb / (n + nb)
        m2 += m2b + delta * delta * n * nb / (n + nb)
        n += nb
    sample = np.concatenate([p[5] for p in parts])
    return {
        "mean": float(mean),
        "std": float(np.sqrt(m2 / n)),
        "percentile_00_5": float(np.percentile(sample, 0.5)),
        "percentile_99_5": float(np.percentile(sample, 99.5)),
        "min": float(min(p[3] for p in parts)),
        "max": float(max(p[4] for p in parts)),
    }


def make_plan(
    ds: DatasetInfo,
    fingerprint: dict[str, Any],
    target_spacing: Sequence[float] | None = None,
    normalization: str | None = None,
) -> Plan:
    """Choose the target spacing (median by default) and intensity normalisation for a dataset.

    Args:
        ds: the dataset.
        fingerprint: from ``compute_fingerprint``.
        target_spacing: mm per spatial axis; the dataset's median spacing when None.
        normalization: one of :data:`NORMALIZATIONS` for every channel; when None, each channel's
            from its name in ``channel_names`` (nnU-Net's: ``CT``, ``noNorm``, ``zscore``,
            ``rescale_to_0_1``, ``rgb_to_0_1``; any other name is z-scored).
    """
    chosen = fingerprint["median_spacing"] if target_spacing is None else target_spacing
    spacing = tuple(float(s) for s in chosen)
    if len(spacing) != ds.ndim or min(spacing) <= 0:
        raise FlexPatchError(f"target spacing {spacing} must hold {ds.ndim} positive values (mm)")
    schemes = (normalization,) * len(ds.channel_names) if normalization else ds.normalizations
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise FlexPatchError(f"normalization {normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
    windows = tuple(_ct_window(ds, fingerprint, c) if s == "ct" else None for c, s in enumerate(schemes))
    resampled = [
        resampled_shape(shape, sp, spacing)
        for shape, sp in zip(fingerprint["shapes"], fingerprint["spacings"], strict=True)
    ]
    return Plan(
        ndim=ds.ndim,
        in_channels=len(ds.channel_names),
        num_classes=ds.num_classes,
        labels=dict(ds.labels),
        target_spacing=spacing,
        normalization=schemes,
        ct_window=windows,
        median_shape=tuple(int(round(v)) for v in np.median(np.array(resampled), axis=0)),
        regions=ds.regions,
        regions_class_order=ds.regions_class_order,
    )


def _ct_window(ds: DatasetInfo, fingerprint: dict[str, Any], channel: int) -> tuple[float, float]:
    """A CT channel's window: its foreground's 0.5 and 99.5 percentiles (as nnU-Net's)."""
    per_channel = fingerprint.get("intensity_per_channel") or [fingerprint.get("intensity")]
    if channel >= len(per_channel):
        raise FlexPatchError(f"{ds.root}: the fingerprint has no statistics of channel {channel}; retrain")
    stats = per_channel[channel]
    if not stats:
        raise FlexPatchError(f"{ds.root}: CT normalisation needs foreground voxels, but no label has any")
    return float(stats["percentile_00_5"]), float(stats["percentile_99_5"])


def normalize(image: np.ndarray, plan: Plan) -> np.ndarray:
    """Intensity normalisation of ``(C, *S)``, each channel by its own scheme (a CT channel by its
    window to [0, 1], an MR or PET channel z-scored, ...): one scheme for all would clip a PET
    channel to the CT window. A float32 copy, normalised in place (a CT holds hundreds of MB)."""
    image = image.astype(np.float32, copy=True)
    for c, (scheme, window) in enumerate(zip(plan.normalization, plan.ct_window, strict=True)):
        _normalize_channel(image[c], scheme, window)
    return image


def _normalize_channel(x: np.ndarray, scheme: str, window: tuple[float, float] | None) -> None:
    """Normalise one float32 channel in place."""
    if scheme == "ct" and window is not None:
        lo, hi = window
        np.clip(x, lo, hi, out=x)
        x -= np.float32(lo)
        x /= np.float32(hi - lo if hi > lo else 1.0)  # a constant foreground gives lo == hi
    elif scheme == "zscore":
        mean, std = x.mean(dtype=np.float64), max(x.std(dtype=np.float64), 1e-8)
        rows = max(1, (1 << 22) // max(1, x[0].size))  # in float64, as before, but a slab at a time
        for i in range(0, x.shape[0], rows):
            x[i : i + rows] = (x[i : i + rows] - mean) / std
    elif scheme == "rescale":
        lo, hi = float(x.min()), float(x.max())
        x -= np.float32(lo)
        x /= np.float32(hi - lo if hi > lo else 1.0)
    elif scheme == "rgb":
        x /= np.float32(255.0)


def preprocess_case(
    image: Volume, label: Volume | None, plan: Plan
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Normalise a case and resample it to the plan's spacing.

    Returns:
        The image ``(C, *S')`` float32, the label ``(*S')`` int16 (or None), and the
        properties ``restore`` needs: ``original_shape``, ``original_affine``,
        ``original_spacing``, ``resampled_shape`` and ``resampled_affine`` (the
        world placement of the resampled grid).
    """
    where = image.path or "image"
    if image.ndim != plan.ndim:
        raise FlexPatchError(f"{where}: has {image.ndim} spatial axes, the plan expects {plan.ndim}")
    if image.data.shape[0] != plan.in_channels:
        raise FlexPatchError(
            f"{where}: has {image.data.shape[0]} channels, the plan expects {plan.in_channels}"
        )
    shape = image.spatial_shape
    new_shape = check_grid(resampled_shape(shape, image.spacing, plan.target_spacing), image, plan)
    # nnU-Net order: intensities are normalised on the original grid, then resampled
    data = normalize(image.data, plan)
    if data.shape[1:] != new_shape:  # (resample copies even when the grid is the same)
        data = resample(data, new_shape, order=1).astype(np.float32, copy=False)
    seg = None if label is None else resample(label.data, new_shape, order=0).astype(np.int16, copy=False)
    props = {
        "original_shape": list(shape),
        "original_affine": np.asarray(image.affine).tolist(),
        "original_spacing": list(image.spacing),
        "resampled_shape": list(new_shape),
        "resampled_affine": _resampled_affine(image.affine, shape, new_shape).tolist(),
    }
    return data, seg, props


def _resampled_affine(affine: np.ndarray, shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """World affine of the resampled grid: new voxel i sits at old index (i + 0.5) * s / s' - 0.5."""
    step = np.eye(4)  # a 2D case's third (singleton) axis keeps its place
    for ax, (s, t) in enumerate(zip(shape, new_shape, strict=True)):
        step[ax, ax] = s / t
        step[ax, 3] = 0.5 * s / t - 0.5
    return np.asarray(affine, dtype=np.float64) @ step


def preprocess_dataset(
    ds: DatasetInfo, plan: Plan, cache_dir: str | Path, progress: bool = True
) -> list[Path]:
    """Preprocess every training case into ``cache_dir/<plan hash>/<case>.npz``.

    Each file holds ``image``, ``label``, ``props`` (JSON) and ``key``; it is reused
    while ``key`` (the plan and the case files' sizes and mtimes) still matches.
    """
    folder = Path(cache_dir) / plan.digest()
    if not (folder / "plan.json").is_file():  # lets a person tell the cache folders apart
        save_json(folder / "plan.json", plan.to_json())
    paths = []
    for case in _track(ds.training, "preprocessing", progress):
        path = folder / f"{case.id}.npz"
        key = _case_key(case.images, case.label, plan)
        if _cached_key(path) != key:
            image, label = load_case(case, ds.ndim, ds.labels)
            data, seg, props = preprocess_case(image, label, plan)
            if seg is None:  # training cases always carry a label; this keeps the file format fixed
                raise FlexPatchError(f"{case.images[0]}: training case '{case.id}' has no label")
            with atomic_path(path) as tmp:
                np.savez(tmp, image=data, label=seg, props=np.array(json.dumps(props)), key=np.array(key))
        paths.append(path)
    return paths


def load_preprocessed(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a case written by ``preprocess_dataset``: image ``(C, *S)``, label ``(*S)``, props."""
    try:
        with np.load(path) as f:
            return f["image"], f["label"], json.loads(str(f["props"]))
    except (OSError, KeyError, ValueError) as e:
        raise FlexPatchError(f"{path}: not a readable preprocessed case ({e})") from None


def _case_key(images: Sequence[Path], label: Path | None, plan: Plan) -> str:
    parts = [plan.digest()]
    for p in [*images, *([label] if label else [])]:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cached_key(path: Path) -> str | None:
    try:
        with np.load(path) as f:
            return str(f["key"])
    except (OSError, KeyError, ValueError):  # missing, foreign or damaged: rebuild it
        return None


def _track(items: Sequence[Any], what: str, progress: bool) -> Any:
    return track(items, what, disable=not progress, transient=True)
