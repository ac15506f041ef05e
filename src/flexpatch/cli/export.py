"""``flexpatch export``: a sliding-window model's network as TorchScript or ONNX, for one window."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexpatch.cli.common import JsonOpt, emit_json, parse_ints

ModelArg = Annotated[Path, typer.Argument(help="A sliding-window model folder written by flexpatch train.")]
WindowOpt = Annotated[
    str,
    typer.Option(
        "--window",
        help="The input window the network is exported for, e.g. 48,48,48 or 48 (a hypernetwork is "
        "baked at it).",
    ),
]
FormatOpt = Annotated[str, typer.Option("--format", help="torchscript or onnx (needs the onnx package).")]
OutOpt = Annotated[
    Path, typer.Option("--out", help="The file to write; FILE.json beside it says how to run it.")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out (and its JSON).")]


def export(
    model_dir: ModelArg,
    window: WindowOpt,
    out: OutOpt,
    fmt: FormatOpt = "torchscript",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a trained network for one input window (TorchScript or ONNX), with a JSON of how to run it."""
    from flexpatch.export import export_model

    size = parse_ints(window, "window")
    done = export_model(model_dir, out, size, format=fmt, overwrite=overwrite)
    if as_json:
        emit_json(
            {"file": str(done.path), "info": str(done.info_path), "window": list(done.window), "format": fmt}
        )
    else:
        typer.echo(done.describe())


COMMANDS = (export,)
