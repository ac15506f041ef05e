"""One optimiser step that a non-finite loss cannot poison, shared by every trainer.

A single NaN or inf gradient, once applied, makes every weight NaN for good: the run then
trains on for thousands of steps and predicts background everywhere (the full patchwork
benchmark's 32^3 U-Net on an H100, bfloat16 autocast: an all-air patch gives every InstanceNorm
zero variance, each multiplies the gradient by about 1/sqrt(eps), and the norm overflows; clipping
by 12/inf then turns an infinite element into NaN). As PyTorch's GradScaler does for
float16, a step whose gradient norm is not finite is skipped; a run whose steps keep being
skipped has diverged and stops with an error instead of saving NaN weights.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from flexpatch.errors import FlexPatchError


def guarded_step(
    loss: torch.Tensor, opt: torch.optim.Optimizer, params: Iterable[torch.Parameter], clip: float | None
) -> bool:
    """Zero the gradients, back-propagate ``loss``, clip them to the norm ``clip`` (None: no clipping)
    and step ``opt``, unless the gradient norm is not finite. Returns whether the step was taken."""
    params = list(params)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    # the norm is needed anyway to clip; with no clipping, an infinite bound leaves gradients as they are
    norm = torch.nn.utils.clip_grad_norm_(params, math.inf if clip is None else clip)
    if not bool(torch.isfinite(norm)):
        opt.zero_grad(set_to_none=True)
        return False
    opt.step()
    return True


def advance(sched: torch.optim.lr_scheduler.LRScheduler, stepped: bool) -> None:
    """Advance the learning-rate schedule whether or not the optimiser stepped, so a run keeps its
    length. PyTorch warns when a schedule steps before its optimiser ever has, which a skipped first
    step causes without anything being wrong; only that case is silenced."""
    with warnings.catch_warnings():
        if not stepped:
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        sched.step()


@dataclass
class Divergence:
    """Counts skipped steps; ``limit`` skipped in a row means the run has diverged."""

    limit: int = 20
    run: int = 0
    total: int = 0

    def update(self, stepped: bool, step: int, where: str) -> None:
        """Record one step; raise :class:`FlexPatchError` naming ``where`` at ``limit`` skipped in a row."""
        self.run = 0 if stepped else self.run + 1
        self.total += not stepped
        if self.run >= self.limit:
            raise FlexPatchError(
                f"{where}: training diverged: the loss or its gradients were not finite for {self.run} steps "
                f"in a row (up to step {step}); lower the learning rate or turn bfloat16 autocast off"
            )
