"""The training harness every method's loop runs on: cadence, best/last checkpoints, the divergence
guard and the JSONL log (each method's own tests check that resume stays exact on top of it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flexpatch.checkpoint import load_checkpoint
from flexpatch.errors import FlexPatchError
from flexpatch.train.harness import Harness, jsonl_log, truncate_log


def test_cadence_validates_every_n_and_at_the_end(tmp_path: Path) -> None:
    h = Harness(tmp_path, total=10, val_every=4)
    assert [s for s in range(1, 11) if h.validation_due(s)] == [4, 8, 10]
    assert [s for s in range(1, 11) if h.save_due(s)] == [4, 8, 10]  # by default with validation
    h = Harness(tmp_path, total=10, val_every=4, save_every=3)
    assert [s for s in range(1, 11) if h.save_due(s)] == [3, 6, 9, 10]


def test_best_is_kept_first_then_only_when_it_improves(tmp_path: Path) -> None:
    h = Harness(tmp_path, total=5, val_every=1)
    weights = lambda v: lambda: {"w": torch.tensor([v])}  # noqa: E731
    assert h.keep_if_best(math.nan, weights(0.0))  # the first validation keeps weights, even NaN
    assert h.best == -1.0
    assert h.keep_if_best(0.5, weights(0.5)) and not h.keep_if_best(0.4, weights(0.4))
    assert not h.keep_if_best(math.nan, weights(9.0))  # a NaN never improves
    assert h.best == 0.5 and load_checkpoint(tmp_path / "model_best.pt")["w"].item() == 0.5
    h.save_last({"step": 3})
    assert load_checkpoint(tmp_path / "model_last.pt") == {"step": 3}


def test_skipped_steps_are_marked_and_a_run_of_them_stops_the_run(tmp_path: Path) -> None:
    h = Harness(tmp_path, total=100, val_every=10)
    assert h.taken(1, True, {"step": 1}) == {"step": 1}
    assert h.taken(2, False, {"step": 2}) == {"step": 2, "skipped": True}
    with pytest.raises(FlexPatchError, match=f"{tmp_path}: training diverged"):
        for step in range(3, 3 + h.divergence.limit):
            h.taken(step, False, {})


def test_log_lines_are_appended_and_truncated_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with jsonl_log(path) as log:
        for step in (1, 2, 3):
            log({"step": step})
    path.write_text(path.read_text() + '{"step": 4, "lo')  # a line a crash cut short
    truncate_log(path, lambda record: record["step"] <= 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, {"step": 2}]
