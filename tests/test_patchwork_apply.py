"""Patchwork application: lazy evaluation counts, identity stitching, output grids (2D and 3D)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.patchwork import apply
from flexpatch.patchwork.scheme import Scheme


class IdentityBlock:
    """A stand-in patchwork whose every block returns its image crop (B_n([I, C]) = I)."""

    num_outputs = 1

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def forward_level(self, level, image_crop, parent_out=None, rel=None):
        return image_crop[:, :1]


class ScoreBlock(IdentityBlock):
    """Returns a constant logit per patch (its mean intensity), so attention ranks patches by it."""

    def forward_level(self, level, image_crop, parent_out=None, rel=None):
        return (
            image_crop[:, :1]
            .mean(dim=tuple(range(2, image_crop.ndim)), keepdim=True)
            .expand_as(image_crop[:, :1])
        )


def _affine(ndim, spacing):
    a = np.eye(4)
    a[:ndim, :ndim] = np.diag(spacing)
    a[:ndim, 3] = 10.0
    return a


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_block_stitches_back_the_nearest_neighbour_image(ndim):
    shape = (37, 30, 26)[:ndim]
    image = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    scheme = Scheme(ndim=ndim, depth=2, matrix=(8,) * ndim, fov_rel=0.6, destvox_rel=1.0)
    # jitter: a grid exactly half a voxel off would put patch voxels on rounding ties
    opts = apply.ApplyOptions(generate="tree", window="constant", batch_size=64, jitter=0.05, num_chunks=2)
    out = apply.apply_image(IdentityBlock(2), image, _affine(ndim, (1.5,) * ndim), scheme, opts, lambda x: x)
    assert out.values.shape == (1, *shape)
    covered = out.values.numpy() != 0
    assert covered.mean() > 0.97
    np.testing.assert_allclose(out.values.numpy()[covered], image[covered], atol=1e-4)
    # a coarser finest level (2 image voxels per patch voxel) gives the downgraded image:
    # every output voxel holds the value of some image voxel within one voxel of it
    coarse = Scheme(ndim=ndim, depth=2, matrix=(8,) * ndim, fov_rel=0.6, destvox_rel=2.0)
    out = apply.apply_image(IdentityBlock(2), image, _affine(ndim, (1.5,) * ndim), coarse, opts, lambda x: x)
    assert (
        float(torch.corrcoef(torch.stack([out.values.flatten(), torch.from_numpy(image).flatten()]))[0, 1])
        > 0.2
    )


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.01])
def test_lazy_evaluation_keeps_exactly_the_top_fraction(ndim, fraction):
    shape = (40,) * ndim
    image = np.random.default_rng(1).random((1, *shape)).astype(np.float32)
    scheme = Scheme(ndim=ndim, depth=3, matrix=(4,) * ndim, fov_rel=0.5, destvox_rel=2.0)
    opts = apply.ApplyOptions(
        generate="random", num_patches=12, lazy=fraction, branch_factor=3, batch_size=256
    )
    out = apply.apply_image(ScoreBlock(3), image, _affine(ndim, (1.0,) * ndim), scheme, opts, torch.sigmoid)
    n0 = 12
    n1 = 3 * max(1, math.floor(n0 * fraction))
    n2 = 3 * max(1, math.floor(n1 * fraction))
    assert out.stats["patches"] == [n0, n1, n2]


def test_lazy_keeps_the_patches_with_the_highest_attention():
    logits = torch.tensor([0.0, 5.0, -3.0, 2.0, 1.0]).reshape(5, 1, 1, 1).expand(5, 1, 2, 2)
    np.testing.assert_array_equal(apply._keep(logits, 0.4, False, 1), [1, 3])
    np.testing.assert_array_equal(apply._keep(logits, 0.1, False, 1), [1])  # max(1, floor(0.5)) = 1
    np.testing.assert_array_equal(apply._keep(logits, None, False, 1), np.arange(5))
    cat = torch.cat([torch.full_like(logits, 9.0), logits], dim=1)  # background channel is ignored
    np.testing.assert_array_equal(apply._keep(cat, 0.4, True, 2), [1, 3])


@pytest.mark.parametrize("ndim", [2, 3])
def test_sampling_factor_grid(ndim):
    shape = (20, 16, 12)[:ndim]
    out_shape, grid = apply.output_grid(shape, 2.0)
    assert out_shape == tuple(2 * s for s in shape)
    # output voxel centres 0 and 1 straddle input voxel 0 symmetrically
    np.testing.assert_allclose(grid[:ndim, :ndim] @ np.zeros(ndim) + grid[:ndim, ndim], -0.25)
    np.testing.assert_allclose(grid[:ndim, :ndim] @ np.ones(ndim) + grid[:ndim, ndim], 0.25)
    image = np.ones((1, *shape), dtype=np.float32)
    scheme = Scheme(ndim=ndim, depth=1, matrix=(8,) * ndim, fov_rel=0.5)
    opts = apply.ApplyOptions(sampling_factor=2.0, window="constant")
    out = apply.apply_image(IdentityBlock(1), image, _affine(ndim, (1.0,) * ndim), scheme, opts, lambda x: x)
    assert out.values.shape[1:] == out_shape
    # patch voxels (1.25 image voxels) are larger than the output's (0.5): each patch is pulled onto
    # every output voxel it covers, so the grid has no holes; only the outer ring, whose nearest patch
    # voxel lies outside the image (zero padding), differs from the image's 1
    inner = (0, *(slice(1, -1) for _ in range(ndim)))
    torch.testing.assert_close(out.values[inner], torch.ones_like(out.values[inner]), atol=1e-4, rtol=0)


def test_options_are_checked():
    with pytest.raises(FlexPatchError, match="lazy"):
        apply.ApplyOptions(lazy=1.5).check(3)
    with pytest.raises(FlexPatchError, match="level"):
        apply.ApplyOptions(level=5).check(3)
    with pytest.raises(FlexPatchError, match="generate"):
        apply.ApplyOptions(generate="grid").check(3)
    for bad in (0, -5):
        with pytest.raises(FlexPatchError, match="memory must be positive"):
            apply.ApplyOptions(memory=bad).check(3)
    apply.ApplyOptions(memory=None).check(3)
    assert apply.ApplyOptions(lazy=0.25).branches() == 4


@pytest.mark.parametrize("ndim", [2, 3])
def test_level_mix_fills_what_the_finest_level_left_out(ndim):
    """Lazy evaluation leaves regions without fine patches; level='mix' takes the coarse level there."""
    shape = (32,) * ndim
    image = np.random.default_rng(2).random((1, *shape)).astype(np.float32) + 1.0  # never 0
    scheme = Scheme(ndim=ndim, depth=2, matrix=(8,) * ndim, fov_rel=0.5, destvox_rel=1.0)
    base = dict(generate="tree", window="constant", lazy=0.25, batch_size=256)
    last = apply.apply_image(IdentityBlock(2), image, _affine(ndim, (1.0,) * ndim), scheme,
                             apply.ApplyOptions(**base), lambda x: x)  # fmt: skip
    mix = apply.apply_image(IdentityBlock(2), image, _affine(ndim, (1.0,) * ndim), scheme,
                            apply.ApplyOptions(**base, level="mix"), lambda x: x)  # fmt: skip
    fine = last.values != 0
    assert 0 < float(fine.float().mean()) < 0.9
    torch.testing.assert_close(mix.values[fine], last.values[fine])
    assert float((mix.values != 0).float().mean()) > float(fine.float().mean())


def test_public_api_names():
    import flexpatch

    assert flexpatch.train_patchwork.__module__ == "flexpatch.patchwork.train"
    assert flexpatch.ApplyOptions().generate == "tree"


def test_options_are_frozen_and_carry_no_output():
    """What happened per case is in Applied.stats (and the runner's info), not in the options."""
    import dataclasses

    opts = apply.ApplyOptions()
    assert "stats" not in {f.name for f in dataclasses.fields(opts)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.batch_size = 2  # type: ignore[misc]


def test_attention_is_sigmoid_for_labels_and_foreground_probability_for_softmax():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).reshape(2, 2, 1, 1).expand(2, 2, 3, 3)
    multi = apply.attention(logits, categorical=False)
    torch.testing.assert_close(multi, torch.sigmoid(torch.tensor([[1.0, 0.0], [0.0, 2.0]])).mean(1))
    soft = apply.attention(logits, categorical=True)
    torch.testing.assert_close(soft, 1 - torch.softmax(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), 1)[:, 0])
    # softmax logits shifted by a constant are the same prediction: the same attention
    torch.testing.assert_close(apply.attention(logits + 7, categorical=True), soft)
