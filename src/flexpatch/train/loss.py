"""The segmentation loss of the core trainer and the cascade: soft Dice plus cross entropy
(MONAI's ``DiceCELoss``), with nnU-Net's ``ignore`` label left out of both terms."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def segmentation_loss(batch_dice: bool, ignore: int | None = None) -> Loss:
    """``loss(logits (B, K, *S), label (B, 1, *S))``: Dice over the classes (over the whole batch
    with ``batch_dice``) plus cross entropy, both without the voxels labelled ``ignore``.

    Without ``ignore`` this is exactly ``DiceCELoss(to_onehot_y=True, softmax=True, batch=...)``;
    MONAI's ``DiceCELoss`` has no ignore index, its ``DiceLoss`` and torch's cross entropy do.
    """
    from monai.losses import DiceLoss  # seconds to import: only when a run starts

    dice = DiceLoss(to_onehot_y=True, softmax=True, batch=batch_dice, ignore_index=ignore)
    index = -100 if ignore is None else ignore  # -100: cross_entropy's own "no ignore index"

    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return dice(logits, label) + F.cross_entropy(logits, label[:, 0].long(), ignore_index=index)

    return loss
