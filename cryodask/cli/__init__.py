"""The ``cryodask`` command line: parses, validates and prints; the work is in the library.

Each command group lives in its own module and registers a ``typer.Typer`` here. Errors the
user can fix (``CryodaskError``, and click's usage errors: a wrong flag, a missing option) print
one line and exit 2, a usage error with what was probably meant; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import os
import sys

import typer

from ..errors import CryodaskError

try:  # typer >= 0.20 carries its own copy of click, whose exceptions it raises
    from typer._click import exceptions as _click
except ImportError:  # pragma: no cover  (older typer: click itself)
    from click import exceptions as _click

app = typer.Typer(help="Membrane segmentation and particle picking for cryo-ET collections on Dask.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryodask {version()}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
          _: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit.")):
    if debug:
        os.environ["CRYODASK_DEBUG"] = "1"


def version() -> str:
    """The installed distribution's version; the package's own in a source tree not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("cryodask")
    except PackageNotFoundError:
        import cryodask

        return getattr(cryodask, "__version__", "unknown")


def _register() -> None:
    # each adds its commands to ``app``
    from . import (autopick, bench, convert, crisp, demo, doctor, evaluate, jobscript, membranes,  # noqa: F401
                   picking, postprocess, run, synth)


def main(argv=None) -> int:
    """Entry point of the console script."""
    _register()
    command = typer.main.get_command(app)
    _plain_flags(command)
    try:
        code = command.main(args=argv, prog_name="cryodask", standalone_mode=False)  # returns typer.Exit's code
    except CryodaskError as exc:
        from ..validate import cli_message

        print(f"error: {cli_message(exc)}", file=sys.stderr)  # a parameter's field named as its flag
        return exc.exit_code
    except (typer.Exit, SystemExit) as exc:
        return getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except _click.NoArgsIsHelpError:  # the command alone: its help is printed, nothing went wrong
        return 0
    except _click.ClickException as exc:  # a wrong flag, a missing option: one line and exit 2
        print(f"error: {usage_line(exc, sys.argv[1:] if argv is None else argv, command)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001  (a bug: one line unless --debug)
        if os.environ.get("CRYODASK_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


def usage_line(exc, argv=(), root=None) -> str:
    """One line for click's usage error ``exc``, naming the command and what was probably meant
    (difflib over the command's options or subcommands), instead of click's usage box."""
    import difflib

    ctx = getattr(exc, "ctx", None)
    where_ = ctx.command_path if ctx is not None else _command_path(root, argv)
    see = f"see {where_} --help"
    if isinstance(exc, _click.NoSuchOption):
        # click reports "-out" as its first letter "-o": suggest from what was typed
        typed = next((a.split("=", 1)[0] for a in argv if a.startswith(exc.option_name) and a.startswith("-")),
                     exc.option_name)
        names = [o for p in (ctx.command.get_params(ctx) if ctx is not None else ()) if not getattr(p, "hidden", False)
                 for o in (*p.opts, *getattr(p, "secondary_opts", ())) if o.startswith("-")]
        close = difflib.get_close_matches(typed, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else see
        return f"{where_}: no such option {typed}; {hint}"
    if isinstance(exc, _click.MissingParameter) and exc.param is not None:
        param = exc.param
        if param.param_type_name == "option":
            name = next((o for o in param.opts if o.startswith("--")), param.opts[0])  # the first: aliases follow
            return (f"{where_}: missing option {name}" + (f" ({_first_line(param.help)})" if param.help else "")
                    + f"; {see}")
        return f"{where_}: missing argument {(param.name or '').upper()}" + \
            (f" ({_first_line(param.help)})" if getattr(param, "help", None) else "") + f"; {see}"
    message = " ".join(exc.format_message().split())
    if ctx is not None and "No such command" in message and "Did you mean" not in message:
        message += f" ({see})"
    return f"{where_}: {message}"


def _command_path(root, argv) -> str:
    """``cryodask crisp train`` from the words of ``argv`` that name (sub)commands."""
    words = ["cryodask"]
    for word in argv:
        commands = getattr(root, "commands", None)
        if not commands or word not in commands:
            break
        words.append(word)
        root = commands[word]
    return " ".join(words)


def _first_line(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


def _plain_flags(command) -> None:
    """A flag takes no value, so ``--help`` shows none (typer prints ``<bool>`` after each)."""
    params = list(command.params)
    help_option = command.get_help_option(command.context_class(command))
    for param in params + ([help_option] if help_option is not None else []):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _plain_flags(sub)
