"""Small runtime helpers shared by training and inference: devices, RNG state, progress bars."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flexpatch.errors import FlexPatchError

console = Console(stderr=True)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; an unavailable CUDA request is a user error, not a crash."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FlexPatchError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlexPatchError(f"device {device!r} requested but no CUDA GPU is available")
    return dev


def check_writable(folder: str | Path, what: str = "output folder") -> None:
    """Fail before any work when ``folder`` cannot be created or written; creates nothing.

    Args:
        folder: the folder a command will write into (it may not exist yet).
        what: how the message names it.
    """
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it" if existing == folder else f"{existing}"
        raise FlexPatchError(f"{folder}: cannot create {what}, {where} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FlexPatchError(f"{folder}: {what} is not writable (permission denied on {existing})")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, so that ``--resume`` continues exactly."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # generators take their state as a CPU byte tensor, wherever a checkpoint was mapped to
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class _Progress(Progress):
    """A progress bar that vanishes when its block raises.

    Off a terminal rich prints the final bar and a blank line on exit; after an error
    they would stand beside the CLI's one-line message on stderr.
    """

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if exc_type is None:
            super().__exit__(exc_type, exc_val, exc_tb)
        elif not self.disable:
            self.live.transient = True
            self.live.stop()


def progress_bar(disable: bool = False) -> Progress:
    """A rich progress bar; tasks carry a free-text field ``info`` (loss, Dice, it/s)."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    return _Progress(*columns, console=console, disable=disable)
