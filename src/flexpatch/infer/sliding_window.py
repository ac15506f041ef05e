"""Sliding-window inference: a regular grid of boxes, blended by a weighted mean.

The windows and weights are MONAI's (``sliding_window_inference``) whenever the
window fits inside the image, built on the geometry core (:func:`grid_starts`,
:func:`window_weights`, :class:`Patch`). Where the window is larger than the image
along an axis, that axis is covered by the whole image, padded only up to the
network's divisor: padding up to the window with zeros (MONAI's behaviour) shows the
network mostly background it never saw in training, and collapses Dice (0.82 -> 0.08
measured on a 3D U-Net).

Speed and memory: the weight sum depends only on the layout, so it is built once per
call, axis by axis (the grid is a Cartesian product of per-axis starts), and only after
the first case's forwards, so it never sits beside the activations (peak one ``(1, *S)``
buffer below MONAI's). Putting outputs back is the geometry core's accumulator
(:class:`~flexpatch.accumulator.Accumulator`, box mode, sum fusion, no coverage of its own: the
layout's :func:`~flexpatch.accumulator.grid_coverage` replaces it): one fused ``addcmul_`` per
window, and the weighted mean is one ``div_`` at the end. Measured against MONAI: BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from flexpatch.accumulator import Accumulator, grid_coverage, mean_
from flexpatch.errors import FlexPatchError
from flexpatch.geometry import WINDOW_KINDS, slab_axis, window_layout, window_weights

Shape = tuple[int, ...]
Starts = list[Shape]
PAD_MODES: tuple[str, ...] = ("replicate", "constant", "reflect")

__all__ = ["PAD_MODES", "slab_axis", "sliding_window", "sliding_window_slabs", "window_layout"]


def _pad_case(case: torch.Tensor, padded: Shape, mode: str) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad ``(C, *spatial)`` symmetrically up to ``padded``; return it and the crop back."""
    spatial = tuple(case.shape[1:])
    if spatial == padded:
        return case, tuple(slice(None) for _ in spatial)
    before = [(p - s) // 2 for s, p in zip(spatial, padded, strict=True)]
    if mode == "reflect" and any(p - s >= s for s, p in zip(spatial, padded, strict=True)):
        raise FlexPatchError(
            f"reflect padding of image {spatial} to {padded} needs more voxels than the image has"
        )
    pads: list[int] = []
    for s, p, b in reversed(list(zip(spatial, padded, before, strict=True))):
        pads += [b, p - s - b]
    # torch pads replicate/reflect only with a batch dim, and only float tensors
    out = F.pad(case[None].float(), pads, mode=mode)[0].to(case.dtype)
    return out, tuple(slice(b, b + s) for b, s in zip(before, spatial, strict=True))


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(k)``; the runtime's bar over windows when enabled (gone when done), else a no-op."""
    if not enabled:
        yield lambda k: None
        return
    from flexpatch.runtime import progress_bar  # only when asked: keeps import light

    with progress_bar(transient=True) as bar:
        task = bar.add_task("sliding window", total=total)
        yield lambda k: bar.advance(task, k)


def _check_output(y: object, n_windows: int, window: Shape) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise FlexPatchError(
            f"net returned {type(y).__name__}; sliding_window needs one tensor (B, C, *window)"
        )
    if y.ndim != len(window) + 2 or y.shape[0] != n_windows or tuple(y.shape[2:]) != window:
        raise FlexPatchError(
            f"net returned shape {tuple(y.shape)} for {n_windows} windows of {window}; "
            f"expected ({n_windows}, C, *{window})"
        )
    return y


class _Stitcher:
    """Adds weighted window outputs into a buffer on the stitch device.

    When the stitch device is the CPU and the net runs on CUDA, each output batch is
    copied into pinned memory without blocking, and added only after the next batch
    has been launched: the CPU stitches while the GPU computes.
    """

    def __init__(
        self, make_weights: Callable[[], torch.Tensor], stitch: torch.device, net_device: torch.device
    ) -> None:
        self.make_weights = make_weights
        self.stitch = stitch
        self.deferred = stitch != net_device
        self.async_copy = stitch.type == "cpu" and net_device.type == "cuda"
        # (moved outputs, their copy's event, window starts, buffer) of the batch still to add
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None, Starts, torch.Tensor] | None = None
        self.accumulator: Accumulator | None = None  # one per case's buffer, not one per batch

    @functools.cached_property
    def weights(self) -> torch.Tensor:
        """The window weights, made at the first add: after the first forward, not beside it."""
        return self.make_weights()

    def add(self, buffer: torch.Tensor, y: torch.Tensor, starts: Starts) -> None:
        """Add ``y`` (one output per window start) into ``buffer`` (``(C, *padded)``)."""
        if not self.deferred:
            self._add_now(buffer, y, starts)
            return
        event = None
        if self.async_copy:
            moved = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
            moved.copy_(y, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            moved = y.to(self.stitch, non_blocking=True)
        self.flush()
        self.pending = (moved, event, starts, buffer)

    def flush(self) -> None:
        """Add the batch still in flight, if any."""
        if self.pending is None:
            return
        moved, event, starts, buffer = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        self._add_now(buffer, moved, starts)

    def _add_now(self, buffer: torch.Tensor, y: torch.Tensor, starts: Starts) -> None:
        if self.accumulator is None or self.accumulator.values is not buffer:
            self.accumulator = Accumulator(buffer)
        self.accumulator.add_boxes(y, starts, self.weights)


class _Output:
    """The ``(N, C_out, *spatial)`` result, allocated once the first output gives ``C_out``.

    It is a normal tensor (made outside inference mode) so that callers may update it in
    place. Without padding, a case's slice of it is the stitch buffer itself: no copy.
    """

    def __init__(self, n_cases: int, spatial: Shape, padded: Shape, dtype: torch.dtype, device: torch.device):
        self.n_cases, self.spatial, self.padded = n_cases, spatial, padded
        self.dtype, self.device = dtype, device
        self.tensor: torch.Tensor | None = None

    def buffer(self, n: int, channels: int) -> torch.Tensor:
        if self.tensor is None:
            with torch.inference_mode(False):
                shape = (self.n_cases, channels, *self.spatial)
                self.tensor = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.padded == self.spatial:
            return self.tensor[n]
        return self.tensor.new_zeros((channels, *self.padded))

    def finish(self, n: int, buffer: torch.Tensor, weight_sum: torch.Tensor, crop: tuple[slice, ...]) -> None:
        mean_(buffer, weight_sum)
        if self.tensor is not None and self.padded != self.spatial:
            self.tensor[n] = buffer[(slice(None), *crop)]


def _windows(case: torch.Tensor, starts: Starts, window: Shape) -> torch.Tensor:
    """The windows at ``starts`` of ``(C, *padded)`` as one batch: views stacked once, one copy."""
    return torch.stack([case[(slice(None), *(slice(s, s + w) for s, w in zip(st, window)))] for st in starts])


def _blend_case(
    net: Callable[[torch.Tensor], torch.Tensor],
    case: torch.Tensor,
    starts: Starts,
    window: Shape,
    batch_size: int,
    make_buffer: Callable[[int], torch.Tensor],
    stitcher: _Stitcher,
    advance: Callable[[int], None],
) -> torch.Tensor:
    """Run the net over one case's windows; return the weighted sum ``(C_out, *padded)``."""
    buffer: torch.Tensor | None = None
    for b0 in range(0, len(starts), batch_size):
        batch = starts[b0 : b0 + batch_size]
        y = _check_output(net(_windows(case, batch, window)), len(batch), window)
        if buffer is None:
            buffer = make_buffer(y.shape[1])
        stitcher.add(buffer, y, batch)
        advance(len(batch))
    stitcher.flush()
    if buffer is None:
        raise FlexPatchError(f"image case {tuple(case.shape)} produced no windows")
    return buffer


def _validate(image: torch.Tensor, batch_size: int, blend: str, sigma_scale: float, pad_mode: str) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim not in (4, 5):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise FlexPatchError(f"image must be a 4D (N, C, H, W) or 5D (N, C, D, H, W) tensor, got {shape}")
    if int(batch_size) < 1:
        raise FlexPatchError(f"batch_size must be >= 1, got {batch_size}")
    if blend not in WINDOW_KINDS:
        raise FlexPatchError(f"unknown blend {blend!r}; choose one of {', '.join(WINDOW_KINDS)}")
    if not float(sigma_scale) > 0:
        raise FlexPatchError(f"sigma_scale must be > 0, got {sigma_scale}")
    if pad_mode not in PAD_MODES:
        raise FlexPatchError(f"unknown pad_mode {pad_mode!r}; choose one of {', '.join(PAD_MODES)}")


def sliding_window(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: int | Sequence[int],
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    sigma_scale: float = 0.125,
    divisor: Sequence[int] | int = 1,
    pad_mode: str = "replicate",
    device: str | torch.device | None = None,
    stitch_device: str | torch.device | None = None,
    progress: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Run ``net`` over a regular grid of windows; blended by a weighted mean: ``(N, C_out, *spatial)``.

    Args:
        net: maps ``(B, C, *window)`` to ``(B, C_out, *window)`` (logits or probabilities).
        image: ``(N, C, *spatial)``, 2D or 3D; cases are processed one after another.
        patch_size: the window, one int per spatial axis (or one int for all).
        overlap: fraction shared by neighbouring windows, in [0, 1).
        blend: window weights: ``constant``, ``gaussian`` (its sigma ``sigma_scale`` x the window
            side), ``cos`` or ``cos2``.
        batch_size: windows per network call.
        divisor: the network's size divisor; patch sides must be multiples of it, and an
            image axis the window covers is padded up to a multiple of it.
        pad_mode: how that padding is filled: ``replicate``, ``constant`` (zeros) or ``reflect``.
        device: where the net runs (default: the image's device); each case moves there once.
        stitch_device: where outputs are blended and returned (default: the image's device).
        progress: show a rich progress bar over windows; out_dtype: dtype of the blended output.
    """
    _validate(image, batch_size, blend, sigma_scale, pad_mode)
    spatial = tuple(image.shape[2:])
    window, padded, starts = window_layout(spatial, patch_size, overlap, divisor)
    net_device = torch.device(device) if device is not None else image.device
    stitch = torch.device(stitch_device) if stitch_device is not None else image.device
    n_cases = image.shape[0]
    if n_cases == 0:
        raise FlexPatchError(f"image {tuple(image.shape)} has no cases (N = 0)")
    output = _Output(n_cases, spatial, padded, out_dtype, stitch)
    with torch.inference_mode(), _progress_bar(progress, n_cases * len(starts)) as advance:
        stitcher = _Stitcher(
            lambda: window_weights(window, blend, sigma_scale, device=stitch, dtype=out_dtype),
            stitch,
            net_device,
        )
        weight_sum: torch.Tensor | None = None
        for n in range(n_cases):
            case, crop = _pad_case(image[n].to(net_device), padded, pad_mode)
            buffer = _blend_case(
                net, case, starts, window, batch_size, lambda c, n=n: output.buffer(n, c), stitcher, advance
            )
            if weight_sum is None:
                # made once the first case's forwards are done, so it never adds to their peak memory
                weight_sum = grid_coverage(stitcher.weights, starts, padded)
            output.finish(n, buffer, weight_sum, crop)
    if output.tensor is None:
        raise FlexPatchError(f"image {tuple(image.shape)} produced no output")
    return output.tensor


def sliding_window_slabs(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: int | Sequence[int],
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 4,
    sigma_scale: float = 0.125,
    divisor: Sequence[int] | int = 1,
    pad_mode: str = "replicate",
    device: str | torch.device | None = None,
    stitch_device: str | torch.device | None = None,
    axis: int | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`sliding_window` of one case, given back slab by slab along ``axis`` (default
    :func:`slab_axis`): yields ``(first row, (C_out, rows, ...))`` in row order, covering the image.

    Why: a CT's whole output at 7 classes is gigabytes; streamed, a band one window deep is held.
    Windows run in order of their start along ``axis``; rows before the next start are final.
    Values are :func:`sliding_window`'s within float rounding (coverage summed in another order).
    A slab is a view of the band, valid until the next is asked for (change it in place, or copy).
    """
    _validate(image, batch_size, blend, sigma_scale, pad_mode)
    if image.shape[0] != 1:
        raise FlexPatchError(f"sliding_window_slabs takes one case, got image {tuple(image.shape)}")
    spatial = tuple(image.shape[2:])
    window, padded, starts = window_layout(spatial, patch_size, overlap, divisor)
    a = slab_axis(spatial, patch_size, overlap, divisor) if axis is None else int(axis)
    net_device = torch.device(device) if device is not None else image.device
    stitch = torch.device(stitch_device) if stitch_device is not None else image.device
    with torch.inference_mode(), _progress_bar(progress, len(starts)) as advance:
        case, crop = _pad_case(image[0].to(net_device), padded, pad_mode)
        weights = window_weights(window, blend, sigma_scale, device=stitch)
        band_shape = (*padded[:a], window[a], *padded[a + 1 :])
        groups = sorted({s[a] for s in starts})
        # every group of windows (one start along the axis) covers its band alike
        one_group = [(*s[:a], 0, *s[a + 1 :]) for s in starts if s[a] == groups[0]]
        group_coverage = grid_coverage(weights, one_group, band_shape)
        coverage = torch.zeros_like(group_coverage)
        stitcher = _Stitcher(lambda: weights, stitch, net_device)
        band: list[torch.Tensor] = []  # made at the first output, which gives C_out
        for k, u in enumerate(groups):
            group = [s for s in starts if s[a] == u]
            for b0 in range(0, len(group), batch_size):
                batch = group[b0 : b0 + batch_size]
                y = _check_output(net(_windows(case, batch, window)), len(batch), window)
                if not band:
                    band.append(torch.zeros((y.shape[1], *band_shape), device=stitch))
                stitcher.add(band[0], y, [(*s[:a], 0, *s[a + 1 :]) for s in batch])
                advance(len(batch))
            stitcher.flush()
            coverage += group_coverage
            done = (groups[k + 1] if k + 1 < len(groups) else padded[a]) - u
            slab = _finished_rows(band[0], coverage, a, done, u, crop)
            if slab is not None:
                yield slab
            _shift(band[0], a + 1, done)
            _shift(coverage, a + 1, done)


def _finished_rows(
    band: torch.Tensor, coverage: torch.Tensor, axis: int, done: int, first: int, crop: tuple[slice, ...]
) -> tuple[int, torch.Tensor] | None:
    """The band's first ``done`` rows as their weighted mean, cropped to the image (the band's
    row 0 is padded row ``first``); None when they are all padding."""
    lo = max(first, crop[axis].start or 0)
    hi = min(first + done, crop[axis].stop if crop[axis].stop is not None else first + done)
    if hi <= lo:
        return None
    where = list(crop)
    where[axis] = slice(lo - first, hi - first)
    # divided where they lie: the rows are finished, and the shift that follows drops them
    return lo - (crop[axis].start or 0), mean_(band[(slice(None), *where)], coverage[(slice(None), *where)])


def _shift(band: torch.Tensor, dim: int, n: int) -> None:
    """Move ``band`` ``n`` rows towards its start along ``dim``, zeros after: the next group's band."""
    keep = band.shape[dim] - n
    if keep > 0:
        source = band.narrow(dim, n, keep)
        band.narrow(dim, 0, keep).copy_(source.clone() if n < keep else source)  # overlapping rows
    band.narrow(dim, max(keep, 0), band.shape[dim] - max(keep, 0)).zero_()
