"""geometry.extract_each and the patchwork network: shapes, sharing, forwarding, config, matrix checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, extract, extract_each
from flexpatch.patchwork.model import PatchworkNet

# The smallest unet the registry builds: 4 channels, 2 downsamplings (divisor 4), 2 convs per level.
TINY = {"channels": 4, "levels": 2, "convs_per_level": 2}


def _rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    if ndim == 2:
        t = rng.uniform(0, 2 * math.pi)
        return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q


def _general_affine(ndim: int, rng: np.random.Generator, spatial: tuple[int, ...]) -> np.ndarray:
    a = np.eye(ndim + 1)
    a[:ndim, :ndim] = _rotation(ndim, rng) @ np.diag(rng.uniform(0.5, 1.5, ndim))
    a[:ndim, ndim] = rng.uniform(-2, np.asarray(spatial) / 2)
    return a


def _box_affine(ndim: int, rng: np.random.Generator) -> np.ndarray:
    a = np.eye(ndim + 1)
    a[:ndim, ndim] = rng.integers(-3, 6, ndim)  # some boxes leave the source: padding agrees too
    return a


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("kind", ["general", "box"])
def test_extract_each_equals_extract(ndim: int, mode: str, kind: str) -> None:
    rng = np.random.default_rng(ndim * 10 + len(mode) + len(kind))
    spatial, shape = (9, 11, 10)[:ndim], (5, 6, 4)[:ndim]
    sources = torch.randn(3, 2, *spatial)
    general = kind == "general"
    affines = np.stack(
        [_general_affine(ndim, rng, spatial) if general else _box_affine(ndim, rng) for _ in "abc"]
    )
    for padding in ("zeros", "border"):
        out = extract_each(sources, torch.from_numpy(affines).float(), shape, mode=mode, padding=padding)
        assert out.shape == (3, 2, *shape)
        for b in range(3):
            ref = extract(sources[b], [Patch(affines[b], shape)], mode=mode, padding=padding)[0]
            torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5)


def test_extract_each_gradient_and_errors() -> None:
    sources = torch.randn(2, 1, 8, 8, requires_grad=True)
    rel = torch.eye(3).repeat(2, 1, 1)
    extract_each(sources, rel, (8, 8), mode="linear").sum().backward()
    assert sources.grad is not None and torch.allclose(sources.grad, torch.ones_like(sources))
    with pytest.raises(FlexPatchError, match="affines"):
        extract_each(sources, torch.eye(3)[None], (4, 4))
    with pytest.raises(FlexPatchError, match="spatial axes"):
        extract_each(sources, rel, (4, 4, 4))


def _crops(
    ndim: int, matrices: list[int], batch: int = 2
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Image crops per level and relative affines: each child is the central half of its parent."""
    crops = [torch.randn(batch, 1, *(m,) * ndim) for m in matrices]
    rels: list[torch.Tensor | None] = [None]
    for parent, child in zip(matrices, matrices[1:]):
        a = torch.eye(ndim + 1, dtype=torch.float64)
        step = (parent - 1) / 2 / (child - 1)
        a[:ndim, :ndim] *= step
        a[:ndim, ndim] = (parent - 1) / 4
        rels.append(a.repeat(batch, 1, 1))
    return crops, rels


@pytest.mark.parametrize("ndim", [2, 3])
def test_output_shapes_per_level(ndim: int) -> None:
    torch.manual_seed(0)
    matrices = [16, 8, 16]  # levels may differ in matrix size
    net = PatchworkNet(ndim, 1, 3, depth=3, block_options=TINY, intermediate_out=2, final_block=True)
    assert [net.level_channels(k) for k in range(3)] == [5, 5, 3]
    crops, rels = _crops(ndim, matrices)
    outs = net(crops, rels)
    for k, out in enumerate(outs):
        assert out.shape == (2, net.level_channels(k), *(matrices[k],) * ndim)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_identical_blocks_share_parameters() -> None:
    shared = PatchworkNet(2, 1, 2, depth=3, block_options=TINY, identical_blocks=True, intermediate_out=1)
    separate = PatchworkNet(2, 1, 2, depth=3, block_options=TINY, intermediate_out=1)
    assert len(shared.blocks) == 1 and shared.block(0) is shared.block(2)
    assert _count(shared) == _count(shared.blocks[0])
    assert _count(separate) > 2 * _count(shared)
    crops, rels = _crops(2, [16, 16, 16])
    outs = shared(crops, rels)
    assert [o.shape[1] for o in outs] == [3, 3, 2]  # the last level is sliced to num_outputs


@pytest.mark.parametrize("forward_type", ["concat", "sigmoid", "none"])
def test_gradient_reaches_level_zero_only_when_forwarding(forward_type: str) -> None:
    torch.manual_seed(0)
    net = PatchworkNet(2, 1, 2, depth=2, block_options=TINY, forward_type=forward_type)
    crops, rels = _crops(2, [16, 16])
    net(crops, rels)[-1].square().mean().backward()
    grads = [p.grad for p in net.block(0).parameters()]
    if forward_type == "none":
        assert all(g is None for g in grads)
        assert net.block_in_channels == 1 and net.block(1).encoder[0][0].conv.in_channels == 1
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_crop_returns_parent_output(ndim: int) -> None:
    net = PatchworkNet(ndim, 1, 2, depth=2, block_options=TINY, intermediate_out=1)
    parent = torch.randn(2, 3, *(8,) * ndim)
    rel = torch.eye(ndim + 1).repeat(2, 1, 1)
    assert torch.equal(net.crop_parent(parent, rel, (8,) * ndim), parent)
    out = net.forward_level(1, torch.randn(2, 1, *(8,) * ndim), parent, rel)
    assert out.shape == (2, 2, *(8,) * ndim)


def test_config_round_trip_gives_identical_outputs() -> None:
    torch.manual_seed(0)
    net = PatchworkNet(
        2, 1, 2, depth=2, block_options=TINY, intermediate_out=1, forward_type="sigmoid", interp="linear",
        final_block=True, final_all_levels=True,
    )  # fmt: skip
    with torch.no_grad():  # a nonzero head so that the round trip covers it
        net.head.conv2.weight.normal_()
    cfg = json.loads(json.dumps(net.config()))
    assert cfg["block_options"] == TINY and cfg["interp"] == "linear"
    again = PatchworkNet.from_config(cfg)
    again.load_state_dict(net.state_dict())
    crops, rels = _crops(2, [16, 16])
    for a, b in zip(net(crops, rels), again(crops, rels)):
        assert torch.equal(a, b)
    with pytest.raises(FlexPatchError, match="malformed"):
        PatchworkNet.from_config({**cfg, "bogus": 1})


def test_check_matrix_names_the_level() -> None:
    net = PatchworkNet(2, 1, 2, depth=2, block_options=TINY)
    net.check_matrix([(16, 16), (8, 12)])
    with pytest.raises(FlexPatchError, match=r"level 1 matrix \(16, 10\).*unet") as err:
        net.check_matrix([(16, 16), (16, 10)])
    assert "\n" not in str(err.value)
    with pytest.raises(FlexPatchError, match="depth 2"):
        net.check_matrix([(16, 16)])


def test_bad_arguments() -> None:
    with pytest.raises(FlexPatchError, match="forward_type"):
        PatchworkNet(2, 1, 2, depth=2, block_options=TINY, forward_type="bridge")
    with pytest.raises(FlexPatchError, match="interp"):
        PatchworkNet(2, 1, 2, depth=2, block_options=TINY, interp="cubic")
    net = PatchworkNet(2, 1, 2, depth=2, block_options=TINY)
    with pytest.raises(FlexPatchError, match="parent"):
        net.forward_level(1, torch.randn(1, 1, 16, 16))
    with pytest.raises(FlexPatchError, match="depth 2"):
        net([torch.randn(1, 1, 16, 16)], [None])


def test_extract_each_samples_half_precision_sources_on_a_float32_grid():
    """Under bfloat16 autocast the parent output is bfloat16; its crop must land on the same voxels."""
    from flexpatch.geometry import extract_each

    src = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32)
    aff = torch.eye(3).repeat(2, 1, 1)
    aff[:, :2, :2] *= 31 / 15  # a coarse 16^2 grid over the 32^2 source: bf16 coordinates would round off
    aff[:, :2, 2] = 0.0
    full = extract_each(src, aff, (16, 16), mode="nearest")
    half = extract_each(src.bfloat16(), aff, (16, 16), mode="nearest")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, full.bfloat16())
