"""The segment-then-segment cascade part of ``flexpatch train``: ``--cascade sts``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from flexpatch.cli.common import emit_json, finite
from flexpatch.errors import FlexPatchError


def train_cli(
    dataset_dir: Path,
    out: Path,
    kind: str,
    flags: dict[str, Any],
    options: dict[str, Any],
    device: str,
    as_json: bool,
    overwrite: bool = False,
) -> None:
    """``train --cascade sts``: the settings that have flags from the flags, the others from ``options``."""
    from flexpatch.cascade.config import SHARED, CascadeConfig
    from flexpatch.cascade.train import train_cascade

    if kind != "sts":
        raise FlexPatchError(f"unknown cascade {kind!r}; the one offered is 'sts' (segment-then-segment)")
    own = {f.name for f in dataclasses.fields(CascadeConfig)} - {"train"}
    known = (own | set(SHARED)) - set(flags)  # flat, as the flags: the shared settings are train's
    unknown = sorted(set(options) - known)
    if unknown:
        raise FlexPatchError(
            f"--cascade-options: unknown or flag-only setting(s) {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(known))}"
        )
    try:
        config = CascadeConfig.of(**flags, **options)
    except TypeError as e:  # a value of the wrong type, e.g. a list for min_side
        raise FlexPatchError(f"--cascade-options: {e}") from None
    result = train_cascade(dataset_dir, out, config, device=device, progress=not as_json, overwrite=overwrite)
    _report(result, as_json)


def resume_cli(dataset_dir: Path, out: Path, device: str, as_json: bool) -> None:
    """``train --resume`` of a cascade: its checkpoint's config, from where each stage stopped."""
    from flexpatch.cascade.train import train_cascade

    result = train_cascade(dataset_dir, out, None, device=device, progress=not as_json, resume=True)
    _report(result, as_json)


def _report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json({k: finite(v) if isinstance(v, float) else v for k, v in result.items()})
    else:
        typer.echo(
            f"trained cascade in {result['seconds']:.0f} s; validation Dice {result['best_val_dice']:.3f} "
            f"(rough model alone {result['baseline_val_dice']:.3f})"
        )
