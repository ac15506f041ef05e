"""The patchwork parts of ``flexpatch train`` and ``flexpatch predict`` (seed 04)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flexpatch.errors import FlexPatchError

SCHEME_KEYS = (
    "depth", "matrix", "fov_mm", "fov_rel", "destvox_mm", "destvox_rel", "system", "snapper", "interp",
    "scatter", "smooth", "normalize", "overlap",
)  # fmt: skip


def read_options(path: Path | None) -> dict[str, Any]:
    """``--patchwork-options FILE.json``: any PatchworkConfig or scheme field, by name."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FlexPatchError(f"{path}: unreadable patchwork options ({err})") from None
    if not isinstance(data, dict):
        raise FlexPatchError(f"{path}: patchwork options must be a JSON object")
    return data


def make_config(flags: dict[str, Any], options: dict[str, Any]) -> Any:
    """A PatchworkConfig from the command-line flags (None = not given) over the options file."""
    from flexpatch.patchwork.train import PatchworkConfig

    known = {f.name for f in dataclasses.fields(PatchworkConfig)}
    merged = {**options, **{k: v for k, v in flags.items() if v is not None}}
    unknown = sorted(set(merged) - known - set(SCHEME_KEYS))
    if unknown:
        raise FlexPatchError(f"unknown patchwork option(s): {', '.join(unknown)}")
    scheme = dict(merged.pop("scheme", {}))
    scheme.update({k: merged.pop(k) for k in SCHEME_KEYS if k in merged})
    return PatchworkConfig(scheme=scheme, **merged)


def train_cli(dataset_dir: Path, out: Path, flags: dict[str, Any], options_file: Path | None, device: str,
              as_json: bool) -> dict[str, Any]:
    from flexpatch.patchwork.train import train_patchwork

    config = make_config(flags, read_options(options_file))
    return train_patchwork(dataset_dir, out, config, device=device, progress=not as_json)


def predict_cli(model_dir: Path, inputs: list[Path], out: Path, flags: dict[str, Any], out_type: str,
                device: str, as_json: bool) -> tuple[list[Path], dict[str, Any]]:
    from flexpatch.patchwork.apply import ApplyOptions, predict_patchwork_files

    level = flags.pop("level", "last")
    opts = ApplyOptions(level=int(level) if str(level).isdigit() else level,
                        **{k: v for k, v in flags.items() if v is not None})
    written = predict_patchwork_files(model_dir, inputs, out, opts, out_type, device, progress=not as_json)
    return written, opts.stats
