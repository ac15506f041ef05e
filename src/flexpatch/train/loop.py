"""The training loop: patches of any size in, checkpoints and a JSONL log out.

Dice + CE loss, AdamW or SGD with poly decay, bfloat16 autocast on CUDA,
sliding-window validation every ``val_every`` steps, atomic best/last
checkpoints, and an exact ``resume`` (model, optimiser, scheduler, RNG and the
data stream, which is a pure function of (seed, step)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from flexpatch.checkpoint import BEST, LAST, load_checkpoint
from flexpatch.data.context import context_channels
from flexpatch.data.dataset import DatasetInfo, load_dataset
from flexpatch.data.io import load_json, save_json
from flexpatch.data.preprocess import (
    Plan,
    compute_fingerprint,
    make_plan,
    preprocess_dataset,
)
from flexpatch.data.sanity import warn_patch_clipped
from flexpatch.distributed import Dist, current
from flexpatch.errors import FlexPatchError
from flexpatch.methods import write_method
from flexpatch.models import check_patch_size, create_model
from flexpatch.models.registry import check_trainable
from flexpatch.runtime import (
    check_writable,
    console,
    numpy_rng,
    resolve_device,
    seed_everything,
    set_rng_state,
)
from flexpatch.sampling import PatchStream, SamplingConfig, SizeSampler, make_loader, parse_patch_spec
from flexpatch.sampling.augment import AugmentConfig, parse_augment
from flexpatch.sampling.progressive import ProgressiveSchedule
from flexpatch.sampling.sizes import FixedSize, smallest_sizes
from flexpatch.train.config import TrainConfig
from flexpatch.train.folds import split_for, write_validation
from flexpatch.train.harness import (
    Harness,
    claim_folder,
    resume_checkpoint,
    resume_settings,
    truncate_log,
)
from flexpatch.train.loss import segmentation_loss
from flexpatch.train.run import Run
from flexpatch.train.step import Divergence
from flexpatch.train.transfer import initialise, param_groups


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    best_dice: float
    last_loss: float
    seconds: float


def cache_dir_for(dataset_dir: Path, out_dir: Path) -> Path:
    """Preprocessed cases live beside the dataset (shared by models) unless that folder is read-only."""
    import os

    return dataset_dir / ".flexpatch_cache" if os.access(dataset_dir, os.W_OK) else out_dir / "cache"


def check_inputs(
    dataset_dir: Path, out_dir: Path, config: TrainConfig
) -> tuple[DatasetInfo, torch.nn.Module]:
    """Fail in seconds, before the slow preprocessing: dataset layout, model, patch sizes, output folder.

    Returns:
        The dataset (``dataset.json`` read and its files listed; no image loaded) and the
        network, initialised from ``config.seed``.
    """
    ds = load_dataset(dataset_dir)
    seed_everything(config.seed)
    net = create_model(
        config.model,
        ndim=ds.ndim,
        in_channels=len(ds.channel_names) + context_channels(config.context, ds.ndim),
        out_channels=ds.out_channels,  # one per region for region-based labels
        **config.model_kwargs,
    )
    sizes = parse_patch_spec(config.patch, ds.ndim, net.divisor, batch=config.batch, steps=config.steps)
    for size in smallest_sizes(sizes):
        check_trainable(size, net.divisor, f"size drawn by patch {config.patch!r}", config.model)
    if config.val_patch is not None:
        check_patch_size(
            config.validation_patch(ds.ndim), net.divisor, "validation patch", model=config.model
        )
    check_writable(out_dir, "model folder")
    return ds, net


def prepare(
    ds: DatasetInfo, out_dir: Path, config: TrainConfig, progress: bool, resume: bool = False
) -> tuple[Plan, list[Path]]:
    """Fingerprint, plan and preprocess the dataset; write fingerprint.json, plan.json, dataset.json.

    A resumed run reuses the saved fingerprint, so its plan cannot drift; a new run in an old
    model folder measures the dataset afresh (it may be another dataset). Under torchrun the main
    process alone does this (:func:`_follow` for the others).
    """
    fp_path = out_dir / "fingerprint.json"
    reuse = resume and fp_path.is_file()
    fingerprint = load_json(fp_path) if reuse else compute_fingerprint(ds, progress=progress)
    plan = make_plan(ds, fingerprint, target_spacing=config.target_spacing)
    cases = preprocess_dataset(ds, plan, cache_dir_for(ds.root, out_dir), progress=progress)
    save_json(fp_path, fingerprint)
    save_json(out_dir / "plan.json", plan.to_json())
    save_json(out_dir / "dataset.json", ds.to_json())
    return plan, cases


T = TypeVar("T")


def split_cases(cases: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded train/validation split, each part in the given order; a single case is used for both."""
    if len(cases) < 2:
        return list(cases), list(cases)
    order = numpy_rng(seed).permutation(len(cases))
    val = set(order[: max(1, round(fraction * len(cases)))].tolist())
    return [c for i, c in enumerate(cases) if i not in val], [c for i, c in enumerate(cases) if i in val]


def make_optimizer(
    net: torch.nn.Module, config: TrainConfig, loaded: frozenset[str] = frozenset()
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimiser (``loaded`` parameters at ``config.loaded_lr_scale`` x the rate), poly decay."""
    groups = param_groups(net, config.lr, loaded, config.loaded_lr_scale)
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=config.lr, momentum=0.99, nesterov=True, weight_decay=config.weight_decay
        )
    else:
        opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    poly = lambda step: max(1.0 - step / config.steps, 0.0) ** config.poly_power  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, poly)


LOG = "log.jsonl"  # the run's JSONL log in its model folder

# Settings a resumed run may change: workers leave the numbers alone; more steps extend the run
# (the learning-rate decay and a growing patch schedule then follow the new length from there).
RESUME_FREE = ("workers", "steps")


def resolve_config(
    out_dir: Path, config: TrainConfig | None, resume: bool, changes: dict[str, Any] | None = None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's config and, on ``resume``, the checkpoint it continues.

    On resume the config is the checkpoint's own (``config.json`` may belong to another run that
    was stopped while rewriting the folder); a given ``config``, or ``changes``, may differ from it
    only in :data:`RESUME_FREE`.
    """
    if not resume:
        return config or TrainConfig(), None
    # a failed first write of model_last.pt may leave model_best.pt alone: it cannot stand in
    hint = f" (a new run in another folder can start from its weights: --init-from {out_dir})"
    path = resume_checkpoint(out_dir / LAST, out_dir / BEST, hint)
    state = load_checkpoint(path, map_location="cpu")
    # checkpoints of older versions may lack their config: config.json is then the only record
    saved = state.get("config") or load_json(out_dir / "config.json")
    given = config.to_json() if config is not None else None
    settings = resume_settings(path, saved, given, changes, RESUME_FREE)
    try:
        resolved = TrainConfig.from_json(settings, path if state.get("config") else out_dir / "config.json")
    except (TypeError, ValueError) as e:
        raise FlexPatchError(f"{path}: its config does not fit this version ({e})") from None
    if resolved.steps < int(state.get("step", 0)):
        raise FlexPatchError(f"{path}: {state['step']} steps are done already, steps={resolved.steps}")
    return resolved, state


def _restore(
    state: dict[str, Any] | None,
    path: Path,
    net: torch.nn.Module,
    opt: Any,
    sched: Any,
    log_path: Path,
    dist: Dist = Dist(),
) -> tuple[int, float, Any, Divergence]:
    """Load a ``model_last.pt``'s state into the run and cut the log to it; returns its step, best
    Dice, this process's RNG state and skipped-step count (fresh for a checkpoint written before
    it was saved). Without a state (a new run) the log starts empty and the run at step 0."""
    if state is None:
        if dist.main:
            log_path.unlink(missing_ok=True)
        return 0, -1.0, None, Divergence()
    if dist.main:
        truncate_log(log_path, lambda record: int(record["step"]) <= int(state["step"]))
    # read on the CPU: RNG states must stay CPU tensors; weights and optimiser moments are
    # copied onto the parameters' device by load_state_dict
    try:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        divergence = Divergence(**state.get("divergence", {}))
        return int(state["step"]), float(state["best"]), rng_for(state, dist), divergence
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlexPatchError(f"{path}: does not fit this model and config ({reason})") from None


def rng_for(state: dict[str, Any], dist: Dist) -> Any:
    """This process's RNG state in a checkpoint: its own when the run had as many processes, else
    the main process's. The data stream does not depend on it (every patch is a function of the seed,
    the step and its place in the global batch), so a run resumed with another number of processes
    trains on the same batches; its numbers then equal the uninterrupted run's to rounding only."""
    ranks = state.get("rng_ranks")
    if ranks and int(state.get("world", 1)) == dist.world:
        return ranks[dist.rank]
    return state["rng"]


def augmentation(config: TrainConfig, mirrored_pairs: Sequence[Any]) -> AugmentConfig | None:
    """The run's augmentation; mirroring off where the dataset has labels that differ by side."""
    aug = parse_augment(config.augment)
    if mirrored_pairs and aug.p_mirror > 0:
        console.print(
            "[yellow]note[/] mirroring is off: the dataset declares mirrored_pairs (left/right labels)"
        )
        aug = aug.without_mirroring()
    return aug if aug != parse_augment("none") else None


def _batches(
    cases: list[Path],
    sizes: SizeSampler,
    divisor: tuple[int, ...],
    config: TrainConfig,
    span: tuple[int, int],
    dev: torch.device,
    plan: Plan,
    augment: AugmentConfig | None,
    dist: Dist = Dist(),
) -> Iterator[dict[str, Any]]:
    """Batches ``span`` = ``(start, end)`` (end excluded) of the run's stream, the same whatever
    ``config.workers``; under torchrun this process's share of each (:meth:`Dist.samples`)."""
    # progressive growing oversamples foreground at 0.5 while the patch grows (all three of its trainers)
    growing = isinstance(sizes, ProgressiveSchedule)
    sampling = SamplingConfig(
        batch_size=config.batch,
        mode=config.sampling,
        foreground_ratio=0.5 if growing else config.foreground_ratio,
        divisor=divisor,
        augment=augment,
        spacing=plan.target_spacing,
        ignore_label=plan.labels.get("ignore"),
        context=config.context,
    )
    start, end = span
    stream = PatchStream(
        cases, sizes, sampling, seed=config.seed, start_step=start, steps=end - start, dist=dist
    )
    return iter(make_loader(stream, workers=config.workers, pin_memory=dev.type == "cuda"))


def train(
    dataset_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
    changes: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a model on patches of a dataset and write a self-contained model folder; inputs are
    checked (dataset, model, patch sizes, output folder) before preprocessing, so mistakes fail fast.
    ``config.init_from`` loads matching weights from another model folder first (see
    :mod:`flexpatch.train.transfer`). Under torchrun the processes split each step's batch.

    Args:
        dataset_dir: an nnU-Net raw or MSD dataset.
        out_dir: the model folder (weights, config.json, plan.json, fingerprint.json, log.jsonl).
        config: the run's settings; on ``resume`` the checkpoint's config is used and this must be
            None or equal to it (except ``workers`` and ``steps``).
        resume: continue from ``out_dir/model_last.pt`` exactly where it stopped (with more
            ``steps``, a finished run goes on).
        device: ``auto``, ``cpu``, ``cuda`` (under torchrun: each process's own GPU).
        progress: show progress (loss, validation Dice, it/s) on stderr.
        stop_after: stop (saving ``model_last.pt``) after this many steps, as an interruption would.
        overwrite: replace an earlier run's model folder (else a non-empty ``out_dir`` is refused).
        changes: on ``resume`` without ``config``, settings of :data:`RESUME_FREE` to change.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    dist, dev = join_processes(device)
    config, saved = dist.on_main(lambda: resolve_config(out_dir, config, resume, changes))
    net, loaded, plan, cases, ds = _setup(dataset_dir, out_dir, config, (resume, overwrite, progress), dist)
    train_cases, val_cases = split_for(cases, dataset_dir, config)  # a --fold's, else val_fraction's
    sizes, val_patch = _write_folder(out_dir, config, plan, net, dist)
    opt, sched = make_optimizer(net.to(dev), config, loaded)
    start, best, rng, divergence = _restore(saved, out_dir / LAST, net, opt, sched, out_dir / LOG, dist)
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    if end < start:
        raise FlexPatchError(f"{out_dir / LAST}: stop_after {stop_after} is before its step {start}")
    harness = Harness(
        out_dir, config.steps, config.val_every, best=best, divergence=divergence, main=dist.main
    )
    run = Run(net, opt, sched, _loss(config, plan, dist), config, plan, dev, harness, stage_ends(sizes), dist)
    augment = augmentation(config, [list(p) for p in ds.mirrored_pairs])
    batches = _batches(train_cases, sizes, net.divisor, config, (start, end), dev, plan, augment, dist)
    if rng is not None:
        # only now: making the loader's iterator draws a seed from torch's RNG, which the
        # uninterrupted run did before its first step, not at this one
        set_rng_state(rng)
    on = f"{dev}" if not dist.active else f"{dist.world} processes ({dev.type})"
    what = f"{config.model} on {len(train_cases)} cases (val {len(val_cases)}), patch {sizes.describe()}"
    console.print(f"[bold]train[/] {what}, batch {config.batch}, steps {start}->{end}, device {on}")
    last_loss, seconds = run.loop(batches, start, end, val_cases, val_patch, out_dir / LOG, progress)
    run.finish(end)
    dist.barrier()  # the model folder is complete: the main process has written it
    if isinstance(config.fold, int) and end == config.steps:  # as nnU-Net: a fold's predictions
        write_validation(dataset_dir, out_dir, [p.stem for p in val_cases], device)  # each its share
    return TrainResult(out_dir, end, harness.best, last_loss, seconds)


def join_processes(device: str) -> tuple[Dist, torch.device]:
    """This process's place under torchrun (one process without it) and its device; only the main
    process speaks (progress, messages)."""
    dist = current()
    dev = dist.device(resolve_device(device))
    dist.start(dev)
    console.quiet = console.quiet or not dist.main
    return dist, dev


def _loss(config: TrainConfig, plan: Plan, dist: Dist) -> Any:
    regions = [values for _, values in plan.regions]
    return segmentation_loss(config.batch_dice, plan.labels.get("ignore"), regions, dist)


def main_then_others(
    dist: Dist, out_dir: Path, start: Callable[[], T], follow: Callable[[dict[str, Any]], T]
) -> T:
    """A trainer's set-up: ``start()`` in the main process (it claims the folder, preprocesses and
    writes the fingerprint); the others wait for the fingerprint and ``follow`` it, writing nothing."""
    started = start() if dist.main else None
    fingerprint = dist.on_main(lambda: load_json(out_dir / "fingerprint.json"))
    return started if started is not None else follow(fingerprint)


def followed_cases(
    ds: DatasetInfo, out_dir: Path, fingerprint: dict[str, Any], target_spacing: Any
) -> tuple[Plan, list[Path]]:
    """A process other than the main one: the main process's plan and the preprocessed cases (read
    from the cache, or made on a machine that does not share the main one's disk)."""
    plan = make_plan(ds, fingerprint, target_spacing=target_spacing)
    return plan, preprocess_dataset(ds, plan, cache_dir_for(ds.root, out_dir), progress=False)


def _setup(
    dataset_dir: Path, out_dir: Path, config: TrainConfig, flags: tuple[bool, bool, bool], dist: Dist
) -> tuple[torch.nn.Module, frozenset[str], Plan, list[Path], DatasetInfo]:
    """:func:`_start` in the main process, :func:`_follow` in the others."""
    resume, overwrite, progress = flags
    return main_then_others(
        dist,
        out_dir,
        lambda: _start(dataset_dir, out_dir, config, resume, overwrite, progress),
        lambda fingerprint: _follow(dataset_dir, out_dir, config, resume, fingerprint),
    )


def _follow(
    dataset_dir: Path, out_dir: Path, config: TrainConfig, resume: bool, fingerprint: dict[str, Any]
) -> tuple[torch.nn.Module, frozenset[str], Plan, list[Path], DatasetInfo]:
    """What a process other than the main one needs: the network, its --init-from weights, and
    :func:`followed_cases`."""
    ds, net = check_inputs(dataset_dir, out_dir, config)
    loaded = initialise(net, config, out_dir, resume, write=False)
    plan, cases = followed_cases(ds, out_dir, fingerprint, config.target_spacing)
    return net, loaded, plan, cases, ds


def _start(
    dataset_dir: Path, out_dir: Path, config: TrainConfig, resume: bool, overwrite: bool, progress: bool
) -> tuple[torch.nn.Module, frozenset[str], Plan, list[Path], DatasetInfo]:
    """Check the inputs, claim the folder, load --init-from weights, preprocess: the network, the
    names of the loaded weights, the plan, the preprocessed cases and the dataset."""
    ds, net = check_inputs(dataset_dir, out_dir, config)
    if overwrite and config.init_from and Path(config.init_from).resolve() == out_dir.resolve():
        raise FlexPatchError(f"{out_dir}: cannot start from the weights of the folder --overwrite replaces")
    # with the inputs checked: a mistake must not cost the folder an earlier run wrote
    claim_folder(out_dir, "model folder", resume=resume, overwrite=overwrite)
    loaded = initialise(net, config, out_dir, resume)  # before preprocessing: a bad source fails fast
    plan, cases = prepare(ds, out_dir, config, progress, resume)
    return net, loaded, plan, cases, ds


def _write_folder(
    out_dir: Path, config: TrainConfig, plan: Plan, net: torch.nn.Module, dist: Dist
) -> tuple[SizeSampler, tuple[int, ...]]:
    """config.json, model.json and method.json (the default inference window and the size kind,
    so that predicting needs no training code), by the main process; returns the patch sizes and
    validation window, after checking that every step's batch can be split across the processes."""
    sizes = parse_patch_spec(config.patch, plan.ndim, net.divisor, batch=config.batch, steps=config.steps)
    val_patch = config.validation_patch(plan.ndim) or sizes.max_size()
    growing = isinstance(sizes, ProgressiveSchedule)
    dist.samples(min(st.batch for st in sizes.stages()) if growing else config.batch)
    if dist.main:
        warn_patch_clipped(sizes, load_json(out_dir / "fingerprint.json"), plan.target_spacing, net.divisor)
        save_json(out_dir / "config.json", config.to_json())
        save_json(out_dir / "model.json", net.spec.to_json())
        fixed = isinstance(sizes, FixedSize)
        write_method(out_dir, "sliding-window", val_patch, fixed_size=fixed, largest=list(sizes.max_size()))
    return sizes, val_patch


def stage_ends(sizes: SizeSampler) -> dict[int, int]:
    """Step closing each stage of a growing patch schedule -> that stage's index."""
    if isinstance(sizes, ProgressiveSchedule) and sizes.mode != "random":
        return {st.start + st.steps: st.index for st in sizes.stages()[:-1]}
    return {}
