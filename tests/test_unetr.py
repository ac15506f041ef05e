"""UNETR with any token size: MONAI equality at token 16, shapes, position embeddings, FlexiViT resize."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNETR

from flexpatch import FlexPatchError
from flexpatch.models import ModelSpec, build, create_model, model_divisor
from flexpatch.models.unetr import (
    FlexUNETR,
    decoder_strides,
    interpolation_matrix,
    pi_resize,
    resample_grid,
    resize_tokens,
)

TINY = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 2, "num_layers": 2, "feature_size": 8}
BASE = {2: 64, 3: 32}  # input edge the tests aim for
TOKENS = [4, 8, 12, 16, 24, 32]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(ndim: int, token: int | list[int], img: int | list[int], **kwargs) -> FlexUNETR:
    return create_model("unetr", ndim, 1, 3, token_size=token, img_size=img, **{**TINY, **kwargs})


def _mode(ndim: int) -> str:
    return "trilinear" if ndim == 3 else "bilinear"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ((16,), [(2,), (2,), (2,), (2,)]),
        ((12,), [(3,), (2,), (2,)]),
        ((24,), [(3,), (2,), (2,), (2,)]),
        ((5,), [(5,)]),
        ((12, 16), [(1, 2), (3, 2), (2, 2), (2, 2)]),
        ((16, 16, 4), [(2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)]),
    ],
)
def test_decoder_strides_golden(token: tuple[int, ...], expected: list[tuple[int, ...]]) -> None:
    strides = decoder_strides(token)
    assert strides == expected
    assert tuple(math.prod(s[a] for s in strides) for a in range(len(token))) == token
    with pytest.raises(FlexPatchError, match="exceed 1"):
        decoder_strides((1, 1))


@pytest.mark.parametrize(("n_in", "n_out"), [(4, 8), (8, 4), (6, 3), (5, 7), (7, 3), (3, 3), (1, 4)])
def test_interpolation_matrix_matches_torch_antialiased_linear(n_in: int, n_out: int) -> None:
    basis = torch.eye(n_in, dtype=torch.float64)[:, None, None, :]
    ref = F.interpolate(basis, size=(1, n_out), mode="bilinear", align_corners=False, antialias=True)
    np.testing.assert_allclose(interpolation_matrix(n_in, n_out), ref[:, 0, 0, :].T.numpy(), atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_resample_grid_is_torch_interpolation_and_identity_on_a_matching_grid(ndim: int) -> None:
    x = torch.randn(1, 5, *(3, 4, 2)[:ndim], dtype=torch.float64)
    big = (7, 8, 5)[:ndim]
    ref = F.interpolate(x, size=big, mode=_mode(ndim), align_corners=False)
    torch.testing.assert_close(resample_grid(x, big), ref)
    assert resample_grid(x, x.shape[2:]) is x


@pytest.mark.parametrize("ndim", [2, 3])
def test_token_16_is_monai_unetr_with_its_weights(ndim: int) -> None:
    torch.manual_seed(0)
    size = (BASE[ndim],) * ndim
    small = {k: v for k, v in TINY.items() if k != "num_layers"}  # MONAI fixes 12 layers
    ref = UNETR(1, 3, size, spatial_dims=ndim, **small).eval()
    model = create_model("unetr", ndim, 1, 3, img_size=list(size), num_layers=12, **small).eval()
    model.load_state_dict(ref.state_dict())  # strict: the same parameter names and shapes
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("token", TOKENS)
def test_every_token_size_runs_forward_and_backward(ndim: int, token: int) -> None:
    torch.manual_seed(0)
    size = token * -(-BASE[ndim] // token)  # the smallest multiple of the token at least BASE
    model = _tiny(ndim, token, size)
    assert model.divisor == (token,) * ndim and model.steps == len(decoder_strides((token,)))
    out = model(torch.randn(1, 1, *(size,) * ndim))
    assert out.shape == (1, 3, *(size,) * ndim)
    out.square().mean().backward()
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    assert frozen and all(".norm_cross_attn." in name for name in frozen)  # MONAI's unused norm
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_per_axis_token_size() -> None:
    torch.manual_seed(0)
    model = _tiny(3, [8, 16, 4], [16, 32, 8])
    assert model.divisor == (8, 16, 4) == model_divisor("unetr", 3, token_size=[8, 16, 4])
    out = model(torch.randn(1, 1, 24, 16, 12))  # grid (3, 1, 3): the embeddings are resampled
    assert out.shape == (1, 3, 24, 16, 12) and torch.isfinite(out).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_position_embeddings_follow_the_input(ndim: int) -> None:
    torch.manual_seed(0)
    img = BASE[ndim] // 2
    model = _tiny(ndim, 8, img)
    shape = (3 * img // 2, img // 2, img)[:ndim]  # larger, smaller and equal on different axes
    grid = tuple(s // 8 for s in shape)
    # The same network built for this input, its embeddings resampled by hand: the plain path.
    native = _tiny(ndim, 8, list(shape))
    state = model.state_dict()
    pos = state["vit.patch_embedding.position_embeddings"]
    pos = resample_grid(pos.transpose(1, 2).reshape(1, -1, *(img // 8,) * ndim), grid)
    native.load_state_dict(
        {**state, "vit.patch_embedding.position_embeddings": pos.flatten(2).transpose(1, 2)}
    )
    x = torch.randn(2, 1, *shape)
    out = model(x)
    torch.testing.assert_close(out, native(x), rtol=0, atol=1e-5)
    out.mean().backward()
    assert model.vit.patch_embedding.position_embeddings.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
        assert torch.equal(first, second) and list(model.vit._cache) == [grid]
        torch.testing.assert_close(first, out.detach(), rtol=0, atol=1e-6)
        # An in-place update (an optimiser step, load_state_dict) must not meet a stale cache.
        model.vit.patch_embedding.position_embeddings.add_(0.5)
        changed = model(x)
    assert not torch.allclose(changed, first)
    with torch.enable_grad():
        torch.testing.assert_close(changed, model(x).detach(), rtol=0, atol=1e-6)


def test_bad_sizes_are_explicit_errors() -> None:
    model = _tiny(3, 8, 16)
    with pytest.raises(FlexPatchError, match=r"input size \(16, 12, 16\).*nearest valid sizes 8 or 16"):
        model(torch.randn(1, 1, 16, 12, 16))
    with pytest.raises(FlexPatchError, match=r"expects input \(N, 1"):
        model(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(FlexPatchError, match="img_size"):
        _tiny(3, 12, 32)
    with pytest.raises(FlexPatchError, match="token_size"):
        _tiny(3, [8, 8], 16)
    with pytest.raises(FlexPatchError, match="num_heads"):
        _tiny(2, 8, 16, num_heads=5)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(("k", "new"), [(4, 8), (4, 6), (6, 4)])
def test_pi_resize_is_the_min_norm_least_squares_solution(ndim: int, k: int, new: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 2, *(k,) * ndim, dtype=torch.float64)
    resized = pi_resize(w, (new,) * ndim)
    # Reference: the full (non-separable) resize matrix B and numpy's least squares on B^T w' = w.
    b = interpolation_matrix(k, new)
    full = b if ndim == 1 else np.kron(b, b) if ndim == 2 else np.kron(np.kron(b, b), b)
    ref = np.linalg.lstsq(full.T, w.reshape(6, -1).numpy().T, rcond=None)[0].T
    np.testing.assert_allclose(resized.reshape(6, -1).numpy(), ref, atol=1e-10)
    if new > k:  # growing: <resize(x), w'> == <x, w> exactly, patch by patch
        x = torch.randn(5, 2, *(k,) * ndim, dtype=torch.float64)
        inner = torch.einsum("pi...,oi...->po", x, w)
        torch.testing.assert_close(
            torch.einsum("pi...,oi...->po", resample_grid(x, (new,) * ndim), resized), inner
        )
    assert pi_resize(w, (k,) * ndim) is w


@pytest.mark.parametrize("ndim", [2, 3])
def test_pi_resize_keeps_the_embedding_of_an_upsampled_image(ndim: int) -> None:
    torch.manual_seed(0)
    conv, n = (F.conv3d if ndim == 3 else F.conv2d), BASE[ndim]
    w = torch.randn(48, 1, *(8,) * ndim)
    w_pi, w_plain = pi_resize(w, (16,) * ndim), resample_grid(w, (16,) * ndim) / 2**ndim

    def error(x: torch.Tensor, kernel: torch.Tensor) -> float:
        y = conv(x, w, stride=8)
        big = F.interpolate(x, scale_factor=2, mode=_mode(ndim), align_corners=False)
        return ((conv(big, kernel, stride=16) - y).norm() / y.norm()).item()

    smooth = F.interpolate(torch.randn(1, 1, *(n // 8,) * ndim), size=(n,) * ndim, mode=_mode(ndim))
    assert error(smooth, w_pi) < 0.05  # measured 0.024 (2D and 3D)
    # On white noise, FlexiViT's point: PI-resize beats resizing the kernel (even area-normalised).
    noise = torch.randn(1, 1, *(n,) * ndim)
    assert error(noise, w_pi) < 0.3 and error(noise, w_pi) < 0.5 * error(
        noise, w_plain
    )  # 0.17-0.19 vs 0.64-0.75


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_tokens_by_one_is_an_exact_copy(ndim: int) -> None:
    torch.manual_seed(0)
    model = _tiny(ndim, 8, BASE[ndim]).eval()
    same = resize_tokens(model, 8)
    assert same.fresh_parameters == () and same.spec == model.spec and same.divisor == model.divisor
    assert not same.training
    x = torch.randn(1, 1, *(BASE[ndim],) * ndim)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    assert same.vit.blocks[0].mlp.linear1.weight is not model.vit.blocks[0].mlp.linear1.weight


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_tokens_keeps_the_encoder_and_reuses_the_decoder_by_level(ndim: int) -> None:
    torch.manual_seed(0)
    n = BASE[ndim] // 2
    model = _tiny(ndim, 8, n).eval()
    big = resize_tokens(model, 16, img_size=2 * n)  # same token grid, so same position embeddings
    assert big.divisor == (16,) * ndim and big.spec.kwargs["token_size"] == 16
    assert build(ModelSpec.from_json(json.loads(json.dumps(big.spec.to_json())))).spec == big.spec
    # The FlexiViT property end to end: the ViT sees an upsampled image as the original one,
    # better than with the kernel merely interpolated (and divided by the area it grew by).
    plain = resize_tokens(model, 16, img_size=2 * n)
    kernel = model.vit.patch_embedding.patch_embeddings.weight.detach()
    plain.vit.patch_embedding.patch_embeddings.weight.data = resample_grid(kernel, (16,) * ndim) / 2**ndim
    x = F.interpolate(torch.randn(1, 1, *(n // 4,) * ndim), size=(n,) * ndim, mode=_mode(ndim))
    big_x = F.interpolate(x, scale_factor=2, mode=_mode(ndim))
    with torch.no_grad():
        y = model.vit(x)[0]
        pi_error, plain_error = (((m.vit(big_x)[0] - y).norm() / y.norm()).item() for m in (big, plain))
        assert pi_error < 0.1 and pi_error < plain_error  # measured 0.05 vs 0.06-0.08
        assert big(torch.randn(1, 1, *(2 * n,) * ndim)).shape == (1, 3, *(2 * n,) * ndim)
    fresh = set(big.fresh_parameters)
    # 8 -> 16 adds a level: its skip branch and up-block are new, as is the transposed
    # convolution of the old deepest up-block (it now reads the level below, not tokens).
    assert {k.split(".")[0] for k in fresh} == {"encoder4", "decoder5", "decoder4", "encoder2", "encoder3"}
    assert not any(k.startswith(("vit.", "encoder1.", "decoder2.", "decoder3.", "out.")) for k in fresh)
    assert all(".transp_conv." in k for k in fresh if k.startswith("decoder4."))
    old, new = model.state_dict(), big.state_dict()
    # Skip branches align at their fine end: the block that reaches level 1 keeps its weights.
    torch.testing.assert_close(new["encoder2.blocks.1.0.conv.weight"], old["encoder2.blocks.0.0.conv.weight"])
    torch.testing.assert_close(
        new["decoder4.conv_block.conv1.conv.weight"], old["decoder4.conv_block.conv1.conv.weight"]
    )
    odd = resize_tokens(model, 12, img_size=36 if ndim == 3 else 60)  # an odd factor: a stride-3 first step
    assert odd(torch.randn(1, 1, *(24,) * ndim)).shape == (1, 3, *(24,) * ndim)


def test_registry_smoke_and_spec_round_trip() -> None:
    torch.manual_seed(0)
    model = create_model("unetr", 2, 1, 3, token_size=[4, 8], img_size=[32, 32], **TINY)
    assert model.divisor == (4, 8) and model.spec.kwargs["token_size"] == [4, 8]
    assert model.spec.kwargs["res_block"] is True  # defaults recorded
    clone = build(ModelSpec.from_json(json.loads(json.dumps(model.spec.to_json()))))
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 16, 40)
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), model.eval()(x))
    with pytest.raises(FlexPatchError, match="resize_tokens needs a unetr"):
        resize_tokens(torch.nn.Linear(2, 2), 8)
