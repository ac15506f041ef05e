"""Patchwork losses: CE + soft Dice with don't-care voxels, per-patch F1, and candidate sampling.

Seed 04 (Deep Neural Patchworks) trains on patch stacks whose labels may hold ``-1`` ("don't care":
no loss there). :func:`patch_loss` returns a per-sample loss next to the batch mean because hard mining
(:mod:`flexpatch.patchwork.mining`) ranks patches by it. For many labels (> 50) the output buffers get
huge, so :class:`LabelEmbedding` embeds the classes in a low-dimensional feature space, trains with a
sampled softmax (TensorFlow's candidate sampling) and decodes by the maximal response.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexpatch.errors import FlexPatchError
from flexpatch.runtime import generator

SMOOTH = 1e-5
DECODE_CHUNK = 1 << 16  # voxels per chunk in LabelEmbedding.decode: bounds the (chunk, K) logit buffer


def _check_shapes(logits: Tensor, target: Tensor, categorical: bool) -> None:
    """Raise FlexPatchError unless logits (B, C, *m) and target fit together."""
    if logits.ndim < 3:
        raise FlexPatchError(f"logits must be (B, C, *matrix), got shape {tuple(logits.shape)}")
    want = (logits.shape[0], *logits.shape[2:]) if categorical else tuple(logits.shape)
    if tuple(target.shape) != tuple(want):
        kind = "(B, *matrix) class indices" if categorical else "(B, C, *matrix) 0/1 maps"
        raise FlexPatchError(f"target must be {kind} of shape {tuple(want)}, got {tuple(target.shape)}")
    if categorical and logits.shape[1] < 2:
        raise FlexPatchError(f"softmax logits need >= 2 channels (background, labels), got {logits.shape[1]}")


def _onehot(target: Tensor, num_classes: int, valid: Tensor) -> Tensor:
    """(B, *m) class indices -> (B, K, *m) float one-hot, all zero at don't-care voxels."""
    onehot = F.one_hot(target.clamp(min=0), num_classes).movedim(-1, 1).to(torch.float32)
    return onehot * valid.unsqueeze(1)


def _soft_dice_loss(prob: Tensor, truth: Tensor) -> Tensor:
    """Per (sample, channel) soft Dice loss ``1 - (2 I + s) / (P + T + s)``; inputs already masked.

    Equal smoothing in numerator and denominator is what makes a class absent from both target and
    prediction count as Dice 1 (loss 0): then I = P = T = 0 and the ratio is s / s. With soft
    predictions P is never exactly 0, so the loss of an absent class is P / (P + s): it vanishes only
    as the predicted mass for that class goes to zero, which is what pushes false positives down
    (the same convention as monai's DiceLoss with smooth_nr = smooth_dr).
    """
    axes = tuple(range(2, prob.ndim))
    inter = (prob * truth).sum(axes)
    denom = prob.sum(axes) + truth.sum(axes)
    return 1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)


def _masked_sums(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Sum and count of ``values`` over valid elements (what a batch mean is made of), and the mean
    per sample (0 where nothing is valid)."""
    values = values * valid
    valid = valid.to(values.dtype)
    per_sample = values.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1.0)
    return torch.stack([values.sum(), valid.sum()]), per_sample


def _unchanged(stats: Tensor) -> Tensor:
    return stats


def _dice_stats(prob: Tensor, truth: Tensor, dice_b: Tensor, batch_dice: bool) -> Tensor:
    """What the batch Dice term is computed from: the overlap and volumes per class over the batch
    (``batch_dice``: the batch as one sample), else the per-sample Dice losses' sum and count."""
    if batch_dice:
        axes = (0, *range(2, prob.ndim))
        return torch.cat([(prob * truth).sum(axes), prob.sum(axes) + truth.sum(axes)])
    return torch.stack([dice_b.sum(), torch.tensor(float(dice_b.numel()), device=dice_b.device)])


def _terms(logits: Tensor, target: Tensor, categorical: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cross entropy's (sum, count) and per-sample mean over valid voxels, and the prediction
    and truth the Dice compares (don't-care voxels zero in both; categorical: foreground only)."""
    valid = target >= 0  # NaN >= 0 is False: NaN is don't care as well
    if categorical:
        ce, ce_b = _masked_sums(F.cross_entropy(logits, target.clamp(min=0), reduction="none"), valid)
        prob = torch.softmax(logits, 1)[:, 1:] * valid.unsqueeze(1)
        return ce, ce_b, prob, _onehot(target, logits.shape[1], valid)[:, 1:]
    truth = torch.where(valid, target, torch.zeros_like(target)).to(logits.dtype)
    ce, ce_b = _masked_sums(F.binary_cross_entropy_with_logits(logits, truth, reduction="none"), valid)
    return ce, ce_b, torch.sigmoid(logits) * valid, truth


def patch_loss(
    logits: Tensor,
    target: Tensor,
    categorical: bool = True,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    batch_dice: bool = False,
    total: Callable[[Tensor], Tensor] = _unchanged,
) -> tuple[Tensor, Tensor]:
    """Cross entropy + soft Dice with don't-care voxels; returns (mean loss, detached per-sample loss).

    Args:
        logits: ``(B, C, *m)`` raw network outputs.
        target: categorical: ``(B, *m)`` int64 class indices in ``[0, C)``; non-categorical (multi-label,
            sigmoid): ``(B, C, *m)`` float 0/1 maps. ``-1`` (and, for floats, NaN) marks "don't care".
        categorical: softmax over channels (True) or an independent sigmoid per channel (False).
        dice_weight, ce_weight: weights of the two terms.
        total: sums the batch's statistics over the processes that each hold part of it
            (:meth:`flexpatch.distributed.Dist.sum` under torchrun, so that the mean loss is the
            whole batch's and its gradient too); the identity on one process.

    Categorical: softmax cross entropy with ``ignore_index=-1`` (the batch term equals
    ``F.cross_entropy(logits, target, ignore_index=-1)``), plus soft Dice over the foreground classes
    ``1..C-1``, per sample, don't-care voxels removed from prediction and target, averaged over classes
    and samples (equals monai ``DiceLoss(include_background=False, softmax=True, to_onehot_y=True,
    batch=False, smooth_nr=1e-5, smooth_dr=1e-5)``). Non-categorical: BCE with logits averaged over valid
    elements plus soft Dice over every channel on the sigmoid.

    ``batch_dice`` computes the Dice term of the mean loss over the whole batch (nnU-Net's choice):
    a class absent from one small patch then no longer costs that patch a Dice loss near 1 for any
    predicted mass, which otherwise teaches a network to never predict rare classes. The per-sample
    loss keeps per-sample Dice either way.

    The batch CE averages over all valid voxels of the batch, while the per-sample CE averages over a
    sample's own valid voxels, so the mean loss equals the mean of the per-sample losses only when
    every sample has the same number of valid voxels. The per-sample loss serves hard mining.
    """
    _check_shapes(logits, target, categorical)
    logits = logits.float()  # softmax / Dice sums are unstable in half precision
    ce, ce_b, prob, truth = _terms(logits, target, categorical)
    dice_b = _soft_dice_loss(prob, truth).mean(1)
    # the batch's terms from sums (one reduction across processes): CE sum and count, then Dice's
    sums = total(torch.cat([ce, _dice_stats(prob, truth, dice_b, batch_dice)]))
    mean_ce = sums[0] / sums[1].clamp(min=1.0)
    if batch_dice:
        inter, denom = sums[2:].reshape(2, -1)
        dice = (1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)).mean()
    else:
        dice = sums[2] / sums[3].clamp(min=1.0)
    per_sample = ce_weight * ce_b + dice_weight * dice_b
    return ce_weight * mean_ce + dice_weight * dice, per_sample.detach()


@torch.no_grad()
def f1_per_sample(logits: Tensor, target: Tensor, categorical: bool = True) -> Tensor:
    """Hard Dice/F1 per sample: mean over foreground classes present in target or prediction.

    Prediction: argmax over channels (categorical) or ``logits > 0`` (sigmoid). Classes ``1..C-1``
    (categorical) or all channels (multi-label); don't-care voxels are ignored. A sample where no class
    is present in either target or prediction scores 1.0. Returns ``(B,)`` float32.
    """
    _check_shapes(logits, target, categorical)
    valid = target >= 0
    if categorical:
        num_classes = logits.shape[1]
        pred = _onehot(logits.argmax(1), num_classes, valid)[:, 1:]
        truth = _onehot(target, num_classes, valid)[:, 1:]
    else:
        pred = ((logits > 0) & valid).float()
        truth = ((target > 0.5) & valid).float()
    axes = tuple(range(2, pred.ndim))
    inter = (pred * truth).sum(axes)
    denom = pred.sum(axes) + truth.sum(axes)
    present = denom > 0
    f1 = torch.where(present, 2.0 * inter / denom.clamp(min=1.0), torch.zeros_like(denom))
    count = present.sum(1)
    return torch.where(count > 0, f1.sum(1) / count.clamp(min=1), torch.ones_like(f1[:, 0]))


class LabelEmbedding(nn.Module):
    """Classes embedded in an E-dimensional feature space; class logits are ``w_k . f + b_k``.

    The network outputs E feature channels instead of K class channels (E << K), so full-image
    prediction buffers stay small. Training uses :meth:`sampled_loss` (sampled softmax), inference
    :meth:`decode` (the class of maximal response).

    Args:
        num_classes: K, including background.
        dim: E, the embedding dimension.
        seed: seeds the initial class vectors (normal, std 1/sqrt(E)).
    """

    def __init__(self, num_classes: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        if num_classes < 2 or dim < 1:
            raise FlexPatchError(f"LabelEmbedding needs num_classes >= 2, dim >= 1; got {num_classes}, {dim}")
        gen = generator(seed)
        self.num_classes = num_classes
        self.dim = dim
        self.weight = nn.Parameter(torch.randn(num_classes, dim, generator=gen) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def _check_features(self, features: Tensor, channel_axis: int) -> None:
        if features.ndim <= channel_axis or features.shape[channel_axis] != self.dim:
            raise FlexPatchError(
                f"features need {self.dim} channels on axis {channel_axis}, got shape {tuple(features.shape)}"
            )

    def logits(self, features: Tensor) -> Tensor:
        """Full class logits: features ``(B, E, *m)`` -> ``(B, K, *m)``."""
        self._check_features(features, 1)
        out = torch.einsum("be...,ke->bk...", features, self.weight)
        return out + self.bias.view(1, -1, *([1] * (features.ndim - 2)))

    def sampled_loss(
        self,
        features: Tensor,
        target: Tensor,
        num_sampled: int,
        generator: torch.Generator | None = None,
        total: Callable[[Tensor], Tensor] = _unchanged,
    ) -> Tensor:
        """Sampled softmax cross entropy (candidate sampling); ``-1`` target voxels are ignored.

        One set of ``num_sampled`` negative classes is drawn per call (per batch), uniformly without
        replacement from all K classes. Each valid voxel scores ``[its true class, the sampled ones]``;
        a sampled class equal to the voxel's true class (an "accidental hit") is masked to -inf so the
        true class is not counted twice; cross entropy takes the true class at index 0. With
        ``num_sampled == K`` this is exactly the full softmax cross entropy.

        Args:
            features: ``(B, E, *m)``.
            target: ``(B, *m)`` int64 class indices, ``-1`` = don't care.
            num_sampled: negatives per batch, ``1 <= num_sampled <= K``.
            generator: CPU generator for the draw (global RNG when None).
            total: sums (cross-entropy sum, voxel count) over the processes that each hold part
                of the batch, as in :func:`patch_loss`; the identity on one process.
        """
        self._check_features(features, 1)
        if tuple(target.shape) != (features.shape[0], *features.shape[2:]):
            raise FlexPatchError(f"target must have shape {(features.shape[0], *features.shape[2:])}")
        if not 1 <= num_sampled <= self.num_classes:
            raise FlexPatchError(f"num_sampled must be in [1, {self.num_classes}], got {num_sampled}")
        valid = target >= 0
        feats = features.movedim(1, -1)[valid]  # (V, E)
        true_cls = target[valid]  # (V,)
        # drawn whatever the batch holds: every process that trains on part of it draws alike
        sampled = torch.randperm(self.num_classes, generator=generator)[:num_sampled].to(features.device)
        if true_cls.numel() == 0:  # keeps the graph, contributes nothing
            nothing = (features * 0).sum() + (self.weight * 0).sum() + (self.bias * 0).sum()
            sums = total(torch.stack([nothing, nothing.detach()]))
            return sums[0] / sums[1].clamp(min=1.0)
        true_logit = (feats * self.weight[true_cls]).sum(-1) + self.bias[true_cls]
        neg_logits = feats @ self.weight[sampled].T + self.bias[sampled]  # (V, S)
        neg_logits = neg_logits.masked_fill(true_cls[:, None] == sampled[None, :], float("-inf"))
        # TF's sampled softmax subtracts log Q(class) from every logit. The proposal is uniform, so
        # Q is the same for the true and every sampled class: a constant shift that the softmax cancels.
        all_logits = torch.cat([true_logit[:, None], neg_logits], 1)
        ce = F.cross_entropy(all_logits, torch.zeros_like(true_cls), reduction="sum")
        sums = total(torch.stack([ce, torch.tensor(float(len(true_cls)), device=ce.device)]))
        return sums[0] / sums[1].clamp(min=1.0)

    @torch.no_grad()
    def decode(self, features: Tensor) -> Tensor:
        """Class map of maximal response: features ``(E, *s)`` -> ``(*s)`` int64, chunked over voxels."""
        self._check_features(features, 0)
        flat = features.reshape(self.dim, -1).T  # (V, E)
        out = torch.empty(flat.shape[0], dtype=torch.int64, device=features.device)
        weight, bias = self.weight.to(flat.dtype), self.bias.to(flat.dtype)
        for start in range(0, flat.shape[0], DECODE_CHUNK):
            chunk = flat[start : start + DECODE_CHUNK]
            out[start : start + chunk.shape[0]] = (chunk @ weight.T + bias).argmax(1)
        return out.reshape(features.shape[1:])
