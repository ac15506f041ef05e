"""Test-time mirroring (nnU-Net's): the network's logits averaged over every combination of
flipped spatial axes, each flipped back, in one wrapper any method's network can be put in."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from flexpatch.errors import FlexPatchError

TTA_MODES: tuple[str, ...] = ("auto", "none", "mirror")


def flip_sets(ndim: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (default all), the empty one (no flip) first."""
    axes = tuple(range(ndim)) if axes is None else tuple(axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class Mirrored(torch.nn.Module):
    """``net`` applied to ``x`` and to each mirror image of it, flipped back and averaged (logits,
    as nnU-Net v2). It exposes the wrapped network's ``divisor`` and ``spec``, so the sliding
    window and the memory planner use it like the network; a 3D call costs 8 network calls."""

    def __init__(self, net: torch.nn.Module, ndim: int, axes: Sequence[int] | None = None) -> None:
        super().__init__()
        self.net = net
        self.flips = flip_sets(ndim, axes)
        self.divisor = getattr(net, "divisor", 1)
        self.spec = getattr(net, "spec", None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        total = torch.zeros((), device=x.device)  # broadcast to the first output's shape
        for axes in self.flips:
            dims = [2 + a for a in axes]
            y = self.net(x.flip(dims) if dims else x, *args, **kwargs)
            total = total + (y.flip(dims) if dims else y).float()
        return total / len(self.flips)


def mirroring_for(tta: str, trained_mirrored: bool, mirrored_pairs: Sequence[Any], where: str) -> bool:
    """Whether to mirror at test time: ``mirror`` always (refused for a dataset whose labels differ
    by side: a mirror image swaps them), ``none`` never, ``auto`` when the model was trained with
    mirroring (nnU-Net's default)."""
    if tta not in TTA_MODES:
        raise FlexPatchError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_MODES)}")
    if tta == "mirror" and mirrored_pairs:
        raise FlexPatchError(
            f"{where}: --tta mirror would swap left and right: the dataset declares mirrored_pairs"
        )
    return tta == "mirror" or (tta == "auto" and trained_mirrored and not mirrored_pairs)
