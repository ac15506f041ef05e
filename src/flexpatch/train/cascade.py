"""Training segment-then-segment (seed 05): a rough network on whole images resized to S, then a
fine network on ground-truth object crops resized to S.

A cascade folder holds ``cascade.json`` (written last: its presence marks a complete run), the
dataset's ``plan.json`` / ``fingerprint.json``, one ``log.jsonl`` and two ordinary model folders,
``rough/`` and ``fine/``, each loadable by ``load_model``. Every random draw (cases, crops,
jitter) comes from a generator seeded by ``(seed, stage, step)``, so a run is a pure function
of its config.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexpatch.data.dataset import DatasetInfo, load_dataset
from flexpatch.data.io import save_json
from flexpatch.data.preprocess import load_preprocessed
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.metrics import dice_torch
from flexpatch.infer.cascade import (
    CASCADE_FILE,
    FUSIONS,
    OVERSIZE,
    Box,
    boxes_from_extents,
    crop_resize,
    object_extents,
    rough_probabilities,
    segment,
)
from flexpatch.methods import write_method
from flexpatch.models import build, check_patch_size, create_model
from flexpatch.runtime import (
    check_writable,
    console,
    generator,
    progress_bar,
    resolve_device,
    seed_everything,
)
from flexpatch.train.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from flexpatch.train.config import TrainConfig, config_from_json
from flexpatch.train.harness import claim_folder
from flexpatch.train.loop import make_optimizer, prepare, split_cases
from flexpatch.train.step import Divergence, advance, guarded_step

STAGES = ("rough", "fine")
CACHE_BYTES = 4 * 2**30  # preprocessed cases kept in memory; the rest are read again when drawn


@dataclass(frozen=True)
class CascadeConfig:
    """Everything that decides a segment-then-segment run; saved in ``cascade.json``.

    Attributes:
        input_size: S, the network input per axis for both stages (the paper: 32 to 256).
        steps: optimiser steps of the rough stage.
        fine_steps: steps of the fine stage; None means ``steps``.
        batch: images per step (the fine stage takes one random object crop of each).
        jitter: the fine stage's box augmentation: an integer in ``[-jitter, jitter]`` added
            to every box start and size (the paper: 16 pixels).
        fine_from_rough: start the fine network from the rough one's best weights.
        model, model_kwargs: the registered network used by both stages.
        lr, optimizer, weight_decay, poly_power: as :class:`TrainConfig`.
        val_every: validate every this many steps and at the end (baseline Dice for the
            rough stage, cascade Dice for the fine stage); the best weights are kept.
        val_fraction: share of cases held out for validation.
        fuse: default fusion at inference: ``or`` (thresholded masks, the paper) or ``max``.
        min_side: components of the rough mask with a side under this many voxels are noise.
        per_class: one box per component of each class (else of the foreground as a whole).
        oversize: a padded box larger than the image: ``drop`` (the authors) or ``clip``.
        amp: bfloat16 autocast on CUDA.
        target_spacing: resampling spacing in mm; None means the dataset's median.
        seed: seeds the split, the weights and every draw.
    """

    input_size: int = 64
    steps: int = 1000
    fine_steps: int | None = None
    batch: int = 8
    jitter: int = 16
    fine_from_rough: bool = True
    model: str = "unet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    val_every: int = 100
    val_fraction: float = 0.2
    fuse: str = "or"
    min_side: int = 5
    per_class: bool = True
    oversize: str = "drop"
    amp: bool = True
    target_spacing: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_size < 4:
            raise FlexPatchError(f"input size must be >= 4, got {self.input_size}")
        if self.fine_steps is not None and self.fine_steps < 1:
            raise FlexPatchError(f"fine steps must be >= 1, got {self.fine_steps}")
        if self.jitter < 0 or self.min_side < 0:
            raise FlexPatchError(f"jitter and min side must be >= 0, got {self.jitter} and {self.min_side}")
        if self.fuse not in FUSIONS:
            raise FlexPatchError(f"unknown fusion {self.fuse!r}; choose one of {', '.join(FUSIONS)}")
        if self.oversize not in OVERSIZE:
            raise FlexPatchError(
                f"unknown oversize rule {self.oversize!r}; choose one of {', '.join(OVERSIZE)}"
            )
        self.stage("rough")  # the shared settings (steps, batch, lr, ...) are checked by TrainConfig

    def stage(self, name: str) -> TrainConfig:
        """The :class:`TrainConfig` of one stage (saved as its ``config.json``; its patch is S)."""
        steps = self.fine_steps if name == "fine" and self.fine_steps is not None else self.steps
        return TrainConfig(
            model=self.model,
            model_kwargs=dict(self.model_kwargs),
            patch=str(self.input_size),
            steps=steps,
            batch=self.batch,
            lr=self.lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            poly_power=self.poly_power,
            val_every=self.val_every,
            val_fraction=self.val_fraction,
            workers=0,
            amp=self.amp,
            target_spacing=self.target_spacing,
            seed=self.seed,
        )

    def rules(self) -> dict[str, Any]:
        """The box rules inference must share with training."""
        return {"min_side": self.min_side, "per_class": self.per_class, "oversize": self.oversize}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CascadeConfig:
        return config_from_json(cls, d, tuples=("target_spacing",))


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
) -> float:
    """Mean foreground Dice on the preprocessed grid: of the rough model alone when ``fine`` is None."""
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
    return float(torch.nanmean(torch.stack(scores).float()))


def _train_stage(
    stage: str,
    net: torch.nn.Module,
    cases: _Cases,
    sample: Callable[..., tuple[torch.Tensor, ...]],
    validate: Callable[[torch.nn.Module], float],
    config: CascadeConfig,
    dev: torch.device,
    out_dir: Path,
    progress: bool,
) -> tuple[float, float]:
    """Train one stage into ``out_dir/stage/model_{best,last}.pt``; returns its best Dice and last loss."""
    from monai.losses import DiceCELoss  # seconds to import: only once the inputs are checked

    tc = config.stage(stage)
    net.to(dev).train()
    opt, sched = make_optimizer(net, tc)
    loss_fn, folder = DiceCELoss(to_onehot_y=True, softmax=True), out_dir / stage
    amp, best, loss, divergence = tc.amp and dev.type == "cuda", -1.0, float("nan"), Divergence()
    with progress_bar(disable=not progress) as bar, (out_dir / "log.jsonl").open("a") as log:
        task = bar.add_task(stage, total=tc.steps, info="")
        for step in range(1, tc.steps + 1):
            g = generator("flexpatch-sts", stage, config.seed, step)
            idx = torch.randint(len(cases), (tc.batch,), generator=g).tolist()
            x, y = sample(cases, config.input_size, idx, g)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                loss_t = loss_fn(net(x.to(dev)), y.to(dev))
            stepped = guarded_step(loss_t, opt, net.parameters(), None)  # seed 05 trains unclipped
            divergence.update(stepped, step, str(folder))
            advance(sched, stepped)
            loss = float(loss_t.detach())
            record: dict[str, Any] = {
                "stage": stage,
                "step": step,
                "loss": loss,
                "lr": sched.get_last_lr()[0],
            }
            if not stepped:
                record["skipped"] = True
            if step % tc.val_every == 0 or step == tc.steps:
                record["val_dice"] = dice = validate(net)
                # NaN (nothing to score) never improves, but the first validation always saves
                if dice > best or not (folder / BEST).exists():
                    best = dice if dice > best else best
                    save_checkpoint(
                        folder / BEST, {"model": net.state_dict(), "step": step, "val_mean": dice}
                    )
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(task, completed=step, info=f"loss {loss:.3f}  val Dice {best:.3f}")
    save_checkpoint(folder / LAST, {"model": net.state_dict(), "step": tc.steps, "val_mean": best})
    return best, loss


def _check(ds: DatasetInfo, out_dir: Path, config: CascadeConfig) -> torch.nn.Module:
    """Fail in seconds, before preprocessing: model, input size, output folder. Returns the rough net."""
    seed_everything(config.seed)
    net = create_model(
        config.model,
        ndim=ds.ndim,
        in_channels=len(ds.channel_names),
        out_channels=ds.num_classes,
        **config.model_kwargs,
    )
    check_patch_size((config.input_size,) * ds.ndim, net.divisor, "input size", model=config.model)
    check_writable(out_dir, "model folder")
    return net


def _stage_folder(folder: Path, net: torch.nn.Module, out_dir: Path, tc: TrainConfig) -> None:
    """An ordinary model folder (model.json, plan.json, config.json) beside the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (BEST, LAST):  # an earlier run's weights must not stand in for this one's
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
) -> dict[str, Any]:
    """Train the rough and the fine network of a segment-then-segment cascade.

    Args:
        dataset_dir: an nnU-Net raw or MSD dataset.
        out_dir: the cascade folder (see the module docstring); ``predict_cascade_files`` reads it.
        config: the run's settings.
        device: ``auto``, ``cpu``, ``cuda``.
        progress: show progress bars on stderr.
        overwrite: replace the cascade folder of an earlier run (a non-empty ``out_dir`` is refused
            otherwise).

    Returns:
        ``model_dir``, ``steps`` (both stages), ``best_val_dice`` (the cascade),
        ``baseline_val_dice`` (the rough model alone), ``last_loss`` (fine stage) and ``seconds``.
    """
    config = config or CascadeConfig()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    dev = resolve_device(device)
    ds = load_dataset(dataset_dir)
    rough = _check(ds, out_dir, config)
    claim_folder(out_dir, "model folder", resume=False, overwrite=overwrite)
    t0 = time.perf_counter()
    plan, paths = prepare(ds, out_dir, config.stage("rough"), progress)
    (out_dir / CASCADE_FILE).unlink(missing_ok=True)  # an old run's marker must not outlive it
    (out_dir / "log.jsonl").unlink(missing_ok=True)
    train_paths, val_paths = split_cases(paths, config.val_fraction, config.seed)
    train_cases, val_cases = _Cases(train_paths, config.per_class), _Cases(val_paths, config.per_class)
    console.print(
        f"[bold]segment-then-segment[/] {config.model} at S={config.input_size} on {len(train_paths)} "
        f"cases (val {len(val_paths)}), batch {config.batch}, device {dev}"
    )
    k = plan.num_classes
    _stage_folder(out_dir / "rough", rough, out_dir, config.stage("rough"))
    base, _ = _train_stage(
        "rough",
        rough,
        train_cases,
        _rough_sample,
        lambda net: validate_cascade(net, None, val_cases, config, k, dev),
        config,
        dev,
        out_dir,
        progress,
    )
    rough.load_state_dict(load_checkpoint(out_dir / "rough" / BEST, map_location=dev)["model"])
    rough.eval()
    seed_everything(config.seed + 1)  # a fresh fine network differs from the rough one's start
    fine = build(rough.spec)
    if config.fine_from_rough:
        fine.load_state_dict(rough.state_dict())
    _stage_folder(out_dir / "fine", fine, out_dir, config.stage("fine"))
    best, loss = _train_stage(
        "fine",
        fine,
        train_cases,
        _fine_sampler(config),
        lambda net: validate_cascade(rough, net, val_cases, config, k, dev),
        config,
        dev,
        out_dir,
        progress,
    )
    # no sliding window: the rough net sees the whole image resized, the fine net one crop per object
    write_method(out_dir, "segment-then-segment")
    # last: the file marks a complete cascade folder (load_cascade reads its top-level fields)
    meta = {"method": "segment-then-segment", "input_size": config.input_size, "fuse": config.fuse}
    save_json(
        out_dir / CASCADE_FILE,
        {**meta, **config.rules(), "rough": "rough", "fine": "fine", "config": config.to_json()},
    )
    steps = config.steps + (config.fine_steps or config.steps)
    return {
        "model_dir": str(out_dir),
        "steps": steps,
        "best_val_dice": best,
        "baseline_val_dice": base,
        "last_loss": loss,
        "seconds": round(time.perf_counter() - t0, 1),
    }
