"""Hard mining: keep counts, selection orders and ages, rarity scores, and the patch pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexpatch.errors import FlexPatchError
from flexpatch.patchwork.mining import PatchPool, balance_scores, count_labels, keep_count, select_hard


def test_keep_count() -> None:
    assert keep_count(10, 0) == 0
    assert keep_count(10, -1.0) == 0
    assert keep_count(10, 1) == 5
    assert keep_count(11, 1) == 5
    assert keep_count(8, 3) == 6
    assert keep_count(3, 2) == 2  # 3 * 2/3 is whole: no off-by-one from rounding
    assert keep_count(0, 3) == 0
    assert keep_count(7, 0.1) == 0


SCORES = np.array([0.5, 0.9, 0.1, 0.9, 0.7, 0.3])


def test_select_hard_orders() -> None:
    ages = np.zeros(6, dtype=int)
    np.testing.assert_array_equal(select_hard(SCORES, ages, 1.0, "loss"), [1, 3, 4])
    np.testing.assert_array_equal(select_hard(SCORES, ages, 1.0, "f1"), [0, 2, 5])
    np.testing.assert_array_equal(select_hard(SCORES, ages, 1.0, "balance"), [1, 3, 4])
    assert select_hard(SCORES, ages, 0.0).size == 0
    with pytest.raises(FlexPatchError):
        select_hard(SCORES, ages, 1.0, "random")
    with pytest.raises(FlexPatchError):
        select_hard(SCORES, ages[:3], 1.0)


def test_select_hard_age_limit_and_ties() -> None:
    ages = np.array([0, 50, 0, 49, 0, 0])
    # patch 1 (age 50) is retired although its loss is the highest; patch 3 (age 49) still counts
    np.testing.assert_array_equal(select_hard(SCORES, ages, 1.0, "loss", max_age=50), [0, 3, 4])
    # only two eligible patches: fewer than keep_count(6, 1) = 3 are kept
    np.testing.assert_array_equal(select_hard(SCORES, np.array([5, 5, 0, 5, 5, 0]), 1.0, max_age=5), [2, 5])
    ties = np.full(6, 0.4)
    first = select_hard(ties, np.zeros(6, dtype=int), 1.0)
    np.testing.assert_array_equal(first, [0, 1, 2])
    np.testing.assert_array_equal(select_hard(ties, np.zeros(6, dtype=int), 1.0), first)
    nan = np.array([np.nan, 0.2, 0.1, 0.3])
    np.testing.assert_array_equal(select_hard(nan, np.zeros(4, dtype=int), 1.0), [1, 3])


def test_balance_scores_by_hand() -> None:
    counts = np.array(
        [
            [50, 10, 0],  # common label 1: 10 / (40 + 1)
            [50, 30, 0],  # common label 1: 30 / 41
            [50, 0, 4],  # all of rare label 2: 4 / (4 + 1)
            [90, 0, 0],  # background only: 0
            [40, 0, 0],
        ]
    )
    expected = np.array([10 / 41, 30 / 41, 4 / 5, 0.0, 0.0])
    np.testing.assert_allclose(balance_scores(counts), expected)
    kept = select_hard(balance_scores(counts), np.zeros(5, dtype=int), 1.0, "balance")
    np.testing.assert_array_equal(kept, [1, 2])
    both = np.array([[0, 1, 1], [0, 1, 0]])  # labels add up: 1/3 + 1/2 and 1/3
    np.testing.assert_allclose(balance_scores(both), [1 / 3 + 1 / 2, 1 / 3])
    with pytest.raises(FlexPatchError):
        balance_scores(np.array([1, 2, 3]))


def test_count_labels() -> None:
    labels = torch.tensor([[[0, 1], [1, -1]], [[2, 2], [2, 0]]])
    np.testing.assert_array_equal(count_labels(labels, 3), [[1, 2, 0], [1, 0, 3]])


def _new(n: int, offset: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(offset, offset + n)
    return {
        "crop0": ids.float()[:, None, None, None].expand(n, 1, 4, 4).clone(),
        "labels": ids[:, None, None].expand(n, 4, 4).clone(),
        "rel1": torch.eye(3, dtype=torch.float64).expand(n, 3, 3).clone(),
    }


def test_pool_merge_subset_and_ages() -> None:
    pool = PatchPool.merge(None, _new(4, 0))
    assert len(pool) == 4 and pool.ages.tolist() == [0, 0, 0, 0]
    kept = pool.hard(np.array([0.1, 0.8, 0.3, 0.9]), 1.0)
    assert kept.data["labels"][:, 0, 0].tolist() == [1, 3]
    merged = PatchPool.merge(kept, _new(3, 10))
    assert len(merged) == 5 and merged.ages.tolist() == [1, 1, 0, 0, 0]
    assert merged.data["labels"][:, 0, 0].tolist() == [1, 3, 10, 11, 12]
    again = PatchPool.merge(merged.subset([0, 3]), _new(1, 20))
    assert again.ages.tolist() == [2, 1, 0] and again.data["crop0"][:, 0, 0, 0].tolist() == [1, 11, 20]
    with pytest.raises(FlexPatchError):
        PatchPool.merge(kept, {"crop0": torch.zeros(2, 1, 4, 4)})
    with pytest.raises(FlexPatchError):
        PatchPool.merge(None, {"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(FlexPatchError):
        PatchPool.merge(kept, {**_new(1, 0), "labels": torch.zeros(1, 5, 5, dtype=torch.int64)})


def test_pool_batches_cover_every_patch_once() -> None:
    pool = PatchPool.merge(PatchPool.merge(None, _new(5, 0)), _new(6, 100))
    seen = []
    for batch in pool.batches(4, torch.Generator().manual_seed(0)):
        assert set(batch) == {"crop0", "labels", "rel1", "index"}
        assert batch["labels"].shape[0] == batch["index"].shape[0] <= 4
        # the index key points back into the pool
        torch.testing.assert_close(batch["labels"], pool.data["labels"][batch["index"]])
        seen += batch["labels"][:, 0, 0].tolist()
    assert sorted(seen) == [*range(5), *range(100, 106)]

    def order(seed: int) -> list[int]:
        return [i for b in pool.batches(3, torch.Generator().manual_seed(seed)) for i in b["index"].tolist()]

    assert order(7) == order(7)
    assert order(7) != order(8)
    with pytest.raises(FlexPatchError):
        next(pool.batches(0))
