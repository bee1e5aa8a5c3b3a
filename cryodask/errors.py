"""Errors that the command line prints as one line and exits 2 on.

Anything the user can fix (a bad file, a missing voxel size, an unwritable folder) is an
``InputError``; its message names the file and the problem, nothing else.
"""


class CryodaskError(Exception):
    """Base class: a problem the user can act on; printed without a traceback."""

    exit_code = 2


class InputError(CryodaskError):
    """An input file, option or output location that cannot be used as given."""


def where(path, problem: str) -> InputError:
    """``InputError("path: problem")`` — the one-line form every input error takes."""
    return InputError(f"{path}: {problem}")
