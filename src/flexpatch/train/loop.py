"""The training loop: patches of any size in, checkpoints and a JSONL log out.

Dice + CE loss, AdamW or SGD with poly decay, bfloat16 autocast on CUDA,
sliding-window validation every ``val_every`` steps, atomic best/last
checkpoints, and an exact ``resume`` (model, optimiser, scheduler, RNG and the
data stream, which is a pure function of (seed, step)).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss

from flexpatch.data.dataset import load_dataset
from flexpatch.data.io import load_json, save_json
from flexpatch.data.preprocess import Plan, compute_fingerprint, make_plan, preprocess_dataset
from flexpatch.errors import FlexPatchError
from flexpatch.evaluate.metrics import dice_torch
from flexpatch.infer.sliding_window import sliding_window
from flexpatch.models import create_model
from flexpatch.runtime import console, progress_bar, resolve_device, rng_state, seed_everything, set_rng_state
from flexpatch.sampling import PatchStream, SamplingConfig, make_loader, parse_patch_spec
from flexpatch.train.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from flexpatch.train.config import TrainConfig


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


def prepare(
    dataset_dir: Path, out_dir: Path, config: TrainConfig, progress: bool
) -> tuple[Plan, list[Path], Any]:
    """Fingerprint, plan and preprocess the dataset; write fingerprint.json, plan.json, dataset.json."""
    ds = load_dataset(dataset_dir)
    fp_path = out_dir / "fingerprint.json"
    fingerprint = load_json(fp_path) if fp_path.exists() else compute_fingerprint(ds, progress=progress)
    plan = make_plan(ds, fingerprint, target_spacing=config.target_spacing)
    cases = preprocess_dataset(ds, plan, cache_dir_for(Path(dataset_dir), out_dir), progress=progress)
    save_json(fp_path, fingerprint)
    save_json(out_dir / "plan.json", plan.to_json())
    save_json(out_dir / "dataset.json", ds.to_json())
    return plan, cases, ds


def split_cases(cases: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded train/validation split; a single case is used for both."""
    if len(cases) < 2:
        return cases, cases
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = max(1, round(fraction * len(cases)))
    val = sorted(cases[i] for i in order[:n_val])
    return [c for c in cases if c not in val], val


def make_optimizer(net: torch.nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            net.parameters(), lr=config.lr, momentum=0.99, nesterov=True, weight_decay=config.weight_decay
        )
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    poly = lambda step: max(1.0 - step / config.steps, 0.0) ** config.poly_power  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, poly)


@torch.no_grad()
def validate(
    net: torch.nn.Module,
    cases: list[Path],
    patch: tuple[int, ...],
    num_classes: int,
    divisor: tuple[int, ...],
    device: torch.device,
    overlap: float = 0.5,
) -> dict[int, float]:
    """Mean Dice per foreground class over ``cases`` (sliding window at ``patch``)."""
    was_training = net.training
    net.eval()
    scores: list[torch.Tensor] = []
    for path in cases:
        with np.load(path) as z:
            image, label = torch.from_numpy(z["image"]), torch.from_numpy(z["label"].astype(np.int64))
        logits = sliding_window(
            net, image[None], patch, overlap=overlap, divisor=divisor, device=device, batch_size=4
        )
        pred = logits.argmax(1).cpu()
        onehot = lambda x: torch.nn.functional.one_hot(x, num_classes).movedim(-1, 1)  # noqa: E731
        scores.append(dice_torch(onehot(pred), onehot(label[None]))[0, 1:])
    net.train(was_training)
    mean = torch.nanmean(torch.stack(scores).float(), dim=0)
    return {c + 1: float(v) for c, v in enumerate(mean)}


def _checkpoint_state(net, opt, sched, step: int, best: float, config: TrainConfig) -> dict[str, Any]:
    return {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "best": best,
        "rng": rng_state(),
        "config": config.to_json(),
    }


def _truncate_log(log_path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint so the log reads as one run."""
    if not log_path.exists():
        return
    keep = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
    log_path.write_text("".join(ln + "\n" for ln in keep))


def train(
    dataset_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a model on patches of a dataset and write a self-contained model folder.

    Args:
        dataset_dir: an nnU-Net raw or MSD dataset.
        out_dir: the model folder (weights, config.json, plan.json, fingerprint.json, log.jsonl).
        config: the run's settings; on ``resume`` the saved config is used and this must be None or equal.
        resume: continue from ``out_dir/model_last.pt`` exactly where it stopped.
        device: ``auto``, ``cpu``, ``cuda``.
        stop_after: stop (saving ``model_last.pt``) after this many steps, as an interruption would.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    dev = resolve_device(device)
    if resume:
        if not (out_dir / LAST).exists():
            raise FlexPatchError(f"{out_dir / LAST}: nothing to resume from")
        saved = TrainConfig.from_json(load_json(out_dir / "config.json"))
        config = config if config is not None else saved
    config = config or TrainConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "config.json", config.to_json())
    plan, cases, _ = prepare(dataset_dir, out_dir, config, progress)
    train_cases, val_cases = split_cases(cases, config.val_fraction, config.seed)

    seed_everything(config.seed)
    net = create_model(
        config.model,
        ndim=plan.ndim,
        in_channels=plan.in_channels,
        out_channels=plan.num_classes,
        **config.model_kwargs,
    )
    save_json(out_dir / "model.json", net.spec.to_json())
    sizes = parse_patch_spec(config.patch, plan.ndim, net.divisor)
    val_patch = tuple(config.val_patch or sizes.max_size())
    net.to(dev)
    opt, sched = make_optimizer(net, config)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)

    start, best = 0, -1.0
    log_path = out_dir / "log.jsonl"
    if resume:
        state = load_checkpoint(out_dir / LAST, map_location=dev)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, best = int(state["step"]), float(state["best"])
        _truncate_log(log_path, start)
    elif log_path.exists():
        log_path.unlink()

    sampling = SamplingConfig(
        batch_size=config.batch,
        mode=config.sampling,
        foreground_ratio=config.foreground_ratio,
        divisor=net.divisor,
    )
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    stream = PatchStream(train_cases, sizes, sampling, seed=config.seed, start_step=start, steps=end - start)
    loader = make_loader(stream, workers=config.workers, pin_memory=dev.type == "cuda")
    use_amp = config.amp and dev.type == "cuda"
    console.print(
        f"[bold]train[/] {config.model} on {len(train_cases)} cases (val {len(val_cases)}), "
        f"patch {sizes.describe()}, batch {config.batch}, steps {start}->{end}, device {dev}"
    )
    t0, last_loss, last_val = time.perf_counter(), float("nan"), float("nan")
    net.train()
    with progress_bar(disable=not progress) as bar, log_path.open("a") as log:
        task = bar.add_task("train", total=config.steps, completed=start, info="")
        for batch in loader:
            step = int(batch["step"]) + 1
            image = batch["image"].to(dev, non_blocking=True)
            label = batch["label"].to(dev, non_blocking=True)[:, None]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(net(image), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last_loss = float(loss.detach())
            record: dict[str, Any] = {
                "step": step,
                "loss": last_loss,
                "lr": sched.get_last_lr()[0],
                "patch": list(batch["size"]),
            }
            if step % config.val_every == 0 or step == config.steps:
                dice = validate(
                    net, val_cases, val_patch, plan.num_classes, net.divisor, dev, config.val_overlap
                )
                last_val = float(np.nanmean(list(dice.values())))
                record.update(val_dice={str(k): v for k, v in dice.items()}, val_mean=last_val)
                if last_val > best:
                    best = last_val
                    save_checkpoint(
                        out_dir / BEST, {"model": net.state_dict(), "step": step, "val_mean": best}
                    )
                save_checkpoint(out_dir / LAST, _checkpoint_state(net, opt, sched, step, best, config))
            log.write(json.dumps(record) + "\n")
            log.flush()
            rate = (step - start) / max(time.perf_counter() - t0, 1e-9)
            bar.update(
                task, completed=step, info=f"loss {last_loss:.3f}  val Dice {last_val:.3f}  {rate:.2f} it/s"
            )
    if end < config.steps or not (out_dir / BEST).exists():
        save_checkpoint(out_dir / LAST, _checkpoint_state(net, opt, sched, end, best, config))
    if not (out_dir / BEST).exists():
        save_checkpoint(out_dir / BEST, {"model": net.state_dict(), "step": end, "val_mean": best})
    return TrainResult(out_dir, end, best, last_loss, time.perf_counter() - t0)
