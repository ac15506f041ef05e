"""A patchwork's application batch from a memory budget (``predict --memory`` for patchworks).

While a patchwork segments an image, the device that runs it holds, besides the weights:

- the stitched sums on the output grid, for each scattered level: ``C`` float32 channels for
  softmax outputs (the coverage lives in channel 0's slot, see :class:`Stitcher`), ``C + 1``
  otherwise, and its blending window; with ``level mix`` every level has them, and a coverage
  mask (a byte a voxel) each at the end;
- the outputs of every patch of a level with children, kept for their children's crops while
  the next level runs (its own outputs fill up meanwhile);
- one batch: its image crops, its parents' outputs, the block's forward pass, the activation;
- on the CPU, the level sources too (the normalised and smoothed image): they stay on the host;
- at the end, the label map's slab-wise temporaries (``labelling_bytes``; other output types are
  made on the host from the stitched probabilities).

All but the batch are counted: each level's patch count follows from the scheme and the image
(lazy evaluation keeps a fixed number). The batch's part is measured, one batch per level (crops,
forward, activation and stitching into a scratch stitcher of the real size), with the planner's
tracker (on CUDA the allocator's peak): at batches 1 and 2, then, as it is linear in the batch, at
the largest batch that the line keeps within the budget, taken down until its measurement fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.plan.budget import format_bytes
from flexpatch.plan.memory import measure_peak, tensor_bytes
from flexpatch.runtime import is_out_of_memory

if TYPE_CHECKING:  # annotations only: the patchwork's application imports this module
    from flexpatch.patchwork.generate import Level
    from flexpatch.patchwork.scheme import Scheme

FLOAT = 4  # bytes of the float32 outputs and sums


@dataclass(frozen=True)
class BatchPlan:
    """The application batch for a budget, and the peak bytes it is predicted to reach."""

    batch: int
    predicted: int
    budget: int

    def describe(self) -> str:
        return (
            f"memory {format_bytes(self.budget)}: patchwork batch {self.batch}; "
            f"predicted peak {format_bytes(self.predicted)}"
        )


def resident_bytes(
    out_voxels: int,
    channels: int,
    stitched: Sequence[Sequence[int]],
    normalized: bool,
    mix: bool,
    sources: Sequence[torch.Tensor],
    dev: torch.device,
) -> int:
    """Bytes held for the whole application: for each stitched level (``stitched``: their
    matrices) its sums, its blending window and with level mix its coverage mask (one byte a
    voxel); on the CPU the level sources."""
    sums = len(stitched) * (channels + (0 if normalized else 1)) * out_voxels * FLOAT
    windows = sum(int(np.prod(m)) for m in stitched) * FLOAT
    masks = len(stitched) * out_voxels if mix else 0
    return sums + windows + masks + (tensor_bytes(sources) if dev.type == "cpu" else 0)


def kept_bytes(net: Any, levels: list[Level], scheme: Scheme) -> list[int]:
    """Bytes of each level's outputs when all are kept (float32, the level's channels)."""
    return [
        len(lv) * net.level_channels(k) * int(np.prod(scheme.matrix[k])) * FLOAT
        for k, lv in enumerate(levels)
    ]


def _measure_batch(run: Callable[[int, int], None], k: int, batch: int, dev: torch.device) -> float:
    """The measured peak of ``run(k, batch)`` after a warm-up run; infinite when it runs out of memory."""
    try:
        run(k, batch)  # warm-up: cuDNN plans and lazily made buffers are not the batch's
        peak = measure_peak(lambda: run(k, batch), dev)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not is_out_of_memory(e):
            raise
        peak = math.inf  # a probe that does not fit the device does not fit
    if dev.type == "cuda" and math.isinf(peak):
        torch.cuda.empty_cache()
    return peak


def plan_batch(
    run: Callable[[int, int], None],
    kept: Sequence[int],
    dev: torch.device,
    *,
    resident: int,
    budget: int,
    most: int,
    finish: int = 0,
) -> BatchPlan:
    """The largest batch up to ``most`` whose peak fits ``budget`` (module docstring).

    Args:
        run: ``run(k, batch)`` does what application does with one batch of level ``k`` (crops,
            forward, activation, stitching); its allocations are measured.
        kept: bytes of each level's outputs (:func:`kept_bytes`); the last level's are not kept.
        resident: bytes held throughout (:func:`resident_bytes`).
        finish: what the end (the label map) allocates on top of ``resident``.

    Raises:
        FlexPatchError: not even one patch at a time fits.
    """
    depth = len(kept)
    # while level k runs: its parents' outputs, and its own as they fill up
    held = [resident + (kept[k - 1] if k else 0) + (kept[k] if k < depth - 1 else 0) for k in range(depth)]
    measured: dict[tuple[int, int], float] = {}

    def batch_part(k: int, batch: int) -> float:
        if (k, batch) not in measured:
            measured[k, batch] = _measure_batch(run, k, batch, dev)
        return measured[k, batch]

    def peak(batch: int, linear: bool = False) -> float:
        """Measured at ``batch``, or (``linear``) extrapolated from batches 1 and 2."""
        if linear:
            parts = [
                batch_part(k, 1) + (batch - 1) * (batch_part(k, 2) - batch_part(k, 1)) for k in range(depth)
            ]
        else:
            parts = [batch_part(k, batch) for k in range(depth)]
        return max(resident + finish, *(h + part for h, part in zip(held, parts)))

    one = peak(1)
    if one > budget:
        raise FlexPatchError(
            f"memory budget {format_bytes(budget)} is below the patchwork's smallest need: "
            f"{format_bytes(one)} at one patch per forward pass"
        )
    # the largest batch the extrapolation allows is measured, then taken down while it does not fit;
    # so the probes themselves stay within the budget wherever the extrapolation holds
    batch = next((b for b in range(most, 1, -1) if peak(b, linear=True) <= budget), 1)
    while batch > 1 and peak(batch) > budget:
        batch -= 1
    return BatchPlan(batch, int(peak(batch)), budget)
