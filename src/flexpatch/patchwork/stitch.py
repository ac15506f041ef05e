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

The arithmetic (every scatter mode, the means) is the geometry core's
:class:`~flexpatch.accumulator.Accumulator`; this module is DNP's policy over it: which mode a
patch takes, the windows, the suppression and the buffer layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flexpatch import accumulator
from flexpatch.accumulator import Accumulator, as_affines, mean_
from flexpatch.errors import FlexPatchError
from flexpatch.geometry import Patch, nearest_box, window_weights

SCATTER_KINDS: tuple[str, ...] = ("nearest", "linear")
EPS = 1e-5  # DNP's guard against dividing by zero coverage
PULL_SLAB_VOXELS = accumulator.PULL_SLAB_VOXELS  # grid voxels a coarse patch is sampled at in one go


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
        self._acc = Accumulator(self._summed, self._count)
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
        mats = as_affines(affines, len(outputs), n)
        outputs = outputs.detach().to(device=self.device, dtype=self.dtype)
        matrix = tuple(int(s) for s in outputs.shape[2:])
        window = self._window(matrix)
        summed = outputs[:, 1:] if self.normalized else outputs
        if np.any(voxel_scales(mats) > 1 + 1e-6):  # coarse voxels: a scatter would leave holes
            self._acc.add(summed, mats, "pull", window, sampling=self.scatter, slab_voxels=PULL_SLAB_VOXELS)
        elif self.scatter == "nearest":
            boxes = np.stack([nearest_box(Patch(a, matrix)).affine for a in mats])
            self._acc.add(summed, boxes, "nearest", window)
        else:
            self._acc.add(summed, mats, "linear", window)

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
        count = sums[:1] if self.normalized else self._count
        return mean_(sums, count, eps=EPS, alpha=self.alpha, first_from_coverage=self.normalized)

    def finish(self) -> torch.Tensor:
        """:meth:`result`, computed in the running sum itself; the stitcher then takes no more adds.

        Application keeps no second image-sized ``(C, *shape)`` buffer this way, which is most
        of a patchwork's peak memory on a large image (7 classes at 256^3: 448 MiB each).
        """
        if self._finished:
            raise FlexPatchError("this stitcher has already given its result")
        self._finished = True
        # slab by slab (see mean_): the divisor's temporaries stay slab-sized
        return mean_(self._sum, self._count, eps=EPS, alpha=self.alpha, first_from_coverage=self.normalized)


def voxel_scales(affines: np.ndarray) -> np.ndarray:
    """Size of a patch voxel along each patch axis, in grid voxels: ``(B, n)`` column norms."""
    n = affines.shape[-1] - 1
    return np.linalg.norm(affines[:, :n, :n], axis=1)


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
