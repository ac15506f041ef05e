"""The segmentation loss of the core trainer and the cascade: soft Dice plus cross entropy
(MONAI's ``DiceCELoss``), with nnU-Net's ``ignore`` label left out of both terms; for nnU-Net's
region-based labels, sigmoid Dice plus binary cross entropy on the region masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from flexpatch.data.regions import region_mask
from flexpatch.distributed import Dist

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr


def segmentation_loss(
    batch_dice: bool, ignore: int | None = None, regions: Sequence[Sequence[int]] = (), dist: Dist = Dist()
) -> Loss:
    """``loss(logits (B, K, *S), label (B, 1, *S))``: Dice over the classes (over the whole batch
    with ``batch_dice``) plus cross entropy, both without the voxels labelled ``ignore``.

    Without ``ignore`` this is exactly ``DiceCELoss(to_onehot_y=True, softmax=True, batch=...)``;
    MONAI's ``DiceCELoss`` has no ignore index, its ``DiceLoss`` and torch's cross entropy do.

    With ``regions`` (the label values of each region, one logit channel each) the target of
    channel ``r`` is "the label is one of ``regions[r]``" and the loss is
    ``DiceLoss(sigmoid=True)`` plus ``binary_cross_entropy_with_logits`` on those masks, as
    nnU-Net's region-based training.

    Under torchrun (``dist`` active) each process holds part of the batch: the loss is then
    computed from sums over all processes (:func:`summed_loss`), so it is the whole batch's loss,
    batch Dice and the ignore label included, and not a mean of per-process losses.
    """
    regions = [tuple(int(v) for v in r) for r in regions]
    if dist.active:
        return summed_loss(batch_dice, ignore, regions, dist.sum)
    if regions:
        return _region_loss(batch_dice, ignore, regions)
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


def summed_loss(
    batch_dice: bool,
    ignore: int | None,
    regions: Sequence[tuple[int, ...]],
    total: Callable[[torch.Tensor], torch.Tensor],
) -> Loss:
    """:func:`segmentation_loss` from sufficient statistics (per class: overlap, predicted and true
    volume; the cross entropy's sum and voxel count) that ``total`` sums over processes.

    ``total`` is differentiable (its backward sums the gradients over the processes too) and every
    process computes the same loss from the same totals; DistributedDataParallel's mean of the
    processes' gradients is then exactly the whole batch's gradient. With ``total`` the identity
    this equals MONAI's ``DiceCELoss`` (tested), which the single process keeps using.
    """

    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if regions:
            probs, target, care, ce = _region_terms(logits, label, ignore, regions)
        else:
            probs, target, care, ce = _softmax_terms(logits, label, ignore)
        if care is not None:
            probs, target = probs * care, target * care
        axes = [0, *range(2, logits.ndim)] if batch_dice else list(range(2, logits.ndim))
        overlap, predicted, true = ((probs * target).sum(axes), probs.sum(axes), target.sum(axes))
        if batch_dice:
            sums = total(torch.cat([overlap, predicted, true, ce]))
            overlap, predicted, true = sums[:-2].reshape(3, -1)
            dice = (1 - (2 * overlap + SMOOTH) / (predicted + true + SMOOTH)).mean()
        else:  # a Dice per sample and class: their mean over the whole batch
            per = 1 - (2 * overlap + SMOOTH) / (predicted + true + SMOOTH)
            count = torch.tensor([float(per.numel())], device=per.device)
            sums = total(torch.cat([per.sum()[None], count, ce]))
            dice = sums[0] / sums[1]
        return dice + sums[-2] / sums[-1].clamp_min(1)

    return loss


def _softmax_terms(
    logits: torch.Tensor, label: torch.Tensor, ignore: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Softmax, one-hot target, the cared-for voxels, and (cross-entropy sum, voxel count)."""
    index = -100 if ignore is None else ignore
    ce_sum = F.cross_entropy(logits, label[:, 0].long(), ignore_index=index, reduction="sum")
    care = None if ignore is None else (label != ignore).to(logits.dtype)
    kept = label if ignore is None else torch.where(label == ignore, torch.zeros_like(label), label)
    target = F.one_hot(kept[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    count = (label != index).sum().to(logits.dtype)
    return torch.softmax(logits, 1), target, care, torch.stack([ce_sum, count])


def _region_terms(
    logits: torch.Tensor, label: torch.Tensor, ignore: int | None, regions: Sequence[tuple[int, ...]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Sigmoids, region masks, the cared-for voxels, and (binary cross-entropy sum, count)."""
    target = torch.cat([region_mask(label, values) for values in regions], dim=1).to(logits.dtype)
    care = None if ignore is None else (label != ignore).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if care is None:
        ce = torch.stack([bce.sum(), torch.tensor(float(bce.numel()), device=bce.device)])
    else:
        ce = torch.stack([(bce * care).sum(), care.sum() * len(regions)])
    return torch.sigmoid(logits), target, care, ce
