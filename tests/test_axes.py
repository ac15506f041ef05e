"""The per-axis primitives: one value per axis, and sizes rounded to a divisor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexpatch.axes import nearest_valid, per_axis, round_down, round_nearest, round_up
from flexpatch.errors import FlexPatchError


@pytest.mark.parametrize("value", [64, np.int64(64), (64,), [64], torch.tensor(64), "64"])
def test_per_axis_repeats_one_value(value: object) -> None:
    assert per_axis(value, 3, "patch") == (64, 64, 64)


def test_per_axis_keeps_one_per_axis_and_casts() -> None:
    assert per_axis([48, 64, 32], 3, "patch") == (48, 64, 32)
    assert per_axis(np.array([1, 2]), 2, "spacing", cast=float) == (1.0, 2.0)
    assert per_axis(0.5, 2, "spacing", cast=float) == (0.5, 0.5)
    assert per_axis((1, 0), 2, "flip", cast=bool) == (True, False)


def test_per_axis_errors_name_the_option() -> None:
    with pytest.raises(FlexPatchError, match=r"patch \(8, 8, 8\) has 3 entries for a 2D image: give 1 or 2"):
        per_axis((8, 8, 8), 2, "patch")
    with pytest.raises(FlexPatchError, match="spacing 'a,b' has an entry that is not a valid number"):
        per_axis("a,b", 2, "spacing", cast=float)
    with pytest.raises(FlexPatchError, match="neither a number nor a sequence"):
        per_axis(object(), 2, "patch")
    with pytest.raises(FlexPatchError, match="^my own words$"):
        per_axis((1, 2), 3, "patch", message="my own words")


def test_rounding_matches_brute_force() -> None:
    for divisor in range(1, 10):
        multiples = [k * divisor for k in range(-25, 110)]
        for size in range(-20, 100):
            assert round_down(size, divisor) == max(m for m in multiples if m <= size)
            assert round_up(size, divisor) == min(m for m in multiples if m >= size)
            below, above = nearest_valid(size, divisor)
            assert below == max(divisor, round_down(size, divisor))
            assert above == max(divisor, round_up(size, divisor))


def test_round_nearest() -> None:
    assert round_nearest(96, 16) == 96
    assert round_nearest(100, 16) == 96
    assert round_nearest(105, 16) == 112
    assert round_nearest(24, 16) == 32  # 1.5 rounds to 2 (Python's round: halves to even)
    assert round_nearest(40, 16) == 32  # 2.5 rounds to 2
