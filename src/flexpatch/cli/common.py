"""What the command modules share: option types, parsers of command-line values, output, errors.

Only light imports here (typer and the standard library): ``flexpatch --help`` imports this
module, so torch and MONAI stay inside the commands.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated, Any

import typer

from flexpatch.errors import FlexPatchError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help="The network's number type: float32, bfloat16 (autocast; about 2x faster on a CPU with "
        "AVX512-BF16 or AMX, slower where emulated) or auto (bfloat16 where the device runs it natively). "
        "Sliding-window models.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        help="Torch CPU threads (default: OMP_NUM_THREADS, else the cores the loader workers leave)."
    ),
]


def use_cores(threads: int | None, workers: int | None = None) -> Any:
    """Set torch's threads for a command (:func:`flexpatch.runtime.cpu_plan`); returns the plan
    (a ``CpuPlan``: threads, workers and the cores they share)."""
    from flexpatch.runtime import apply_threads, cpu_plan

    plan = cpu_plan(threads, workers)
    apply_threads(plan)
    return plan


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"48,48,32"`` -> (48, 48, 32); a clear error for anything else."""
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise FlexPatchError(f"{what} {text!r} must be integers separated by commas, e.g. 64,64,64") from None
    if not values or any(v <= 0 for v in values):
        raise FlexPatchError(f"{what} {text!r} must be positive on every axis")
    return values


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """``"2,2,5"`` -> (2.0, 2.0, 5.0); a clear error for anything else."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FlexPatchError(f"{what} {text!r} must be numbers separated by commas, e.g. 2,2,5") from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise FlexPatchError(f"{what} {text!r} must be positive on every axis")
    return values


def parse_options(text: str | None, flag: str = "--options") -> dict[str, Any]:
    """A JSON object given on the command line (``'{"token_size": 8}'``); ``{}`` when not given."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FlexPatchError(f"{flag} {text!r} is not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise FlexPatchError(f"{flag} {text!r} must be a JSON object")
    return value


def finite(value: float) -> float | None:
    """JSON has no NaN: a run with no step or no validation reports null."""
    return value if math.isfinite(value) and value >= 0 else None


def emit_json(obj: object) -> None:
    """The result of a ``--json`` command on stdout."""
    typer.echo(json.dumps(obj, indent=2, default=str))


def fail(message: str, code: int = 2) -> None:
    """``error: MESSAGE`` on stderr and exit ``code``."""
    # one line whatever a library put in the message, so scripts can grep it
    typer.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(code)
