"""Running a planned prediction within its budget when it runs out of memory anyway (the plan is
:mod:`flexpatch.plan.planner`'s; running it is inference's).

:func:`sliding_window_within` retries with, in order, half the window batch, stitching on
the CPU, and a smaller window; the first two leave the output unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import torch

from flexpatch.errors import FlexPatchError, format_shape
from flexpatch.infer.sliding_window import sliding_window
from flexpatch.plan.planner import WindowChoice, shrink
from flexpatch.runtime import is_out_of_memory

T = TypeVar("T")


def fallback(
    choice: WindowChoice, image_shape: Sequence[int], divisor: Sequence[int], fixed_window: bool
) -> WindowChoice | None:
    """The next thing to try after running out of memory: half the batch, CPU stitching, a smaller window."""
    if choice.batch > 1:
        return replace(choice, batch=choice.batch // 2)
    if torch.device(choice.stitch_device).type != "cpu":
        return replace(choice, stitch_device="cpu")
    smaller = None if fixed_window else shrink(choice.window, image_shape, divisor)
    return replace(choice, window=smaller) if smaller else None


def sliding_window_within(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    choice: WindowChoice,
    divisor: Sequence[int],
    *,
    device: str | torch.device,
    overlap: float = 0.5,
    blend: str = "gaussian",
    fixed_window: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[torch.Tensor, WindowChoice]:
    """:func:`sliding_window` with ``choice``, retrying through out-of-memory errors (:func:`fallback`).

    Returns:
        The blended output and the choice that ran.

    Raises:
        FlexPatchError: out of memory with nothing left to try.
    """

    def run(c: WindowChoice) -> torch.Tensor:
        return sliding_window(
            net, image, c.window, overlap, blend, c.batch,
            divisor=divisor, device=device, stitch_device=c.stitch_device,
        )  # fmt: skip

    return run_within(run, tuple(image.shape[2:]), choice, divisor, device, fixed_window, log)


def run_within(
    run: Callable[[WindowChoice], T],
    image_shape: Sequence[int],
    choice: WindowChoice,
    divisor: Sequence[int],
    device: str | torch.device,
    fixed_window: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[T, WindowChoice]:
    """``run(choice)``, and again with the :func:`fallback` of each choice that ran out of memory
    (``run`` starts over: a streamed prediction's consumer with it).

    Raises:
        FlexPatchError: out of memory with nothing left to try.
    """
    image_shape = tuple(image_shape)
    while True:
        try:
            return run(choice), choice
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_out_of_memory(e):
                raise
        # retried outside the except block, so the failed attempt's frames and tensors are gone
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        nxt = fallback(choice, image_shape, divisor, fixed_window)
        if nxt is None:
            raise FlexPatchError(
                f"out of memory at {choice.describe()} on image {format_shape(image_shape)}: "
                f"nothing smaller to try{' (the window is fixed)' if fixed_window else ''}"
            )
        log(f"out of memory at {choice.describe()}; retrying with {nxt.describe()}")
        choice = nxt
