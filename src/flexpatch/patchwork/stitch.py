"""Stitching patch outputs back onto an output grid, as Deep Neural Patchworks does.

Every patch output is weighted by a window (DNP's ``cos``/``cos2``) and scattered
onto the grid, either to the nearest voxel or splatted multilinearly onto the
``2^n`` neighbours. A patch whose voxels are larger than the grid's (a coarse level, or
an output grid finer than the patches) is pulled instead: every grid voxel inside its
footprint samples it (nearest or linear), so that it covers its whole area rather than
one grid voxel per patch voxel. The result divides the weighted sum by the coverage, or, with
DNP's sparse suppression ``alpha > 0``, by ``sqrt(count^2 + 3 alpha)`` so that
voxels seen by a single patch cannot give a confident answer. N-dimensional.

Softmax outputs (``normalized``) keep one image-sized buffer fewer: each patch's channels add up
to one, so the first channel's weighted sum is the coverage minus the others'. Its slot holds
the coverage while patches are added, and :meth:`Stitcher.finish` recovers it in place.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, accumulate, extract, nearest_box, window_weights

SCATTER_KINDS: tuple[str, ...] = ("nearest", "linear")
EPS = 1e-5  # DNP's guard against dividing by zero coverage
PULL_SLAB_VOXELS = 1 << 18  # grid voxels a coarse patch is sampled at in one go


class Stitcher:
    """Running weighted sums of patch outputs on an output grid ``(C, *shape)``.

    Args:
        shape: spatial shape of the output grid.
        channels: number of output channels.
        window: blending window kind (``cos``, ``cos2``, ``constant``; see ``window_weights``).
        alpha: DNP's sparse suppression; 0 gives the plain weighted mean.
        scatter: ``nearest`` (DNP's default) or ``linear`` (multilinear splatting).
        normalized: the outputs add up to one over the channels (softmax probabilities): the
            first channel is not summed but recovered from the coverage, which saves one
            ``(1, *shape)`` buffer.
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int,
        window: str = "cos",
        alpha: float = 0.0,
        scatter: str = "nearest",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        normalized: bool = False,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) not in (2, 3) or any(s <= 0 for s in self.shape):
            raise FlexPatchError(f"stitch grid shape {self.shape} must be 2 or 3 positive sizes")
        if channels <= int(normalized):
            what = "more than one (normalized outputs)" if normalized else "positive"
            raise FlexPatchError(f"stitch channels must be {what}, got {channels}")
        if scatter not in SCATTER_KINDS:
            raise FlexPatchError(f"unknown scatter {scatter!r}; choose one of {', '.join(SCATTER_KINDS)}")
        if not alpha >= 0:
            raise FlexPatchError(f"sparse suppression alpha must be >= 0, got {alpha}")
        window_weights((1,) * len(self.shape), window)  # fail early on an unknown window kind
        self.channels = int(channels)
        self.window = window
        self.alpha = float(alpha)
        self.scatter = scatter
        self.device = torch.device(device)
        self.dtype = dtype
        self.normalized = normalized
        self._sum = torch.zeros((self.channels, *self.shape), device=self.device, dtype=dtype)
        # normalized: channel 0's slot is the coverage (views, so the scatters below fill both)
        self._count = self._sum[:1] if normalized else torch.zeros_like(self._sum[:1])
        self._summed = self._sum[1:] if normalized else self._sum
        self._windows: dict[tuple[int, ...], torch.Tensor] = {}
        self._finished = False

    def _window(self, matrix: tuple[int, ...]) -> torch.Tensor:
        # windows depend only on the matrix shape, which is fixed per level: compute once
        if matrix not in self._windows:
            self._windows[matrix] = window_weights(matrix, self.window, device=self.device, dtype=self.dtype)
        return self._windows[matrix]

    def add(self, outputs: torch.Tensor, affines: torch.Tensor | np.ndarray) -> None:
        """Add a batch of patch outputs ``(B, C, *m)`` placed by ``affines`` ``(B, n+1, n+1)``.

        Each affine maps patch voxel indices to output-grid voxel indices. Parts
        of a patch outside the grid are dropped.
        """
        if self._finished:
            raise FlexPatchError("this stitcher has already given its result (finish): it takes no more adds")
        n = len(self.shape)
        if outputs.ndim != n + 2 or outputs.shape[1] != self.channels:
            raise FlexPatchError(
                f"outputs have shape {tuple(outputs.shape)}, expected (B, {self.channels}, {n} spatial axes)"
            )
        mats = _as_affines(affines, len(outputs), n)
        outputs = outputs.detach().to(device=self.device, dtype=self.dtype)
        matrix = tuple(int(s) for s in outputs.shape[2:])
        window = self._window(matrix)
        summed = outputs[:, 1:] if self.normalized else outputs
        if np.any(voxel_scales(mats) > 1 + 1e-6):
            for b in range(len(outputs)):
                pull_patch(self._summed, self._count, summed[b], mats[b], window, self.scatter)
        elif self.scatter == "nearest":
            patches = [nearest_box(Patch(a, matrix)) for a in mats]
            accumulate(self._summed, self._count, summed, patches, window)
        else:
            scatter_linear(self._summed, self._count, summed, mats, window)

    def coverage(self) -> torch.Tensor:
        """The summed window weights per voxel, ``(1, *shape)`` (0 where no patch reached)."""
        return self._coverage().clone()

    def covered(self) -> torch.Tensor:
        """Where any patch reached, ``(1, *shape)`` bool: a quarter of :meth:`coverage`'s bytes."""
        return self._coverage() > 0

    def _coverage(self) -> torch.Tensor:
        if self._finished and self.normalized:  # finish turned channel 0's slot into the background
            raise FlexPatchError(
                "a normalized stitcher's coverage is gone once it has finished: take it before"
            )
        return self._count

    def result(self) -> torch.Tensor:
        """The stitched output ``(C, *shape)``: the weighted mean, or DNP's suppressed mean."""
        if self._finished:
            raise FlexPatchError("this stitcher has already given its result")
        sums = self._sum.clone()
        return _normalize(sums, sums[:1] if self.normalized else self._count, self.normalized, self.alpha)

    def finish(self) -> torch.Tensor:
        """:meth:`result`, computed in the running sum itself; the stitcher then takes no more adds.

        Application keeps no second image-sized ``(C, *shape)`` buffer this way, which is most
        of a patchwork's peak memory on a large image (7 classes at 256^3: 448 MiB each).
        """
        if self._finished:
            raise FlexPatchError("this stitcher has already given its result")
        self._finished = True
        return _normalize(self._sum, self._count, self.normalized, self.alpha)


def _normalize(sums: torch.Tensor, count: torch.Tensor, normalized: bool, alpha: float) -> torch.Tensor:
    """Running sums ``(C, *shape)`` and their coverage ``(1, *shape)`` to the stitched output, in
    ``sums`` itself, one slab of the first axis at a time so that temporaries stay slab-sized.

    ``normalized``: ``count`` is ``sums[:1]``, and channel 0 becomes the coverage minus the other
    channels (clamped at 0 against rounding); see :class:`Stitcher`.
    """
    for i in range(sums.shape[1]):
        slab, cover = sums[:, i], count[:, i]
        divisor = cover + EPS if alpha == 0 else torch.sqrt(cover**2 + 3 * alpha)
        if normalized:  # the divisor is taken first: channel 0 is the coverage until here
            slab[0].sub_(slab[1:].sum(0)).clamp_(min=0)
        slab.div_(divisor)
    return sums


def _as_affines(affines: torch.Tensor | np.ndarray, batch: int, n: int) -> np.ndarray:
    """Affines as a float64 numpy stack ``(B, n+1, n+1)``, checked against the batch."""
    if isinstance(affines, torch.Tensor):
        affines = affines.detach().cpu().numpy()
    mats = np.asarray(affines, dtype=np.float64)
    if mats.shape != (batch, n + 1, n + 1):
        raise FlexPatchError(f"affines have shape {mats.shape}, expected {(batch, n + 1, n + 1)}")
    return mats


def voxel_scales(affines: np.ndarray) -> np.ndarray:
    """Size of a patch voxel along each patch axis, in grid voxels: ``(B, n)`` column norms."""
    n = affines.shape[-1] - 1
    return np.linalg.norm(affines[:, :n, :n], axis=1)


def pull_patch(
    out_sum: torch.Tensor,
    weight_sum: torch.Tensor,
    output: torch.Tensor,
    affine: np.ndarray,
    window: torch.Tensor,
    mode: str,
) -> None:
    """Add one coarse patch ``output`` ``(C, *m)`` by sampling it at the grid voxels it covers.

    The footprint is the patch's voxel extent, ``[-0.5, m - 0.5]`` per patch axis; the window is
    sampled with the output (one grid_sample of ``[output * window, window]``), so overlapping
    patches blend exactly as in the scatter. One patch at a time: a coarse patch's footprint can be
    the whole grid, and a batch of them would multiply that memory.
    """
    n = len(window.shape)
    spatial = out_sum.shape[1:]
    m = np.array(window.shape, dtype=np.float64)
    corners = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in m])))  # (2^n, n)
    grid_pos = corners @ affine[:n, :n].T + affine[:n, n]
    lo = np.maximum(np.ceil(grid_pos.min(0) - 1e-9), 0).astype(int)
    hi = np.minimum(np.floor(grid_pos.max(0) + 1e-9), np.array(spatial) - 1).astype(int)
    if np.any(hi < lo):
        return
    values = torch.cat([output * window, window[None].to(output.dtype)])
    oblique = np.any(np.abs(affine[:n, :n] - np.diag(np.diag(affine[:n, :n]))) > 1e-9)
    # slabs of the first axis: a coarse patch's box can be the whole grid, and sampling it at once
    # would hold (C + 1) grid-sized channels and the sampling grid on top of the sums
    size = hi - lo + 1
    rows = max(1, PULL_SLAB_VOXELS // int(np.prod(size[1:])))
    for first in range(int(lo[0]), int(hi[0]) + 1, rows):
        start = np.array([first, *lo[1:]])
        shape = (min(rows, int(hi[0]) + 1 - first), *(int(v) for v in size[1:]))
        to_box = np.eye(n + 1)
        to_box[:n, n] = start
        box_to_patch = np.linalg.inv(affine) @ to_box  # grid box index -> patch index
        pulled = extract(values, [Patch(box_to_patch, shape)], mode=mode, padding="border")[0]
        if oblique:  # an oblique patch fills only part of its bounding box
            pulled = pulled * _footprint(box_to_patch, shape, m, out_sum.device).to(pulled.dtype)
        dst = tuple(slice(int(a0), int(a0) + s) for a0, s in zip(start, shape))
        out_sum[(slice(None), *dst)] += pulled[:-1]
        weight_sum[(slice(None), *dst)] += pulled[-1:]


def _footprint(
    box_to_patch: np.ndarray, shape: tuple[int, ...], m: np.ndarray, device: torch.device
) -> torch.Tensor:
    """Which voxels of a grid box lie inside the patch's voxel extent ``[-0.5, m - 0.5]``."""
    n = len(shape)
    axes = [torch.arange(s, dtype=torch.float64, device=device) for s in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    a = torch.as_tensor(box_to_patch, dtype=torch.float64, device=device)
    pos = idx @ a[:n, :n].T + a[:n, n]
    limit = torch.as_tensor(m - 0.5, dtype=torch.float64, device=device)
    return torch.all((pos >= -0.5 - 1e-9) & (pos <= limit + 1e-9), dim=-1)


def scatter_linear(
    out_sum: torch.Tensor,
    weight_sum: torch.Tensor,
    outputs: torch.Tensor,
    affines: np.ndarray,
    window: torch.Tensor,
) -> None:
    """Splat ``outputs * window`` and ``window`` onto the grid with multilinear weights, in place.

    Each patch voxel lands at a real-valued grid position and is shared among the
    ``2^n`` surrounding grid voxels with weights that sum to one (those outside the
    grid are dropped). All patches of the batch go through one ``index_add_`` per corner.

    Args:
        out_sum: ``(C, *spatial)`` running weighted sum.
        weight_sum: ``(1, *spatial)`` running sum of weights.
        outputs: ``(B, C, *m)`` patch outputs.
        affines: ``(B, n+1, n+1)`` patch index -> grid index.
        window: ``(*m)`` weights.
    """
    n = len(outputs.shape) - 2
    spatial = tuple(out_sum.shape[1:])
    device = out_sum.device
    axes = [torch.arange(s, dtype=torch.float64, device=device) for s in outputs.shape[2:]]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, n)  # (M, n)
    a = torch.as_tensor(affines, dtype=torch.float64, device=device)
    pos = (torch.einsum("bij,mj->bmi", a[:, :n, :n], idx) + a[:, None, :n, n]).reshape(-1, n)  # (B*M, n)
    base = torch.floor(pos)
    frac = pos - base
    base = base.long()
    channels = outputs.shape[1]
    # (C, B*M): channel-major so that one index_add_ along dim 1 serves every channel
    w_patch = window.reshape(1, -1).expand(len(outputs), -1).reshape(-1).to(out_sum.dtype)
    vals = outputs.reshape(len(outputs), channels, -1).permute(1, 0, 2).reshape(channels, -1)
    vals = vals.to(out_sum.dtype) * w_patch
    limits = torch.tensor(spatial, device=device)
    flat_sum = out_sum.view(channels, -1)
    flat_weight = weight_sum.view(1, -1)
    for bits in itertools.product((0, 1), repeat=n):
        offset = torch.tensor(bits, device=device)
        corner = base + offset
        weight = torch.prod(torch.where(offset.bool(), frac, 1 - frac), dim=1).to(out_sum.dtype)
        ok = torch.all((corner >= 0) & (corner < limits), dim=1) & (weight > 0)
        flat = torch.zeros(int(ok.sum()), dtype=torch.long, device=device)
        for d in range(n):
            flat = flat * spatial[d] + corner[ok, d]
        w = weight[ok]
        flat_sum.index_add_(1, flat, vals[:, ok] * w)
        flat_weight.index_add_(1, flat, (w_patch[ok] * w)[None])


def mix_levels(results: Sequence[torch.Tensor], coverages: Sequence[torch.Tensor]) -> torch.Tensor:
    """DNP's ``level='mix'``: each voxel takes the finest level (last) that covers it.

    Args:
        results: per-level stitched outputs ``(C, *shape)``, coarse to fine, on one grid. The
            first is overwritten and returned: the levels are mixed in place, a channel at a time.
        coverages: the matching ``(1, *shape)`` coverages, or :meth:`Stitcher.covered` masks;
            a voxel is covered where > 0.

    Voxels no level covers keep the coarsest level's value.
    """
    if not results or len(results) != len(coverages):
        raise FlexPatchError(
            f"mix_levels needs one coverage per result: {len(results)} results, {len(coverages)} coverages"
        )
    mixed = results[0]
    for res, cov in zip(results[1:], coverages[1:]):
        if res.shape != mixed.shape or cov.shape[1:] != mixed.shape[1:]:
            raise FlexPatchError(
                f"levels must share one grid: {tuple(res.shape)} / {tuple(cov.shape)} vs {tuple(mixed.shape)}"
            )
        mask = cov[0] > 0
        for c in range(len(mixed)):
            torch.where(mask, res[c], mixed[c], out=mixed[c])
    return mixed
