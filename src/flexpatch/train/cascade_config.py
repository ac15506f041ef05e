"""The settings of a segment-then-segment run (saved in ``cascade.json`` and in its checkpoints)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from flexpatch.errors import FlexPatchError
from flexpatch.infer.cascade import FUSIONS, OVERSIZE
from flexpatch.train.config import TrainConfig, config_from_json


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
