"""The ``flexpatch`` command: a thin typer layer over the library.

``app`` is built here from the command modules (``data``, ``train``, ``predict``, ``export``,
``demo``, ``analysis``), each of which lists its commands in ``COMMANDS``; they share ``common`` and
never import this module. Heavy modules (torch, MONAI) are imported inside the commands so that
``flexpatch --help`` is instant.

Every user error, whether the library's ``FlexPatchError`` or a value, option or argument the
command line parser refuses, is printed as one line on stderr with exit code 2, no traceback.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import typer

from flexpatch.cli import analysis, data, demo, export, predict, train
from flexpatch.cli.common import fail
from flexpatch.distributed import MainFailed, current, stop
from flexpatch.errors import FlexPatchError

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]

__all__ = ["app", "main"]

INTERRUPTED = 130  # the shell's code for Ctrl-C, which typer also returns for it
TERMINATED = 143  # the shell's code for SIGTERM (a scheduler's or a container's stop)


_signals: list[int] = []  # the signals received (typer turns any KeyboardInterrupt into code 130)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C, raised where the program stands: every cleanup of Ctrl-C (temporary files
    removed, a training's checkpoint kept) runs for it too."""
    _signals.append(signum)
    raise KeyboardInterrupt


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="flexpatch: medical image segmentation that stays accurate at any patch size.",
)
for _module in (data, train, predict, export, demo, analysis):
    for _command in _module.COMMANDS:
        app.command()(_command)


def _quiet() -> None:
    """No progress, messages or results from this process: the main one shows the run's."""
    import os

    from flexpatch.runtime import console

    console.quiet = True
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2; Ctrl-C exits 130, SIGTERM 143."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not current().main:  # under torchrun one process speaks for the run; errors still say where
        _quiet()
    try:
        code = _run()
    finally:
        # on every way out, an error's exit included: a torchrun process that exits still in its
        # group may abort in the group's threads ("terminate called without an active exception")
        if "torch.distributed" in sys.modules:
            stop()
    sys.exit(code)


def _run() -> int:
    """The command; its exit code (an error's: one line, SystemExit)."""
    try:
        code = app(standalone_mode=False)  # parser errors come back as exceptions, not usage boxes
    except MainFailed:  # under torchrun: the main process says it, once
        code = 2
    except UsageError as e:
        _usage_error(e)
    except ClickException as e:
        fail(e.format_message(), e.exit_code)
    except FlexPatchError as e:
        fail(str(e))
    except OSError as e:  # disk full, permission denied: the user's machine, not a bug
        fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
    except typer.Abort:  # end of input at a prompt
        typer.echo("aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        code = INTERRUPTED
    if code == INTERRUPTED and signal.SIGTERM in _signals:
        code = TERMINATED
    if code in (INTERRUPTED, TERMINATED):
        typer.echo("interrupted" if code == INTERRUPTED else "terminated", err=True)
    return code if isinstance(code, int) else 0


def _usage_error(e: Any) -> None:
    """``error: flexpatch predict: Invalid value for '--overlap': ... (see 'flexpatch predict --help')``."""
    if type(e).__name__ == "NoArgsIsHelpError":  # bare ``flexpatch``: the help was the answer
        if e.format_message().strip():
            typer.echo(e.format_message())
        sys.exit(e.exit_code)
    names, ctx = [], e.ctx
    while ctx is not None and ctx.parent is not None:  # the command path, whatever the program name
        names.append(ctx.info_name)
        ctx = ctx.parent
    where = " ".join(["flexpatch", *reversed(names)])
    message = " ".join(e.format_message().split()).rstrip(".")
    fail(f"{where}: {message} (see '{where} --help')", e.exit_code)
