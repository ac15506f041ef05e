"""UNETR with any token size and any input size, plus FlexiViT's token resize.

MONAI's UNETR fixes the ViT token (patch) size at 16 and the input size at build time.
:class:`FlexUNETR` keeps its parts and parameter names (a MONAI UNETR state dict loads
into the token-16 model unchanged) and lifts both limits:

- **Token size** ``t`` (per axis) sets the decoder. Each axis's ``t`` is split into its
  odd part ``r`` and its power of two ``2**k``; the decoder upsamples the token grid by
  ``r`` first (a transposed convolution of stride ``r``, skipped when ``r == 1``) and
  then by 2 per step, so every finer level sits at ``1/2**j`` of the input, as in a
  U-Net: 16 -> 2,2,2,2 (MONAI's UNETR), 8 -> 2,2,2, 12 -> 3,2,2, 24 -> 3,2,2,2. Axes
  that need fewer steps stay put (stride 1) on the coarsest steps, like nnU-Net's
  anisotropic pooling. With ``n`` steps there are ``n - 1`` ViT skip connections, read
  after blocks ``num_layers * j // n + 1`` (j = 1..n-1: blocks 4, 7, 10 for MONAI's
  12 layers and token 16), each upsampled from the token grid to its level.
- **Input size**: the learned position embeddings live on the grid of ``img_size``;
  an input with another token grid gets them resampled (linear per axis, antialiased
  when shrinking, as timm does), so any input divisible by the token size runs. In
  eval mode without gradients the resampled embedding is cached per grid.
- :func:`resize_tokens` turns a trained model into one with another token size:
  FlexiViT's PI-resize of the patch-embedding kernel, the position embeddings
  resampled to the new grid, the transformer kept. The decoder depends on the token
  size on purpose: a decoder fixed at 1/16 would throw away the fine bottleneck that
  small tokens exist for. Decoder blocks are matched by the resolution they work at
  and reused whenever their shapes agree; the rest (the deepest up-block's transposed
  convolution, blocks of levels the old model lacked, odd-stride steps) start fresh
  and are listed in ``fresh_parameters`` so that a fine-tune can target them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetResBlock, get_conv_layer
from monai.networks.nets.vit import ViT
from torch import nn

from flexpatch.axes import per_axis
from flexpatch.errors import FlexPatchError
from flexpatch.models.registry import ModelSpec, build, check_patch_size, register_model

__all__ = [
    "FlexUNETR",
    "decoder_strides",
    "interpolation_matrix",
    "pi_resize",
    "resample_grid",
    "resize_tokens",
]

_KERNEL = "vit.patch_embedding.patch_embeddings.weight"
_POSITIONS = "vit.patch_embedding.position_embeddings"
_SKIP_BLOCK = re.compile(r"^(encoder\d+\.blocks\.)(\d+)(\..*)$")
_CACHE_GRIDS = 4  # sliding windows use one grid, PGPS validation another: a few cover both


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(value)
    return value


def _per_axis(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    """``value`` repeated on every axis (an int) or checked to have ``ndim`` positive ints."""
    message = f"unetr {what} {value!r} must be a positive int or {ndim} positive ints"
    return per_axis(value, ndim, what, cast=_positive_int, message=message)


def decoder_strides(token_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-axis strides of the decoder's upsampling steps, from the token grid to full size.

    Example: ``(12, 16)`` gives ``[(1, 2), (3, 2), (2, 2), (2, 2)]``; the product over
    steps is the token size on every axis.
    """
    if all(t == 1 for t in token_size):
        raise FlexPatchError(f"unetr token size {tuple(token_size)} must exceed 1 on some axis")
    factors = []
    for t in token_size:
        twos = (t & -t).bit_length() - 1  # the power of two in t
        factors.append(([t >> twos] if t >> twos > 1 else []) + [2] * twos)
    steps = max(len(f) for f in factors)
    padded = [[1] * (steps - len(f)) + f for f in factors]
    return [tuple(f[i] for f in padded) for i in range(steps)]


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix of 1D linear resizing (align_corners=False).

    Shrinking widens the triangle filter by the scale (antialiasing, as PIL and
    ``F.interpolate(antialias=True)`` do); rows are normalised, so edges replicate.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    weights = np.clip(1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support, 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def resample_grid(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``x (N, C, *grid)`` to ``size`` with :func:`interpolation_matrix` on each axis.

    Differentiable; axes already of the right size are left untouched, so a matching
    grid returns ``x`` itself.
    """
    for axis, (n_in, n_out) in enumerate(zip(x.shape[2:], size, strict=True)):
        if n_in != n_out:
            x = _along(x, 2 + axis, interpolation_matrix(n_in, n_out))
    return x


def pi_resize(kernel: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """FlexiViT's pseudo-inverse resize of a patch-embedding kernel ``(O, I, *k)`` to ``size``.

    With ``B`` the linear resize of a patch from ``k`` to ``size``, the new kernel
    solves ``B^T w' = w`` in the least-squares / minimum-norm sense, so
    ``<B x, w'> = <x, w>`` for every patch ``x`` when growing (exactly) and as
    nearly as possible when shrinking. ``B`` is separable, and the pseudo-inverse of
    a Kronecker product is the product of the pseudo-inverses: one small matrix per axis.
    """
    for axis, (n_in, n_out) in enumerate(zip(kernel.shape[2:], size, strict=True)):
        if n_in != n_out:
            kernel = _along(kernel, 2 + axis, np.linalg.pinv(interpolation_matrix(n_in, n_out).T))
    return kernel


def _along(x: torch.Tensor, dim: int, matrix: np.ndarray) -> torch.Tensor:
    """Multiply axis ``dim`` of ``x`` by ``matrix (n_out, n_in)``, in x's precision, outside autocast."""
    m = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        return torch.movedim(torch.movedim(x, dim, -1) @ m.T, -1, dim)


class _GridViT(ViT):
    """MONAI's ViT (no class token) whose position embeddings follow the input's token grid."""

    def __init__(self, grid: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.grid = grid
        for block in self.blocks:
            # MONAI builds this norm even without cross-attention; it never sees data. Frozen, it
            # stays in the state dict (MONAI checkpoints load) but out of DDP's unused-gradient check.
            block.norm_cross_attn.requires_grad_(False)
        self._cache: dict[tuple[int, ...], tuple[torch.Tensor, int, int, torch.Tensor]] = {}

    def positions(self, grid: tuple[int, ...]) -> torch.Tensor:
        """Position embeddings ``(1, hidden, *grid)``; resampled unless ``grid`` is the native one."""
        pos = self.patch_embedding.position_embeddings
        native = pos.transpose(1, 2).reshape(1, -1, *self.grid)
        if grid == self.grid:
            return native
        if self.training or torch.is_grad_enabled():
            return resample_grid(native, grid)
        # Keyed on the tensor itself and its version, so optimiser steps, load_state_dict,
        # .to() and torch.func.functional_call never see a stale entry.
        key = (pos, pos.data_ptr(), pos._version)
        hit = self._cache.get(grid)
        if hit is None or hit[0] is not pos or hit[1:3] != key[1:]:
            if len(self._cache) >= _CACHE_GRIDS:
                self._cache.clear()
            hit = self._cache[grid] = (*key, resample_grid(native, grid))
        return hit[3]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embedding.patch_embeddings(x)
        x = x + self.positions(tuple(x.shape[2:]))
        x = self.patch_embedding.dropout(x.flatten(2).transpose(1, 2))
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return self.norm(x), hidden


class _TokenUp(nn.Module):
    """MONAI's ``UnetrPrUpBlock`` (same parameter names) with its own stride per step."""

    def __init__(
        self, ndim: int, cin: int, cout: int, strides: list[tuple[int, ...]], norm: Any, res_block: bool
    ) -> None:
        super().__init__()
        block = UnetResBlock if res_block else UnetBasicBlock
        self.transp_conv_init = _transposed(ndim, cin, cout, strides[0])
        self.blocks = nn.ModuleList(
            nn.Sequential(_transposed(ndim, cout, cout, s), block(ndim, cout, cout, 3, 1, norm))
            for s in strides[1:]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv_init(x)
        for block in self.blocks:
            x = block(x)
        return x


def _transposed(ndim: int, cin: int, cout: int, stride: tuple[int, ...]) -> nn.Module:
    return get_conv_layer(ndim, cin, cout, stride, stride, conv_only=True, is_transposed=True)


class FlexUNETR(nn.Module):
    """UNETR (Hatamizadeh et al. 2022) with any token size and any input size.

    Inputs must be divisible by the token size on every axis (the model's divisor).

    Args:
        ndim: spatial dimensions, 2 or 3.
        in_channels: image channels.
        out_channels: output channels (logits).
        token_size: ViT patch edge, one int or one per axis.
        img_size: the training input size; sets the grid of the learned position embeddings.
        feature_size: decoder width at full resolution (doubles per level).
        hidden_size: ViT width.
        mlp_dim: ViT feed-forward width.
        num_heads: attention heads.
        num_layers: transformer blocks.
        norm_name: decoder normalisation, as MONAI names it (``"instance"``, ``["group", {...}]``).
        res_block: residual convolution blocks in the decoder (MONAI's default).
        dropout_rate: dropout in the ViT.
        qkv_bias: bias in the attention's qkv projection.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        *,
        token_size: int | Sequence[int] = 16,
        img_size: int | Sequence[int] = 96,
        feature_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        num_layers: int = 12,
        norm_name: str | Sequence[Any] = "instance",
        res_block: bool = True,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise FlexPatchError(f"unetr ndim must be 2 or 3, got {ndim}")
        token, img = _per_axis(token_size, ndim, "token_size"), _per_axis(img_size, ndim, "img_size")
        check_patch_size(img, token, "img_size", model="unetr")
        if num_layers < 1 or hidden_size % num_heads:
            raise FlexPatchError(
                f"unetr needs num_layers >= 1 and hidden_size divisible by num_heads, "
                f"got {num_layers} layers, hidden {hidden_size}, {num_heads} heads"
            )
        self.ndim, self.in_channels, self.out_channels = ndim, in_channels, out_channels
        self.token_size, self.img_size = token, img
        # The constructor's options as given, so that resize_tokens can rebuild a model built directly.
        self.options = dict(
            token_size=token_size,
            img_size=img_size,
            feature_size=feature_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            num_layers=num_layers,
            norm_name=norm_name,
            res_block=res_block,
            dropout_rate=dropout_rate,
            qkv_bias=qkv_bias,
        )
        self.fresh_parameters: tuple[str, ...] = ()
        grid = tuple(i // t for i, t in zip(img, token, strict=True))
        self.vit = _GridViT(
            grid,
            in_channels=in_channels,
            img_size=img,
            patch_size=token,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            dropout_rate=dropout_rate,
            spatial_dims=ndim,
            qkv_bias=qkv_bias,
        )
        self._build_decoder(feature_size, hidden_size, num_layers, norm_name, res_block)

    def _build_decoder(self, fs: int, hidden: int, layers: int, norm: Any, res_block: bool) -> None:
        norm = tuple(norm) if isinstance(norm, list) else norm  # JSON turns MONAI's tuples into lists
        strides = decoder_strides(self.token_size)
        n = self.steps = len(strides)
        self.skip_layers = tuple(layers * j // n for j in range(1, n))
        width = [fs * 2**j for j in range(n)] + [hidden]
        # MONAI's names: encoder(j+1) feeds level j, decoder(j+2) upsamples level j+1 to j.
        self.encoder1 = UnetrBasicBlock(self.ndim, self.in_channels, fs, 3, 1, norm, res_block)
        for j in range(1, n):
            skip = _TokenUp(self.ndim, hidden, width[j], strides[: n - j], norm, res_block)
            self.add_module(f"encoder{j + 1}", skip)
        for j in range(n):
            up = UnetrUpBlock(self.ndim, width[j + 1], width[j], 3, strides[n - 1 - j], norm, res_block)
            self.add_module(f"decoder{j + 2}", up)
        self.out = UnetOutBlock(self.ndim, fs, self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, out_channels, *S)`` for ``x (N, in_channels, *S)``, S divisible by the token size."""
        if x.ndim != 2 + self.ndim or x.shape[1] != self.in_channels:
            raise FlexPatchError(
                f"unetr expects input (N, {self.in_channels}, {self.ndim} spatial axes), got {tuple(x.shape)}"
            )
        check_patch_size(tuple(x.shape[2:]), self.token_size, "input size", model="unetr")
        grid = tuple(s // t for s, t in zip(x.shape[2:], self.token_size, strict=True))
        last, hidden = self.vit(x)
        skips = [self.encoder1(x)]
        for j, layer in enumerate(self.skip_layers, start=1):
            skips.append(getattr(self, f"encoder{j + 1}")(_to_grid(hidden[layer], grid)))
        y = _to_grid(last, grid)
        for j in reversed(range(self.steps)):
            y = getattr(self, f"decoder{j + 2}")(y, skips[j])
        return self.out(y)


def _to_grid(tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``(N, L, C)`` tokens to a ``(N, C, *grid)`` feature map (tokens are in C order)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def resize_tokens(
    model: FlexUNETR, token_size: int | Sequence[int], img_size: int | Sequence[int] | None = None
) -> FlexUNETR:
    """A copy of ``model`` with another token size (FlexiViT), on the same device and dtype.

    The patch-embedding kernel is PI-resized (:func:`pi_resize`), the position
    embeddings resampled to the new grid of ``img_size`` (default: the model's), the
    transformer copied. Decoder tensors are copied where name and shape agree, the
    skip branches' up-blocks aligned at their fine end (the block that reaches a level
    keeps its weights); the others keep their fresh initialisation and are listed in
    the result's ``fresh_parameters``. A factor of 1 returns an exact copy. A model
    built by the registry gets an updated ``.spec`` and ``.divisor``.
    """
    if not isinstance(model, FlexUNETR):
        raise FlexPatchError(f"resize_tokens needs a unetr model, got {type(model).__name__}")
    changes: dict[str, Any] = {"token_size": token_size}
    if img_size is not None:
        changes["img_size"] = img_size
    spec = getattr(model, "spec", None)
    if isinstance(spec, ModelSpec):
        kwargs = {**spec.kwargs, **changes}
        new = build(ModelSpec(spec.name, spec.ndim, spec.in_channels, spec.out_channels, kwargs))
    else:
        new = FlexUNETR(model.ndim, model.in_channels, model.out_channels, **{**model.options, **changes})
    ref = model.vit.patch_embedding.position_embeddings
    new.to(device=ref.device, dtype=ref.dtype).train(model.training)
    old, state = model.state_dict(), new.state_dict()
    fresh = []
    for key in state:
        source = _source_key(key, model.steps - new.steps)
        if key == _KERNEL:
            state[key] = pi_resize(old[key], new.token_size)
        elif key == _POSITIONS:
            grid = resample_grid(old[key].transpose(1, 2).reshape(1, -1, *model.vit.grid), new.vit.grid)
            state[key] = grid.flatten(2).transpose(1, 2)
        elif source in old and old[source].shape == state[key].shape:
            state[key] = old[source]
        else:
            fresh.append(key)
    new.load_state_dict(state)
    new.fresh_parameters = tuple(fresh)
    return new


def _source_key(key: str, extra_steps: int) -> str:
    """The old name of ``key``: skip branches with ``extra_steps`` more blocks align at the fine end."""
    match = _SKIP_BLOCK.match(key)
    if match is None:
        return key
    index = int(match[2]) + extra_steps
    return f"{match[1]}{index}{match[3]}" if index >= 0 else ""


def _divisor(ndim: int, options: dict) -> tuple[int, ...]:
    return _per_axis(options["token_size"], ndim, "token_size")


register_model(
    "unetr",
    FlexUNETR,
    _divisor,
    "UNETR, ViT encoder with any token size (divisor) and input size; FlexiViT token resize",
)
