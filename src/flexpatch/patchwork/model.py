"""The network of deep neural patchworks: one block per level, coarse to fine.

Level ``n`` sees its image crop ``I_n`` and the crop ``C_n`` of its parent's output at its own
voxels: ``X_n = B_n([I_n, C_n])``. Level 0 has no parent; it gets zeros in the forwarded
channels so that one block can serve every level (``identical_blocks``). Non-final levels
output ``num_outputs + intermediate_out`` channels; the first ``num_outputs`` are logits a
loss may use, the rest are free features forwarded to the children.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import nn

from flexpatch.errors import FlexPatchError
from flexpatch.geometry import extract_each
from flexpatch.models.registry import check_patch_size, create_model

FORWARD_TYPES: tuple[str, ...] = ("concat", "sigmoid", "none")
INTERPS: tuple[str, ...] = ("nearest", "linear")
_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


class FinalHead(nn.Module):
    """``x + conv1x1(relu(conv1x1(x)))``; the last conv starts at zero, so the head starts as identity."""

    def __init__(self, ndim: int, channels: int) -> None:
        super().__init__()
        self.conv1 = _CONV[ndim](channels, channels, kernel_size=1)
        self.act = nn.ReLU()
        self.conv2 = _CONV[ndim](channels, channels, kernel_size=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class PatchworkNet(nn.Module):
    """Hierarchical patch network: ``depth`` levels, each a registry block, parents feeding children.

    Args:
        ndim: 2 or 3 spatial dimensions.
        in_channels: image channels of every level's crop.
        num_outputs: logits of the final level (and the loss channels of the others).
        depth: number of levels, coarse (0) to fine (depth-1).
        block: registry model name for the level blocks.
        block_options: options of that model (``create_model`` keyword arguments).
        identical_blocks: one shared block for all levels (scale-invariant patchwork).
        intermediate_out: extra forwarded feature channels of non-final levels.
        forward_type: ``concat`` the parent's logits (the paper's 'simple'), ``sigmoid`` of
            them (bounded), or ``none`` (independent levels, an ablation).
        final_block: add a residual 1x1 head on the final level's ``num_outputs`` channels.
        final_all_levels: apply that head (one, shared) on every level's first ``num_outputs``.
        interp: ``nearest`` (the paper's choice) or ``linear`` crop of the parent output.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        num_outputs: int,
        depth: int,
        block: str = "unet",
        block_options: dict | None = None,
        identical_blocks: bool = False,
        intermediate_out: int = 0,
        forward_type: str = "concat",
        final_block: bool = False,
        final_all_levels: bool = False,
        interp: str = "nearest",
    ) -> None:
        super().__init__()
        _validate(ndim, in_channels, num_outputs, depth, intermediate_out, forward_type, interp)
        self.ndim = ndim
        self.in_channels = in_channels
        self.num_outputs = num_outputs
        self.depth = depth
        self.block_name = block
        self.identical_blocks = bool(identical_blocks)
        self.intermediate_out = intermediate_out
        self.forward_type = forward_type
        self.final_all_levels = bool(final_all_levels)
        self.interp = interp
        options = dict(block_options or {})
        if self.identical_blocks:
            # The shared block always produces the intermediate width; the last level slices it.
            blocks = [create_model(block, ndim, self.block_in_channels, self.forwarded_channels, **options)]
        else:
            blocks = [
                create_model(block, ndim, self.block_in_channels, self.level_channels(k), **options)
                for k in range(depth)
            ]
        self.blocks = nn.ModuleList(blocks)
        # The registry resolves defaults: recording them keeps a saved config rebuildable as is.
        self.block_options = dict(blocks[0].spec.kwargs)
        self.head = FinalHead(ndim, num_outputs) if final_block else None

    @property
    def forwarded_channels(self) -> int:
        """Channels a parent hands to its child: ``num_outputs + intermediate_out``."""
        return self.num_outputs + self.intermediate_out

    @property
    def block_in_channels(self) -> int:
        """Input channels of every block: the image plus the forwarded parent output (unless ``none``)."""
        if self.forward_type == "none":
            return self.in_channels
        return self.in_channels + self.forwarded_channels

    def level_channels(self, level: int) -> int:
        """Output channels of ``level``: the intermediate width, or ``num_outputs`` at the last level."""
        self._check_level(level)
        return self.num_outputs if level == self.depth - 1 else self.forwarded_channels

    def block(self, level: int) -> nn.Module:
        """The network of ``level`` (the shared one with ``identical_blocks``)."""
        self._check_level(level)
        return self.blocks[0] if self.identical_blocks else self.blocks[level]

    def crop_parent(self, parent_out: torch.Tensor, rel: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The parent's output ``(B, Cp, *m_parent)`` sampled at the child's voxels: ``(B, Cp, *shape)``.

        ``rel`` ``(B, n+1, n+1)`` maps child patch index -> parent patch index; outside the
        parent the crop is zero.
        """
        return extract_each(parent_out, rel, shape, mode=self.interp)  # type: ignore[arg-type]

    def forward_level(
        self,
        level: int,
        image_crop: torch.Tensor,
        parent_out: torch.Tensor | None = None,
        rel: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of one level ``(B, level_channels(level), *m)`` for its image crop ``(B, C, *m)``.

        ``parent_out`` is the previous level's output and ``rel`` the child-in-parent affines;
        both are ignored with ``forward_type='none'`` and may be None at level 0 (zeros forwarded).
        """
        self._check_level(level)
        if image_crop.ndim != self.ndim + 2 or image_crop.shape[1] != self.in_channels:
            raise FlexPatchError(
                f"level {level} image crop {tuple(image_crop.shape)} must be (B, {self.in_channels}, "
                f"*{self.ndim} spatial axes)"
            )
        x = image_crop
        if self.forward_type != "none":
            x = torch.cat([image_crop, self._forwarded(level, image_crop, parent_out, rel)], dim=1)
        out = self.block(level)(x)
        if level == self.depth - 1:
            out = out[:, : self.num_outputs]
        if self.head is not None and (self.final_all_levels or level == self.depth - 1):
            k = self.num_outputs
            out = torch.cat([self.head(out[:, :k]), out[:, k:]], dim=1)
        return out

    def _forwarded(
        self, level: int, image_crop: torch.Tensor, parent_out: torch.Tensor | None, rel: torch.Tensor | None
    ) -> torch.Tensor:
        batch, matrix = image_crop.shape[0], tuple(image_crop.shape[2:])
        if parent_out is None:
            if level > 0:
                raise FlexPatchError(
                    f"level {level} needs its parent's output (forward_type {self.forward_type})"
                )
            return image_crop.new_zeros((batch, self.forwarded_channels, *matrix))
        if rel is None:
            raise FlexPatchError(f"level {level} got a parent output but no relative affines")
        if parent_out.shape[0] != batch or parent_out.shape[1] != self.forwarded_channels:
            raise FlexPatchError(
                f"level {level} parent output {tuple(parent_out.shape)} must have batch {batch} "
                f"and {self.forwarded_channels} channels"
            )
        crop = self.crop_parent(parent_out, rel, matrix)
        return torch.sigmoid(crop) if self.forward_type == "sigmoid" else crop

    def forward(
        self, crops: Sequence[torch.Tensor], rels: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """Every level's logits for one chain of crops per batch item (``rels[0]`` is None)."""
        if len(crops) != self.depth or len(rels) != self.depth:
            raise FlexPatchError(
                f"patchwork of depth {self.depth} got {len(crops)} crops and {len(rels)} relative affines"
            )
        outputs: list[torch.Tensor] = []
        for level, (crop, rel) in enumerate(zip(crops, rels)):
            parent = outputs[-1] if outputs else None
            outputs.append(self.forward_level(level, crop, parent, rel if level else None))
        return outputs

    def check_matrix(self, matrices: Sequence[Sequence[int]]) -> None:
        """Raise FlexPatchError naming the level whose block cannot take its matrix size."""
        if len(matrices) != self.depth:
            raise FlexPatchError(f"patchwork of depth {self.depth} got {len(matrices)} level matrices")
        for level, matrix in enumerate(matrices):
            divisor = getattr(self.block(level), "divisor", (1,) * self.ndim)
            check_patch_size(matrix, divisor, f"level {level} matrix", model=self.block_name)

    def config(self) -> dict:
        """Every constructor argument, JSON-serialisable (block options with defaults resolved)."""
        cfg = {
            "ndim": self.ndim,
            "in_channels": self.in_channels,
            "num_outputs": self.num_outputs,
            "depth": self.depth,
            "block": self.block_name,
            "block_options": self.block_options,
            "identical_blocks": self.identical_blocks,
            "intermediate_out": self.intermediate_out,
            "forward_type": self.forward_type,
            "final_block": self.head is not None,
            "final_all_levels": self.final_all_levels,
            "interp": self.interp,
        }
        return json.loads(json.dumps(cfg))

    @classmethod
    def from_config(cls, cfg: dict) -> PatchworkNet:
        """Rebuild (freshly initialised) the network :meth:`config` describes."""
        if not isinstance(cfg, dict):
            raise FlexPatchError(f"patchwork config must be a JSON object, got {type(cfg).__name__}")
        try:
            return cls(**cfg)
        except TypeError as err:
            raise FlexPatchError(f"patchwork config is malformed: {err}") from None

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.depth:
            raise FlexPatchError(f"level {level} is out of range for a patchwork of depth {self.depth}")


def _validate(
    ndim: int,
    in_channels: int,
    num_outputs: int,
    depth: int,
    intermediate_out: int,
    forward_type: str,
    interp: str,
) -> None:
    if ndim not in _CONV:
        raise FlexPatchError(f"patchwork ndim must be 2 or 3, got {ndim}")
    for name, value, low in (
        ("in_channels", in_channels, 1),
        ("num_outputs", num_outputs, 1),
        ("depth", depth, 1),
        ("intermediate_out", intermediate_out, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise FlexPatchError(f"patchwork {name} must be an integer >= {low}, got {value!r}")
    if forward_type not in FORWARD_TYPES:
        choices = ", ".join(FORWARD_TYPES)
        raise FlexPatchError(f"unknown forward_type {forward_type!r}; choose one of {choices}")
    if interp not in INTERPS:
        raise FlexPatchError(f"unknown interp {interp!r}; choose one of {', '.join(INTERPS)}")
