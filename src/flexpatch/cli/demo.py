"""``flexpatch demo``: the README's main job on the phantom, in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexpatch.cli.common import DeviceOpt, JsonOpt, emit_json


def demo(
    out_dir: Annotated[
        Path, typer.Argument(help="Working folder (phantom, models, predictions, report).")
    ] = Path("demo_out"),
    steps: Annotated[int, typer.Option(help="Training steps per model.")] = 300,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """The main job on the phantom: a fixed-size and an AP + context U-Net, Dice at 5 windows, a table
    and a PNG; --json prints {"image": [...], "models": {name: {window edge: mean Dice}}}."""
    from flexpatch.demo import as_json as short_form
    from flexpatch.demo import run_demo

    result = run_demo(out_dir, steps=steps, device=device, progress=not as_json)
    if as_json:
        emit_json(short_form(result))


COMMANDS = (demo,)
