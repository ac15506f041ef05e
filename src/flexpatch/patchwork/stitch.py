"""Stitching patch outputs back onto an output grid, as Deep Neural Patchworks does.

Every patch output is weighted by a window (DNP's ``cos``/``cos2``) and scattered
onto the grid, either to the nearest voxel or splatted multilinearly onto the
``2^n`` neighbours. A patch whose voxels are larger than the grid's (a coarse level, or
an output grid finer than the patches) is pulled instead: every grid voxel inside its
footprint samples it (nearest or linear), so that it covers its whole area rather than
one grid voxel per patch voxel. The result divides the weighted sum by the coverage, or, with
DNP's sparse suppression ``alpha > 0``, by ``sqrt(count^2 + 3 alpha)`` so that
voxels seen by a single patch cannot give a confident answer. N-dimensional.
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


class Stitcher:
    """Running weighted sums of patch outputs on an output grid ``(C, *shape)``.

    Args:
        shape: spatial shape of the output grid.
        channels: number of output channels.
        window: blending window kind (``cos``, ``cos2``, ``constant``; see ``window_weights``).
        alpha: DNP's sparse suppression; 0 gives the plain weighted mean.
        scatter: ``nearest`` (DNP's default) or ``linear`` (multilinear splatting).
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
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) not in (2, 3) or any(s <= 0 for s in self.shape):
            raise FlexPatchError(f"stitch grid shape {self.shape} must be 2 or 3 positive sizes")
        if channels <= 0:
            raise FlexPatchError(f"stitch channels must be positive, got {channels}")
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
        self._sum = torch.zeros((self.channels, *self.shape), device=self.device, dtype=dtype)
        self._count = torch.zeros((1, *self.shape), device=self.device, dtype=dtype)
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
        if np.any(voxel_scales(mats) > 1 + 1e-6):
            for b in range(len(outputs)):
                pull_patch(self._sum, self._count, outputs[b], mats[b], window, self.scatter)
        elif self.scatter == "nearest":
            patches = [nearest_box(Patch(a, matrix)) for a in mats]
            accumulate(self._sum, self._count, outputs, patches, window)
        else:
            scatter_linear(self._sum, self._count, outputs, mats, window)

    def coverage(self) -> torch.Tensor:
        """The summed window weights per voxel, ``(1, *shape)`` (0 where no patch reached)."""
        return self._count.clone()

    def result(self) -> torch.Tensor:
        """The stitched output ``(C, *shape)``: the weighted mean, or DNP's suppressed mean."""
        return self._sum / self._divisor()

    def finish(self) -> torch.Tensor:
        """:meth:`result`, computed in the running sum itself; the stitcher then takes no more adds.

        Application keeps no second image-sized ``(C, *shape)`` buffer this way, which is most
        of a patchwork's peak memory on a large image (7 classes at 256^3: 448 MiB each).
        """
        if self._finished:
            raise FlexPatchError("this stitcher has already given its result")
        self._finished = True
        return self._sum.div_(self._divisor())

    def _divisor(self) -> torch.Tensor:
        if self.alpha == 0:
            return self._count + EPS
        return torch.sqrt(self._count**2 + 3 * self.alpha)


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
    shape = tuple(int(s) for s in hi - lo + 1)
    to_box = np.eye(n + 1)
    to_box[:n, n] = lo
    box_to_patch = np.linalg.inv(affine) @ to_box  # grid box index -> patch index
    values = torch.cat([output * window, window[None].to(output.dtype)])
    pulled = extract(values, [Patch(box_to_patch, shape)], mode=mode, padding="border")[0]
    off_diagonal = affine[:n, :n] - np.diag(np.diag(affine[:n, :n]))
    if np.any(np.abs(off_diagonal) > 1e-9):  # an oblique patch fills only part of its bounding box
        pulled = pulled * _footprint(box_to_patch, shape, m, out_sum.device).to(pulled.dtype)
    dst = tuple(slice(int(a0), int(a0) + s) for a0, s in zip(lo, shape))
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
        results: per-level stitched outputs ``(C, *shape)``, coarse to fine, on one grid.
        coverages: the matching ``(1, *shape)`` coverages; a voxel is covered where > 0.

    Voxels no level covers keep the coarsest level's value.
    """
    if not results or len(results) != len(coverages):
        raise FlexPatchError(
            f"mix_levels needs one coverage per result: {len(results)} results, {len(coverages)} coverages"
        )
    mixed = results[0].clone()
    for res, cov in zip(results[1:], coverages[1:]):
        if res.shape != mixed.shape or cov.shape[1:] != mixed.shape[1:]:
            raise FlexPatchError(
                f"levels must share one grid: {tuple(res.shape)} / {tuple(cov.shape)} vs {tuple(mixed.shape)}"
            )
        mixed = torch.where(cov > 0, res, mixed)
    return mixed
