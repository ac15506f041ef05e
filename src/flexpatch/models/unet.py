"""The U-Net of the patch-size hypernetwork paper, in 2D and 3D.

Every level holds ``convs_per_level`` convolutions: the input level starts with a
stride-1 convolution from the image channels, deeper levels with a stride-2
convolution, and each decoder level with a transposed convolution (k=4, s=2, p=1)
followed by convolutions on the concatenated skip connection. A block is
Conv -> ReLU -> InstanceNorm(affine). Channels double per level.

The network is a plain tree of ``nn.Conv*`` / ``nn.InstanceNorm*`` modules with no
buffers and no shared weights, so a hypernetwork can supply every parameter by name
through ``torch.func.functional_call``.
"""

from __future__ import annotations

import torch
from torch import nn

from flexpatch.errors import FlexPatchError

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class Block(nn.Sequential):
    """Conv -> ReLU -> InstanceNorm(affine), the unit the whole U-Net is made of."""

    def __init__(self, ndim: int, cin: int, cout: int, stride: int = 1, transposed: bool = False) -> None:
        if transposed:
            # k=4, s=2, p=1 doubles the size exactly and covers every output voxel evenly.
            conv: nn.Module = _CONV_T[ndim](cin, cout, kernel_size=4, stride=2, padding=1)
        else:
            conv = _CONV[ndim](cin, cout, kernel_size=3, stride=stride, padding=1)
        # track_running_stats=False: statistics come from each patch, so nothing but
        # parameters needs to be predicted or stored.
        norm = _NORM[ndim](cout, affine=True, track_running_stats=False)
        super().__init__()
        self.conv = conv
        self.act = nn.ReLU()
        self.norm = norm


class DecoderLevel(nn.Module):
    """Upsample, concatenate the skip connection, then convolve back to the level's width."""

    def __init__(self, ndim: int, width: int, convs: int) -> None:
        super().__init__()
        self.up = Block(ndim, 2 * width, width, transposed=True)
        blocks = [Block(ndim, 2 * width, width)] + [Block(ndim, width, width) for _ in range(convs - 2)]
        self.convs = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """The seed-01 U-Net: ``levels`` stride-2 downsamplings, so sizes must divide ``2**levels``.

    Args:
        ndim: 2 or 3 spatial dimensions.
        in_channels: image channels.
        out_channels: output channels (logits, background included).
        channels: width of the full-resolution level; it doubles at every level.
        levels: number of stride-2 downsamplings.
        convs_per_level: convolutions per level, the (strided or transposed) first one included.
    """

    def __init__(
        self,
        ndim: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: int = 16,
        levels: int = 3,
        convs_per_level: int = 4,
    ) -> None:
        super().__init__()
        _validate(ndim, in_channels, out_channels, channels, levels, convs_per_level)
        self.ndim = ndim
        self.levels = levels
        widths = [channels * 2**level for level in range(levels + 1)]
        encoder = []
        for level, width in enumerate(widths):
            cin, stride = (in_channels, 1) if level == 0 else (widths[level - 1], 2)
            first = Block(ndim, cin, width, stride=stride)
            encoder.append(
                nn.Sequential(first, *[Block(ndim, width, width) for _ in range(convs_per_level - 1)])
            )
        self.encoder = nn.ModuleList(encoder)
        # Deepest decoder level first, in the order the forward pass uses them.
        self.decoder = nn.ModuleList(DecoderLevel(ndim, w, convs_per_level) for w in reversed(widths[:-1]))
        self.head = _CONV[ndim](channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, out_channels, *spatial)`` for an input ``(N, in_channels, *spatial)``."""
        step = 2**self.levels
        spatial = tuple(x.shape[2:])
        if len(spatial) != self.ndim or any(s % step for s in spatial):
            raise FlexPatchError(
                f"unet input spatial shape {spatial} must have {self.ndim} axes divisible by {step}"
            )
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for level, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            x = level(x, skip)
        return self.head(x)


def _validate(ndim: int, cin: int, cout: int, channels: int, levels: int, convs: int) -> None:
    if ndim not in _CONV:
        raise FlexPatchError(f"unet supports ndim 2 or 3, got {ndim}")
    for name, value, low in (
        ("in_channels", cin, 1),
        ("out_channels", cout, 1),
        ("channels", channels, 1),
        ("levels", levels, 1),
        # The decoder needs its skip-merging convolution besides the transposed one.
        ("convs_per_level", convs, 2),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise FlexPatchError(f"unet {name} must be an integer >= {low}, got {value!r}")
