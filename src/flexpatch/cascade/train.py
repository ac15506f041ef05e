"""Training segment-then-segment: a rough network on whole images resized to S, then a
fine network on ground-truth object crops resized to S.

A cascade folder holds ``cascade.json`` (written last: its presence marks a complete run), the
dataset's ``plan.json`` / ``fingerprint.json``, one ``log.jsonl`` and two ordinary model folders,
``rough/`` and ``fine/``, each loadable by ``load_model``. Every random draw (cases, crops,
jitter) comes from a generator seeded by ``(seed, stage, step)``, so a run is a pure function
of its config.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexpatch.cascade.config import CascadeConfig, check_unused
from flexpatch.cascade.infer import (
    CASCADE_FILE,
    Box,
    boxes_from_extents,
    crop_resize,
    object_extents,
    rough_probabilities,
    segment,
)
from flexpatch.checkpoint import BEST, LAST, load_checkpoint
from flexpatch.data.dataset import DatasetInfo, load_dataset, refuse_regions
from flexpatch.data.io import load_json, save_json
from flexpatch.data.preprocess import load_preprocessed
from flexpatch.distributed import one_process_only
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.metrics import dice_torch
from flexpatch.geometry import Patch
from flexpatch.methods import write_method
from flexpatch.models import build, check_patch_size, create_model
from flexpatch.runtime import (
    check_writable,
    console,
    generator,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from flexpatch.sampling.augment import AugmentConfig, augmented_sample
from flexpatch.train.config import TrainConfig
from flexpatch.train.harness import (
    Harness,
    claim_folder,
    resume_checkpoint,
    resume_settings,
    training_log,
    truncate_log,
)
from flexpatch.train.loop import augmentation, make_optimizer, prepare, split_cases
from flexpatch.train.loss import segmentation_loss
from flexpatch.train.step import Divergence, advance, guarded_step

STAGES = ("rough", "fine")
CACHE_BYTES = 4 * 2**30  # preprocessed cases kept in memory; the rest are read again when drawn


class _Cases:
    """Preprocessed cases as tensors, with their ground-truth object extents computed once."""

    def __init__(self, paths: list[Path], per_class: bool) -> None:
        self.paths, self.per_class = paths, per_class
        self.extents: dict[int, list] = {}
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
            self.extents[i] = object_extents(label, self.per_class)
        if self._bytes + image.nbytes + label.nbytes <= CACHE_BYTES:
            self._kept[i] = case
            self._bytes += image.nbytes + label.nbytes
        return case


def _rough_sample(cases: _Cases, size: int, idx: list[int], _: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Whole images resized to S (labels by nearest neighbour), each resized once."""
    for i in set(idx) - cases.resized.keys():
        image, label = cases[i]
        box = [Box.whole(image.shape[1:])]
        cases.resized[i] = (
            crop_resize(image, box, size, "linear")[0],
            crop_resize(label[None], box, size, "nearest")[0],
        )
    return torch.stack([cases.resized[i][0] for i in idx]), torch.stack([cases.resized[i][1] for i in idx])


def _fine_sampler(config: CascadeConfig) -> Callable[..., tuple[torch.Tensor, ...]]:
    def sample(cases: _Cases, size: int, idx: list[int], g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """One random jittered ground-truth object crop per image (the whole image when it has none)."""
        xs, ys = [], []
        for i in idx:
            image, label = cases[i]
            spatial = tuple(image.shape[1:])
            boxes = boxes_from_extents(
                cases.extents[i], spatial, size, config.jitter, g, config.min_side, config.oversize
            )
            box = boxes[int(torch.randint(len(boxes), (1,), generator=g))][1] if boxes else Box.whole(spatial)
            xs.append(crop_resize(image, [box], size, "linear")[0])
            ys.append(crop_resize(label[None], [box], size, "nearest")[0])
        return torch.stack(xs), torch.stack(ys)

    return sample


@torch.no_grad()
def validate_cascade(
    rough: torch.nn.Module,
    fine: torch.nn.Module | None,
    cases: _Cases,
    config: CascadeConfig,
    num_classes: int,
    device: torch.device,
) -> tuple[dict[str, float], float]:
    """Foreground Dice on the preprocessed grid, of the rough model alone when ``fine`` is None:
    per class (its mean over the cases, for the log and the curves) and over all."""
    nets = [n for n in (rough, fine) if n is not None]
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    scores = []
    for i in range(len(cases)):
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
    table = torch.stack(scores).float()  # (cases, classes)
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


def _stage_state(
    net: torch.nn.Module, opt: Any, sched: Any, at: _Stage, config: CascadeConfig
) -> dict[str, Any]:
    """Everything a resumed stage needs, and the run's config (a resume compares it, not a file)."""
    return {
        "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "step": at.step, "val_mean": at.best, "loss": at.loss, "rng": rng_state(),
        "divergence": dataclasses.asdict(at.harness.divergence), "cascade": config.to_json(),
    }  # fmt: skip


def _start_stage(
    saved: dict[str, Any] | None, folder: Path, tc: TrainConfig, net: torch.nn.Module, opt: Any, sched: Any
) -> _Stage:
    """A stage from its start, or from ``saved`` (its last checkpoint) when resumed."""
    harness = Harness(folder, tc.steps, tc.val_every)
    if saved is None:
        return _Stage(0, float("nan"), harness)
    try:
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        harness.best, harness.divergence = float(saved["val_mean"]), Divergence(**saved["divergence"])
        return _Stage(int(saved["step"]), float(saved["loss"]), harness)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlexPatchError(f"{folder / LAST}: does not fit this cascade ({reason})") from None


def _train_stage(
    stage: str,
    net: torch.nn.Module,
    cases: _Cases,
    sample: Callable[..., tuple[torch.Tensor, ...]],
    validate: Callable[[torch.nn.Module], tuple[dict[str, float], float]],
    config: CascadeConfig,
    dev: torch.device,
    out_dir: Path,
    progress: bool,
    saved: dict[str, Any] | None = None,
    end: int | None = None,
) -> _Stage:
    """Train one stage into ``out_dir/stage/model_{best,last}.pt``, from ``saved`` (a resumed
    stage's last checkpoint) on, up to step ``end`` (default: the stage's steps)."""
    tc = config.stage(stage)
    net.to(dev).train()
    opt, sched = make_optimizer(net, tc)
    ignore = load_json(out_dir / "plan.json")["labels"].get("ignore")
    loss_fn, amp = segmentation_loss(False, ignore), tc.amp and dev.type == "cuda"
    aug = augmentation(tc, load_json(out_dir / "dataset.json").get("mirrored_pairs", []))
    at = _start_stage(saved, out_dir / stage, tc, net, opt, sched)
    h, end = at.harness, tc.steps if end is None else min(end, tc.steps)
    with h.progress(stage, at.step, progress) as update, training_log(out_dir / "log.jsonl") as log:
        for step in range(at.step + 1, end + 1):
            g = generator("flexpatch-sts", stage, config.train.seed, step)
            idx = torch.randint(len(cases), (tc.batch,), generator=g).tolist()
            x, y = sample(cases, config.input_size, idx, g)
            if aug is not None:
                x, y = _augmented(
                    x, y, aug, generator("flexpatch-sts-augment", stage, config.train.seed, step)
                )
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                loss_t = loss_fn(net(x.to(dev)), y.to(dev))
            stepped = guarded_step(loss_t, opt, net.parameters(), None)  # the paper trains unclipped
            advance(sched, stepped)
            at.step, at.loss = step, float(loss_t.detach())
            record = {"stage": stage, "step": step, "loss": at.loss, "lr": sched.get_last_lr()[0]}
            h.taken(step, stepped, record)
            if h.validation_due(step):
                per_class, dice = validate(net)
                record.update(val_dice=per_class, val_mean=dice)
                h.keep_if_best(dice, lambda: {"model": net.state_dict(), "step": step, "val_mean": dice})  # noqa: B023
                h.save_last(_stage_state(net, opt, sched, at, config))
            log(record)
            update(step, f"loss {at.loss:.3f}  val Dice {at.best:.3f}")
    if at.step < tc.steps or not (h.folder / LAST).is_file():  # stopped early: where to go on from
        h.save_last(_stage_state(net, opt, sched, at, config))
    return at


def _augmented(
    x: torch.Tensor, y: torch.Tensor, aug: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(B, C, *S)`` and labels ``(B, 1, *S)``, each augmented as a patch of itself (the core
    trainer's set and draws): the network sees the image resized to S, so the augmented field is
    that S-cube, its edges repeated."""
    box = Patch.box((0,) * (x.ndim - 2), tuple(x.shape[2:]))
    pairs = [augmented_sample(x[b], y[b, 0], box, aug, g) for b in range(x.shape[0])]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])[:, None]


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
    """Train the rough and the fine network of a segment-then-segment cascade.

    Args:
        dataset_dir: an nnU-Net raw or MSD dataset.
        out_dir: the cascade folder (see the module docstring); ``predict_cascade_files`` reads it.
        config: the run's settings (on ``resume``: None, or equal to the checkpoint's).
        device: ``auto``, ``cpu``, ``cuda``.
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
    one_process_only("a segment-then-segment cascade")
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    config, saved = _resolve(out_dir, config, resume)
    dev = resolve_device(device)
    ds = load_dataset(dataset_dir)
    rough = _check(ds, out_dir, config)
    claim_folder(out_dir, "model folder", resume=resume, overwrite=overwrite)
    t0 = time.perf_counter()
    plan, paths = prepare(ds, out_dir, config.stage("rough"), progress, resume)
    (out_dir / CASCADE_FILE).unlink(missing_ok=True)  # an old run's marker must not outlive it
    _start_log(out_dir / "log.jsonl", saved)
    train_paths, val_paths = split_cases(paths, config.train.val_fraction, config.train.seed)
    train_cases, val_cases = _Cases(train_paths, config.per_class), _Cases(val_paths, config.per_class)
    console.print(
        f"[bold]segment-then-segment[/] {config.train.model} at S={config.input_size} on "
        f"{len(train_paths)} cases (val {len(val_paths)}), batch {config.train.batch}, {dev}"
    )
    k = plan.num_classes
    _stage_folder(out_dir / "rough", rough, out_dir, config.stage("rough"), "rough" in saved)
    validate = lambda net: validate_cascade(net, None, val_cases, config, k, dev)  # noqa: E731
    base = _train_stage("rough", rough, train_cases, _rough_sample, validate, config, dev, out_dir, progress,
                        saved.get("rough"), stop_after)  # fmt: skip
    if base.step < config.train.steps:
        return _summary(out_dir, base.step, float("nan"), base, t0)
    fine = _fine_net(rough, config, load_checkpoint(out_dir / "rough" / BEST, map_location=dev)["model"])
    _stage_folder(out_dir / "fine", fine, out_dir, config.stage("fine"), "fine" in saved)
    validate = lambda net: validate_cascade(rough, net, val_cases, config, k, dev)  # noqa: E731
    left = None if stop_after is None else stop_after - config.train.steps
    at = _train_stage("fine", fine, train_cases, _fine_sampler(config), validate, config, dev, out_dir,
                      progress, saved.get("fine"), left)  # fmt: skip
    if at.step == config.stage("fine").steps:  # not stopped early: the folder is complete
        _finish(out_dir, config)
    return _summary(out_dir, config.train.steps + at.step, at.best, base, t0, at.loss)


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
