"""A reproducible stream of training batches, one patch size per step.

A step's size and batch size come from the size sampler: a schedule over the steps
(``StepSizeSampler``, e.g. progressive growing) decides both; any other sampler draws
the size and the batch size is the config's.

Every random choice of step ``s`` (its patch size, cases and centres) comes from a
``torch.Generator`` seeded by a hash of ``(seed, s)``. The stream is therefore a
pure function of ``(cases, sizes, config, seed)``: it is the same with any number
of loader workers, and resuming at ``start_step=k`` gives exactly batches
``k, k+1, ...`` of an uninterrupted run (what training's ``--resume`` relies on).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flexpatch.data.context import context_channels, with_context
from flexpatch.distributed import Dist
from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, extract
from flexpatch.runtime import derive_seed, generator
from flexpatch.sampling.augment import AugmentConfig, augmented_sample, skip_sample
from flexpatch.sampling.centres import CENTRE_MODES, compute_class_locations, draw_centre, fit_patch, patch_at
from flexpatch.sampling.sizes import SizeSampler, batch_for_step, size_for_step

Shape = tuple[int, ...]
PAD_MODES: tuple[str, ...] = ("border", "zeros")


@dataclass(frozen=True)
class SamplingConfig:
    """How training batches are drawn.

    Attributes:
        batch_size: patches per step (all of one size), unless the size sampler schedules its
            own per step (``StepSizeSampler.batch_at``, e.g. progressive growing).
        divisor: the network's size divisor per axis (patches are fitted to it).
        mode: centre mode (``uniform``, ``balanced``, ``per_class``; see ``draw_centre``).
        foreground_ratio: probability of a foreground centre in the label-aware modes.
        pad_mode: how ``extract`` pads image and label where a patch exceeds the image (only up to the
            divisor, see ``fit_patch``): ``border`` repeats the edge, ``zeros`` pads 0.
        max_per_class: foreground voxels kept per class for centre draws (nnU-Net's 10000).
        augment: data augmentation of each patch (None: none); see :mod:`flexpatch.sampling.augment`.
        spacing: the cases' voxel size per axis, so that rotations act in millimetres.
        ignore_label: the "don't care" label value: never a foreground centre.
        context: location context appended to each case's image (:mod:`flexpatch.data.context`);
            its channels move with the patch but get no intensity augmentation.
    """

    batch_size: int
    divisor: Shape
    mode: str = "balanced"
    foreground_ratio: float = 0.33
    pad_mode: str = "border"
    max_per_class: int = 10000
    augment: AugmentConfig | None = None
    spacing: tuple[float, ...] | None = None
    ignore_label: int | None = None
    context: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "divisor", tuple(int(d) for d in self.divisor))
        if self.batch_size < 1:
            raise FlexPatchError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.divisor or any(d < 1 for d in self.divisor):
            raise FlexPatchError(f"divisor {self.divisor} must be positive on every axis")
        if self.mode not in CENTRE_MODES:
            raise FlexPatchError(
                f"unknown centre mode {self.mode!r}; choose one of {', '.join(CENTRE_MODES)}"
            )
        if not 0.0 <= self.foreground_ratio <= 1.0:
            raise FlexPatchError(f"foreground ratio must be in [0, 1], got {self.foreground_ratio}")
        if self.pad_mode not in PAD_MODES:
            raise FlexPatchError(f"unknown pad mode {self.pad_mode!r}; choose one of {', '.join(PAD_MODES)}")


@dataclass
class _Case:
    image: torch.Tensor  # (C, *S) float32
    label: torch.Tensor  # (*S) int16, kept small; batches are widened to int64
    locations: dict[int, np.ndarray]

    @property
    def shape(self) -> Shape:
        return tuple(self.label.shape)


class PatchStream(IterableDataset):
    """Batches ``{"image", "label", "size", "step", "cases", "starts", "centres"}``.

    Cases are ``.npz`` files holding ``image`` ``(C, *S)`` float32 and ``label``
    ``(*S)`` integer arrays (the preprocessing cache). Each process (main or
    loader worker) loads them lazily and keeps the ``cache_size`` most recently
    used: memory is about ``workers x cache_size x case size``, so keep
    ``cache_size`` at least the number of cases when they fit (random case draws
    thrash a smaller cache).

    Each step takes one patch size and a batch size from the size sampler
    (:func:`size_for_step`, :func:`batch_for_step`), then draws per sample a case
    and a centre. The drawn size is fitted (``fit_patch``) to the smallest case of
    the batch so no sample is padded beyond the divisor.
    """

    def __init__(
        self,
        cases: Sequence[Path | str],
        sizes: SizeSampler,
        cfg: SamplingConfig,
        seed: int,
        start_step: int = 0,
        steps: int | None = None,
        cache_size: int = 64,
        dist: Dist = Dist(),
    ) -> None:
        """Set up the stream (no data is read here).

        Args:
            cases: ``.npz`` case files.
            sizes: the patch-size sampler.
            cfg: batch size, centre mode, divisor, padding.
            seed: the run's seed; with the step index it fixes every draw.
            start_step: index of the first batch (resume at this step).
            steps: number of batches to yield (None: endless).
            cache_size: cases kept in memory per process.
            dist: under torchrun, this process cuts only its share of each step's batch
                (:meth:`Dist.samples`); every draw is made for the whole batch, so sample ``i`` of a
                step is the same patch with any number of processes.
        """
        super().__init__()
        self.cases = [Path(c) for c in cases]
        if not self.cases:
            raise FlexPatchError("no training cases given to the patch stream")
        missing = [str(c) for c in self.cases if not c.is_file()]
        if missing:
            raise FlexPatchError(f"case file not found: {missing[0]} ({len(missing)} missing)")
        ndim = len(cfg.divisor)
        if len(sizes.max_size()) != ndim:
            raise FlexPatchError(
                f"patch size {sizes.describe()!r} is not {ndim}D like the divisor {cfg.divisor}"
            )
        if start_step < 0 or (steps is not None and steps < 0) or cache_size < 1:
            raise FlexPatchError(
                f"bad stream range: start_step={start_step}, steps={steps}, cache={cache_size}"
            )
        self.sizes, self.cfg, self.seed = sizes, cfg, int(seed)
        self.start_step, self.steps, self.cache_size = int(start_step), steps, int(cache_size)
        self.dist = dist
        self._cache: OrderedDict[int, _Case] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # Workers started by spawn get the stream pickled: send no loaded arrays.
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def _load(self, index: int) -> _Case:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        case = _read_case(
            self.cases[index],
            len(self.cfg.divisor),
            self.cfg.max_per_class,
            (self.seed, index),
            self.cfg.context,
        )
        case.locations.pop(self.cfg.ignore_label, None)  # type: ignore[arg-type]
        self._cache[index] = case
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return case

    def batch(self, step: int) -> dict[str, Any]:
        """Batch ``step`` of the stream: a pure function of the seed and ``step``."""
        g = generator("flexpatch-step", self.seed, step)
        drawn = tuple(int(s) for s in size_for_step(self.sizes, step, g))
        for s, d in zip(drawn, self.cfg.divisor, strict=True):
            if s % d:
                raise FlexPatchError(
                    f"patch size {drawn} from {self.sizes.describe()!r} not divisible by {d}"
                )
        batch_size = batch_for_step(self.sizes, step, self.cfg.batch_size)
        if batch_size < 1:
            raise FlexPatchError(
                f"batch size {batch_size} of step {step} from {self.sizes.describe()!r} is < 1"
            )
        picks = torch.randint(len(self.cases), (batch_size,), generator=g).tolist()
        cases = [self._load(i) for i in picks]
        smallest = tuple(min(axis) for axis in zip(*(c.shape for c in cases), strict=True))
        size = fit_patch(drawn, smallest, self.cfg.divisor)
        mine = self.dist.samples(batch_size)
        images, labels, starts, centres = [], [], [], []
        # augmentation draws come from a stream of their own: the cases, sizes and centres of a
        # step are the same with augmentation on or off
        ga = generator("flexpatch-augment", self.seed, step) if self.cfg.augment else None
        for i, case in enumerate(cases):
            centre = draw_centre(
                None,
                size,
                g,
                self.cfg.mode,
                self.cfg.foreground_ratio,
                class_locations=case.locations,
                image_shape=case.shape,
            )
            box = patch_at(centre, size, case.shape)
            if i not in mine:  # another process's sample: only its draws, so that ours follow
                self._skip(case, ga)
                continue
            image, label = self._cut(case, box, ga)
            images.append(image)
            labels.append(label)
            centres.append(centre)
            starts.append(box.start)
        return {
            "image": torch.cat(images),
            "label": torch.cat(labels).long(),
            "size": size,
            "drawn_size": drawn,
            "step": step,
            "global_batch": batch_size,
            "cases": [str(self.cases[picks[i]]) for i in mine],
            "starts": starts,
            "centres": centres,
        }

    def _cut(self, case: _Case, box: Patch, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(1, C, *size)`` image and ``(1, *size)`` label of one sample, augmented when ``g``."""
        pad = self.cfg.pad_mode
        if g is None or self.cfg.augment is None:
            label = extract(case.label[None], [box], padding=pad)[:, 0]
            return extract(case.image, [box], padding=pad), label
        keep = context_channels(self.cfg.context, box.ndim)  # coordinates move, keep their values
        return augmented_sample(case.image, case.label, box, self.cfg.augment, g, pad, self.cfg.spacing, keep)

    def _skip(self, case: _Case, g: torch.Generator | None) -> None:
        if g is not None and self.cfg.augment is not None:
            keep = context_channels(self.cfg.context, len(self.cfg.divisor))
            skip_sample(self.cfg.augment, g, len(self.cfg.divisor), case.image.shape[0] - keep)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # Worker w makes every workers-th step so the DataLoader's round-robin restores step order.
        first = self.start_step + worker
        steps = (
            itertools.count(first, workers)
            if self.steps is None
            else range(first, self.start_step + self.steps, workers)
        )
        for step in steps:
            yield self.batch(step)


def _read_case(path: Path, ndim: int, max_per_class: int, key: tuple[int, int], context: str) -> _Case:
    """A cached case; ``key`` (the run's seed, the case's index) seeds its foreground subsample."""
    needed = ("image", "label", "props") if context != "none" else ("image", "label")
    try:
        with np.load(path) as z:
            missing = [k for k in needed if k not in z.files]
            if missing:
                raise FlexPatchError(f"case {path} lacks array {missing[0]!r}; expected {', '.join(needed)}")
            image, label = z["image"], z["label"]
            if context != "none":
                image = with_context(image, json.loads(str(z["props"]))["resampled_affine"], context)
    except (OSError, ValueError) as err:
        raise FlexPatchError(f"cannot read case {path}: {err}") from None
    if label.ndim != ndim or image.ndim != ndim + 1 or image.shape[1:] != label.shape:
        raise FlexPatchError(
            f"case {path}: image {image.shape} and label {label.shape} must be (C, *S) and (*S), S {ndim}D"
        )
    if not np.issubdtype(label.dtype, np.integer):
        raise FlexPatchError(f"case {path}: label dtype {label.dtype} is not an integer type")
    locations = compute_class_locations(label, max_per_class, seed=derive_seed("flexpatch-case", *key))
    return _Case(
        torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(label, dtype=np.int16)),
        locations,
    )


def _keep(item: Any) -> Any:
    """The stream batches itself: pass items through untouched (tuples stay tuples)."""
    return item


def _seed_worker(worker_id: int) -> None:
    # The stream seeds its own generators; this keeps any stray numpy/random use distinct per worker.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    stream: PatchStream, workers: int = 2, pin_memory: bool = False, context: str | None = None
) -> DataLoader:
    """A DataLoader over ``stream``: batches come out in step order whatever ``workers`` is.

    Args:
        stream: the patch stream (it batches itself, so ``batch_size=None``).
        workers: loader processes; 0 runs in the calling process.
        pin_memory: pin batches for faster host-to-GPU copies.
        context: multiprocessing start method; default ``fork`` where available
            (workers start in milliseconds and share the parent's imports; they
            never touch CUDA, so forking a CUDA parent is safe), else ``spawn``.
    """
    if workers < 0:
        raise FlexPatchError(f"number of loader workers must be >= 0, got {workers}")
    kwargs: dict[str, Any] = {}
    if workers > 0:
        method = context or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        kwargs = {
            "multiprocessing_context": multiprocessing.get_context(method),
            "persistent_workers": True,
            "worker_init_fn": _seed_worker,
            "prefetch_factor": 2,
        }
    return DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, collate_fn=_keep, **kwargs
    )
