"""The built-in data: synthetic abdominal CT and fluorescence-like cell images.

Nothing is downloaded: ``make_phantom`` writes an nnU-Net v2 raw dataset that
behaves like the real problems the papers study.

*abdomen* mimics multi-organ CT (as the hypernetwork paper's data): an elliptic body with a muscle wall,
spine, paraspinal muscles, aorta, vena cava and unlabelled bowel, and five
labelled organs plus liver lesions. Liver and spleen look alike and the two
kidneys look identical, so only global context (which side of the spine a
kidney lies on) separates right from left: small patches must fail there.

Voxel axes follow LPS (DICOM/ITK): x runs towards the patient's left (so the
patient's right is at low x), y towards posterior, z towards the head. The
anatomy is laid out in field-of-view units ([-1, 1] per axis), so it fills any
matrix shape; spacing only sets the affine and the blur in millimetres. A 2D
abdomen is one axial slice through the kidneys.

*cells* mimics the nuclei images of segment-then-segment: a dark,
unevenly lit background with 5 to 40 bright ellipses (ellipsoids in 3D).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from flexpatch.data.io import write_image, write_text
from flexpatch.errors import FlexPatchError
from flexpatch.runtime import check_writable, numpy_rng, track

ABDOMEN_LABELS = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "stomach": 3,
    "kidney_right": 4,
    "kidney_left": 5,
    "lesion": 6,
}
CELLS_LABELS = {"background": 0, "nucleus": 1}
KINDS = ("abdomen", "cells")
MIN_SIZE = 16

# Nominal organ ellipsoids in field-of-view units: (label, centre (x, y, z), semi-axes).
# Painted in this order, so a later organ wins where two blobs meet; the kidneys
# are exact mirror images so that their position is the only thing telling them apart.
_ORGANS = (
    (1, (-0.38, -0.05, 0.35), (0.40, 0.45, 0.42)),
    (3, (0.25, -0.28, 0.25), (0.22, 0.20, 0.28)),
    (2, (0.52, 0.22, 0.25), (0.15, 0.20, 0.25)),
    (4, (-0.32, 0.28, 0.0), (0.12, 0.14, 0.24)),
    (5, (0.32, 0.28, 0.0), (0.12, 0.14, 0.24)),
)
_SLICE_Z = 0.14  # the axial level of a 2D abdomen: kidneys, liver, spleen and stomach all cut it
_JITTER = 0.04  # std of organ position jitter, FOV units (2 voxels at 96)
_ROUGHNESS = 0.2  # amplitude of the smooth radial deformation of every blob
_WARP = 0.03  # amplitude of the global smooth displacement, FOV units
_PSF_MM = 1.2  # std of the scanner blur


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 4) -> np.ndarray:
    """Low-frequency noise (std about 1) on ``shape``, drawn on a coarse grid.

    Cubic upsampling to an intermediate 16-grid, then linear to ``shape``: smooth
    enough that organ outlines show no creases (linear alone leaves straight edges),
    cheap enough that a 96^3 case takes well under a second.
    """
    grid = ndimage.gaussian_filter(rng.standard_normal((coarse,) * len(shape)).astype(np.float32), 0.7)
    grid /= grid.std() + 1e-6
    mid = ndimage.zoom(grid, 16 / coarse, order=3, mode="nearest", grid_mode=True)
    field = ndimage.zoom(mid, [s / 16 for s in shape], order=1, mode="nearest", grid_mode=True)
    return field[tuple(slice(0, s) for s in shape)]


def _coords(shape: tuple[int, ...], rng: np.random.Generator) -> list[np.ndarray | float]:
    """Warped x, y, z in FOV units; a 2D image gets the constant axial level as z."""
    axes = [(np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1 for n in shape]
    coords: list[np.ndarray | float] = list(np.meshgrid(*axes, indexing="ij"))
    for k in range(len(shape)):
        coords[k] = coords[k] + _WARP * _smooth_field(rng, shape)
    if len(shape) == 2:
        coords.append(_SLICE_Z)
    return coords


def _bbox(shape: tuple[int, ...], centre: np.ndarray, reach: np.ndarray) -> tuple[slice, ...] | None:
    """Voxel slices covering ``centre +- reach`` (FOV units), or None when that misses the image."""
    if len(shape) == 2 and abs(_SLICE_Z - centre[2]) >= reach[2]:
        return None
    slices = []
    for n, c, r in zip(shape, centre, reach, strict=False):  # a 2D shape meets 3D centres
        lo = max(0, int(np.floor((c - r + 1) / 2 * n - 0.5)))
        hi = min(n, int(np.ceil((c + r + 1) / 2 * n - 0.5)) + 1)
        if lo >= hi:
            return None
        slices.append(slice(lo, hi))
    return tuple(slices)


def _blob(
    coords: list,
    shape: tuple[int, ...],
    centre: np.ndarray,
    semi: np.ndarray,
    rng: np.random.Generator,
    rough: float = _ROUGHNESS,
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """A deformed, slightly rotated ellipsoid: its box and a radius map (< 1 inside)."""
    angle = rng.uniform(-0.15, 0.15)
    sl = _bbox(shape, centre, semi * (1.35 + 3 * rough) + 3 * _WARP)  # 1.35: a kidney's fat
    if sl is None:
        return None
    d = [(c[sl] if isinstance(c, np.ndarray) else c) - m for c, m in zip(coords, centre, strict=True)]
    x = np.cos(angle) * d[0] + np.sin(angle) * d[1]
    y = -np.sin(angle) * d[0] + np.cos(angle) * d[1]
    r = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (d[2] / semi[2]) ** 2)
    box_shape = tuple(s.stop - s.start for s in sl)
    return sl, (r + rough * _smooth_field(rng, box_shape)).astype(np.float32)


def _intensities(rng: np.random.Generator) -> dict[str, float]:
    """Per-case tissue values (HU); liver and spleen overlap and both kidneys share theirs."""
    liver = rng.uniform(55, 70)
    cortex = rng.uniform(140, 165)
    return {
        "fat": rng.uniform(-110, -90),
        "muscle": rng.uniform(40, 55),
        "bone": rng.uniform(650, 750),
        "marrow": rng.uniform(250, 350),
        "aorta": rng.uniform(160, 200),
        "ivc": rng.uniform(110, 140),
        "liver": liver,
        "spleen": liver + rng.uniform(-8, 2),
        "stomach_wall": rng.uniform(25, 40),
        "stomach_content": rng.uniform(0, 15),
        "cortex": cortex,
        "medulla": cortex - rng.uniform(30, 45),
    }


def _body(coords: list, image: np.ndarray, rng: np.random.Generator, hu: dict[str, float]) -> np.ndarray:
    """Paint the unlabelled anatomy; return the cavity where organs may lie."""
    x, y = coords[0], coords[1]
    bx, by, yc = rng.uniform(0.82, 0.92), rng.uniform(0.62, 0.72), rng.uniform(-0.02, 0.04)
    radius = np.sqrt((x / bx) ** 2 + ((y - yc) / by) ** 2)
    body = radius < 1
    wall = body & (radius > 1 - rng.uniform(0.06, 0.09))
    spine_y, spine_r = yc + 0.62 * by, rng.uniform(0.09, 0.11)
    spine_d = np.sqrt(x**2 + (y - spine_y) ** 2)
    spine = spine_d < spine_r
    muscle = wall | (((np.abs(x) - 0.17) / 0.11) ** 2 + ((y - spine_y - 0.06) / 0.1) ** 2 < 1) & body
    vessel_y = spine_y - spine_r - 0.055
    aorta = (x - 0.06) ** 2 + (y - vessel_y) ** 2 < 0.045**2
    ivc = (x + 0.1) ** 2 + (y - vessel_y) ** 2 < 0.05**2
    image[body] = hu["fat"]
    image[muscle] = hu["muscle"]
    image[aorta] = hu["aorta"]
    image[ivc] = hu["ivc"]
    image[spine] = hu["bone"]
    image[spine_d < 0.7 * spine_r] = hu["marrow"]
    return body & ~(muscle | spine | aorta | ivc)


def _bowel(coords: list, image: np.ndarray, cavity: np.ndarray, rng: np.random.Generator) -> None:
    """Unlabelled soft-tissue loops, some with gas, in the lower abdomen: organ-like distractors."""
    for _ in range(rng.integers(10, 21)):
        centre = np.array(
            [rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.1), rng.uniform(-0.9, -0.1)], np.float32
        )
        found = _blob(coords, image.shape, centre, np.full(3, rng.uniform(0.1, 0.2), np.float32), rng)
        hu, gas = rng.uniform(20, 45), rng.random() < 0.4
        if found is None:
            continue
        sl, r = found
        inside = (r < 1) & cavity[sl]
        image[sl][inside] = hu
        if gas:
            image[sl][inside & (r < 0.5)] = -800.0


def _organs(
    coords: list, image: np.ndarray, label: np.ndarray, cavity: np.ndarray, rng: np.random.Generator, hu: dict
) -> None:
    """Paint the labelled organs with their inner structure, in ``_ORGANS`` order."""
    gas = rng.random() < 0.5
    for lab, centre, semi in _ORGANS:
        c = (np.asarray(centre) + rng.normal(0, _JITTER, 3)).astype(np.float32)
        a = (np.asarray(semi) * rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, 3)).astype(np.float32)
        # Kidneys stay regular, as real ones are, and sit in perirenal fat: equal shapes and equal
        # surroundings keep their look identical, so only their position tells them apart.
        found = _blob(coords, image.shape, c, a, rng, 0.06 if lab in (4, 5) else _ROUGHNESS)
        if found is None:
            continue
        sl, r = found
        inside = (r < 1) & cavity[sl]
        img = image[sl]
        if lab in (4, 5):
            capsule = (r < 1.35) & cavity[sl] & ~inside
            label[sl][capsule] = 0
            img[capsule] = hu["fat"]
            img[inside] = np.where(r[inside] < 0.55, hu["medulla"], hu["cortex"])
        elif lab == 3:
            img[inside] = np.where(r[inside] > 0.72, hu["stomach_wall"], hu["stomach_content"])
            if gas:  # a supine patient's gastric air rises anteriorly (low y)
                img[inside & (r < 0.72) & (coords[1][sl] < c[1] - 0.3 * a[1])] = -850.0
        else:
            img[inside] = hu["liver" if lab == 1 else "spleen"]
        label[sl][inside] = lab


def _lesions(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, radius: tuple[float, float]
) -> None:
    """0 to 4 dark round lesions (radii in voxels) centred well inside the liver."""
    count = int(rng.integers(0, 5))
    liver = label == 1
    if count == 0 or not liver.any():
        return
    depth = ndimage.distance_transform_edt(liver)
    for _ in range(count):
        rad = rng.uniform(*radius) * rng.uniform(0.85, 1.15, label.ndim)
        hu = rng.uniform(10, 20)
        # prefer centres deep enough for the whole lesion; fall back to any liver voxel
        deep = np.flatnonzero(depth >= rad.max())
        deep = deep if deep.size else np.flatnonzero(liver)
        centre = np.unravel_index(deep[rng.integers(deep.size)], label.shape)
        reach = int(np.ceil(rad.max())) + 1
        # clipped to the image: ogrid below must match the slice of label it is compared with
        lo, hi = np.maximum(np.subtract(centre, reach), 0), np.minimum(np.add(centre, reach + 1), label.shape)
        sl = tuple(map(slice, lo, hi))
        grid = np.ogrid[sl]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, rad, strict=True)) < 1
        inside &= liver[sl]
        label[sl][inside] = ABDOMEN_LABELS["lesion"]
        image[sl][inside] = hu


def abdomen_case(
    shape: Sequence[int],
    rng: np.random.Generator,
    lesion_radius: tuple[float, float] = (2.0, 5.0),
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal CT: image (HU, float32) and labels (``ABDOMEN_LABELS``, int16).

    Args:
        shape: matrix shape, 3D (x, y, z) or 2D (one axial slice through the kidneys).
        rng: the only source of randomness; the same state gives the same case.
        lesion_radius: range of liver lesion radii, in voxels.
        spacing: voxel size in mm (default 2.0); sets the scanner blur.
    """
    shape = _check_shape(shape, len(shape))
    spacing = _check_spacing(spacing, len(shape), 2.0)
    _check_range(lesion_radius, "lesion_radius")
    coords = _coords(shape, rng)
    hu = _intensities(rng)
    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.int16)
    cavity = _body(coords, image, rng, hu)
    _bowel(coords, image, cavity, rng)
    _organs(coords, image, label, cavity, rng, hu)
    _lesions(image, label, rng, lesion_radius)
    image = ndimage.gaussian_filter(image, [_PSF_MM / s for s in spacing])
    # Mirror the bias fields across x: a lateral trend would let a small patch tell the kidneys apart.
    gain, offset = (_smooth_field(rng, shape) for _ in range(2))
    gain, offset = (gain + gain[::-1]) / 2, (offset + offset[::-1]) / 2
    image *= 1 + 0.015 * gain
    image += 4.0 * offset
    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(15, 25))
    return image.astype(np.float32, copy=False), label


def cells_case(
    shape: Sequence[int], rng: np.random.Generator, radius: tuple[float, float] = (2.0, 8.0)
) -> tuple[np.ndarray, np.ndarray]:
    """One nuclei image: values in [0, 1] (float32) and a binary label (int16).

    Args:
        shape: matrix shape, 2D or 3D.
        rng: the only source of randomness.
        radius: range of the nuclei's long semi-axis, in pixels.
    """
    shape = _check_shape(shape, len(shape))
    _check_range(radius, "radius")
    ndim = len(shape)
    image = np.zeros(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.int16)
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(rng.integers(5, 41)):
        for _try in range(20):  # rejection keeps nuclei apart enough to touch but rarely merge
            centre, r = rng.uniform(0, shape), rng.uniform(*radius)
            if all(np.linalg.norm(centre - c) >= 0.85 * (r + rc) for c, rc in placed):
                break
        else:
            continue
        placed.append((centre, r))
        semi = r * np.concatenate([[1.0], rng.uniform(0.6, 1.0, ndim - 1)])
        q, qr = np.linalg.qr(rng.standard_normal((ndim, ndim)))  # a uniformly random orientation
        rot, bright = q * np.sign(np.diag(qr)), rng.uniform(0.3, 1.0)
        sl = tuple(
            slice(max(0, int(c - r) - 1), min(n, int(c + r) + 2)) for c, n in zip(centre, shape, strict=True)
        )
        grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in sl], indexing="ij"), -1)
        local = (grid - centre) @ rot  # coordinates along the nucleus's own axes
        f = (((local / semi) ** 2).sum(-1)).astype(np.float32)
        inside = f < 1
        label[sl][inside] = 1
        image[sl] = np.maximum(image[sl], np.where(inside, bright * (1 - 0.25 * f), 0))
    light = 1 + 0.15 * _smooth_field(rng, shape)
    image = (image + 0.06 + 0.03 * _smooth_field(rng, shape)) * light
    image = ndimage.gaussian_filter(image, 0.8)
    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(0.02, 0.04))
    return np.clip(image, 0, 1).astype(np.float32, copy=False), label


def _check_shape(shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if ndim not in (2, 3):
        raise FlexPatchError(f"phantom ndim must be 2 or 3, got {ndim}")
    if len(shape) != ndim:
        raise FlexPatchError(f"phantom shape {shape} has {len(shape)} axes, expected {ndim} for ndim={ndim}")
    if min(shape) < MIN_SIZE:
        raise FlexPatchError(f"phantom shape {shape} is too small: every axis needs >= {MIN_SIZE} voxels")
    return shape


def _check_spacing(spacing: Sequence[float] | None, ndim: int, default: float) -> tuple[float, ...]:
    spacing = (default,) * ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != ndim or min(spacing) <= 0:
        raise FlexPatchError(f"phantom spacing {spacing} must hold {ndim} positive values (mm)")
    return spacing


def _check_range(bounds: Sequence[float], name: str) -> None:
    if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
        raise FlexPatchError(f"phantom {name} {tuple(bounds)} must be (low, high) with 0 < low <= high")


def _affine(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """diag(spacing) with the origin placed so that the image centre is the world origin."""
    affine = np.diag([*spacing, *(1.0,) * (4 - len(shape))])
    affine[: len(shape), 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True)]
    return affine


def _is_phantom(out: Path) -> bool:
    """Whether ``out`` holds a phantom this function wrote (its dataset.json says so)."""
    try:
        old = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and str(old.get("name", "")).startswith("phantom_") and "seed" in old


def _claim(out: Path, overwrite: bool) -> None:
    """A phantom goes into a new or empty folder, or with ``overwrite`` over an earlier phantom;
    a folder holding anything else (a real dataset) is never written into."""
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return
    named = f"{present[0]}{' ...' if len(present) > 1 else ''}"
    if not _is_phantom(out):
        raise FlexPatchError(f"{out}: folder holds {named}, not a phantom; write the phantom elsewhere")
    if not overwrite:
        raise FlexPatchError(f"{out}: holds a phantom already; --overwrite replaces it")
    _remove_stale(out)


def _remove_stale(out: Path) -> None:
    """Delete the cases of an earlier phantom in ``out`` so counts never mix two runs."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        for f in (out / sub).glob("phantom_*.nii.gz"):
            f.unlink()


def make_phantom(
    out_dir: str | Path,
    cases: int = 8,
    shape: Sequence[int] | None = None,
    ndim: int = 3,
    kind: str = "abdomen",
    seed: int = 0,
    test_cases: int | None = None,
    lesion_radius: tuple[float, float] = (2.0, 5.0),
    spacing: Sequence[float] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic nnU-Net v2 raw dataset and return its folder.

    Training case ``i`` draws from an RNG seeded by ``(seed, 0, i)`` and test
    case ``j`` from ``(seed, 1, j)``, so asking for more cases never changes the
    earlier ones. ``dataset.json`` is written last: its presence means the set is complete.

    Args:
        out_dir: dataset folder: new or empty, or holding an earlier phantom (with ``overwrite``).
        cases: training cases (``imagesTr``/``labelsTr``, ids ``phantom_000``...).
        shape: matrix shape; default 96 per axis for abdomen, 256^2 or 64^3 for cells.
        ndim: 3, or 2 (abdomen: one axial slice; cells: a 2D image).
        kind: ``"abdomen"`` (CT, 6 labels) or ``"cells"`` (nuclei, 1 label).
        seed: non-negative base seed.
        test_cases: cases in ``imagesTs``/``labelsTs`` (ids ``phantom_test_000``...);
            default ``max(2, cases // 4)``.
        lesion_radius: liver lesion radii in voxels (abdomen only).
        spacing: voxel size in mm; default 2.0 (abdomen) or 1.0 (cells).
        progress: show a progress bar.
        overwrite: replace an earlier phantom in ``out_dir`` (a folder with anything else is refused).
    """
    if kind not in KINDS:
        raise FlexPatchError(f"unknown phantom kind {kind!r}; choose one of {', '.join(KINDS)}")
    default = {"abdomen": 96, "cells": 256 if ndim == 2 else 64}[kind]
    shape = _check_shape((default,) * ndim if shape is None else shape, ndim)
    spacing = _check_spacing(spacing, ndim, 2.0 if kind == "abdomen" else 1.0)
    test_cases = max(2, cases // 4) if test_cases is None else test_cases
    if cases < 1 or test_cases < 0 or seed < 0:
        raise FlexPatchError(
            f"phantom needs cases >= 1, test_cases >= 0, seed >= 0; got {cases}, {test_cases}, {seed}"
        )
    _check_range(lesion_radius, "lesion_radius")
    out = Path(out_dir)
    check_writable(out, "dataset folder")
    _claim(out, overwrite)
    jobs = [("Tr", f"phantom_{i:03d}", (seed, 0, i)) for i in range(cases)]
    jobs += [("Ts", f"phantom_test_{j:03d}", (seed, 1, j)) for j in range(test_cases)]
    _write_cases(out, jobs, kind, shape, spacing, lesion_radius, progress)
    meta = _dataset_json(kind, shape, spacing, seed, cases, test_cases)
    write_text(out / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return out


def _write_cases(
    out: Path,
    jobs: list[tuple[str, str, tuple[int, ...]]],
    kind: str,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    lesion_radius: tuple[float, float],
    progress: bool,
) -> None:
    """Write each job, ``(split, case id, RNG key)``, to ``images{split}`` and ``labels{split}``."""
    affine = _affine(shape, spacing)
    steps: Iterable = track(jobs, f"phantom {kind} {shape}") if progress else jobs
    for split, case, key in steps:
        rng = numpy_rng(*key)
        if kind == "abdomen":
            image, label = abdomen_case(shape, rng, lesion_radius, spacing)
            image = np.round(image).astype(np.int16)  # whole HU, as scanners store CT: half the file size
        else:
            image, label = cells_case(shape, rng)
        write_image(out / f"images{split}" / f"{case}_0000.nii.gz", image, affine)
        write_image(out / f"labels{split}" / f"{case}.nii.gz", label, affine)


def _dataset_json(
    kind: str, shape: tuple[int, ...], spacing: tuple[float, ...], seed: int, cases: int, test_cases: int
) -> dict:
    """The phantom's ``dataset.json``: nnU-Net's fields, and how it was made."""
    ndim = len(shape)
    return {
        "name": f"phantom_{kind}",
        "description": f"flexpatch synthetic {kind} phantom ({ndim}D, seed {seed})",
        "channel_names": {"0": "CT" if kind == "abdomen" else "microscopy"},
        "labels": ABDOMEN_LABELS if kind == "abdomen" else CELLS_LABELS,
        # the kidneys differ only by side: no mirroring in training, and sweeps count side mix-ups
        "mirrored_pairs": [["kidney_left", "kidney_right"]] if kind == "abdomen" else [],
        "numTraining": cases,
        "numTest": test_cases,
        "file_ending": ".nii.gz",
        "ndim": ndim,
        "shape": list(shape),
        "spacing": list(spacing),
        "kind": kind,
        "seed": seed,
    }
