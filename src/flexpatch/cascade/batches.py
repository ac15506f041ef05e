"""The training batches of a segment-then-segment cascade: whole images resized to S (the rough
stage), or one jittered ground-truth object crop per image resized to S (the fine stage).

Step ``s`` of a stage is a pure function of ``(seed, stage, s)``. Under torchrun every process makes
every random draw of the step's global batch, in the same order, and resizes and augments only its
own share of the samples (:meth:`~flexpatch.distributed.Dist.samples`): sample ``i`` is the same
crop, augmented alike, whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from flexpatch.cascade.config import CascadeConfig
from flexpatch.cascade.infer import Box, boxes_from_extents, crop_resize, object_extents
from flexpatch.data.preprocess import load_preprocessed
from flexpatch.distributed import Dist
from flexpatch.geometry import Patch
from flexpatch.runtime import generator
from flexpatch.sampling.augment import AugmentConfig, augmented_sample, skip_sample

CACHE_BYTES = 4 * 2**30  # preprocessed cases kept in memory; the rest are read again when drawn

# ``sample(cases, S, case of each sample of the global batch, this process's samples, generator)``
Sampler = Callable[["Cases", int, list[int], range, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class Cases:
    """Preprocessed cases as tensors, with their ground-truth object extents computed once."""

    def __init__(self, paths: list[Path], per_class: bool) -> None:
        self.paths, self.per_class = paths, per_class
        self.extents: dict[int, list] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.resized: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the rough stage's inputs
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i in self._kept:
            return self._kept[i]
        image, label, _ = load_preprocessed(self.paths[i])
        case = torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))
        if i not in self.extents:
            self.extents[i], self.shapes[i] = object_extents(label, self.per_class), tuple(label.shape)
        if self._bytes + image.nbytes + label.nbytes <= CACHE_BYTES:
            self._kept[i] = case
            self._bytes += image.nbytes + label.nbytes
        return case

    def objects(self, i: int) -> tuple[list, tuple[int, ...]]:
        """Case ``i``'s object extents and spatial shape (read once: another process's sample of a
        batch needs them for its draws, not its voxels)."""
        if i not in self.extents:
            self[i]
        return self.extents[i], self.shapes[i]


def rough_sample(
    cases: Cases, size: int, idx: list[int], mine: range, _: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole images resized to S (labels by nearest neighbour), each resized once."""
    ours = [idx[i] for i in mine]
    for i in set(ours) - cases.resized.keys():
        image, label = cases[i]
        box = [Box.whole(image.shape[1:])]
        cases.resized[i] = (
            crop_resize(image, box, size, "linear")[0],
            crop_resize(label[None], box, size, "nearest")[0],
        )
    return torch.stack([cases.resized[i][0] for i in ours]), torch.stack([cases.resized[i][1] for i in ours])


def fine_sampler(config: CascadeConfig) -> Sampler:
    def sample(
        cases: Cases, size: int, idx: list[int], mine: range, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One random jittered ground-truth object crop per image (the whole image when it has none)."""
        xs, ys = [], []
        for n, i in enumerate(idx):
            extents, spatial = cases.objects(i)
            boxes = boxes_from_extents(
                extents, spatial, size, config.jitter, g, config.min_side, config.oversize
            )
            box = boxes[int(torch.randint(len(boxes), (1,), generator=g))][1] if boxes else Box.whole(spatial)
            if n not in mine:  # another process's sample: only its draws, so that ours follow
                continue
            image, label = cases[i]
            xs.append(crop_resize(image, [box], size, "linear")[0])
            ys.append(crop_resize(label[None], [box], size, "nearest")[0])
        return torch.stack(xs), torch.stack(ys)

    return sample


def step_batch(
    stage: str,
    step: int,
    cases: Cases,
    sample: Sampler,
    config: CascadeConfig,
    aug: AugmentConfig | None,
    dist: Dist = Dist(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the global batch of ``step``: inputs ``(b, C, *S)``, labels ``(b, 1, *S)``."""
    batch = config.stage(stage).batch
    g = generator("flexpatch-sts", stage, config.train.seed, step)
    idx = torch.randint(len(cases), (batch,), generator=g).tolist()
    mine = dist.samples(batch)
    x, y = sample(cases, config.input_size, idx, mine, g)
    if aug is not None:
        ga = generator("flexpatch-sts-augment", stage, config.train.seed, step)
        x, y = augmented(x, y, aug, ga, [n in mine for n in range(batch)])
    return x, y


def augmented(
    x: torch.Tensor, y: torch.Tensor, aug: AugmentConfig, g: torch.Generator, ours: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(b, C, *S)`` and labels ``(b, 1, *S)``, each augmented as a patch of itself (the core
    trainer's set and draws): the network sees the image resized to S, so the augmented field is
    that S-cube, its edges repeated. ``ours`` says which samples of the global batch are these
    ``b``; the others' draws are made and skipped."""
    box = Patch.box((0,) * (x.ndim - 2), tuple(x.shape[2:]))
    pairs, k = [], 0
    for mine in ours:
        if not mine:
            skip_sample(aug, g, x.ndim - 2, x.shape[1])
            continue
        pairs.append(augmented_sample(x[k], y[k, 0], box, aug, g))
        k += 1
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])[:, None]
