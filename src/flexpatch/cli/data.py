"""Commands about data and networks: ``phantom`` writes a dataset, ``models`` lists the networks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexpatch.cli.common import JsonOpt, emit_json, parse_floats, parse_ints


def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the nnU-Net raw dataset.")],
    cases: Annotated[int, typer.Option(help="Training cases.")] = 8,
    shape: Annotated[str, typer.Option(help="Image shape, e.g. 96,96,96 (3D) or 256,256 (2D).")] = "96,96,96",
    ndim: Annotated[int, typer.Option(help="2 or 3.")] = 3,
    kind: Annotated[str, typer.Option(help="abdomen or cells.")] = "abdomen",
    seed: int = 0,
    test_cases: Annotated[int | None, typer.Option(help="Test cases (imagesTs/labelsTs).")] = None,
    spacing: Annotated[str | None, typer.Option(help="Voxel size in mm, e.g. 2,2,2.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier phantom in OUT_DIR (nothing else is).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the built-in phantom as an nnU-Net raw dataset (nothing is downloaded)."""
    from flexpatch.data.phantom import make_phantom

    sp = parse_floats(spacing, "spacing") if spacing else None
    out = make_phantom(
        out_dir,
        cases,
        parse_ints(shape, "shape"),
        ndim,
        kind,
        seed,
        test_cases,
        spacing=sp,
        progress=not as_json,
        overwrite=overwrite,
    )
    if as_json:
        emit_json({"dataset_dir": str(out)})
    else:
        typer.echo(f"phantom written to {out}")


def models(as_json: JsonOpt = False) -> None:
    """List the registered networks and the divisibility their input needs."""
    from flexpatch.models import list_models, model_divisor

    rows = {
        name: {"divisor_3d": model_divisor(name, 3), "divisor_2d": model_divisor(name, 2)}
        for name in list_models()
    }
    if as_json:
        emit_json(rows)
        return
    for name, row in rows.items():
        typer.echo(f"{name:12s} 3D divisible by {row['divisor_3d']}, 2D by {row['divisor_2d']}")


COMMANDS = (phantom, models)
