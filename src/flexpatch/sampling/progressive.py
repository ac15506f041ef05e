"""Progressive growing of the patch size: a curriculum from small to planned patches.

Fischer et al. (MICCAI 2024) train on the smallest patch the network accepts and grow it
in equal shares of the run to the planned size. The rules follow the authors' nnU-Net
trainers (``nnUNetTrainer_PGPS``, ``_PGPSplus``, ``_RPSS``):

- The largest size is the planned patch; the smallest is ``2**pools`` per axis (one
  bottleneck voxel), the first axis twice that (a 2x1x1 bottleneck).
- Growth adds ``2**pools`` to one axis at a time, clipped at the largest size, visiting the
  axes 1, 2, ..., 0, 1, ... (the authors' counter starts at 1) and skipping an axis that is
  already full. 128^3 with 5 pools per axis: 64x32x32, 64x64x32, 64^3, 96x64x64, 96x96x64,
  96^3, 128x96x96, 128x128x96, 128^3; the number of stages is the authors'
  ``sum(ceil((max - min) / 2**pools)) + 1``.
- Each stage gets ``steps // num_stages`` steps; the last (the largest size) also takes the
  remainder, as the authors' left-over epochs train at the largest size.
- Modes: ``resource`` (PGPS) keeps the batch size; ``performance`` (PGPS+) scales it from the
  largest size backwards, ``b_i = floor(vol_{i+1} * b_{i+1} / vol_i)`` on the already rounded
  ``b_{i+1}`` and at least ``batch`` (24, 12, 6, 4, 3, 2, 2, 2, 2 for the example with batch 2),
  so a batch never holds more voxels than one at the largest size; ``random`` (RPSS, the
  authors' ablation) draws each step's size uniformly from the same list, batch constant.

The authors use foreground oversampling 0.5 for the whole run in all three trainers
(:meth:`ProgressiveSchedule.foreground_ratio_at`). Validation and inference use the largest
size (``max_size()``). Stages are in training steps (the authors count epochs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch

from flexpatch.axes import per_axis, round_down
from flexpatch.errors import FlexPatchError, format_shape
from flexpatch.sampling.sizes import one_size, register_size_kind

Shape = tuple[int, ...]
MODES: tuple[str, ...] = ("resource", "performance", "random")
FOREGROUND_RATIO = 0.5


@dataclass(frozen=True)
class Stage:
    """One patch size of the curriculum and the steps ``start .. start + steps - 1`` it trains."""

    index: int
    patch: Shape
    batch: int
    start: int
    steps: int

    @property
    def end(self) -> int:
        """The first step after this stage."""
        return self.start + self.steps


def pools_from_divisor(divisor: Sequence[int]) -> Shape:
    """The number of 2x downsamplings per axis of a network with this size divisor (log2 of each)."""
    divs = tuple(int(d) for d in divisor)
    for d in divs:
        if d < 1 or d & (d - 1):
            raise FlexPatchError(
                f"size divisor {d} (of {divs}) is not a power of two: progressive growth steps by 2**pools"
            )
    return tuple(d.bit_length() - 1 for d in divs)


def growth_sizes(max_size: Sequence[int], pools: Sequence[int]) -> list[Shape]:
    """The curriculum's patch sizes, smallest first (see the module docstring for the rule)."""
    top = tuple(int(m) for m in max_size)
    steps = [2**p for p in pools]
    # The first axis starts one step larger (the authors' 2x1x1 bottleneck); clipped for tiny maxima.
    current = [
        min(s * (2 if axis == 0 else 1), m) for axis, (s, m) in enumerate(zip(steps, top, strict=True))
    ]
    sizes = [tuple(current)]
    axis = 1 % len(top)
    while tuple(current) != top:
        if current[axis] < top[axis]:
            current[axis] = min(current[axis] + steps[axis], top[axis])
            sizes.append(tuple(current))
        axis = (axis + 1) % len(top)
    return sizes


def performance_batches(sizes: Sequence[Sequence[int]], batch: int) -> list[int]:
    """PGPS+ batch sizes: ``batch`` at the last size, scaled by the volume ratio going backwards.

    Integer arithmetic gives the exact floor where the authors' ``int(ratio * b)`` could
    round a float such as 2.9999999 down.
    """
    volumes = [math.prod(s) for s in sizes]
    out = [int(batch)]
    for i in range(len(sizes) - 2, -1, -1):
        out.append(max(volumes[i + 1] * out[-1] // volumes[i], int(batch)))
    return out[::-1]


@dataclass(frozen=True)
class ProgressiveSchedule:
    """The growth curriculum over a run; also a size sampler (``draw``, ``max_size``, ``describe``).

    Attributes:
        max_patch: the largest (planned) patch size: the last stage, validation and inference.
        pools: 2x downsamplings of the network per axis (its divisor is ``2**pools``).
        mode: ``resource``, ``performance`` or ``random`` (see the module docstring).
        batch: the batch size at the largest patch (every stage's in resource and random mode).
        steps: training steps of the whole run.
    """

    max_patch: Shape
    pools: Shape
    mode: str
    batch: int
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_patch", tuple(int(m) for m in self.max_patch))
        object.__setattr__(self, "pools", tuple(int(p) for p in self.pools))
        _validate(self)

    @cached_property
    def _stages(self) -> tuple[Stage, ...]:
        sizes = growth_sizes(self.max_patch, self.pools)
        if self.mode == "performance":
            batches = performance_batches(sizes, self.batch)
        else:
            batches = [self.batch] * len(sizes)
        share = self.steps // len(sizes)
        return tuple(
            Stage(i, size, b, i * share, share if i < len(sizes) - 1 else self.steps - i * share)
            for i, (size, b) in enumerate(zip(sizes, batches, strict=True))
        )

    def stages(self) -> list[Stage]:
        """All stages in training order; their steps add up to ``steps``.

        In random mode the stages list the sizes drawn from; their timing is unused.
        """
        return list(self._stages)

    def stage_at(self, step: int) -> Stage:
        """The stage that trains step ``step`` (the last one for steps past the run's end)."""
        if step < 0:
            raise FlexPatchError(f"training step must be >= 0, got {step}")
        stages = self._stages
        return stages[min(step // stages[0].steps, len(stages) - 1)]

    def size_at(self, step: int, generator: torch.Generator) -> Shape:
        """The patch size of step ``step``; random mode draws it from ``generator``, the others don't."""
        if self.mode == "random":
            return self.draw(generator)
        return self.stage_at(step).patch

    def batch_at(self, step: int) -> int:
        """The batch size of step ``step``."""
        return self.stage_at(step).batch

    def foreground_ratio_at(self, step: int) -> float | None:
        """Foreground oversampling of step ``step``: 0.5 within the run, None (the default) past it.

        The authors set 0.5 for the whole run in all three trainers (nnU-Net's 0.33 gives one
        forced foreground patch in a batch of two, i.e. 0.5) and restore 0.33 only afterwards.
        """
        if step < 0:
            raise FlexPatchError(f"training step must be >= 0, got {step}")
        return FOREGROUND_RATIO if step < self.steps else None

    def draw(self, generator: torch.Generator) -> Shape:
        """A size drawn uniformly from the stages (what random mode does at every step)."""
        stages = self._stages
        return stages[int(torch.randint(len(stages), (1,), generator=generator))].patch

    def max_size(self) -> Shape:
        return self.max_patch

    def describe(self) -> str:
        """The spec; ``parse_patch_spec`` reads it back given the divisor, batch and steps."""
        return f"progressive:{self.mode}:{format_shape(self.max_patch)}"

    def to_json(self) -> dict[str, Any]:
        """The schedule and its stages as plain JSON types (for ``flexpatch schedule`` and the log)."""
        return {
            "spec": self.describe(),
            "mode": self.mode,
            "max_size": list(self.max_patch),
            "pools": list(self.pools),
            "batch": self.batch,
            "steps": self.steps,
            "foreground_ratio": FOREGROUND_RATIO,
            "stages": [{**asdict(s), "patch": list(s.patch)} for s in self._stages],
        }


def _validate(schedule: ProgressiveSchedule) -> None:
    top, pools = schedule.max_patch, schedule.pools
    if schedule.mode not in MODES:
        raise FlexPatchError(f"unknown progressive mode {schedule.mode!r}; choose one of {', '.join(MODES)}")
    if not top or len(top) != len(pools):
        raise FlexPatchError(f"largest patch {top} and pools {pools} must have the same number of axes")
    if any(p < 0 for p in pools):
        raise FlexPatchError(f"pools {pools} must be >= 0 on every axis")
    for axis, (m, p) in enumerate(zip(top, pools, strict=True)):
        step = 2**p
        if m <= 0 or m % step:
            below = round_down(m, step)
            above = below + step  # round_up(m, step) unless m is 0 (or a negative multiple)
            near = f"{below} or {above}" if below > 0 else f"{above}"
            raise FlexPatchError(
                f"largest patch {format_shape(top)}: axis {axis} size {m} is not a positive multiple of "
                f"2**{p} = {step}; nearest valid {near}"
            )
    if schedule.batch < 1:
        raise FlexPatchError(f"progressive batch size must be >= 1, got {schedule.batch}")
    count = len(growth_sizes(top, pools))
    if schedule.steps < count:
        raise FlexPatchError(
            f"progressive schedule to {format_shape(top)} has {count} stages but the run has "
            f"{schedule.steps} steps; give at least {count}"
        )


def make_schedule(
    max_size: Sequence[int],
    pools: int | Sequence[int],
    mode: str = "resource",
    batch: int = 2,
    steps: int = 1000,
) -> ProgressiveSchedule:
    """Build and validate a growth schedule.

    Args:
        max_size: the planned (largest) patch size.
        pools: downsamplings per axis, or one int for all axes (e.g. ``pools_from_divisor``).
        mode: ``resource``, ``performance`` or ``random``.
        batch: batch size at the largest patch.
        steps: training steps of the run (at least one per stage).

    Raises:
        FlexPatchError: unknown mode, axes that differ, a largest size that is not a multiple
            of ``2**pools``, a batch below 1 or fewer steps than stages.
    """
    top = tuple(int(m) for m in max_size)
    message = f"largest patch {top} and pools {pools!r} must have the same number of axes"
    per_axis_pools = per_axis(pools, len(top), "pools", message=message)
    return ProgressiveSchedule(top, per_axis_pools, str(mode), int(batch), int(steps))


def _parse(
    body: str, ndim: int, divisor: Shape, *, batch: int | None, steps: int | None
) -> ProgressiveSchedule:
    spec = f"progressive:{body}"
    mode, _, size = body.partition(":")
    if mode not in MODES:
        raise FlexPatchError(f"patch size {spec!r}: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not size:
        raise FlexPatchError(
            f"patch size {spec!r} needs the largest patch size, "
            f"e.g. progressive:{mode}:{format_shape([128] * ndim)}"
        )
    if batch is None or steps is None:
        raise FlexPatchError(
            f"patch size {spec!r} schedules the whole run: parse it with the run's batch and steps"
        )
    top = one_size(size, ndim, divisor, spec, "x")
    return make_schedule(top, pools_from_divisor(divisor), mode, batch, steps)


register_size_kind("progressive", _parse, "progressive:performance:128x128x128", needs_run=True)
