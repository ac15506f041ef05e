"""Hard mining on the patch level (deep neural patchworks, as the authors' code).

After each training round, DNP keeps the ``1 - 1/(1+h)`` fraction of the round's patches that were
hardest (highest loss, lowest F1, or rarest labels) and joins them with freshly drawn ones, so rare
structures (a cyst present in 5 of 100 images) accumulate instead of being drawn once and forgotten.
A patch is kept for at most ``max_age`` rounds (``hard_mining_maxage``, 50), so the pool never freezes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flexpatch.errors import FlexPatchError

ORDERS: tuple[str, ...] = ("loss", "f1", "balance")
INDEX_KEY = "index"  # key added to every batch from PatchPool.batches: the patches' pool indices


def keep_count(n: int, h: float) -> int:
    """How many of ``n`` patches hard mining keeps: ``floor(n * (1 - 1/(1+h)))``, 0 for ``h <= 0``.

    ``h = 1`` keeps half, ``h = 3`` three quarters. Computed as ``n*h/(1+h)`` plus a tiny epsilon so a
    mathematically whole count (e.g. ``3 * 2/3``) is not floored one too low by rounding.
    """
    if h <= 0 or n <= 0:
        return 0
    return min(n, math.floor(n * h / (1.0 + h) + 1e-9))


def select_hard(
    scores: np.ndarray,
    ages: np.ndarray,
    h: float,
    order: str = "loss",
    max_age: int = 50,
) -> np.ndarray:
    """Indices (ascending, int64) of the patches to keep for the next round.

    ``keep_count(N, h)`` patches are kept, fewer when fewer are eligible; only patches with
    ``age < max_age`` are eligible. ``order``: "loss" keeps the highest scores (patch losses), "f1" the
    lowest (per-patch F1), "balance" the highest (rarity from :func:`balance_scores`). Ties go to the
    lower index; NaN scores rank last.
    """
    if order not in ORDERS:
        raise FlexPatchError(f"unknown hard mining order {order!r}; expected one of {', '.join(ORDERS)}")
    scores = np.asarray(scores, dtype=np.float64)
    ages = np.asarray(ages)
    if scores.ndim != 1 or scores.shape != ages.shape:
        raise FlexPatchError(f"scores and ages must both be (N,), got {scores.shape} and {ages.shape}")
    eligible = np.flatnonzero(ages < max_age)
    count = min(keep_count(len(scores), h), len(eligible))
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    key = scores[eligible] if order == "f1" else -scores[eligible]
    ranked = eligible[np.lexsort((eligible, key))]  # primary: key ascending (NaN last); ties: index
    return np.sort(ranked[:count]).astype(np.int64)


def balance_scores(label_counts: np.ndarray) -> np.ndarray:
    """Rarity of each patch's labels: ``r_i = sum_{k>=1} c_ik / (sum_j c_jk + 1)``.

    ``label_counts[i, k]`` is the number of voxels of label k in patch i (column 0 is background and is
    ignored). Each foreground label contributes the share of its total voxels over the pool that the
    patch holds, so a patch holding most of a rare label scores near 1 for that label, while a patch
    holding one of many copies of a common label scores little. The ``+1`` keeps absent labels at 0.
    Returns ``(N,)`` float64; keep the highest with ``select_hard(..., order="balance")``.
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    if counts.ndim != 2 or (counts < 0).any():
        raise FlexPatchError(f"label_counts must be a non-negative (N, K) table, got shape {counts.shape}")
    fg = counts[:, 1:]
    return (fg / (fg.sum(0, keepdims=True) + 1.0)).sum(1)


def count_labels(labels: Tensor, num_classes: int) -> np.ndarray:
    """Voxel counts (N, K) per patch and label of (N, *m) integer label maps; -1 and >= K are not counted."""
    flat = labels.reshape(labels.shape[0], -1).long()
    valid = (flat >= 0) & (flat < num_classes)
    rows = torch.arange(flat.shape[0], device=flat.device)[:, None].expand_as(flat)
    codes = (rows * num_classes + flat)[valid]
    counts = torch.bincount(codes, minlength=flat.shape[0] * num_classes)
    return counts.reshape(flat.shape[0], num_classes).cpu().numpy()


def _check_data(data: Mapping[str, Tensor]) -> int:
    """Raise unless ``data`` is a non-empty dict of tensors sharing the leading dim; returns it."""
    if not data:
        raise FlexPatchError("a patch pool needs at least one tensor")
    if INDEX_KEY in data:
        raise FlexPatchError(f"patch pool key {INDEX_KEY!r} is reserved for the batch indices")
    sizes = {name: int(t.shape[0]) if t.ndim else -1 for name, t in data.items()}
    if len(set(sizes.values())) != 1 or -1 in sizes.values():
        raise FlexPatchError(f"patch pool tensors must share the leading dim N, got {sizes}")
    return next(iter(sizes.values()))


@dataclass
class PatchPool:
    """A set of training patches: name -> tensor with leading dim N, plus each patch's age in rounds.

    Typical entries are the image crops per level, the labels and the relative affines; the pool does
    not interpret them. Age 0 means drawn this round; hard mining retires patches at ``max_age``.
    """

    data: dict[str, Tensor]
    ages: np.ndarray

    def __post_init__(self) -> None:
        n = _check_data(self.data)
        self.ages = np.asarray(self.ages, dtype=np.int64)
        if self.ages.shape != (n,):
            raise FlexPatchError(f"patch pool ages must have shape ({n},), got {self.ages.shape}")

    def __len__(self) -> int:
        return len(self.ages)

    @staticmethod
    def merge(kept: PatchPool | None, new: Mapping[str, Tensor]) -> PatchPool:
        """Join the kept (hard) patches, one round older, with newly drawn ones at age 0."""
        n_new = _check_data(new)
        if kept is None:
            return PatchPool(dict(new), np.zeros(n_new, dtype=np.int64))
        if set(kept.data) != set(new):
            raise FlexPatchError(f"patch pool keys differ: kept {sorted(kept.data)}, new {sorted(new)}")
        merged = {}
        for name, old in kept.data.items():
            if old.shape[1:] != new[name].shape[1:]:
                shapes = f"kept {tuple(old.shape)} vs new {tuple(new[name].shape)}"
                raise FlexPatchError(f"patch pool {name!r}: per-patch shapes differ, {shapes}")
            merged[name] = torch.cat([old, new[name].to(old.device, old.dtype)], 0)
        ages = np.concatenate([kept.ages + 1, np.zeros(n_new, dtype=np.int64)])
        return PatchPool(merged, ages)

    def subset(self, idx: np.ndarray | Sequence[int] | Tensor) -> PatchPool:
        """The patches at ``idx`` (in that order), with their ages."""
        if isinstance(idx, Tensor):
            idx = idx.cpu().numpy()
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        data = {name: t[index.to(t.device)] for name, t in self.data.items()}
        return PatchPool(data, self.ages[index.numpy()])

    def hard(self, scores: np.ndarray, h: float, order: str = "loss", max_age: int = 50) -> PatchPool:
        """The patches :func:`select_hard` keeps, given one score per patch."""
        return self.subset(select_hard(scores, self.ages, h, order, max_age))

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[dict[str, Tensor]]:
        """One shuffled pass over the pool: every patch exactly once, the last batch possibly smaller.

        Each batch also holds ``"index"``: the patches' pool indices (int64, CPU), so per-patch losses can
        be written back into a score array for hard mining. Deterministic given the (CPU) generator.
        """
        if batch_size < 1:
            raise FlexPatchError(f"batch_size must be >= 1, got {batch_size}")
        perm = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), batch_size):
            index = perm[start : start + batch_size]
            batch = {name: t[index.to(t.device)] for name, t in self.data.items()}
            batch[INDEX_KEY] = index
            yield batch
