"""The ``cryodask`` command line: parses, validates and prints; the work is in the library.

Each command group lives in its own module and registers a ``typer.Typer`` here. Errors the
user can fix (``CryodaskError``) print one line and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import os
import sys

import typer

from ..errors import CryodaskError

app = typer.Typer(help="Membrane segmentation and particle picking for cryo-ET collections on Dask.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")):
    if debug:
        os.environ["CRYODASK_DEBUG"] = "1"


def _register() -> None:
    from . import autopick, bench, convert, crisp, demo, doctor, evaluate, jobscript, membranes, picking, postprocess, synth  # noqa: F401  (each adds its commands to ``app``)


def main(argv=None) -> int:
    """Entry point of the console script."""
    _register()
    try:
        code = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code here
    except CryodaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (typer.Exit, SystemExit) as exc:
        return getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (a bug: one line unless --debug)
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return 2
        if os.environ.get("CRYODASK_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0
