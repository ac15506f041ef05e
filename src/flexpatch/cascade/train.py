"""Training segment-then-segment: a rough network on whole images resized to S, then a
fine network on ground-truth object crops resized to S.

A cascade folder holds ``cascade.json`` (written last: its presence marks a complete run), the
dataset's ``plan.json`` / ``fingerprint.json``, one ``log.jsonl`` and two ordinary model folders,
``rough/`` and ``fine/``, each loadable by ``load_model``. Every random draw (cases, crops,
jitter) comes from a generator seeded by ``(seed, stage, step)``, so a run is a pure function
of its config.

Under torchrun the processes split each step's global batch (:mod:`flexpatch.cascade.batches`)
and train through DistributedDataParallel on the loss of the whole batch, split the validation
cases, and the main process alone writes: a run on N processes is the one-process run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexpatch.cascade.batches import Cases, Sampler, fine_sampler, rough_sample, step_batch
from flexpatch.cascade.config import CascadeConfig, check_unused
from flexpatch.cascade.infer import CASCADE_FILE, rough_probabilities, segment
from flexpatch.checkpoint import BEST, LAST, load_checkpoint
from flexpatch.data.dataset import DatasetInfo, load_dataset, refuse_regions
from flexpatch.data.io import save_json
from flexpatch.data.preprocess import Plan
from flexpatch.distributed import Dist
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.metrics import dice_torch
from flexpatch.methods import write_method
from flexpatch.models import build, check_patch_size, create_model
from flexpatch.runtime import check_writable, console, rng_state, seed_everything, set_rng_state
from flexpatch.sampling.augment import AugmentConfig
from flexpatch.train.config import TrainConfig
from flexpatch.train.folds import split_for, write_validation
from flexpatch.train.harness import (
    Harness,
    claim_folder,
    resume_checkpoint,
    resume_settings,
    training_log,
    truncate_log,
)
from flexpatch.train.loop import (
    augmentation,
    followed_cases,
    join_processes,
    main_then_others,
    make_optimizer,
    prepare,
    rng_for,
)
from flexpatch.train.loss import segmentation_loss
from flexpatch.train.step import Divergence, advance, guarded_step

STAGES = ("rough", "fine")
LOG = "log.jsonl"


@torch.no_grad()
def validate_cascade(
    rough: torch.nn.Module,
    fine: torch.nn.Module | None,
    cases: Cases,
    config: CascadeConfig,
    num_classes: int,
    device: torch.device,
    dist: Dist = Dist(),
) -> tuple[dict[str, float], float]:
    """Foreground Dice on the preprocessed grid, of the rough model alone when ``fine`` is None:
    per class (its mean over the cases, for the log and the curves) and over all. Under torchrun
    each process segments its share of the cases and every process gets the scores of all."""
    nets = [n for n in (rough, fine) if n is not None]
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    scores = []
    for i in dist.split(range(len(cases))):
        image, label = cases[i]
        if fine is None:
            pred = rough_probabilities(rough, image.to(device), config.input_size, device).argmax(0)
        else:
            pred = segment(
                rough, fine, image, config.input_size, fuse=config.fuse, device=device, **config.rules()
            ).labels
        onehot = lambda x: torch.nn.functional.one_hot(x.cpu()[None], num_classes).movedim(-1, 1)  # noqa: E731
        scores.append(dice_torch(onehot(pred), onehot(label))[0, 1:])
    for n, mode in zip(nets, modes, strict=True):
        n.train(mode)
    table = torch.stack(dist.gather(scores)).float()  # (cases, classes), in the cases' order
    per_class = {str(c + 1): float(v) for c, v in enumerate(torch.nanmean(table, dim=0))}
    return per_class, float(torch.nanmean(table))


@dataclass
class _Stage:
    """Where one stage of a run stands: its step and last loss (its best Dice and skipped steps are
    its harness's)."""

    step: int
    loss: float
    harness: Harness

    @property
    def best(self) -> float:
        return self.harness.best


@dataclass(frozen=True)
class _Context:
    """What both stages of a run share: settings, device, folder and this process's place."""

    config: CascadeConfig
    dev: torch.device
    out_dir: Path
    progress: bool
    dist: Dist
    ignore: int | None  # the plan's "don't care" label
    aug: AugmentConfig | None


def _stage_state(
    net: torch.nn.Module, opt: Any, sched: Any, at: _Stage, config: CascadeConfig, dist: Dist
) -> dict[str, Any]:
    """Everything a resumed stage needs, and the run's config (a resume compares it, not a file);
    under torchrun every process's RNG state (gathered: all processes call this together)."""
    ranks = {"rng_ranks": dist.gather([rng_state()]), "world": dist.world} if dist.active else {}
    return {
        "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "step": at.step, "val_mean": at.best, "loss": at.loss, "rng": rng_state(),
        "divergence": dataclasses.asdict(at.harness.divergence), "cascade": config.to_json(), **ranks,
    }  # fmt: skip


def _start_stage(
    saved: dict[str, Any] | None,
    folder: Path,
    tc: TrainConfig,
    net: torch.nn.Module,
    opt: Any,
    sched: Any,
    dist: Dist,
) -> _Stage:
    """A stage from its start, or from ``saved`` (its last checkpoint) when resumed."""
    harness = Harness(folder, tc.steps, tc.val_every, main=dist.main)
    if saved is None:
        return _Stage(0, float("nan"), harness)
    try:
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        set_rng_state(rng_for(saved, dist))
        harness.best, harness.divergence = float(saved["val_mean"]), Divergence(**saved["divergence"])
        return _Stage(int(saved["step"]), float(saved["loss"]), harness)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlexPatchError(f"{folder / LAST}: does not fit this cascade ({reason})") from None


def _train_stage(
    stage: str,
    net: torch.nn.Module,
    cases: Cases,
    sample: Sampler,
    validate: Callable[[torch.nn.Module], tuple[dict[str, float], float]],
    ctx: _Context,
    saved: dict[str, Any] | None = None,
    end: int | None = None,
) -> _Stage:
    """Train one stage into ``out_dir/stage/model_{best,last}.pt``, from ``saved`` (a resumed
    stage's last checkpoint) on, up to step ``end`` (default: the stage's steps)."""
    tc, config, dev, dist = ctx.config.stage(stage), ctx.config, ctx.dev, ctx.dist
    net.to(dev).train()
    opt, sched = make_optimizer(net, tc)
    loss_fn, amp = segmentation_loss(False, ctx.ignore, (), dist), tc.amp and dev.type == "cuda"
    at = _start_stage(saved, ctx.out_dir / stage, tc, net, opt, sched, dist)
    model = ctx.dist.wrap(net, ctx.dev)
    h, end = at.harness, tc.steps if end is None else min(end, tc.steps)
    log_to = training_log(ctx.out_dir / LOG) if dist.main else nullcontext(lambda record: None)
    with h.progress(stage, at.step, ctx.progress and dist.main) as update, log_to as log:
        for step in range(at.step + 1, end + 1):
            x, y = step_batch(stage, step, cases, sample, config, ctx.aug, dist)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                loss_t = loss_fn(model(x.to(dev)), y.to(dev))
            stepped = guarded_step(loss_t, opt, net.parameters(), None)  # the paper trains unclipped
            advance(sched, stepped)
            at.step, at.loss = step, float(loss_t.detach())
            record = {"stage": stage, "step": step, "loss": at.loss, "lr": sched.get_last_lr()[0]}
            h.taken(step, stepped, record)
            if h.validation_due(step):
                per_class, dice = validate(net)
                record.update(val_dice=per_class, val_mean=dice)
                h.keep_if_best(dice, lambda: {"model": net.state_dict(), "step": step, "val_mean": dice})  # noqa: B023
                h.save_last(_stage_state(net, opt, sched, at, config, dist))
            log(record)
            update(step, f"loss {at.loss:.3f}  val Dice {at.best:.3f}")
    # stopped early: where to go on from (one decision for all: the state gathers from every process)
    if dist.broadcast(at.step < tc.steps or not (h.folder / LAST).is_file()):
        h.save_last(_stage_state(net, opt, sched, at, config, dist))
    return at


def _check(ds: DatasetInfo, out_dir: Path, config: CascadeConfig) -> torch.nn.Module:
    """Fail in seconds, before preprocessing: model, input size, output folder. Returns the rough net."""
    refuse_regions(ds, "segment-then-segment")
    seed_everything(config.train.seed)
    net = create_model(
        config.train.model,
        ndim=ds.ndim,
        in_channels=len(ds.channel_names),
        out_channels=ds.num_classes,
        **config.train.model_kwargs,
    )
    check_patch_size((config.input_size,) * ds.ndim, net.divisor, "input size", model=config.train.model)
    check_writable(out_dir, "model folder")
    return net


def _stage_folder(folder: Path, net: torch.nn.Module, out_dir: Path, tc: TrainConfig, resumed: bool) -> None:
    """An ordinary model folder (model.json, plan.json, config.json) beside the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in () if resumed else (BEST, LAST):  # an earlier run's weights must not stand in
        (folder / name).unlink(missing_ok=True)
    save_json(folder / "model.json", net.spec.to_json())
    save_json(folder / "config.json", tc.to_json())
    (folder / "plan.json").write_text((out_dir / "plan.json").read_text())


def train_cascade(
    dataset_dir: str | Path,
    out_dir: str | Path,
    config: CascadeConfig | None = None,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the rough and the fine network of a segment-then-segment cascade (under torchrun on
    every process, each its share of every step's batch; see the module docstring).

    Args:
        dataset_dir: an nnU-Net raw or MSD dataset.
        out_dir: the cascade folder (see the module docstring); ``predict_cascade_files`` reads it.
        config: the run's settings (on ``resume``: None, or equal to the checkpoint's).
        device: ``auto``, ``cpu``, ``cuda`` (under torchrun: each process's own GPU).
        progress: show progress bars on stderr.
        overwrite: replace the cascade folder of an earlier run (a non-empty ``out_dir`` is refused
            otherwise).
        resume: continue the run in ``out_dir`` exactly where it stopped (each stage keeps
            ``model_last.pt`` at every validation; draws are a function of (seed, stage, step)).
        stop_after: stop (saving where the run stands) after this many steps of both stages
            together, as an interruption would.

    Returns:
        ``model_dir``, ``steps`` (both stages), ``best_val_dice`` (the cascade),
        ``baseline_val_dice`` (the rough model alone), ``last_loss`` (fine stage) and ``seconds``.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    dist, dev = join_processes(device)
    config, saved = dist.on_main(lambda: _resolve(out_dir, config, resume))
    dist.samples(config.train.batch)  # a batch the processes cannot split fails before preprocessing
    t0 = time.perf_counter()
    rough, plan, paths, ds = _setup(dataset_dir, out_dir, config, saved, (resume, overwrite, progress), dist)
    aug = augmentation(config.train, [list(p) for p in ds.mirrored_pairs])
    ctx = _Context(config, dev, out_dir, progress, dist, plan.labels.get("ignore"), aug)
    split = split_for(paths, dataset_dir, config.train)  # a --fold's, else val_fraction's
    result = _run_stages(ctx, rough, plan, split, saved, stop_after, t0)
    dist.barrier()  # the cascade folder is complete: the main process has written it
    complete = dist.broadcast((out_dir / CASCADE_FILE).is_file())  # the main process's disk decides
    if isinstance(config.train.fold, int) and complete:  # as nnU-Net: a fold's validation predictions
        write_validation(dataset_dir, out_dir, [p.stem for p in split[1]], device)
    return result


def _run_stages(
    ctx: _Context,
    rough: torch.nn.Module,
    plan: Plan,
    split: tuple[list[Path], list[Path]],
    saved: dict[str, dict[str, Any]],
    stop_after: int | None,
    t0: float,
) -> dict[str, Any]:
    """The rough stage, then (unless stopped before) the fine one, on the (training, validation)
    cases of ``split``; the summary of the run."""
    config, out_dir, dist, k = ctx.config, ctx.out_dir, ctx.dist, plan.num_classes
    train_paths, val_paths = split
    train_cases, val_cases = Cases(train_paths, config.per_class), Cases(val_paths, config.per_class)
    on = f"{ctx.dev}" if not dist.active else f"{dist.world} processes ({ctx.dev.type})"
    console.print(
        f"[bold]segment-then-segment[/] {config.train.model} at S={config.input_size} on "
        f"{len(train_paths)} cases (val {len(val_paths)}), batch {config.train.batch}, {on}"
    )
    if dist.main:
        _stage_folder(out_dir / "rough", rough, out_dir, config.stage("rough"), "rough" in saved)
    validate = lambda net: validate_cascade(net, None, val_cases, config, k, ctx.dev, dist)  # noqa: E731
    base = _train_stage(
        "rough", rough, train_cases, rough_sample, validate, ctx, saved.get("rough"), stop_after
    )
    if base.step < config.train.steps:
        return _summary(out_dir, base.step, float("nan"), base, t0)
    best = dist.on_main(lambda: load_checkpoint(out_dir / "rough" / BEST, map_location="cpu")["model"])
    fine = _fine_net(rough, config, best)
    if dist.main:
        _stage_folder(out_dir / "fine", fine, out_dir, config.stage("fine"), "fine" in saved)
    validate = lambda net: validate_cascade(rough, net, val_cases, config, k, ctx.dev, dist)  # noqa: E731
    left = None if stop_after is None else stop_after - config.train.steps
    at = _train_stage("fine", fine, train_cases, fine_sampler(config), validate, ctx, saved.get("fine"), left)
    if at.step == config.stage("fine").steps and dist.main:  # not stopped early: the folder is complete
        _finish(out_dir, config)
    return _summary(out_dir, config.train.steps + at.step, at.best, base, t0, at.loss)


def _setup(
    dataset_dir: Path,
    out_dir: Path,
    config: CascadeConfig,
    saved: dict[str, dict[str, Any]],
    flags: tuple[bool, bool, bool],
    dist: Dist,
) -> tuple[torch.nn.Module, Plan, list[Path], DatasetInfo]:
    """:func:`_start` in the main process, :func:`_follow` in the others: the rough net, the plan,
    the preprocessed cases and the dataset."""
    return main_then_others(
        dist,
        out_dir,
        lambda: _start(dataset_dir, out_dir, config, saved, flags),
        lambda fingerprint: _follow(dataset_dir, out_dir, config, fingerprint),
    )


def _start(
    dataset_dir: Path,
    out_dir: Path,
    config: CascadeConfig,
    saved: dict[str, dict[str, Any]],
    flags: tuple[bool, bool, bool],
) -> tuple[torch.nn.Module, Plan, list[Path], DatasetInfo]:
    """Check the inputs, claim the folder, preprocess, start (or cut) the log."""
    resume, overwrite, progress = flags
    ds = load_dataset(dataset_dir)
    rough = _check(ds, out_dir, config)
    claim_folder(out_dir, "model folder", resume=resume, overwrite=overwrite)
    plan, paths = prepare(ds, out_dir, config.stage("rough"), progress, resume)
    (out_dir / CASCADE_FILE).unlink(missing_ok=True)  # an old run's marker must not outlive it
    _start_log(out_dir / LOG, saved)
    return rough, plan, paths, ds


def _follow(
    dataset_dir: Path, out_dir: Path, config: CascadeConfig, fingerprint: dict[str, Any]
) -> tuple[torch.nn.Module, Plan, list[Path], DatasetInfo]:
    """What a process other than the main one needs: the rough net and :func:`followed_cases`."""
    ds = load_dataset(dataset_dir)
    rough = _check(ds, out_dir, config)
    plan, cases = followed_cases(ds, out_dir, fingerprint, config.train.target_spacing)
    return rough, plan, cases, ds


def _resolve(
    out_dir: Path, config: CascadeConfig | None, resume: bool
) -> tuple[CascadeConfig, dict[str, dict[str, Any]]]:
    """The run's config and, on resume, each started stage's last checkpoint (by stage name)."""
    if not resume:
        config = config or CascadeConfig()
        check_unused(config.train)
        return config, {}
    path = resume_checkpoint(out_dir / "rough" / LAST, out_dir / "rough" / BEST)
    saved = {s: load_checkpoint(out_dir / s / LAST) for s in STAGES if (out_dir / s / LAST).is_file()}
    if "cascade" not in saved["rough"]:
        raise FlexPatchError(f"{path}: written by a version without cascade resume; train again")
    given = config.flat() if config is not None else None
    try:  # compared flat: an older checkpoint holds the flat form, and a message names the setting
        ours = CascadeConfig.from_json(saved["rough"]["cascade"], path).flat()
        resolved = CascadeConfig.from_json(resume_settings(path, ours, given, None, ()), path)
    except (TypeError, ValueError) as e:
        raise FlexPatchError(f"{path}: its config does not fit this version ({e})") from None
    return resolved, saved


def _start_log(log_path: Path, saved: dict[str, dict[str, Any]]) -> None:
    """A new run starts an empty log; a resumed one drops what was logged after its checkpoints."""
    if not saved:
        log_path.unlink(missing_ok=True)
        return
    done = {stage: int(state["step"]) for stage, state in saved.items()}
    truncate_log(log_path, lambda record: int(record["step"]) <= done.get(record["stage"], 0))


def _fine_net(rough: torch.nn.Module, config: CascadeConfig, best: dict[str, Any]) -> torch.nn.Module:
    """The rough net with its ``best`` weights, in eval mode; the fine net starts from them or anew."""
    rough.load_state_dict(best)
    rough.eval()
    seed_everything(config.train.seed + 1)  # a fresh fine network differs from the rough one's start
    fine = build(rough.spec)
    if config.fine_from_rough:
        fine.load_state_dict(rough.state_dict())
    return fine


def _finish(out_dir: Path, config: CascadeConfig) -> None:
    # no sliding window: the rough net sees the whole image resized, the fine net one crop per object
    write_method(out_dir, "segment-then-segment")
    # last: the file marks a complete cascade folder (load_cascade reads its top-level fields)
    meta = {"method": "segment-then-segment", "input_size": config.input_size, "fuse": config.fuse}
    save_json(
        out_dir / CASCADE_FILE,
        {**meta, **config.rules(), "rough": "rough", "fine": "fine", "config": config.to_json()},
    )


def _summary(
    out_dir: Path, steps: int, best: float, base: _Stage, t0: float, loss: float = float("nan")
) -> dict[str, Any]:
    return {
        "model_dir": str(out_dir),
        "steps": steps,
        "best_val_dice": best,
        "baseline_val_dice": base.best,
        "last_loss": loss,
        "seconds": round(time.perf_counter() - t0, 1),
    }
