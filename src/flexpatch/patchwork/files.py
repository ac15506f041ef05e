"""What a patchwork model folder holds, and reading its description back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexpatch.errors import FlexPatchError

CONFIG = "patchwork.json"  # written last: its presence means the folder is complete
WEIGHTS = "patchwork.pt"  # the last round's weights
BEST = "patchwork_best.pt"  # the weights of the best validation round, when there is validation
RESUME = "resume.pt"  # everything an exact resume needs


def is_patchwork(model_dir: str | Path) -> bool:
    return (Path(model_dir) / CONFIG).is_file()


def load_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FlexPatchError(f"{path}: unreadable patchwork config ({err})") from None
