"""Patch sets for training: each image's per-level sources, chains drawn per round, worker processes.

A round's patch set is a pure function of (seed, round, case), so it is the same whether it is
cropped inline or in worker processes while the previous round trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch

from flexpatch.data.dataset import DatasetInfo, load_case
from flexpatch.errors import FlexPatchError
from flexpatch.patchwork import crop, generate
from flexpatch.patchwork.config import PatchworkConfig
from flexpatch.patchwork.scheme import ImageFrame, Scheme, level_widths, undersampling
from flexpatch.runtime import generator, numpy_rng
from flexpatch.sampling.augment import apply_intensity, draw_intensity, parse_augment

IGNORE = -1  # "don't care" inside the trainer, whatever value the dataset uses for it


@dataclass
class CaseState:
    """One training image ready for cropping: per-level sources, labels, sampler."""

    geom: ImageFrame
    widths: list[np.ndarray]
    sources: list[torch.Tensor]
    label: torch.Tensor
    sampler: generate.CentreSampler


def label_table(ds: DatasetInfo, config: PatchworkConfig) -> tuple[list[int], int | None]:
    """The label values learnt (channel order) and the "don't care" value, if any.

    Default: every declared label but background; a label named ``ignore`` (nnU-Net's
    convention) is the don't-care value unless ``config.dontcare`` names another.
    """
    ignore = config.dontcare if config.dontcare is not None else ds.labels.get("ignore")
    values = config.labels or sorted(v for k, v in ds.labels.items() if v != 0 and k != "ignore")
    if not values:
        raise FlexPatchError(f"{ds.root / 'dataset.json'}: no foreground labels to learn")
    return [int(v) for v in values], ignore


def remap_labels(label: np.ndarray, values: Sequence[int], ignore: int | None) -> np.ndarray:
    """Label values -> channel indices 1..K (others 0); the don't-care value -> -1."""
    out = np.zeros(label.shape, dtype=np.int64)
    for i, v in enumerate(values, start=1):
        out[label == v] = i
    if ignore is not None:
        out[label == ignore] = IGNORE
    return out


def load_state(
    case: Any, ndim: int, scheme: Scheme, config: PatchworkConfig, values: list[int], ignore: int | None
) -> CaseState:
    image, label = load_case(case, ndim)
    if label is None:
        raise FlexPatchError(f"{case.images[0]}: a training case without a label map")
    geom = ImageFrame.of(image.spatial_shape, image.affine, scheme.system)
    widths = level_widths(scheme, geom)
    sources = crop.level_sources(image.data, scheme, undersampling(scheme, geom, widths))
    lab = remap_labels(label.data, values, ignore)
    sampler = generate.CentreSampler(
        geom, np.clip(lab, 0, None), config.ratio, config.label_weight, config.autoweight
    )
    return CaseState(geom, widths, sources, torch.from_numpy(lab), sampler)


def draw_case(
    state: CaseState, scheme: Scheme, config: PatchworkConfig, round_idx: int, case_idx: int
) -> dict[str, torch.Tensor]:
    """One image's patch set for a round: crops, labels and parent affines per level."""
    rng = numpy_rng(config.seed, round_idx, case_idx)
    levels = generate.draw_chains(
        scheme, state.geom, state.widths, config.num_patches, rng, state.sampler, config.augment()
    )
    out: dict[str, torch.Tensor] = {}
    for k, level in enumerate(levels):
        m = scheme.matrix[k]
        out[f"x{k}"] = crop.crop_image(state.sources[k], level.affine, m, scheme)
        out[f"y{k}"] = crop.crop_label(state.label, level.affine, m)
        if k:
            rel = generate.relative_affines(levels[k - 1].affine[level.parent], level.affine)
            out[f"rel{k}"] = torch.from_numpy(rel).float()
    return out


def with_intensity(
    part: dict[str, torch.Tensor], config: PatchworkConfig, round_idx: int, case_idx: int
) -> dict[str, torch.Tensor]:
    """One image's patch set with its crops (``x0``, ``x1``, ...) intensity-augmented. Run in the
    parent, not in the forked croppers: torch's convolutions in a child forked from a process
    whose OpenMP pool is running can hang (seen in the suite)."""
    g = generator("flexpatch-patchwork-intensity", config.seed, round_idx, case_idx)
    return {k: _intensity(v, config, g) if k.startswith("x") else v for k, v in part.items()}


def _intensity(crops: torch.Tensor, config: PatchworkConfig, g: torch.Generator) -> torch.Tensor:
    """Each crop ``(C, *m)`` of ``crops`` with the core trainer's intensity augmentation (draws
    from ``g``, a function of (seed, round, case), so a resumed run draws the same)."""
    aug = parse_augment(config.intensity)
    if not any((aug.p_noise, aug.p_blur, aug.p_brightness, aug.p_contrast, aug.p_lowres, aug.p_gamma)):
        return crops
    return torch.stack([apply_intensity(c, draw_intensity(aug, g, c.shape[0])) for c in crops])


@dataclass
class RoundJob:
    """What drawing a round needs: every image's state, the scheme and the config."""

    states: list[CaseState]
    scheme: Scheme
    config: PatchworkConfig

    def draw(self, round_idx: int, case_idx: int) -> dict[str, torch.Tensor]:
        return draw_case(self.states[case_idx], self.scheme, self.config, round_idx, case_idx)


# Worker processes get the job by fork (copy-on-write), not by pickling 256^3 volumes.
_JOB: RoundJob | None = None


def _draw_in_worker(round_idx: int, case_idx: int) -> dict[str, torch.Tensor]:
    if _JOB is None:
        raise RuntimeError("patchwork worker started without a round job")
    return _JOB.draw(round_idx, case_idx)


def _worker_init() -> None:
    # A forked child must not enter the OpenMP pool its parent already started (it would hang in
    # libgomp); one thread per worker is also what torch's DataLoader workers use.
    torch.set_num_threads(1)


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class RoundSource:
    """Patch sets per round, drawn ahead by ``workers`` processes (one task per image), or inline.

    The next round is cropped while the current one trains; images are concatenated in case
    order, so the set is the same whatever the number of workers.
    """

    def __init__(self, job: RoundJob, workers: int) -> None:
        global _JOB
        _JOB = job  # set before the pool forks its workers (lazily, at the first submit)
        self.job = job
        self.pool = (
            ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork"), initializer=_worker_init)
            if workers > 0
            else None
        )
        self.pending: dict[int, list[Future]] = {}

    def prefetch(self, round_idx: int) -> None:
        if self.pool is not None and round_idx not in self.pending:
            cases = range(len(self.job.states))
            self.pending[round_idx] = [self.pool.submit(_draw_in_worker, round_idx, i) for i in cases]

    def get(self, round_idx: int) -> dict[str, torch.Tensor]:
        if self.pool is None:
            parts = [self.job.draw(round_idx, i) for i in range(len(self.job.states))]
        else:
            self.prefetch(round_idx)
            parts = [f.result() for f in self.pending.pop(round_idx)]
        config = self.job.config
        return _concat([with_intensity(part, config, round_idx, i) for i, part in enumerate(parts)])

    def close(self) -> None:
        global _JOB
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        _JOB = None
