"""A patchwork run's settings: the scheme's options plus DNP's model and training options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flexpatch.errors import FlexPatchError
from flexpatch.patchwork import generate
from flexpatch.patchwork.scheme import Scheme
from flexpatch.sampling.augment import parse_augment
from flexpatch.train.folds import parse_fold


@dataclass(frozen=True)
class PatchworkConfig:
    """Everything a patchwork run needs besides the data (written to ``patchwork.json``).

    ``scheme`` holds the :class:`Scheme` options; the rest mirrors DNP's PatchWorkModel and
    training options (deep neural patchworks, section "Application interface"). ``intensity``:
    the intensity part of an augmentation setting (:func:`~flexpatch.sampling.augment.parse_augment`,
    nnU-Net's set by default) applied to every crop; spatial augmentation is DNP's own
    (``dphi``, ``flip``, ``dscale``: the patch affines).
    """

    scheme: dict[str, Any] = field(default_factory=dict)
    block: str = "unet"
    block_options: dict[str, Any] = field(default_factory=dict)
    identical_blocks: bool = False
    intermediate_out: int = 0
    intermediate_loss: bool = True
    batch_dice: bool = True
    forward_type: str = "concat"
    final_block: bool = False
    categorical: bool = True
    labels: list[int] | None = None
    dontcare: int | None = None
    embedding_dim: int = 0
    num_sampled: int = 16
    rounds: int = 20
    epochs: int = 1
    num_patches: int = 16
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-5
    ratio: float = 0.5
    label_weight: list[float] | None = None
    autoweight: float | None = None
    hard_mining: float = 0.0
    hard_mining_order: str = "loss"
    hard_mining_maxage: int = 50
    dphi: float = 0.0
    flip: list[int] = field(default_factory=list)
    dscale: float = 0.0
    independent_augmentation: bool = True
    intensity: str = "default"
    workers: int = 1
    save_every: int = 5  # rounds between resume checkpoints (and after the last round)
    val_fraction: float = 0.2  # cases held out for validation, as the core trainer (0: none)
    val_every: int = 10  # rounds between validations (and after the last round)
    seed: int = 0
    fold: int | str | None = None  # a cross-validation fold (0..n-1, "all"), as the core trainer's

    def scheme_obj(self, ndim: int) -> Scheme:
        return Scheme.from_json({**self.scheme, "ndim": ndim})

    def augment(self) -> generate.Augment:
        return generate.Augment(self.dphi, tuple(self.flip), self.dscale, self.independent_augmentation)

    def check(self) -> None:
        parse_augment(self.intensity)
        counts = (self.rounds, self.epochs, self.num_patches, self.batch_size)
        if min(*counts, self.save_every, self.val_every) < 1:
            raise FlexPatchError(
                "rounds, epochs, num_patches, batch_size, save_every and val_every must be >= 1"
            )
        if not 0 <= self.val_fraction < 1:
            raise FlexPatchError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.fold is not None and parse_fold(self.fold) != self.fold:
            raise FlexPatchError(f"fold must be a number from 0 or 'all', got {self.fold!r}")
        if self.hard_mining_order not in ("loss", "f1", "balance"):
            raise FlexPatchError(
                f"hard_mining_order must be loss, f1 or balance, got {self.hard_mining_order!r}"
            )
        if self.embedding_dim and not self.categorical:
            raise FlexPatchError("label embedding (candidate sampling) needs categorical labels")
