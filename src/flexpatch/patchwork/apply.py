"""Applying a patchwork: patches from coarse to fine, lazy evaluation, stitching, output files.

Level 0 is a covering grid (``tree``) or ``num_patches`` random patches; each further level
holds the children of the kept parents. With lazy evaluation only the
max(1, floor(N * fraction)) patches of a level with the highest attention (mean sigmoid of
their foreground logits) get children, and children per parent default to round(1/fraction),
so every level costs about the same. The chosen level's outputs (the last, or all mixed) are
scattered onto the output grid with a cos window and optional sparse suppression.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.patchwork import crop, generate
from flexpatch.patchwork.outputs import labelling_bytes
from flexpatch.patchwork.scheme import ImageFrame, Scheme, level_widths, undersampling
from flexpatch.patchwork.stitch import Stitcher, mix_levels
from flexpatch.plan.patchwork import BatchPlan, kept_bytes, plan_batch, resident_bytes
from flexpatch.runtime import is_out_of_memory, numpy_rng


@dataclass(frozen=True)
class ApplyOptions:
    """DNP's application options (what to do; what happened per case is in ``Applied.stats``).

    Attributes:
        generate: ``tree`` (covering grid, full coverage) or ``random``.
        num_patches: level-0 patches of random generation.
        branch_factor: children per kept parent in random generation (default round(1/lazy) or 1).
        lazy: fraction of patches per level that get children (None: all).
        num_chunks: repetitions of the whole process (with ``jitter``/random draws: more coverage).
        jitter: tree positions jittered by this fraction of the grid step.
        window: ``cos`` or ``cos2`` (or ``constant``); alpha: sparse suppression.
        level: ``last``, ``mix`` (finest level covering each voxel) or a level index.
        sampling_factor: output voxel size = input voxel size / sampling_factor.
        batch_size: patches per forward pass (with ``memory``: at most).
        seed: seeds random generation and jitter.
        memory: a budget in bytes on the device: the batch is the largest that fits
            (:mod:`flexpatch.plan.patchwork`), halved on an out-of-memory error.
    """

    generate: str = "tree"
    num_patches: int = 16
    branch_factor: int | None = None
    lazy: float | None = None
    num_chunks: int = 1
    jitter: float = 0.0
    window: str = "cos"
    alpha: float = 0.0
    level: str | int = "last"
    sampling_factor: float = 1.0
    batch_size: int = 16
    seed: int = 0
    memory: int | None = None

    def check(self, depth: int) -> None:
        if self.generate not in ("tree", "random"):
            raise FlexPatchError(f"generate must be tree or random, got {self.generate!r}")
        if self.lazy is not None and not 0 < self.lazy <= 1:
            raise FlexPatchError(f"lazy fraction must be in (0, 1], got {self.lazy}")
        memory = 1 if self.memory is None else self.memory
        counts = (self.num_chunks, self.num_patches, self.batch_size, self.sampling_factor, memory)
        if min(counts) <= 0:
            raise FlexPatchError(
                "num_chunks, num_patches, batch_size, sampling_factor and memory must be positive"
            )
        if self.level not in ("last", "mix") and not (
            isinstance(self.level, int) and 0 <= self.level < depth
        ):
            raise FlexPatchError(f"level must be last, mix or 0..{depth - 1}, got {self.level!r}")

    def branches(self) -> int:
        if self.branch_factor is not None:
            return self.branch_factor
        return max(1, round(1 / self.lazy)) if self.lazy else 1


def lazy_count(n: int, fraction: float | None) -> int:
    """Patches of a level that get children: max(1, floor(n * fraction)), or all."""
    return n if fraction is None else max(1, math.floor(n * fraction))


def attention(logits: torch.Tensor, categorical: bool) -> torch.Tensor:
    """Evidence of a patch for lazy evaluation: how much of it looks like a label.

    Multi-label (sigmoid) outputs: the mean sigmoid of the label logits over space and labels, as
    DNP. Softmax outputs: the mean foreground probability 1 - p(background), since softmax logits
    are only defined up to a shift and their sigmoid is no probability.
    """
    if categorical and logits.shape[1] > 1:
        return (1 - torch.softmax(logits.float(), 1)[:, 0]).flatten(1).mean(1)
    return torch.sigmoid(logits.float()).flatten(1).mean(1)


def output_grid(shape: Sequence[int], factor: float) -> tuple[tuple[int, ...], np.ndarray]:
    """The output grid's shape and its index -> input index affine (voxel centres kept aligned)."""
    n = len(shape)
    out_shape = tuple(max(1, round(s * factor)) for s in shape)
    g = np.eye(n + 1)
    g[:n, :n] = np.diag([s / o for s, o in zip(shape, out_shape)])
    g[:n, n] = [0.5 * s / o - 0.5 for s, o in zip(shape, out_shape)]
    return out_shape, g


@dataclass
class Applied:
    """Stitched result of one image."""

    values: torch.Tensor  # (C, *out_shape): probabilities, or embedding responses
    grid: np.ndarray  # output index -> input index
    stats: dict[str, Any]


def apply_image(
    net: Any,
    image: np.ndarray,
    affine: np.ndarray,
    scheme: Scheme,
    opts: ApplyOptions,
    activation: Callable[[torch.Tensor], torch.Tensor],
    categorical: bool = True,
    device: torch.device | str = "cpu",
    to_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalized: bool = False,
    plans: dict | None = None,
) -> Applied:
    """Run a patchwork over one image ``(C, *spatial)`` with world ``affine``.

    ``normalized``: ``activation`` gives channels that add up to one (softmax), which lets the
    stitchers keep one image-sized buffer fewer (see :class:`Stitcher`). ``plans``: where the
    batches planned for ``opts.memory`` are kept, by image grid and options, so that the cases of
    one shape are planned once.

    ``net`` needs ``forward_level(k, crops, parent_out, rel)``, ``num_outputs`` and ``depth``
    (a :class:`PatchworkNet`, or any stand-in, such as an identity block in the tests).
    """
    opts.check(scheme.depth)
    shape = tuple(image.shape[1:])
    geom = ImageFrame.of(shape, affine, scheme.system)
    widths = level_widths(scheme, geom)
    out_shape, grid = output_grid(shape, opts.sampling_factor)
    job = _Job(
        net, scheme, geom, widths, crop.level_sources(image, scheme, undersampling(scheme, geom, widths)),
        out_shape, np.linalg.inv(grid), activation, categorical, torch.device(device), to_logits, normalized,
        list(range(scheme.depth)) if opts.level == "mix" else [_scatter_level(opts.level, scheme.depth)],
    )  # fmt: skip
    stats: dict[str, Any] = {}
    key = None  # where the batch planned for opts.memory is kept in plans
    if opts.memory is not None:
        plans = {} if plans is None else plans
        key = (shape, np.asarray(affine).tobytes(), str(job.dev), _options_key(opts))
        plan = plans[key] = plans.get(key) or _plan(job, opts, opts.memory)
        opts = replace(opts, batch_size=plan.batch)
        stats.update(batch_size=plan.batch, predicted_peak=plan.predicted, memory_line=plan.describe())
    start = time.perf_counter()
    stitchers, counts = _apply_halving(job, opts, stats, plans, key)
    stats.update(counts, seconds=time.perf_counter() - start)
    if opts.level == "mix":
        covered = [stitchers[k].covered() for k in job.levels_out]  # before finish: normalized ones lose it
        values = mix_levels([stitchers[k].finish() for k in job.levels_out], covered)
    else:
        values = stitchers[job.levels_out[0]].finish()
    return Applied(values, grid, stats)


def _apply_halving(
    job: _Job, opts: ApplyOptions, stats: dict[str, Any], plans: dict | None, key: tuple | None
) -> tuple[dict[int, Stitcher], dict[str, Any]]:
    """:func:`_apply`; with ``opts.memory``, the batch is halved while it runs out of memory, the
    plan at ``plans[key]`` lowered with it (the next case of this grid starts there) and ``stats``
    told."""
    while True:
        try:
            return _apply(job, opts)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if opts.memory is None or not is_out_of_memory(e):
                raise
        # retried outside the except block, so that the failed attempt's tensors are gone
        if job.dev.type == "cuda":
            torch.cuda.empty_cache()
        if opts.batch_size == 1:
            raise FlexPatchError("out of memory at patchwork batch 1: nothing smaller to try")
        opts = replace(opts, batch_size=opts.batch_size // 2)
        plans[key] = replace(plans[key], batch=opts.batch_size)
        stats.update(
            batch_size=opts.batch_size, memory_line=f"out of memory; retried at batch {opts.batch_size}"
        )


def _options_key(opts: ApplyOptions) -> tuple:
    return tuple((f.name, getattr(opts, f.name)) for f in fields(opts))


@dataclass(frozen=True)
class _Job:
    """What applying a patchwork to one image needs besides the options (see :func:`apply_image`)."""

    net: Any
    scheme: Scheme
    geom: ImageFrame
    widths: list[np.ndarray]
    sources: list[torch.Tensor]  # the image each level crops from
    out_shape: tuple[int, ...]
    to_out: np.ndarray  # input index -> output grid index
    activation: Callable[[torch.Tensor], torch.Tensor]
    categorical: bool
    dev: torch.device
    to_logits: Callable[[torch.Tensor], torch.Tensor] | None
    normalized: bool
    levels_out: list[int]  # the levels scattered onto the output grid

    def stitcher(self, opts: ApplyOptions) -> Stitcher:
        return Stitcher(
            self.out_shape, self.net.num_outputs, opts.window, opts.alpha, self.scheme.scatter, self.dev,
            normalized=self.normalized,
        )  # fmt: skip


def _plan(job: _Job, opts: ApplyOptions, memory: int) -> BatchPlan:
    """The batch within ``memory`` bytes (see :mod:`flexpatch.plan.patchwork`)."""
    # the levels as application draws them, each keeping its first patches where lazy evaluation
    # would keep its best: the counts, all the plan needs, are the same
    rng, levels = numpy_rng(opts.seed), []
    for k in range(job.scheme.depth):
        keep = np.arange(lazy_count(len(levels[-1]), opts.lazy)) if levels else None
        levels.append(_draw_level(job, opts, rng, k, levels[-1] if levels else None, keep))
    voxels = int(np.prod(job.out_shape))
    mix = opts.level == "mix"
    resident = resident_bytes(
        voxels,
        job.net.num_outputs,
        [job.scheme.matrix[k] for k in job.levels_out],
        job.normalized,
        mix,
        job.sources,
        job.dev,
    )
    kept = kept_bytes(job.net, levels, job.scheme)
    scratch = job.stitcher(opts)  # adds land in it as in the real one; its sums are thrown away
    parent_outs: dict[int, torch.Tensor] = {}

    def run(k: int, batch: int) -> None:
        level, parents = levels[k], levels[k - 1] if k else None
        sl = slice(0, min(batch, len(level)))
        if parents is not None and k not in parent_outs:  # held, so counted in kept, not measured
            shape = (len(parents), job.net.level_channels(k - 1), *job.scheme.matrix[k - 1])
            parent_outs[k] = torch.zeros(shape, device=job.dev)
        with torch.no_grad():
            y = run_batch(
                job.net, k, level, sl, parents, parent_outs.get(k), job.sources[k], job.scheme, job.dev
            )
            if k in job.levels_out:
                scratch.add(job.activation(y[:, : job.net.num_outputs]), job.to_out @ level.affine[sl])

    return plan_batch(
        run, kept, job.dev, resident=resident, budget=memory, most=opts.batch_size,
        finish=labelling_bytes(job.out_shape),
    )  # fmt: skip


def _draw_level(
    job: _Job,
    opts: ApplyOptions,
    rng: np.random.Generator,
    k: int,
    parents: generate.Level | None,
    keep: np.ndarray | None,
) -> generate.Level:
    """Level ``k``'s patches: level 0's grid or random draws, else the children of ``keep``."""
    if parents is None or keep is None:
        return generate.first_level(
            job.scheme, job.geom, job.widths, opts.generate, opts.num_patches, rng, opts.jitter
        )
    return generate.next_level(
        job.scheme, job.geom, job.widths, k, parents, keep, opts.generate, opts.branches(), rng, opts.jitter
    )


def _apply(job: _Job, opts: ApplyOptions) -> tuple[dict[int, Stitcher], dict[str, Any]]:
    """Every chunk's patches, coarse to fine, into one stitcher per scattered level."""
    net, scheme = job.net, job.scheme
    stitchers = {k: job.stitcher(opts) for k in job.levels_out}
    rng = numpy_rng(opts.seed)
    counts: dict[str, Any] = {"patches": [0] * scheme.depth, "evaluated_voxels": 0}
    for _ in range(opts.num_chunks):
        parents: generate.Level | None = None
        outputs: torch.Tensor | None = None
        for k in range(scheme.depth):
            keep = _keep(outputs, opts.lazy, job.categorical, net.num_outputs, job.to_logits) if k else None
            level = _draw_level(job, opts, rng, k, parents, keep)
            sink = None
            if k in stitchers:
                stitcher = stitchers[k]

                def sink(y: torch.Tensor, affines: np.ndarray, stitcher: Stitcher = stitcher) -> None:
                    stitcher.add(job.activation(y[:, : net.num_outputs]), job.to_out @ affines)

            # the finest level's outputs go straight into the stitcher: only parents are kept
            outputs = _run_level(
                net,
                k,
                level,
                parents,
                outputs,
                job.sources[k],
                scheme,
                opts,
                job.dev,
                sink,
                k < scheme.depth - 1,
            )
            counts["patches"][k] += len(level)
            counts["evaluated_voxels"] += len(level) * int(np.prod(scheme.matrix[k]))
            parents = level
    return stitchers, counts


def _scatter_level(level: str | int, depth: int) -> int:
    return depth - 1 if level == "last" else int(level)


def _keep(
    outputs: torch.Tensor,
    lazy: float | None,
    categorical: bool,
    num_outputs: int,
    to_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Indices of the patches that get children (all, or the lazy top fraction by attention)."""
    n = len(outputs)
    if lazy is None:
        return np.arange(n)
    logits = outputs[:, :num_outputs]
    score = attention(logits if to_logits is None else to_logits(logits), categorical).cpu()
    order = torch.argsort(score, descending=True, stable=True)
    return np.sort(order[: lazy_count(n, lazy)].numpy())


@torch.no_grad()
def _run_level(
    net: Any,
    k: int,
    level: generate.Level,
    parents: generate.Level | None,
    parent_out: torch.Tensor | None,
    source: torch.Tensor,
    scheme: Scheme,
    opts: ApplyOptions,
    dev: torch.device,
    sink: Callable[[torch.Tensor, np.ndarray], None] | None = None,
    keep: bool = True,
) -> torch.Tensor | None:
    """All patches of a level in batches: each batch's logits go to ``sink`` (the stitcher) and,
    when ``keep``, are returned as ``(N, C, *m_k)`` for the children."""
    out = None
    for s in range(0, len(level), opts.batch_size):
        sl = slice(s, s + opts.batch_size)
        y = run_batch(net, k, level, sl, parents, parent_out, source, scheme, dev)
        if sink is not None:
            sink(y, level.affine[sl])
        if keep:  # filled in place: a list and a torch.cat would hold the level's outputs twice
            out = y.new_empty((len(level), *y.shape[1:])) if out is None else out
            out[sl] = y
        del y  # else it lives on through the next batch's forward pass
    return out


def run_batch(
    net: Any,
    k: int,
    level: generate.Level,
    sl: slice,
    parents: generate.Level | None,
    parent_out: torch.Tensor | None,
    source: torch.Tensor,
    scheme: Scheme,
    dev: torch.device,
) -> torch.Tensor:
    """Logits of the patches ``sl`` of level ``k``: their image crops and their parents' outputs."""
    x = crop.crop_image(source, level.affine[sl], scheme.matrix[k], scheme).to(dev)
    if parents is None or parent_out is None:
        return net.forward_level(k, x)
    pidx = level.parent[sl]
    rel = generate.relative_affines(parents.affine[pidx], level.affine[sl])
    parent = parent_out[torch.as_tensor(pidx, device=parent_out.device)]
    return net.forward_level(k, x, parent, torch.from_numpy(rel).float().to(dev))
