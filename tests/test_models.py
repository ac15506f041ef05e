"""The model registry: every registered network, 2D and 3D, plus patch-size validation."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from flexpatch import FlexPatchError
from flexpatch.models import (
    ModelSpec,
    build,
    check_patch_size,
    create_model,
    list_models,
    model_description,
    model_divisor,
    nearest_valid,
    register_model,
    registry,
)

HAS_EINOPS = importlib.util.find_spec("einops") is not None
# The smallest configuration of each model that the smoke test can afford on one CPU core.
SMALL = {
    "swinunetr": {"feature_size": 12},
    "dynunet": {"filters": [8, 16, 32, 64]},
    "unetr": {
        "hidden_size": 48,
        "mlp_dim": 96,
        "num_heads": 2,
        "num_layers": 2,
        "feature_size": 8,
        "img_size": 32,
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _create(name: str, ndim: int, **kwargs) -> nn.Module:
    if name == "swinunetr" and not HAS_EINOPS:
        with pytest.raises(FlexPatchError, match="einops"):
            create_model(name, ndim, 2, 3)
        pytest.skip("swinunetr needs einops (checked that the error says so)")
    return create_model(name, ndim, in_channels=2, out_channels=3, **{**SMALL.get(name, {}), **kwargs})


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_at_its_smallest_and_an_anisotropic_size(name: str, ndim: int) -> None:
    torch.manual_seed(0)
    model = _create(name, ndim)
    d = model.divisor
    assert len(d) == ndim and model.spec.name == name
    # Exactly the divisor on every axis leaves one voxel at the bottleneck, where instance
    # norm is undefined; doubling one axis gives the smallest size every model can train on.
    smallest = (*d[:-1], 2 * d[-1])
    out = model(torch.randn(1, 2, *smallest))
    assert out.shape == (1, 3, *smallest)
    out.square().mean().backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname

    anisotropic = tuple(k * s for k, s in zip((2, 1, 3), d, strict=False))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, *anisotropic))
    assert type(out) is torch.Tensor and out.shape == (2, 3, *anisotropic)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_spec_round_trip_rebuilds_the_same_network(name: str) -> None:
    torch.manual_seed(0)
    model = _create(name, 2)
    text = json.dumps(model.spec.to_json())
    clone = build(ModelSpec.from_json(json.loads(text)))
    assert clone.spec == model.spec and clone.divisor == model.divisor
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in clone.state_dict().items()} == shapes
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 2, *(2 * s for s in model.divisor))
    model.eval(), clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))


def test_spec_records_defaults_and_options() -> None:
    model = create_model("unet", 2, 1, 4, levels=2, channels=8)
    assert model.spec == ModelSpec("unet", 2, 1, 4, {"channels": 8, "levels": 2, "convs_per_level": 4})
    assert model.divisor == (4, 4)
    seg = create_model("segresnet", 2, blocks_down=(1, 2))
    assert seg.spec.kwargs["blocks_down"] == [1, 2] and seg.divisor == (2, 2)


@pytest.mark.parametrize(
    ("name", "ndim", "kwargs", "expected"),
    [
        ("unet", 3, {}, (8, 8, 8)),
        ("unet", 2, {"levels": 4}, (16, 16)),
        ("dynunet", 3, {}, (8, 8, 8)),
        ("dynunet", 3, {"strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]]}, (4, 4, 2)),
        ("segresnet", 3, {}, (8, 8, 8)),
        ("segresnet", 2, {"blocks_down": [1, 2, 2, 2, 4]}, (16, 16)),
        ("swinunetr", 3, {}, (32, 32, 32)),
        ("basicunet", 2, {}, (16, 16)),
    ],
)
def test_model_divisor(name: str, ndim: int, kwargs: dict, expected: tuple[int, ...]) -> None:
    assert model_divisor(name, ndim, **kwargs) == expected


def test_anisotropic_dynunet_runs_at_its_anisotropic_divisor() -> None:
    strides = [[1, 1, 1], [2, 2, 1], [2, 2, 2]]
    model = create_model("dynunet", 3, 1, 2, strides=strides, filters=[4, 8, 16])
    assert model.divisor == (4, 4, 2)
    assert model(torch.randn(1, 1, 8, 4, 6)).shape == (1, 2, 8, 4, 6)


def _convs(module: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    ]


def _expected_unet_params(ndim: int, cin: int, cout: int, c: int = 16, levels: int = 3) -> int:
    """Hand count from the paper's description: 4 convs per level, every conv followed by IN(affine)."""

    def conv(a: int, b: int, k: int = 3) -> int:
        return k**ndim * a * b + b + 2 * b  # kernel + bias + norm gamma/beta

    widths = [c * 2**i for i in range(levels + 1)]
    total = conv(cin, c) + 3 * conv(c, c)
    for lo, hi in zip(widths, widths[1:], strict=False):
        total += conv(lo, hi) + 3 * conv(hi, hi)  # encoder: stride-2 conv + 3 convs
        total += conv(hi, lo, k=4) + conv(2 * lo, lo) + 2 * conv(lo, lo)  # decoder: up + 3 convs
    return total + 3**ndim * c * cout + cout  # final conv, no norm


@pytest.mark.parametrize("ndim", [2, 3])
def test_seed01_unet_structure(ndim: int) -> None:
    model = create_model("unet", ndim, 1, 6)
    assert model.divisor == (8,) * ndim
    assert len(model.encoder) == 4 and len(model.decoder) == 3
    for level, stage in enumerate(model.encoder):
        convs = _convs(stage)
        assert len(convs) == 4
        assert convs[0].stride == ((1,) if level == 0 else (2,)) * ndim
        assert convs[-1].out_channels == 16 * 2**level
    for level in model.decoder:
        convs = _convs(level)
        assert len(convs) == 4 and isinstance(convs[0], (nn.ConvTranspose2d, nn.ConvTranspose3d))
        assert (convs[0].kernel_size, convs[0].stride, convs[0].padding) == (
            (4,) * ndim,
            (2,) * ndim,
            (1,) * ndim,
        )
    # Conv -> ReLU -> InstanceNorm(affine) everywhere; nothing but parameters to predict.
    norms = [m for m in model.modules() if isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d))]
    assert len(norms) == len(_convs(model)) - 1
    assert all(n.affine and not n.track_running_stats for n in norms)
    assert list(model.buffers()) == []
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == _expected_unet_params(ndim, 1, 6)
    if ndim == 3:
        assert n_params == 3_328_854  # "about 3.3 M U-Net weights" (the authors' code)
    shallow = create_model("unet", ndim, levels=2, convs_per_level=3)
    assert shallow.divisor == (4,) * ndim and len(shallow.encoder) == 3
    assert all(len(_convs(stage)) == 3 for stage in shallow.encoder)


def test_unet_rejects_a_non_divisible_input() -> None:
    with pytest.raises(FlexPatchError, match=r"\(12, 16\).*divisible by 8"):
        create_model("unet", 2)(torch.randn(1, 1, 12, 16))


def test_nearest_valid_matches_brute_force() -> None:
    for divisor in (1, 8, 16):
        multiples = list(range(divisor, 200, divisor))
        for size in range(1, 70):
            below = max([m for m in multiples if m <= size], default=divisor)
            above = min(m for m in multiples if m >= size)
            assert nearest_valid(size, divisor) == (below, above), (size, divisor)


def test_nearest_valid_golden() -> None:
    assert nearest_valid(50, 8) == (48, 56)
    assert nearest_valid(48, 8) == (48, 48)
    assert nearest_valid(3, 8) == (8, 8)
    with pytest.raises(FlexPatchError, match="divisor"):
        nearest_valid(8, 0)


def test_check_patch_size_messages() -> None:
    assert check_patch_size((np.int64(48), 64, 16), (8, 8, 8)) == (48, 64, 16)
    with pytest.raises(FlexPatchError) as err:
        check_patch_size((50, 64, 100), (8, 8, 8), model="unet")
    msg = str(err.value)
    assert msg.startswith("patch size (50, 64, 100) is not divisible by (8, 8, 8) for model unet")
    assert "48 or 56 on axis 0" in msg and "96 or 104 on axis 2" in msg and "axis 1" not in msg
    with pytest.raises(FlexPatchError, match=r"nearest valid sizes 8 on axis 0$"):
        check_patch_size((4, 16), (8, 8))
    with pytest.raises(FlexPatchError, match=r"^roi \(0, 64\) must be positive"):
        check_patch_size((0, 64), (8, 8), what="roi")
    with pytest.raises(FlexPatchError, match="positive"):
        check_patch_size((-8, 64), (8, 8))
    with pytest.raises(FlexPatchError, match="has 2 axes, expected 3"):
        check_patch_size((64, 64), (8, 8, 8))
    with pytest.raises(FlexPatchError, match="integers"):
        check_patch_size((64.0, 64), (8, 8))


def test_unknown_model_and_bad_options() -> None:
    with pytest.raises(FlexPatchError) as err:
        create_model("vnet")
    assert "'vnet'" in str(err.value) and all(name in str(err.value) for name in list_models())
    with pytest.raises(FlexPatchError, match="unknown model"):
        model_divisor("vnet", 3)
    with pytest.raises(FlexPatchError, match=r"model unet: .*depth.*options are \['channels'"):
        create_model("unet", depth=3)
    with pytest.raises(FlexPatchError, match="ndim must be 2 or 3"):
        create_model("unet", ndim=4)
    with pytest.raises(FlexPatchError, match="out_channels must be a positive integer"):
        create_model("unet", out_channels=0)
    with pytest.raises(FlexPatchError, match="JSON"):
        create_model("segresnet", act=object())
    with pytest.raises(FlexPatchError, match="blocks_up .* needs 1 entries"):
        create_model("segresnet", 2, blocks_down=[1, 2], blocks_up=[1, 1, 1])
    with pytest.raises(FlexPatchError, match="model dynunet with options .*kernel_size"):
        create_model("dynunet", 2, kernel_size=[3, 3])  # MONAI's own ValueError, wrapped


def test_spec_from_json_rejects_malformed() -> None:
    good = ModelSpec("unet", 2, 1, 2, {}).to_json()
    with pytest.raises(FlexPatchError, match=r"missing keys \['kwargs'\]"):
        ModelSpec.from_json({k: v for k, v in good.items() if k != "kwargs"})
    with pytest.raises(FlexPatchError, match=r"unknown keys \['patch'\]"):
        ModelSpec.from_json({**good, "patch": [64, 64]})
    with pytest.raises(FlexPatchError, match="model.json: field 'ndim' must be an integer, got \"2\""):
        ModelSpec.from_json({**good, "ndim": "2"}, source="model.json")


class _Tiny(nn.Module):
    def __init__(self, ndim: int, cin: int, cout: int, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_model("tiny", _Tiny, lambda ndim, o: (o["width"],) * ndim, "a test network")
    assert "tiny" in list_models() and model_description("tiny") == "a test network"
    model = create_model("tiny", 2, width=6)
    assert model.divisor == (6, 6) and model.spec.kwargs == {"width": 6}
    with pytest.raises(FlexPatchError, match="already registered"):
        register_model("tiny", _Tiny, 1, "again")
    with pytest.raises(FlexPatchError, match="lowercase identifier"):
        register_model("Tiny Net", _Tiny, 1, "bad name")
    with pytest.raises(FlexPatchError, match="divisor"):
        register_model("tiny2", _Tiny, 0, "bad divisor")
    with pytest.raises(FlexPatchError, match="one-line"):
        register_model("tiny3", _Tiny, 1, "two\nlines")
    assert math.prod(model_divisor("tiny", 3)) == 64
