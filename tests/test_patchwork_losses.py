"""Patchwork losses: CE + Dice with don't care, per-sample F1, and the sampled-softmax label embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from flexpatch.errors import FlexPatchError
from flexpatch.patchwork.losses import LabelEmbedding, f1_per_sample, patch_loss


def _monai_dice(**extra) -> DiceLoss:
    return DiceLoss(
        include_background=False,
        softmax=True,
        to_onehot_y=True,
        batch=False,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        **extra,
    )


def _case(ndim: int = 2, b: int = 3, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (6, 5, 4)[:ndim]
    logits = torch.randn(b, c, *shape, generator=gen)
    target = torch.randint(0, c, (b, *shape), generator=gen)
    target[1][target[1] == 2] = 0  # class 2 absent in sample 1
    return logits, target


def _np_dice_loss(prob: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Reference per-sample soft Dice loss over the channels of prob/truth (B, C, *m).

    valid is (B, C, *m) too: one don't-care mask per channel, as in the multi-label case.
    """
    out = np.zeros(prob.shape[0])
    for i in range(prob.shape[0]):
        vals = []
        for k in range(prob.shape[1]):
            p, t = prob[i, k][valid[i, k]], truth[i, k][valid[i, k]]
            vals.append(1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5))
        out[i] = np.mean(vals)
    return out


@pytest.mark.parametrize("ndim", [2, 3])
def test_categorical_terms_match_torch_and_monai(ndim: int) -> None:
    logits, target = _case(ndim)
    ce, ce_b = patch_loss(logits, target, dice_weight=0.0)
    torch.testing.assert_close(ce, F.cross_entropy(logits, target))
    dice, dice_b = patch_loss(logits, target, ce_weight=0.0)
    torch.testing.assert_close(dice, _monai_dice()(logits, target[:, None]))
    per = _monai_dice(reduction="none")(logits, target[:, None]).flatten(1).mean(1)
    torch.testing.assert_close(dice_b, per)
    assert not dice_b.requires_grad and dice_b.shape == (logits.shape[0],)


def test_categorical_dont_care_matches_ignore_index() -> None:
    logits, target = _case()
    target[:, :2] = -1
    target[2] = -1  # a sample with no valid voxel at all
    ce, ce_b = patch_loss(logits, target, dice_weight=0.0)
    torch.testing.assert_close(ce, F.cross_entropy(logits, target, ignore_index=-1))
    assert ce_b[2] == 0
    dice, _ = patch_loss(logits, target, ce_weight=0.0)
    torch.testing.assert_close(dice, _monai_dice(ignore_index=-1)(logits, target[:, None]))
    # don't-care voxels do not matter: changing logits there leaves the loss unchanged
    changed = logits.clone()
    changed[:, :, :2] = 50 * torch.randn_like(changed[:, :, :2])
    changed[2] = -changed[2]
    torch.testing.assert_close(patch_loss(changed, target)[0], patch_loss(logits, target)[0])


def test_absent_class_scores_dice_one() -> None:
    # a near-certain background prediction of an all-background target: loss ~ 0 (s / s for classes 1..3)
    logits = torch.full((1, 4, 4, 4), -30.0)
    logits[:, 0] = 30.0
    target = torch.zeros(1, 4, 4, dtype=torch.int64)
    total, _ = patch_loss(logits, target)
    assert total.item() < 1e-6


def test_multilabel_matches_bce_and_numpy_dice() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 6, generator=gen)
    target = (torch.rand(2, 3, 5, 6, generator=gen) > 0.6).float()
    target[0, 1, :2] = -1
    valid = target >= 0
    bce, _ = patch_loss(logits, target, categorical=False, dice_weight=0.0)
    ref = F.binary_cross_entropy_with_logits(logits[valid], target[valid])
    torch.testing.assert_close(bce, ref)
    _, dice_b = patch_loss(logits, target, categorical=False, ce_weight=0.0)
    prob = torch.sigmoid(logits).numpy()
    expected = _np_dice_loss(prob, target.clamp(min=0).numpy(), valid.numpy())
    np.testing.assert_allclose(dice_b.numpy(), expected, rtol=1e-5)
    # without don't care the Dice term equals monai's sigmoid DiceLoss
    clean = target.clamp(min=0)
    dice, _ = patch_loss(logits, clean, categorical=False, ce_weight=0.0)
    mon = DiceLoss(sigmoid=True, batch=False, smooth_nr=1e-5, smooth_dr=1e-5)(logits, clean)
    torch.testing.assert_close(dice, mon)


def test_patch_loss_gradient_and_errors() -> None:
    logits, target = _case()
    logits.requires_grad_(True)
    total, _ = patch_loss(logits, target)
    total.backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(FlexPatchError):
        patch_loss(logits, target[:, :3])
    with pytest.raises(FlexPatchError):
        patch_loss(logits, target, categorical=False)


def test_f1_per_sample() -> None:
    target = torch.tensor([[[0, 1, 1, 2]], [[0, 0, 0, 0]], [[1, 1, -1, -1]]])  # (3, 1, 4)
    pred = torch.tensor([[[0, 1, 0, 2]], [[0, 0, 0, 0]], [[1, 1, 2, 2]]])
    logits = F.one_hot(pred, 3).movedim(-1, 1).float()
    f1 = f1_per_sample(logits, target)
    # sample 0: class 1 F1 = 2*1/(1+2), class 2 F1 = 1; sample 1: nothing present -> 1;
    # sample 2: class 2 is predicted only in don't-care voxels -> only class 1 counts, F1 = 1
    torch.testing.assert_close(f1, torch.tensor([(2 / 3 + 1) / 2, 1.0, 1.0]))
    multi = torch.tensor([[[1.0, 0.0, -1.0]], [[0.0, 0.0, 0.0]]])  # (2, 1, 3)
    mlog = torch.tensor([[[2.0, 2.0, 2.0]], [[-1.0, -1.0, -1.0]]])
    torch.testing.assert_close(f1_per_sample(mlog, multi, categorical=False), torch.tensor([2 / 3, 1.0]))


def test_sampled_loss_with_all_classes_equals_full_softmax() -> None:
    k, e = 7, 5
    emb = LabelEmbedding(k, e, seed=3)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, e, 4, 6, generator=gen, dtype=torch.float64)
    emb = emb.double()
    target = torch.randint(0, k, (2, 4, 6), generator=gen)
    target[0, :2] = -1
    sampled = emb.sampled_loss(feats, target, num_sampled=k, generator=torch.Generator().manual_seed(5))
    full = F.cross_entropy(emb.logits(feats), target, ignore_index=-1)
    torch.testing.assert_close(sampled, full, rtol=1e-12, atol=1e-12)


def test_sampled_loss_ignores_dont_care_and_checks_args() -> None:
    emb = LabelEmbedding(6, 3, seed=0)
    feats = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 6, (1, 4, 4))
    target[0, 0] = -1
    other = feats.clone()
    other[0, :, 0] = 100.0  # only don't-care voxels change
    loss_a = emb.sampled_loss(feats, target, 3, torch.Generator().manual_seed(1))
    loss_b = emb.sampled_loss(other, target, 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss_a, loss_b)
    empty = emb.sampled_loss(feats, torch.full_like(target, -1), 3)
    assert empty.item() == 0 and empty.requires_grad
    with pytest.raises(FlexPatchError):
        emb.sampled_loss(feats, target, 7)
    with pytest.raises(FlexPatchError):
        emb.logits(torch.randn(1, 4, 2, 2))


def test_embedding_learns_many_classes_and_decodes() -> None:
    k, e, side = 60, 8, 16
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    codes = F.normalize(torch.randn(k, e, generator=gen), dim=1)  # one input code per class

    def toy(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, k, (batch, side, side), generator=gen)
        image = codes[labels].movedim(-1, 1) + 0.02 * torch.randn(batch, e, side, side, generator=gen)
        return image, labels

    net = torch.nn.Conv2d(e, e, 1)
    emb = LabelEmbedding(k, e, seed=1)
    opt = torch.optim.Adam([*net.parameters(), *emb.parameters()], lr=0.05)
    image, labels = toy(4)
    sampler = torch.Generator().manual_seed(2)
    for _ in range(100):
        opt.zero_grad()
        emb.sampled_loss(net(image), labels, num_sampled=10, generator=sampler).backward()
        opt.step()
    test_image, test_labels = toy(1)
    with torch.no_grad():
        decoded = emb.decode(net(test_image)[0])
    assert decoded.dtype == torch.int64 and decoded.shape == (side, side)
    assert (decoded == test_labels[0]).float().mean().item() > 0.9


@pytest.mark.parametrize("ndim", [2, 3])
def test_batch_dice_matches_monai_batch_dice(ndim: int) -> None:
    """batch_dice: one Dice over the whole batch (nnU-Net), equal to monai's DiceLoss(batch=True)."""
    logits, target = _case(ndim)
    dice, per = patch_loss(logits, target, ce_weight=0.0, batch_dice=True)
    ref = DiceLoss(include_background=False, softmax=True, to_onehot_y=True, batch=True,
                   smooth_nr=1e-5, smooth_dr=1e-5)(logits, target[:, None])  # fmt: skip
    torch.testing.assert_close(dice, ref)
    _, per_sample = patch_loss(logits, target, ce_weight=0.0)
    torch.testing.assert_close(per, per_sample)  # mining scores stay per sample
