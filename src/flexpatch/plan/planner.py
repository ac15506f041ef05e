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

What a prediction does when it runs out of memory anyway is in :mod:`flexpatch.infer.within`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

import numpy as np
import torch

from flexpatch.axes import round_up
from flexpatch.errors import FlexPatchError, format_shape
from flexpatch.geometry import slab_axis, window_layout
from flexpatch.plan.budget import format_bytes
from flexpatch.plan.memory import MemoryModel

Shape = tuple[int, ...]
Choice = TypeVar("Choice", "TrainChoice", "WindowChoice")
HEADROOM = 0.1
TOLERANCE = 0.05  # an anchored prediction this close to the model's needs no new plan
ROUNDS = 3
FLOAT = 4  # bytes of the float32 image, outputs and stitching buffers


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
    """Predicted peak bytes on the network's device of a streamed prediction
    (:func:`~flexpatch.infer.sliding_window.sliding_window_slabs`).

    The image (and its padded copy), the network call, the previous batch's outputs and, when
    stitching here, the band one window deep along the slab axis with its two coverage maps
    and the window weights (all made after the first forward, so a single batch never has them
    beside its activations). Finished slabs are activated in the band itself.
    """
    win, padded, starts = window_layout(image_shape, window, overlap, divisor)
    batch = min(batch, len(starts))
    image, pad, cw = int(np.prod(image_shape)), int(np.prod(padded)), int(np.prod(win))
    axis = slab_axis(image_shape, window, overlap, divisor)
    band = pad // padded[axis] * win[axis]
    c_in, c_out = mm.in_channels, mm.out_channels
    copy = pad if pad != image else 0  # padding makes a copy of the image
    held = c_in * (image + copy) * FLOAT
    buffers = ((c_out + 2) * band + cw) * FLOAT if stitch_here else 0
    if len(starts) > batch:  # the band is made after the first forward: it sits beside the later ones
        return held + mm.peak(win, batch) + batch * c_out * cw * FLOAT + buffers
    return held + max(mm.peak(win, batch), mm.static + batch * (c_in + c_out) * cw * FLOAT + buffers)


def _largest_window(
    shape: Shape, divisor: Sequence[int], window: Sequence[int] | None, max_window: Sequence[int] | None
) -> Shape:
    """The window a plan starts from: ``window`` if fixed, else the image rounded up to the divisor,
    capped at ``max_window``."""
    if window:
        return tuple(window)
    top = tuple(round_up(s, d) for s, d in zip(shape, divisor, strict=True))
    if max_window is not None:
        top = tuple(min(t, m) for t, m in zip(top, max_window, strict=True))
    return top


def _stitch_devices(stitch_device: str | None, net_device: str | torch.device) -> list[str]:
    """The stitch devices to try, in order: the one given, else the network's and then the CPU."""
    stitches = [str(torch.device(s)) for s in ([stitch_device] if stitch_device else (net_device, "cpu"))]
    return list(dict.fromkeys(stitches))


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
    top = _largest_window(shape, divisor, window, max_window)
    stitches = _stitch_devices(stitch_device, mm.device)

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
