"""The settings of a segment-then-segment run (saved in ``cascade.json`` and in its checkpoints)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexpatch.cascade.infer import FUSIONS, OVERSIZE
from flexpatch.errors import FlexPatchError
from flexpatch.schema import check_fields
from flexpatch.train.config import TrainConfig, config_from_json

# The TrainConfig fields the cascade's loop reads; it sets patch (S) and workers (0) itself.
SHARED = (
    "model", "model_kwargs", "steps", "batch", "lr", "optimizer", "weight_decay", "poly_power",
    "val_every", "val_fraction", "amp", "target_spacing", "seed", "augment", "fold",
)  # fmt: skip
_PER_STAGE = ("patch", "workers")
# Where the cascade's defaults differ from TrainConfig's (the paper's batch; crops are drawn in-process).
_TRAIN_DEFAULTS: dict[str, Any] = {"batch": 8, "workers": 0}


def _default_train() -> TrainConfig:
    return TrainConfig(**_TRAIN_DEFAULTS)


@dataclass(frozen=True)
class CascadeConfig:
    """Everything that decides a segment-then-segment run; saved in ``cascade.json``.

    :meth:`of` builds one from flat settings (``steps=...`` beside ``jitter=...``), as the CLI does.

    Attributes:
        input_size: S, the network input per axis for both stages (the paper: 32 to 256).
        train: what both stages share (model, steps of the rough stage, batch, lr, optimizer,
            validation cadence, amp, spacing, seed); its patch is S and its workers 0. The batch is
            images per step (the fine stage takes one random object crop of each). The loop trains
            unclipped (the paper), so the fields outside :data:`SHARED` keep their defaults
            (:func:`check_unused`: a new run refuses others).
        fine_steps: steps of the fine stage; None means ``train.steps``.
        jitter: the fine stage's box augmentation: an integer in ``[-jitter, jitter]`` added
            to every box start and size (the paper: 16 pixels).
        fine_from_rough: start the fine network from the rough one's best weights.
        fuse: default fusion at inference: ``or`` (thresholded masks, the paper) or ``max``.
        min_side: components of the rough mask with a side under this many voxels are noise.
        per_class: one box per component of each class (else of the foreground as a whole).
        oversize: a padded box larger than the image: ``drop`` (the authors) or ``clip``.
    """

    input_size: int = 64
    train: TrainConfig = field(default_factory=_default_train)
    fine_steps: int | None = None
    jitter: int = 16
    fine_from_rough: bool = True
    fuse: str = "or"
    min_side: int = 5
    per_class: bool = True
    oversize: str = "drop"

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
        # saved as the rough stage runs it, so that cascade.json says what was trained
        object.__setattr__(self, "train", self.train.replace(patch=str(self.input_size), workers=0))

    @classmethod
    def of(cls, **settings: Any) -> CascadeConfig:
        """A config from flat settings: the :data:`SHARED` ones go to ``train`` (batch 8 unless
        given), the rest are the cascade's own. The CLI's form, and older ``cascade.json`` files'."""
        shared = {k: settings.pop(k) for k in SHARED if k in settings}
        return cls(train=TrainConfig(**{**_TRAIN_DEFAULTS, **shared}), **settings)

    def stage(self, name: str) -> TrainConfig:
        """The :class:`TrainConfig` of one stage (saved as its ``config.json``; its patch is S)."""
        if name == "fine" and self.fine_steps is not None:
            return self.train.replace(steps=self.fine_steps)
        return self.train

    def rules(self) -> dict[str, Any]:
        """The box rules inference must share with training."""
        return {"min_side": self.min_side, "per_class": self.per_class, "oversize": self.oversize}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """The settings on one level, as JSON (a resume names a changed ``lr``, not ``train``)."""
        own = self.to_json()
        return {**own.pop("train"), **own}

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str | Path = "cascade.json") -> CascadeConfig:
        """The config of a ``cascade.json`` or a checkpoint, nested (``train``) or flat (written
        before the config held a TrainConfig); ``source`` is named in errors."""
        check_fields(cls, d, source)
        if "train" in d:
            train = TrainConfig.from_json(d["train"], f"{source}: train")
        else:  # the rest of its TrainConfig was the cascade's defaults; TrainConfig.from_json fills
            # what older files lack as they ran (no augmentation), so that they resume so
            shared = {**_TRAIN_DEFAULTS, **{k: d[k] for k in SHARED if k in d}}
            train = TrainConfig.from_json(shared, source)
        own = {k: v for k, v in d.items() if k not in SHARED}
        return config_from_json(cls, {**own, "train": train}, source=source)


def check_unused(train: TrainConfig) -> None:
    """Refuse a setting the cascade's loop does not read: it must not look as if it were honoured.

    A new run checks its config; a saved one is not checked again, as TrainConfig's defaults
    (what "unused" is measured against) may change between versions.
    """
    default = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in SHARED + _PER_STAGE and getattr(train, f.name) != getattr(default, f.name):
            raise FlexPatchError(
                f"segment-then-segment does not use train.{f.name} (got {getattr(train, f.name)!r}); "
                f"it shares only {', '.join(SHARED)}"
            )
