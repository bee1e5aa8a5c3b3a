"""One way to check a parameter: every params dataclass validates its fields with these.

Each check returns the value in its canonical type (``3`` → ``3.0`` for a number, a list → a
tuple for a shape), so equal parameters hash equal, and raises a :class:`FieldError` naming the
field in its Python form (``diameter must be > 0, got -3``). The library speaks Python; the
command line speaks flags: :func:`cli_message` turns the field into its ``--flag`` in one place.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError


class FieldError(InputError):
    """An ``InputError`` about one parameter; ``field`` is its Python name."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


#: Fields whose command-line flag is not ``--`` + the field with dashes.
FLAGS: dict[str, str] = {"config": "--model-config", "split": "--split-processing", "object_name": "--object",
                         "remove_thin_noise": "--postprocess-remove-thin-noise"}


def flag(field: str) -> str:
    """The command-line flag of a parameter field: ``min_slices`` → ``--min-slices``."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def cli_message(exc: Exception) -> str:
    """The message the command line prints: a ``FieldError`` names its flag, others as they are."""
    if isinstance(exc, FieldError):
        return f"{flag(exc.field)} {exc.problem}"
    return str(exc)


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def number(field: str, value, *, low: float = -math.inf, high: float = math.inf, strict_low: bool = False,
           strict_high: bool = False, none: bool = False, rule: str | None = None) -> float | None:
    """A finite number (not a bool) within ``low``/``high`` (strict or not) as a float; ``none`` allows None."""
    if value is None and none:
        return None
    try:
        x = math.nan if _is_bool(value) or isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        x = math.nan
    inside = (x > low if strict_low else x >= low) and (x < high if strict_high else x <= high)
    if not (math.isfinite(x) and inside):
        if rule is None:
            bounds = [f"> {low:g}" if strict_low else f">= {low:g}"] if low > -math.inf else []
            bounds += [f"< {high:g}" if strict_high else f"<= {high:g}"] if high < math.inf else []
            rule = "a number" + (" " + " and ".join(bounds) if bounds else "")
        raise FieldError(field, f"must be {rule}{' or None' if none else ''}, got {value!r}")
    return x


def positive(field: str, value, *, none: bool = False, unit: str = "") -> float | None:
    """A finite number > 0 (``unit``, e.g. "Å", is named in the message)."""
    return number(field, value, low=0, strict_low=True, none=none,
                  rule=f"a positive number{' of ' + unit if unit else ''}")


def count(field: str, value, minimum: int = 1, *, none: bool = False, odd: bool = False) -> int | None:
    """A whole number >= ``minimum`` (numpy integers too; bools and 2.0 are not), as an int."""
    if value is None and none:
        return None
    if _is_bool(value) or not isinstance(value, (int, np.integer)) or value < minimum or (odd and value % 2 == 0):
        rule = f"{'an odd' if odd else 'a'} whole number >= {minimum}"
        raise FieldError(field, f"must be {rule}{' or None' if none else ''}, got {value!r}")
    return int(value)


def choice(field: str, value, choices) -> object:
    """One of ``choices``."""
    if value not in tuple(choices):
        raise FieldError(field, f"must be one of {', '.join(str(c) for c in choices)}, got {value!r}")
    return value


def boolean(field: str, value) -> bool:
    """True or False (numpy's too), as a bool."""
    if not _is_bool(value):
        raise FieldError(field, f"must be true or false, got {value!r}")
    return bool(value)


def shape(field: str, value, n: int = 3, minimum: int = 1, *, none: bool = False) -> tuple[int, ...] | None:
    """``n`` whole numbers >= ``minimum`` (a sequence), as a tuple of ints."""
    if value is None and none:
        return None
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != n or any(_is_bool(v) or not isinstance(v, (int, np.integer)) or v < minimum for v in items):
        raise FieldError(field, f"must be {n} whole numbers >= {minimum}{' or None' if none else ''}, got {value!r}")
    return tuple(int(v) for v in items)


def point(field: str, value, n: int = 3) -> tuple[float, ...]:
    """``n`` finite numbers (a position), as a tuple of floats."""
    try:
        items = tuple(float(v) for v in value if not _is_bool(v))
        ok = len(items) == len(tuple(value)) == n and all(math.isfinite(v) for v in items)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise FieldError(field, f"must be {n} finite numbers, got {value!r}")
    return items


def voxel_size(value, field: str = "voxel_size") -> tuple[float, float, float] | None:
    """The one voxel-size rule: a number or a (z, y, x) triple of positive Å → three floats;
    None stays None (the file's header decides)."""
    if value is None:
        return None
    try:
        items = tuple(float(v) for v in np.broadcast_to(np.asarray(value, dtype=float), (3,)))
        ok = not _is_bool(value) and all(math.isfinite(v) and v > 0 for v in items)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise FieldError(field, f"must be a positive number of Å (or three, z,y,x), got {value!r}")
    return items
