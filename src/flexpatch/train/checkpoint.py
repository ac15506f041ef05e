"""Model folders: what ``train`` writes and ``predict`` reads (weights, config, plan, fingerprint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flexpatch.data.io import atomic_path
from flexpatch.errors import FlexPatchError

LAST = "model_last.pt"
BEST = "model_best.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save through a temporary file, so a crash never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not path.exists():
        raise FlexPatchError(f"{path}: checkpoint not found")
    try:
        # our checkpoints hold RNG states (numpy arrays, tuples), so full unpickling is needed
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise FlexPatchError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
