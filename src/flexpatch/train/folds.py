"""Cross-validation as nnU-Net users know it: ``splits_final.json`` and the fold of a run.

``splits_final.json`` is nnU-Net's file: a list with one ``{"train": [case ids], "val": [case
ids]}`` per fold. nnU-Net writes it into its preprocessed folder; flexpatch has no such folder for
users, so it lives next to ``dataset.json``. It is written once, when a fold is first trained and
the file is absent, and never overwritten: a user's (edited) file is what every fold reads.

The split is nnU-Net's: sklearn's ``KFold(n_splits, shuffle=True, random_state=12345)`` over the
sorted training case ids. sklearn is no dependency, so :func:`kfold` reimplements it: a
``numpy.random.RandomState(seed)`` shuffles ``arange(n)``, the shuffled order is cut into
``n_splits`` consecutive parts (the first ``n % n_splits`` one case larger) and each part, in
sorted order, is a fold's validation. Same ids and seed, same file as nnU-Net would write.

Fold ``all`` trains on every case; as nnU-Net, it validates on its training cases too, so its
validation Dice is a training Dice (it still picks the best checkpoint and the post-processing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from flexpatch.data.io import load_json, save_json
from flexpatch.errors import FlexPatchError
from flexpatch.runtime import console

SPLITS_FILE = "splits_final.json"
DEFAULT_FOLDS = 5
SPLIT_SEED = 12345  # nnU-Net's, whatever the run's seed: every fold of a dataset reads one split

Fold = int | str  # 0..n-1 or "all"
T = TypeVar("T")


def parse_fold(value: int | str) -> Fold:
    """``"0"`` -> 0, ``"all"`` -> ``"all"``; anything else is one line."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (value == "all" or value.isdigit()):
        return value if value == "all" else int(value)
    raise FlexPatchError(f"fold must be a number from 0 or 'all', got {value!r}")


def kfold(case_ids: Sequence[str], n_splits: int = DEFAULT_FOLDS, seed: int = SPLIT_SEED) -> list[dict]:
    """nnU-Net's splits (sklearn's shuffled KFold, reimplemented) of the sorted ``case_ids``."""
    ids = sorted(case_ids)
    if n_splits < 2 or n_splits > len(ids):
        raise FlexPatchError(f"{len(ids)} training cases cannot make {n_splits} folds (2 to {len(ids)})")
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, len(ids) // n_splits)
    sizes[: len(ids) % n_splits] += 1
    splits, start = [], 0
    for size in sizes:
        val = set(order[start : start + size].tolist())
        start += size
        splits.append(
            {
                "train": [c for i, c in enumerate(ids) if i not in val],
                "val": [c for i, c in enumerate(ids) if i in val],
            }
        )
    return splits


def read_splits(path: Path, case_ids: Sequence[str]) -> list[dict[str, list[str]]]:
    """A ``splits_final.json`` checked: a non-empty list of ``{"train": [...], "val": [...]}`` whose
    ids are training cases of the dataset; anything else is one line naming the file."""
    splits = load_json(path)
    known = set(case_ids)
    if not isinstance(splits, list) or not splits:
        raise FlexPatchError(
            f"{path}: needs a non-empty list of {{'train': [...], 'val': [...]}}, one per fold"
        )
    for k, split in enumerate(splits):
        if not isinstance(split, dict) or not all(
            isinstance(split.get(part), list) and all(isinstance(c, str) for c in split[part])
            for part in ("train", "val")
        ):
            raise FlexPatchError(f"{path}: fold {k} needs 'train' and 'val' lists of case ids")
        unknown = sorted(set(split["train"] + split["val"]) - known)
        if unknown:
            raise FlexPatchError(f"{path}: fold {k} names cases the dataset lacks: {', '.join(unknown[:5])}")
        if not split["train"]:
            raise FlexPatchError(f"{path}: fold {k} has no training cases")
    return splits


def ensure_splits(dataset_dir: Path, case_ids: Sequence[str], n_folds: int | None = None) -> Path:
    """``dataset_dir/splits_final.json``, written with ``n_folds`` (default 5) when absent and
    checked either way; a given ``n_folds`` the existing file does not hold is one line."""
    path = Path(dataset_dir) / SPLITS_FILE
    if not path.is_file():
        save_json(path, kfold(case_ids, n_folds or DEFAULT_FOLDS))
        console.print(f"wrote {path} ({n_folds or DEFAULT_FOLDS} folds, nnU-Net's seeded split)")
    splits = read_splits(path, case_ids)
    if n_folds is not None and len(splits) != n_folds:
        raise FlexPatchError(f"{path}: holds {len(splits)} folds, not {n_folds} (remove it to split anew)")
    return path


def fold_cases(
    cases: Sequence[T], dataset_dir: Path, fold: Fold, key: Callable[[T], str] = lambda c: Path(c).stem
) -> tuple[list[T], list[T]]:
    """The training and validation cases of ``fold`` among ``cases`` (preprocessed files named
    ``<case id>.npz``, or anything whose ``key`` is its case id), each in the given order. ``all``:
    every case for both."""
    fold = parse_fold(fold)
    if fold == "all":
        return list(cases), list(cases)
    ids = [key(c) for c in cases]
    path = ensure_splits(dataset_dir, ids)
    splits = read_splits(path, ids)
    if fold >= len(splits):
        raise FlexPatchError(f"{path}: holds folds 0 to {len(splits) - 1}, not fold {fold}")
    val = set(splits[fold]["val"])
    train = set(splits[fold]["train"])
    return [c for c, i in zip(cases, ids, strict=True) if i in train], [
        c for c, i in zip(cases, ids, strict=True) if i in val
    ]


def split_for(
    cases: Sequence[T], dataset_dir: Path, config: Any, key: Callable[[T], str] = lambda c: Path(c).stem
) -> tuple[list[T], list[T]]:
    """A run's training and validation cases: its fold's (``config.fold``; ``key`` as
    :func:`fold_cases`), else today's seeded ``val_fraction`` split, unchanged so that runs
    without a fold stay bit for bit the same."""
    from flexpatch.train.loop import split_cases

    if config.fold is None:
        return split_cases(cases, config.val_fraction, config.seed)
    return fold_cases(cases, dataset_dir, config.fold, key)


def write_validation(dataset_dir: Path, out_dir: Path, val_ids: Sequence[str], device: str) -> None:
    """As nnU-Net at the end of a fold: the fold's validation cases predicted into
    ``out_dir/validation`` (label maps, post-processing applied) from the finished model folder,
    by the predictor of the method that wrote it."""
    from flexpatch.data.dataset import load_dataset
    from flexpatch.methods import method_of

    wanted = set(val_ids)
    files = [f for case in load_dataset(dataset_dir).training if case.id in wanted for f in case.images]
    predict = method_of(out_dir).predict_files()
    predict(out_dir, files, out_dir / "validation", device=device, progress=False)
