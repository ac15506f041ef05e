"""One run of the core trainer step by step: the optimiser steps (through DistributedDataParallel
under torchrun), validation and the checkpoints at their cadence, the JSONL log and progress."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexpatch.checkpoint import BEST, save_checkpoint
from flexpatch.data.preprocess import Plan
from flexpatch.distributed import Dist
from flexpatch.evaluate.postprocess import write_postprocessing
from flexpatch.runtime import console, rng_state
from flexpatch.train.config import TrainConfig
from flexpatch.train.harness import Harness, training_log
from flexpatch.train.step import advance, guarded_step
from flexpatch.train.validation import validate, validate_and_decide


@dataclass
class Run:
    """The moving parts of a run, so that the step loop reads as one short function."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    loss_fn: Any
    config: TrainConfig
    plan: Plan
    dev: torch.device
    harness: Harness
    stage_ends: dict[int, int] = field(default_factory=dict)
    dist: Dist = field(default_factory=Dist)

    def __post_init__(self) -> None:
        self.model = self.dist.wrap(self.net, self.dev)  # validation and checkpoints use net

    def state(self, step: int) -> dict[str, Any]:
        """Everything ``resume`` needs: weights, optimiser, scheduler, step, best Dice, RNG, config."""
        return {
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": step,
            "best": self.harness.best,
            "rng": rng_state(),
            "config": self.config.to_json(),
            "divergence": asdict(self.harness.divergence),  # a resumed run counts skipped steps on
            **self.processes(),
        }

    def processes(self) -> dict[str, Any]:
        """Under torchrun: every process's RNG state (for an exact resume) and their number."""
        if not self.dist.active:
            return {}
        return {"rng_ranks": self.dist.gather([rng_state()]), "world": self.dist.world}

    def finish(self, end: int) -> None:
        """Where a run stopped early goes on from; and weights for predict from a run stopped before
        its first validation (its best is then none yet)."""
        # one decision for every process: state() gathers from all of them
        if self.dist.broadcast(end < self.config.steps or not (self.harness.folder / BEST).exists()):
            self.harness.save_last(self.state(end))
        self.harness.keep_if_best(self.harness.best, lambda: self.weights(end, self.harness.best))

    def weights(self, step: int, val_mean: float) -> dict[str, Any]:
        """What ``model_best.pt`` holds: the weights, their step and validation Dice."""
        return {"model": self.net.state_dict(), "step": step, "val_mean": val_mean}

    def validate_and_save(self, step: int, val_cases: list[Path], val_patch: tuple[int, ...]) -> dict:
        """Validation Dice per class; saves the best checkpoint when it improves, and the last. At
        the run's last step the same predictions decide the post-processing (as nnU-Net, on the
        final weights' validation), so it costs no pass of its own."""
        if step < self.config.steps:
            dice = validate(self.net, val_cases, val_patch, self.plan, self.dev, self.config, self.dist)
        else:
            dice, decision = validate_and_decide(
                self.net, val_cases, val_patch, self.plan, self.dev, self.config, self.dist
            )
            if self.dist.main:
                write_postprocessing(self.harness.folder, decision)
            kept = decision["largest_component"] or "none"
            console.print(f"post-processing: largest component kept for classes {kept} (validation Dice)")
        mean = float(np.nanmean(list(dice.values())))
        self.harness.keep_if_best(mean, lambda: self.weights(step, mean))
        self.harness.save_last(self.state(step))
        return {"val_dice": {str(k): v for k, v in dice.items()}, "val_mean": mean}

    def step(self, batch: dict[str, Any], amp: bool) -> tuple[float, bool]:
        """One optimiser step on a batch; returns the loss and whether the step was taken (not skipped
        for a non-finite gradient). The schedule advances either way, so a run keeps its length."""
        image = batch["image"].to(self.dev, non_blocking=True)
        label = batch["label"].to(self.dev, non_blocking=True)[:, None]
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = self.loss_fn(self.model(image), label)
        # randomly sized patches give gradients of very different scales from step to step: clip them
        stepped = guarded_step(loss, self.opt, self.net.parameters(), self.config.grad_clip)
        advance(self.sched, stepped)
        return float(loss.detach()), stepped

    def loop(
        self,
        batches: Iterator[dict[str, Any]],
        start: int,
        end: int,
        val_cases: list[Path],
        val_patch: tuple[int, ...],
        log_path: Path,
        progress: bool,
    ) -> tuple[float, float]:
        """Steps ``start+1 .. end``; one JSONL line each. Returns the last loss and the seconds taken."""
        use_amp, h = self.config.amp and self.dev.type == "cuda", self.harness
        t0, last_loss, last_val = time.perf_counter(), float("nan"), float("nan")
        self.net.train()
        log_to = training_log(log_path) if h.main else nullcontext(_no_log)
        with h.progress("train", start, progress and h.main) as update, log_to as log:
            for batch in batches:
                step = int(batch["step"]) + 1
                last_loss, stepped = self.step(batch, use_amp)
                record = {"step": step, "loss": last_loss, "lr": self.sched.get_last_lr()[0]}
                record.update(
                    patch=list(batch["size"]), batch=int(batch.get("global_batch", len(batch["image"])))
                )
                h.taken(step, stepped, record)
                if h.validation_due(step):
                    record.update(self.validate_and_save(step, val_cases, val_patch))
                    last_val = record["val_mean"]
                elif step in self.stage_ends:  # a resumable point at each stage switch
                    h.save_last(self.state(step))
                if step in self.stage_ends and h.main:  # the stage's weights, validated or not
                    stage_file = h.folder / f"model_stage{self.stage_ends[step]}.pt"
                    save_checkpoint(stage_file, {"model": self.net.state_dict(), "step": step})
                log(record)
                rate = (step - start) / max(time.perf_counter() - t0, 1e-9)
                update(step, f"loss {last_loss:.3f}  val Dice {last_val:.3f}  {rate:.2f} it/s")
        return last_loss, time.perf_counter() - t0


def _no_log(record: dict[str, Any]) -> None:
    """The log of a process other than the main one, which alone writes the run's log."""
