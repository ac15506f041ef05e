"""runtime: the one progress reporter (rich on a terminal, plain lines in a log file or pipe) and
the one spelling of a random stream."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from rich.console import Console

from flexpatch import runtime


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The runtime's console writing to a StringIO: not a terminal, as a log file."""
    buffer = io.StringIO()
    monkeypatch.setattr(runtime, "console", Console(file=buffer))
    return buffer


def test_plain_lines_off_a_terminal(stream: io.StringIO) -> None:
    with runtime.progress_bar(interval=0) as bar:
        task = bar.add_task("train", total=8, info="")
        bar.update(task, completed=2, info="loss 0.412  val Dice 0.803")
        bar.advance(task, 2)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # two updates and the end
    assert re.fullmatch(r"train: 2/8 \(25%\) \d+:\d\d:\d\d  loss 0\.412  val Dice 0\.803", lines[0])
    assert lines[1].startswith("train: 4/8 (50%) ") and lines[1].endswith("loss 0.412  val Dice 0.803")
    assert lines[2].startswith("train: 4/8 (50%) ")


def test_interval_spaces_the_lines(stream: io.StringIO) -> None:
    with runtime.progress_bar(interval=1e9) as bar:
        task = bar.add_task("sweep", total=3)  # no info given: the field defaults to empty
        for _ in range(3):
            bar.advance(task)
    assert re.fullmatch(r"sweep: 3/3 \(100%\) \d+:\d\d:\d\d\n", stream.getvalue())  # only the end


def test_nothing_when_disabled(stream: io.StringIO) -> None:
    with runtime.progress_bar(disable=True, interval=0) as bar:
        task = bar.add_task("train", total=4, info="")
        bar.update(task, completed=4, info="loss 0.1")
    assert list(runtime.track([1, 2], "evaluating", disable=True)) == [1, 2]
    assert stream.getvalue() == ""


def test_an_error_leaves_no_end_line(stream: io.StringIO) -> None:
    with pytest.raises(RuntimeError), runtime.progress_bar(interval=1e9) as bar:
        task = bar.add_task("train", total=4)
        bar.advance(task)
        raise RuntimeError("boom")
    assert stream.getvalue() == ""


def test_transient_bar_has_no_end_line(stream: io.StringIO) -> None:
    with runtime.progress_bar(transient=True, interval=1e9) as bar:
        bar.advance(bar.add_task("sliding window", total=2), 2)
    assert stream.getvalue() == ""


def test_track_reports_the_items(stream: io.StringIO) -> None:
    assert list(runtime.track(["a", "b"], "evaluating")) == ["a", "b"]
    assert stream.getvalue().startswith("evaluating: 2/2 (100%) ")


def test_rich_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(runtime, "console", Console(file=buffer, force_terminal=True, width=80))
    with runtime.progress_bar(interval=0) as bar:
        bar.update(bar.add_task("train", total=2), completed=2, info="loss 0.5")
    assert not bar.plain and "loss 0.5" in buffer.getvalue() and "train: " not in buffer.getvalue()


def test_random_streams_are_the_spellings_they_replace() -> None:
    assert runtime.derive_seed("a", 1) == 6890064810516425771  # golden: streams stay the same across versions
    plain = torch.Generator().manual_seed(7)
    assert torch.equal(torch.rand(4, generator=runtime.generator(7)), torch.rand(4, generator=plain))
    hashed = torch.Generator().manual_seed(runtime.derive_seed("flexpatch-step", 7, 2))
    step = runtime.generator("flexpatch-step", 7, 2)
    assert torch.equal(torch.rand(4, generator=step), torch.rand(4, generator=hashed))
    assert np.array_equal(runtime.numpy_rng(5).random(3), np.random.default_rng(5).random(3))
    assert np.array_equal(runtime.numpy_rng(5, 1, 2).random(3), np.random.default_rng((5, 1, 2)).random(3))
