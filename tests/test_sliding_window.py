"""Sliding-window inference against MONAI's ``sliding_window_inference`` and hand-computed golden values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from flexpatch.accumulator import grid_coverage
from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, accumulate, window_weights
from flexpatch.infer.sliding_window import sliding_window, window_layout

torch.set_num_threads(1)

# Image larger than the window on every axis; anisotropic windows.
IMAGES = {2: (2, 1, 23, 17), 3: (2, 1, 14, 13, 11)}
WINDOWS = {2: (8, 12), 3: (8, 6, 4)}


def conv_net(ndim: int, seed: int = 0, out_channels: int = 2) -> torch.nn.Module:
    """Conv -> ReLU -> Conv with zero padding: its output near a border depends on the padding."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    return torch.nn.Sequential(
        conv(1, 4, 3, padding=1), torch.nn.ReLU(), conv(4, out_channels, 3, padding=1)
    ).eval()


def monai_reference(net, image, window, overlap, blend, batch_size):
    with torch.no_grad():
        return sliding_window_inference(image, window, batch_size, net, overlap=overlap, mode=blend)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_monai_conv_net(ndim, overlap, blend, batch_size):
    net = conv_net(ndim)
    image = torch.randn(IMAGES[ndim], generator=torch.Generator().manual_seed(1))
    ours = sliding_window(net, image, WINDOWS[ndim], overlap=overlap, blend=blend, batch_size=batch_size)
    ref = monai_reference(net, image, WINDOWS[ndim], overlap, blend, batch_size)
    assert ours.shape == ref.shape == (2, 2, *IMAGES[ndim][2:])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_matches_monai_unet(ndim):
    torch.manual_seed(0)
    net = UNet(ndim, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()
    shape = (2, 1, 30, 21) if ndim == 2 else (2, 1, 18, 13, 15)
    window = (16, 12) if ndim == 2 else (12, 8, 8)
    image = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours = sliding_window(net, image, window, overlap=0.5, blend="gaussian", batch_size=3, divisor=4)
    ref = monai_reference(net, image, window, 0.5, "gaussian", 3)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_golden_identity_4x4():
    image = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    out = sliding_window(lambda x: x, image, (2, 2), overlap=0.5, blend="constant")
    assert window_layout((4, 4), (2, 2), 0.5)[2] == [(i, j) for i in range(3) for j in range(3)]
    torch.testing.assert_close(out, image, atol=0, rtol=0)


def test_golden_1d_layout_and_weights():
    window, padded, starts = window_layout((1, 5), (1, 3), overlap=0.5)
    # step int(3 * 0.5) = 1 -> starts 0, 1, 2 along the long axis; one position along the short one
    assert (window, padded, starts) == ((1, 3), (1, 5), [(0, 0), (0, 1), (0, 2)])
    weight_sum = grid_coverage(torch.ones(window), starts, padded)
    assert weight_sum.tolist() == [[[1.0, 2.0, 3.0, 2.0, 1.0]]]
    image = torch.arange(5, dtype=torch.float32).reshape(1, 1, 1, 5)
    ones = sliding_window(lambda x: torch.ones_like(x), image, (1, 3), overlap=0.5, blend="gaussian")
    torch.testing.assert_close(ones, torch.ones_like(image))
    # each window answers its first voxel's value (= its start): 0, 1, 2; constant-weight means by hand
    starts_out = sliding_window(
        lambda x: x[..., :1].expand_as(x).clone(), image, (1, 3), overlap=0.5, blend="constant", batch_size=2
    )
    assert starts_out.flatten().tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


@pytest.mark.parametrize("blend", ["constant", "gaussian", "cos"])
def test_weight_sum_equals_per_window_accumulation(blend):
    window, padded, starts = window_layout((13, 9, 11), (6, 4, 8), overlap=0.4)
    weights = window_weights(window, blend)
    expected_out, expected = torch.zeros(1, *padded), torch.zeros(1, *padded)
    patches = [Patch.box(s, window) for s in starts]
    accumulate(expected_out, expected, torch.zeros(len(patches), 1, *window), patches, weights)
    torch.testing.assert_close(grid_coverage(weights, starts, padded), expected, atol=1e-6, rtol=1e-6)


def test_layout_window_larger_than_image():
    assert window_layout((5, 7), (16, 16), 0.5, divisor=4) == ((8, 8), (8, 8), [(0, 0)])
    # covered axis: whole extent padded to the divisor; the other axis slides as usual, unpadded
    window, padded, starts = window_layout((5, 40), (16, 16), 0.5, divisor=4)
    assert (window, padded) == ((8, 16), (8, 40))
    assert starts == [(0, 0), (0, 8), (0, 16), (0, 24)]
    # an exact fit needs no padding at all
    assert window_layout((16, 8), (16, 8), 0.5, divisor=8) == ((16, 8), (16, 8), [(0, 0)])


@pytest.mark.parametrize("ndim", [2, 3])
def test_window_larger_than_image(ndim):
    spatial = (5, 7) if ndim == 2 else (5, 7, 6)
    image = torch.randn(1, 1, *spatial, generator=torch.Generator().manual_seed(3))
    patch = (16,) * ndim
    net = conv_net(ndim, out_channels=1)
    out = sliding_window(net, image, patch, overlap=0.5, blend="gaussian", divisor=4)
    assert out.shape == (1, 1, *spatial)
    # reference: the whole image, replicate-padded symmetrically to multiples of 4, through the net, cropped
    padded = [-(-s // 4) * 4 for s in spatial]
    before = [(p - s) // 2 for s, p in zip(spatial, padded, strict=True)]
    pads = [
        v for s, p, b in reversed(list(zip(spatial, padded, before, strict=True))) for v in (b, p - s - b)
    ]
    with torch.no_grad():
        whole = net(F.pad(image, pads, mode="replicate"))
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial, strict=True))
    torch.testing.assert_close(out, whole[(slice(None), slice(None), *crop)], atol=1e-6, rtol=0)
    # MONAI zero-pads up to the full window: a padding-sensitive net answers differently
    monai = monai_reference(net, image, patch, 0.5, "gaussian", 4)
    assert monai.shape == out.shape
    assert (monai - out).abs().max() > 1e-2


@pytest.mark.parametrize("pad_mode", ["replicate", "constant", "reflect"])
def test_pad_modes_crop_back_exactly(pad_mode):
    image = torch.randn(2, 3, 6, 9, generator=torch.Generator().manual_seed(4))
    out = sliding_window(lambda x: x * 2, image, (16, 8), overlap=0.5, divisor=8, pad_mode=pad_mode)
    torch.testing.assert_close(out, image * 2, atol=1e-6, rtol=0)


def test_pad_modes_differ_for_a_padding_sensitive_net():
    image = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(5)) + 3
    net = conv_net(2, out_channels=1)
    outs = [sliding_window(net, image, (16, 16), divisor=8, pad_mode=m) for m in ("replicate", "constant")]
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_stitch_device_and_device_cpu_match_default():
    net = conv_net(3)
    image = torch.randn(IMAGES[3], generator=torch.Generator().manual_seed(6))
    default = sliding_window(net, image, WINDOWS[3])
    explicit = sliding_window(net, image, WINDOWS[3], device="cpu", stitch_device="cpu")
    assert explicit.device.type == "cpu"
    torch.testing.assert_close(explicit, default, atol=0, rtol=0)


def test_output_is_a_normal_tensor_with_requested_dtype(capsys):
    image = torch.randn(1, 1, 12, 10)
    out = sliding_window(lambda x: x, image, (8, 8), out_dtype=torch.float64, progress=True)
    assert out.dtype == torch.float64
    assert not out.is_inference()
    out += 1  # callers may update the result in place
    torch.testing.assert_close(out, image.double() + 1, atol=1e-6, rtol=0)


def test_output_channels_learned_from_net():
    image = torch.randn(2, 2, 10, 10)
    out = sliding_window(lambda x: x.repeat(1, 3, 1, 1), image, (4, 6), overlap=0.25, blend="constant")
    torch.testing.assert_close(out, image.repeat(1, 3, 1, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch_size": (50, 64), "divisor": 16}, r"\(48, 64\) or \(64, 64\)"),
        ({"patch_size": (8, 20), "divisor": (4, 8)}, r"\(8, 16\) or \(8, 24\)"),
        ({"patch_size": (0, 8)}, "positive"),
        ({"patch_size": (8, 8, 8)}, "3 entries for a 2D image"),
        ({"patch_size": (8, 8), "overlap": 1.0}, "overlap"),
        ({"patch_size": (8, 8), "overlap": -0.1}, "overlap"),
        ({"patch_size": (8, 8), "batch_size": 0}, "batch_size"),
        ({"patch_size": (8, 8), "blend": "box"}, "unknown blend 'box'"),
        ({"patch_size": (8, 8), "pad_mode": "wrap"}, "unknown pad_mode 'wrap'"),
        ({"patch_size": (8, 8), "divisor": 0}, "divisor"),
        ({"patch_size": (8, 8), "sigma_scale": 0.0}, "sigma_scale"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(FlexPatchError, match=match):
        sliding_window(lambda x: x, torch.zeros(1, 1, 32, 32), **kwargs)


def test_bad_image_and_net():
    with pytest.raises(FlexPatchError, match=r"4D .* or 5D .* got \(1, 32, 32\)"):
        sliding_window(lambda x: x, torch.zeros(1, 32, 32), (8, 8))
    with pytest.raises(FlexPatchError, match=r"net returned shape \(1, 1, 4, 4\)"):
        sliding_window(lambda x: x[..., :4, :4], torch.zeros(1, 1, 16, 16), (8, 8), batch_size=1)
    with pytest.raises(FlexPatchError, match="reflect"):
        sliding_window(lambda x: x, torch.zeros(1, 1, 3, 3), (16, 16), divisor=16, pad_mode="reflect")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_monai_and_cpu_stitching():
    net = conv_net(3).cuda()
    image = torch.randn(IMAGES[3], generator=torch.Generator().manual_seed(7)).cuda()
    ours = sliding_window(net, image, WINDOWS[3], batch_size=3)
    assert ours.device.type == "cuda"
    torch.testing.assert_close(
        ours, monai_reference(net, image, WINDOWS[3], 0.5, "gaussian", 3), atol=1e-5, rtol=0
    )
    # stitching on the CPU (pinned, overlapped copies) and a CPU image run on CUDA give the same answer
    on_cpu = sliding_window(net, image, WINDOWS[3], batch_size=3, stitch_device="cpu")
    from_cpu = sliding_window(net, image.cpu(), WINDOWS[3], batch_size=3, device="cuda")
    for other in (on_cpu, from_cpu):
        assert other.device.type == "cpu"
        torch.testing.assert_close(other, ours.cpu(), atol=1e-6, rtol=0)
