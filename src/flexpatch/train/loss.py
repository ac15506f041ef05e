"""The segmentation loss of the core trainer and the cascade: soft Dice plus cross entropy
(MONAI's ``DiceCELoss``), with nnU-Net's ``ignore`` label left out of both terms; for nnU-Net's
region-based labels, sigmoid Dice plus binary cross entropy on the region masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from flexpatch.data.regions import region_mask

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def segmentation_loss(
    batch_dice: bool, ignore: int | None = None, regions: Sequence[Sequence[int]] = ()
) -> Loss:
    """``loss(logits (B, K, *S), label (B, 1, *S))``: Dice over the classes (over the whole batch
    with ``batch_dice``) plus cross entropy, both without the voxels labelled ``ignore``.

    Without ``ignore`` this is exactly ``DiceCELoss(to_onehot_y=True, softmax=True, batch=...)``;
    MONAI's ``DiceCELoss`` has no ignore index, its ``DiceLoss`` and torch's cross entropy do.

    With ``regions`` (the label values of each region, one logit channel each) the target of
    channel ``r`` is "the label is one of ``regions[r]``" and the loss is
    ``DiceLoss(sigmoid=True)`` plus ``binary_cross_entropy_with_logits`` on those masks, as
    nnU-Net's region-based training.
    """
    if regions:
        return _region_loss(batch_dice, ignore, [tuple(int(v) for v in r) for r in regions])
    from monai.losses import DiceLoss  # seconds to import: only when a run starts

    dice = DiceLoss(to_onehot_y=True, softmax=True, batch=batch_dice, ignore_index=ignore)
    index = -100 if ignore is None else ignore  # -100: cross_entropy's own "no ignore index"

    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return dice(logits, label) + F.cross_entropy(logits, label[:, 0].long(), ignore_index=index)

    return loss


def _region_loss(batch_dice: bool, ignore: int | None, regions: list[tuple[int, ...]]) -> Loss:
    """Sigmoid Dice + BCE on region masks; ``ignore`` voxels are zeroed in both Dice inputs (after
    the sigmoid, by MONAI's ``MaskedDiceLoss``) and weigh nothing in the BCE."""
    from monai.losses import DiceLoss, MaskedDiceLoss

    dice = DiceLoss(sigmoid=True, batch=batch_dice)
    masked_dice = MaskedDiceLoss(sigmoid=True, batch=batch_dice)

    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        target = torch.cat([region_mask(label, values) for values in regions], dim=1).to(logits.dtype)
        if ignore is None:
            return dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
        care = (label != ignore).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * care
        # the mean over the cared-for voxels of every channel: without ignored voxels, the plain mean
        bce = bce.sum() / (care.sum() * len(regions)).clamp_min(1)
        return masked_dice(logits, target, care) + bce

    return loss
