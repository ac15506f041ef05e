"""The deep neural patchwork parts of ``flexpatch train`` and ``flexpatch predict``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer

from flexpatch.cli.common import emit_json, parse_floats, parse_ints
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
    from flexpatch.patchwork.config import PatchworkConfig

    known = {f.name for f in dataclasses.fields(PatchworkConfig)}
    given = {k: v for k, v in flags.items() if v is not None}
    if isinstance(options.get("block_options"), dict) and "block_options" in given:
        # --options adds to the file's block options, key by key, as every other flag does
        given["block_options"] = {**options["block_options"], **given["block_options"]}
    merged = {**options, **given}
    unknown = sorted(set(merged) - known - set(SCHEME_KEYS))
    if unknown:
        raise FlexPatchError(f"unknown patchwork option(s): {', '.join(unknown)}")
    scheme = dict(merged.pop("scheme", {}))
    scheme.update({k: merged.pop(k) for k in SCHEME_KEYS if k in merged})
    return PatchworkConfig(scheme=scheme, **merged)


def train_cli(
    dataset_dir: Path,
    out: Path,
    scheme: dict[str, str | int | None],
    options_file: Path | None,
    device: str,
    as_json: bool,
    overwrite: bool = False,
    **flags: Any,
) -> None:
    """``train --patchwork``: scheme flags as typed (``"32"``, ``"0.9,0.9,0.8"``), the rest as values."""
    from flexpatch.patchwork.train import train_patchwork

    for key, text in scheme.items():
        if isinstance(text, str):
            flags[key] = parse_ints(text, key) if key == "matrix" else parse_floats(text, key)
        elif text is not None:
            flags[key] = text
    config = make_config(flags, read_options(options_file))
    result = train_patchwork(
        dataset_dir, out, config, device=device, progress=not as_json, overwrite=overwrite
    )
    _report(result, as_json)


def resume_cli(dataset_dir: Path, out: Path, device: str, as_json: bool, **overrides: Any) -> None:
    """``train --resume`` of a patchwork: its saved config, with ``rounds``/``workers`` when given."""
    from flexpatch.patchwork.train import train_patchwork

    changes = {k: v for k, v in overrides.items() if v is not None}
    result = train_patchwork(
        dataset_dir, out, None, device=device, progress=not as_json, resume=True, changes=changes
    )
    _report(result, as_json)


def _report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(result)
    else:
        best = result["best_val_dice"]
        typer.echo(
            f"trained patchwork: {result['rounds']} rounds in {result['seconds']:.0f} s, "
            f"last loss {result['last_loss']:.3f}"
            + (f", best validation Dice {best:.3f}" if best is not None else ", no validation cases")
        )


def predict_cli(
    model_dir: Path | list[Path], inputs: list[Path], out: Path, flags: dict[str, Any], out_type: str,
    device: str, as_json: bool, memory: str | None = None, probabilities: bool = False,
) -> None:  # fmt: skip
    """``predict`` with a patchwork model folder (or an ensemble of them): writes the outputs,
    reports the patches per level."""
    from flexpatch.patchwork.apply import ApplyOptions
    from flexpatch.patchwork.predict import predict_patchwork_files

    given = {k: v for k, v in flags.items() if v is not None}
    level = given.pop("level", "last")
    opts = ApplyOptions(level=int(level) if str(level).isdigit() else level, **given)
    written = predict_patchwork_files(
        model_dir, inputs, out, opts, out_type, device, progress=not as_json, memory=memory,
        save_probabilities=probabilities,
    )  # fmt: skip
    members = model_dir if isinstance(model_dir, list) else [model_dir]
    if as_json:
        emit_json({"out_dir": str(out), "segmentations": [str(p) for p in written], "stats": written.info,
                   "models": [str(m) for m in members]})  # fmt: skip
    else:
        ensemble = f" (ensemble of {len(members)})" if len(members) > 1 else ""
        typer.echo(f"wrote {len(written)} patchwork outputs to {out}{ensemble}")
