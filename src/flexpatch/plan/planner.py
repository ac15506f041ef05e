"""The largest training patch and batch, and inference window and window batch, within a memory budget.

Peaks come from a calibrated :class:`~flexpatch.plan.memory.MemoryModel`; a choice
fits when its predicted peak is at most ``(1 - headroom)`` of the budget, the headroom
covering what the estimate leaves out (allocator fragmentation, the data loader).

Sizes follow nnU-Net v2's planner: the training patch starts from a box of 256^3 voxels
(2048^2 in 2D) shaped by the inverse spacing (isotropic in millimetres), capped at the
dataset's median shape and rounded up to the network's divisor; while it does not fit
with the minimum batch, the axis with the largest patch / median ratio loses one
divisor. The batch then grows while it fits, up to 5% of the dataset's voxels per step.
An inference window starts from the whole image and shrinks the same way.

**Check by measurement.** Given a ``measure`` (the measured peak of one network call, e.g.
:meth:`~flexpatch.plan.memory.Prober.peak`), a planner measures the call at its choice and
anchors the model there (:meth:`~flexpatch.plan.memory.MemoryModel.anchored`). Where the
anchored prediction is more than 5% off, or the choice is over the budget, it plans again
with the anchored model, for at most 3 rounds; past them it only goes on while the measured
choice is over (each such round raises the scale, so it ends). What it returns has been
measured. For a window only the network call is measured: the image and the stitching
buffers are counted exactly.

What a prediction does when it runs out of memory anyway is in :mod:`flexpatch.plan.within`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from flexpatch.axes import round_down, round_up
from flexpatch.errors import FlexPatchError, format_shape
from flexpatch.infer.sliding_window import window_layout
from flexpatch.models.tokens import TokenPlan
from flexpatch.plan.memory import MemoryModel

Shape = tuple[int, ...]
Choice = TypeVar("Choice", "TrainChoice", "WindowChoice")
HEADROOM = 0.1
TOLERANCE = 0.05  # an anchored prediction this close to the model's needs no new plan
ROUNDS = 3
FLOAT = 4  # bytes of the float32 image, outputs and stitching buffers
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_budget(text: str | int, device: str | torch.device = "cpu") -> int:
    """``"8GB"`` (10^9 bytes), ``"2GiB"`` (2^30), ``"512MB"``, bytes as an int, or ``"auto"``: free now."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif str(text).strip().lower() == "auto":
        value = available_memory(device)
    else:
        match = _BUDGET.match(str(text).lower())
        if match is None or match[2] not in _UNITS:
            raise FlexPatchError(f"memory budget {text!r}: write it as 8GB, 2GiB, 512MB or auto")
        value = int(float(match[1]) * _UNITS[match[2]])
    if value <= 0:
        raise FlexPatchError(f"memory budget {text!r} must be positive")
    return value


def available_memory(device: str | torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, or the system's available RAM on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            found = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE)
        if found:
            return int(found[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def format_bytes(n: float) -> str:
    """Decimal units, as budgets are usually written (``8GB``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _to_json(choice: TrainChoice | WindowChoice) -> dict:
    d = {f.name: getattr(choice, f.name) for f in fields(choice) if f.name != "model"}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class TrainChoice:
    """A training patch and batch, with the peak bytes predicted by the given model and the budget.

    ``measured``: the measured peak of the choice where the plan was checked (else None);
    ``model``: the memory model anchored at that measurement (not in the JSON).
    """

    patch: Shape
    batch: int
    predicted: int
    budget: int
    measured: int | None = None
    model: MemoryModel | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        return _to_json(self)


@dataclass(frozen=True)
class WindowChoice:
    """A sliding window, its batch and stitch device, with the predicted peak bytes and the budget.

    ``measured``: where the plan was checked, the peak with the network call measured and
    the image and buffers counted (else None); ``model``: as :class:`TrainChoice`'s.
    """

    window: Shape
    batch: int
    stitch_device: str
    predicted: int
    budget: int
    measured: int | None = None
    model: MemoryModel | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        window = format_shape(self.window)
        return f"window {window}, {self.batch} per batch, stitching on {self.stitch_device}"

    def to_json(self) -> dict:
        return _to_json(self)


def initial_patch(median_shape: Sequence[int], spacing: Sequence[float], divisor: Sequence[int]) -> Shape:
    """nnU-Net v2's first patch: 256^3 (3D) or 2048^2 (2D) voxels, isotropic in mm, capped at the median."""
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    voxels = 256**3 if len(inverse) == 3 else 2048**2
    start = np.round(inverse * (voxels / np.prod(inverse)) ** (1 / len(inverse)))
    capped = np.minimum(start, np.asarray(median_shape, dtype=np.float64))
    return tuple(max(d, round_up(int(c), d)) for c, d in zip(capped, divisor, strict=True))


def shrink(patch: Sequence[int], reference: Sequence[int], divisor: Sequence[int]) -> Shape | None:
    """One divisor off the axis with the largest ``patch / reference`` ratio that can lose one, else None.

    A patch never gets as small as the divisor on every axis: the bottleneck would hold one
    voxel, where instance normalisation fails.
    """
    order = sorted(range(len(patch)), key=lambda a: patch[a] / reference[a], reverse=True)
    for axis in order:
        new = list(patch)
        new[axis] -= divisor[axis]
        if new[axis] >= divisor[axis] and any(n > d for n, d in zip(new, divisor, strict=True)):
            return tuple(new)
    return None


def _largest_batch(fits: Callable[[int], bool], start: int, cap: int) -> int:
    batch = start
    while batch < cap and fits(batch + 1):
        batch += 1
    return batch


def _too_small(budget: int, what: str, shape: Shape, needed: float, headroom: float) -> FlexPatchError:
    return FlexPatchError(
        f"memory budget {format_bytes(budget)} is below the smallest {what} {format_shape(shape)} "
        "with batch 1: "
        f"it needs {format_bytes(needed)} plus {headroom:.0%} headroom"
    )


def checked(
    plan: Callable[[MemoryModel], Choice],
    cost: Callable[[Choice, MemoryModel], float],
    point: Callable[[Choice], tuple[Shape, int]],
    mm: MemoryModel,
    measure: Callable[[Shape, int], int] | None,
    allowed: float,
) -> Choice:
    """``plan(mm)``, checked by measurement (module docstring) where ``measure`` is given.

    Args:
        plan: the choice a model gives (raises when nothing fits).
        cost: a choice's peak under a model (a window's: the call plus the image and buffers).
        point: the patch and batch of a choice's network call.
        mm: the calibrated model; ``predicted`` is its estimate of the returned choice.
        measure: measured peak bytes of one network call.
        allowed: the budget less the headroom.
    """
    choice = plan(mm)
    if measure is None:
        return choice
    model, seen, rounds = mm, {}, 0
    while True:
        at = point(choice)
        if at not in seen:
            seen[at] = int(measure(*at))
        anchored, rounds = model.anchored(*at, seen[at]), rounds + 1
        peak = cost(choice, anchored)
        close = abs(anchored.peak(*at) / model.peak(*at) - 1) <= TOLERANCE
        if peak <= allowed and (close or rounds >= ROUNDS):
            return replace(choice, predicted=int(cost(choice, mm)), measured=round(peak), model=anchored)
        # over the budget, the choice fitted the model: the anchored scale is higher, so this ends
        model, choice = anchored, plan(anchored)


def plan_training(
    mm: MemoryModel,
    budget: int,
    median_shape: Sequence[int],
    spacing: Sequence[float],
    divisor: Sequence[int],
    *,
    min_batch: int = 2,
    max_batch: int | None = None,
    dataset_voxels: int | None = None,
    headroom: float = HEADROOM,
    measure: Callable[[Shape, int], int] | None = None,
) -> TrainChoice:
    """The largest training patch (nnU-Net's shrinking) and then the largest batch within ``budget``.

    Args:
        mm: a ``train`` memory model of the network.
        budget: bytes.
        median_shape: the dataset's median image shape at the training spacing.
        spacing: the training spacing (mm); shapes the first patch.
        divisor: the network's size divisor.
        min_batch: the batch the patch must fit with (nnU-Net: 2); 1 when even the smallest
            patch does not fit with it.
        max_batch: the largest batch; default 5% of ``dataset_voxels`` per step (nnU-Net).
        dataset_voxels: voxels of the training set at the training spacing.
        headroom: share of the budget kept free.
        measure: measured peak bytes of one training step at a patch and batch: the plan is
            checked by measurement (:func:`checked`).
    """
    allowed = budget * (1 - headroom)

    def plan(model: MemoryModel) -> TrainChoice:
        for floor in dict.fromkeys((min_batch, 1)):
            patch: Shape | None = initial_patch(median_shape, spacing, divisor)
            while patch is not None and model.peak(patch, floor) > allowed:
                last, patch = patch, shrink(patch, median_shape, divisor)
            if patch is not None:
                break
        else:
            raise _too_small(budget, "patch", last, model.peak(last, 1), headroom)
        voxels = np.prod(patch)
        cap = max_batch or (max(floor, int(0.05 * dataset_voxels / voxels)) if dataset_voxels else 1024)
        batch = _largest_batch(lambda b: model.peak(patch, b) <= allowed, floor, max(cap, floor))
        return TrainChoice(patch, batch, int(model.peak(patch, batch)), budget)

    point = lambda c: (c.patch, c.batch)  # noqa: E731
    return checked(plan, lambda c, model: model.peak(*point(c)), point, mm, measure, allowed)


def sliding_window_peak(
    mm: MemoryModel,
    window: Sequence[int],
    batch: int,
    image_shape: Sequence[int],
    divisor: Sequence[int],
    overlap: float = 0.5,
    stitch_here: bool = True,
) -> float:
    """Predicted peak bytes on the network's device of a prediction (sliding window, then softmax).

    During the forwards: the image (and its padded copy), the network call, the previous
    batch's outputs and, when stitching here, the output buffer and the window weights
    (made after the first forward, so a single batch never has them beside its activations).
    After them: the weight sum, then the probabilities beside the blended output.
    """
    win, padded, starts = window_layout(image_shape, window, overlap, divisor)
    batch = min(batch, len(starts))
    image, pad, cw = int(np.prod(image_shape)), int(np.prod(padded)), int(np.prod(win))
    c_in, c_out = mm.in_channels, mm.out_channels
    copy = pad if pad != image else 0  # padding makes a copy of the image, and the output one of the buffer
    held = c_in * (image + copy) * FLOAT
    buffers = (c_out * (pad + (image if copy else 0)) + cw) * FLOAT if stitch_here else 0
    if len(starts) > batch:  # the buffer is made after the first forward: it sits beside the later ones
        during = held + mm.peak(win, batch) + batch * c_out * cw * FLOAT + buffers
    else:
        during = held + max(mm.peak(win, batch), mm.static + batch * (c_in + c_out) * cw * FLOAT + buffers)
    if not stitch_here:
        return during
    after = mm.static + c_in * image * FLOAT + max(c_out * pad + pad, 2 * c_out * image) * FLOAT
    return max(during, after)


def plan_window(
    mm: MemoryModel,
    budget: int,
    image_shape: Sequence[int],
    divisor: Sequence[int],
    *,
    window: Sequence[int] | None = None,
    max_window: Sequence[int] | None = None,
    overlap: float = 0.5,
    max_batch: int | None = None,
    stitch_device: str | None = None,
    headroom: float = HEADROOM,
    measure: Callable[[Shape, int], int] | None = None,
) -> WindowChoice:
    """The largest window (whole image first, then nnU-Net's shrinking) and window batch within ``budget``.

    Args:
        mm: an ``infer`` memory model of the network (its device is the network's).
        budget: bytes on the network's device.
        image_shape: the image (at the network's spacing).
        divisor: the network's size divisor.
        window: a fixed window: only the batch and stitch device are planned.
        max_window: the largest window to consider (e.g. the training patch of a fixed-size model).
        overlap: of neighbouring windows.
        max_batch: the most windows per forward (default: all of them).
        stitch_device: where to stitch; default the network's device, or the CPU when
            nothing fits that way.
        headroom: share of the budget kept free.
        measure: measured peak bytes of one network call on a batch of windows: the plan is
            checked by measurement (:func:`checked`).
    """
    allowed = budget * (1 - headroom)
    shape = tuple(int(s) for s in image_shape)
    top = tuple(window) if window else tuple(round_up(s, d) for s, d in zip(shape, divisor, strict=True))
    if max_window is not None and not window:
        top = tuple(min(t, m) for t, m in zip(top, max_window, strict=True))
    stitches = [str(torch.device(s)) for s in ([stitch_device] if stitch_device else (mm.device, "cpu"))]
    stitches = list(dict.fromkeys(stitches))

    def peak(model: MemoryModel, w: Shape, b: int, stitch: str) -> float:
        here = torch.device(stitch) == torch.device(model.device)
        return sliding_window_peak(model, w, b, shape, divisor, overlap, here)

    def plan(model: MemoryModel) -> WindowChoice:
        last: tuple[Shape, float] = (top, 0.0)
        for stitch in stitches:
            current: Shape | None = top
            while current is not None and peak(model, current, 1, stitch) > allowed:
                last = (current, peak(model, current, 1, stitch))
                current = None if window else shrink(current, shape, divisor)
            if current is not None:
                n = len(window_layout(shape, current, overlap, divisor)[2])
                fits = lambda b, w=current, s=stitch: peak(model, w, b, s) <= allowed  # noqa: E731
                batch = _largest_batch(fits, 1, min(n, max_batch or n))
                return WindowChoice(current, batch, stitch, int(peak(model, current, batch, stitch)), budget)
        raise _too_small(budget, "window", last[0], last[1], headroom)

    def point(c: WindowChoice) -> tuple[Shape, int]:  # the network's call: the window as laid out
        win, _, starts = window_layout(shape, c.window, overlap, divisor)
        return win, min(c.batch, len(starts))

    cost = lambda c, model: peak(model, c.window, c.batch, c.stitch_device)  # noqa: E731
    return checked(plan, cost, point, mm, measure, allowed)


def plan_dataset(
    dataset_dir: str | Path,
    budget: str | int,
    model: str = "unet",
    model_kwargs: dict[str, Any] | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    token_class: str | None = None,
    target_spacing: Sequence[float] | None = None,
    progress: bool = False,
    check: bool = True,
) -> dict[str, Any]:
    """The memory plan of a dataset: training patch and batch, inference window and batch (JSON-ready).

    The dataset is fingerprinted and planned as ``train`` does (target spacing, median shape);
    the model is probed on ``device``. With ``token_class``, the token size for that class
    (:func:`flexpatch.models.tokens.plan_tokens`) is planned first and, for ``unetr``, built in,
    so that the patch is a multiple of it; a UNETR's ``img_size`` becomes the planned patch.

    Args:
        dtype: ``float32``, ``bfloat16`` or ``auto`` (bfloat16 on CUDA, as training's AMP).
        check: measure a training step at the planned patch and batch, and the network's
            call at the planned window and batch, and plan again where the small probes
            were off (module docstring); the saved memory models are anchored there.
    """
    from flexpatch.data.dataset import load_dataset
    from flexpatch.data.preprocess import compute_fingerprint, make_plan, resampled_shape
    from flexpatch.models import create_model
    from flexpatch.models.tokens import plan_tokens
    from flexpatch.plan.memory import Prober, calibrate
    from flexpatch.runtime import resolve_device

    ds = load_dataset(dataset_dir)
    fingerprint = compute_fingerprint(ds, progress=progress)
    plan = make_plan(ds, fingerprint, target_spacing=target_spacing)
    dev = resolve_device(device)
    dtype = ("bfloat16" if dev.type == "cuda" else "float32") if dtype == "auto" else dtype
    kwargs = dict(model_kwargs or {})
    tokens = plan_tokens(fingerprint, token_class, plan.target_spacing) if token_class else None
    if tokens is not None and model == "unetr":
        kwargs["token_size"] = list(tokens.token_size)
    net = create_model(model, plan.ndim, plan.in_channels, plan.num_classes, **kwargs)
    limit = parse_budget(budget, dev)
    shapes = zip(fingerprint["shapes"], fingerprint["spacings"], strict=True)
    voxels = sum(int(np.prod(resampled_shape(s, sp, plan.target_spacing))) for s, sp in shapes)
    train_prober, infer_prober = Prober(net, "train", dev, dtype), Prober(net, "infer", dev)
    train_mm, infer_mm = calibrate(net, prober=train_prober), calibrate(net, prober=infer_prober)
    train = plan_training(
        train_mm, limit, plan.median_shape, plan.target_spacing, net.divisor, dataset_voxels=voxels,
        measure=train_prober.peak if check else None,
    )  # fmt: skip
    infer = plan_window(
        infer_mm, limit, plan.median_shape, net.divisor, measure=infer_prober.peak if check else None
    )
    if model == "unetr":
        kwargs["img_size"] = list(train.patch)  # the position embeddings' grid: the training patch
    return {
        "dataset": str(dataset_dir),
        "model": model,
        "model_kwargs": kwargs,
        "ndim": plan.ndim,
        "device": str(dev),
        "dtype": dtype,
        "budget_bytes": limit,
        "target_spacing": list(plan.target_spacing),
        "median_shape": list(plan.median_shape),
        "train": train.to_json(),
        "infer": {**infer.to_json(), "image_shape": list(plan.median_shape)},
        "tokens": None if tokens is None else _token_window(tokens, train.patch).to_json(),
        "memory_models": {  # anchored at the measured choices where checked
            "train": (train.model or train_mm).to_json(),
            "infer": (infer.model or infer_mm).to_json(),
        },
    }


def _token_window(tokens: TokenPlan, patch: Shape) -> TokenPlan:
    """The token plan with the window its ViT would take here: the largest multiple of the token
    within the planned patch (a UNETR's patch itself, a multiple of its token by its divisor)."""
    return replace(tokens, window=tuple(max(t, round_down(p, t)) for t, p in zip(tokens.token_size, patch)))
