"""Training configuration: one frozen dataclass, saved as config.json beside every model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexpatch.axes import per_axis
from flexpatch.data.context import check_context
from flexpatch.errors import FlexPatchError
from flexpatch.sampling.augment import parse_augment
from flexpatch.schema import check_fields
from flexpatch.train.folds import parse_fold

OPTIMIZERS = ("adamw", "sgd")


def config_from_json(
    cls: type[Any], d: dict[str, Any], tuples: tuple[str, ...] = (), source: str | Path | None = None
) -> Any:
    """Rebuild a frozen config dataclass from JSON: unknown keys dropped (older or newer
    files still load), lists turned back into tuples for the ``tuples`` fields.

    Every field is checked against its annotation first (:func:`~flexpatch.schema.check_fields`),
    so a hand-edited or foreign file fails in one line naming ``source`` (the file; the class
    name when None) and the field, not in a TypeError later.
    """
    check_fields(cls, d, source or cls.__name__)
    known = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if k in known}
    for key in tuples:
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return cls(**d)


def _auto_workers() -> int:
    from flexpatch.runtime import available_cores, default_workers

    return default_workers(available_cores())


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (paths are arguments of ``train``, not config).

    Attributes:
        model: a registered model name (``flexpatch.list_models()``).
        model_kwargs: extra constructor arguments for the model.
        patch: patch-size spec: ``"64,64,64"``, ``"64"``, ``"uniform:32-192"``, ``"list:32x32x32,64x64x64"``.
        steps: optimiser steps in total.
        batch: patches per step (all of one size).
        lr: initial learning rate (poly decay to 0 with ``poly_power``).
        optimizer: ``adamw`` or ``sgd`` (nesterov, momentum 0.99, as nnU-Net).
        grad_clip: clip the gradient norm to this (nnU-Net uses 12); None turns clipping off.
        batch_dice: Dice over the whole batch, not per patch (nnU-Net's choice for 3D): small patches
            often miss a class, and per-patch Dice then punishes any probability mass for it.
        val_every: validate (sliding window on held-out cases) every this many steps, and at the end.
        val_patch: window for validation (one value: the same on every axis); None means the
            largest training patch.
        val_fraction: share of training cases held out for validation (at least one when there
            are two or more).
        foreground_ratio: probability that a patch is centred on foreground.
        sampling: centre sampling mode (``balanced``, ``uniform``, ``per_class``).
        workers: data-loading worker processes (0 = in the main process); by default chosen
            from the cores of the machine that makes the config (:func:`flexpatch.runtime.default_workers`)
            and saved as that number. The batches are the same whatever it is, so a resumed run
            may change it (``--workers``).
        amp: mixed precision (bfloat16 autocast) on CUDA; ignored on the CPU.
        target_spacing: resampling spacing in mm; None means the dataset's median.
        seed: seeds the split, the initial weights and every sampled patch.
        init_from: a model folder whose matching weights start the run (transfer learning).
        freeze_loaded: keep the weights loaded by ``init_from`` fixed.
        loaded_lr_scale: learning-rate factor of the weights loaded by ``init_from``.
        augment: data augmentation of the training patches: ``default`` (nnU-Net's set),
            ``none``, ``heavy``, or a JSON object of changed settings (see
            :mod:`flexpatch.sampling.augment`). Mirroring is off for datasets that declare
            ``mirrored_pairs`` (it would swap left and right).
        context: location context given to the network: ``none`` or ``coords`` (coordinate
            channels in the body's frame, see :mod:`flexpatch.data.context`); saved with the
            model, so ``predict`` needs no flag.
        fold: the cross-validation fold (``0..n-1`` or ``"all"``, see :mod:`flexpatch.train.folds`):
            its validation cases (``splits_final.json``) replace the ``val_fraction`` split; None
            (runs saved before folds existed, too) keeps that split.
    """

    model: str = "unet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    patch: str = "64,64,64"
    steps: int = 1000
    batch: int = 2
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    grad_clip: float | None = 12.0
    batch_dice: bool = True
    val_every: int = 100
    val_patch: tuple[int, ...] | None = None
    val_fraction: float = 0.2
    val_overlap: float = 0.5
    foreground_ratio: float = 0.33
    sampling: str = "balanced"
    workers: int = field(default_factory=_auto_workers)
    amp: bool = True
    target_spacing: tuple[float, ...] | None = None
    seed: int = 0
    init_from: str | None = None
    freeze_loaded: bool = False
    loaded_lr_scale: float = 1.0
    augment: str = "default"
    context: str = "none"
    fold: int | str | None = None

    def __post_init__(self) -> None:
        parse_augment(self.augment)  # a bad setting fails here, not in a loader worker
        check_context(self.context)
        if self.fold is not None and parse_fold(self.fold) != self.fold:
            raise FlexPatchError(f"fold must be a number from 0 or 'all', got {self.fold!r}")
        if self.steps < 1:
            raise FlexPatchError(f"steps must be >= 1, got {self.steps}")
        if self.batch < 1:
            raise FlexPatchError(f"batch must be >= 1, got {self.batch}")
        if self.lr <= 0:
            raise FlexPatchError(f"learning rate must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise FlexPatchError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.val_every < 1:
            raise FlexPatchError(f"val_every must be >= 1, got {self.val_every}")
        if not 0.0 <= self.foreground_ratio <= 1.0:
            raise FlexPatchError(f"foreground ratio must be in [0, 1], got {self.foreground_ratio}")
        if self.workers < 0:
            raise FlexPatchError(f"workers must be >= 0, got {self.workers}")
        for name in ("val_fraction", "val_overlap"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FlexPatchError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.poly_power < 0:
            raise FlexPatchError(
                f"weight decay and poly power must be >= 0, got {self.weight_decay} and {self.poly_power}"
            )

        if not self.loaded_lr_scale > 0:
            raise FlexPatchError(
                f"loaded_lr_scale must be > 0, got {self.loaded_lr_scale} (freeze with freeze_loaded instead)"
            )
        if not self.init_from and (self.freeze_loaded or self.loaded_lr_scale != 1.0):
            raise FlexPatchError("freeze_loaded and loaded_lr_scale need init_from (a model folder to load)")

    def validation_patch(self, ndim: int) -> tuple[int, ...] | None:
        """``val_patch`` with a single value used on all ``ndim`` axes; None: the largest training patch."""
        if self.val_patch is None:
            return None
        return per_axis(self.val_patch, ndim, "val_patch")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str | Path = "config.json") -> TrainConfig:
        """The config a ``config.json`` (or a checkpoint) holds; ``source`` is named in errors.
        Runs saved before augmentation existed trained without it, and resume so."""
        d = {"augment": "none", **d} if isinstance(d, dict) else d
        return config_from_json(cls, d, tuples=("val_patch", "target_spacing"), source=source)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
