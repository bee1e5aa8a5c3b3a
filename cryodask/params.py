"""Typed parameters of a step and their hash, the key of that step's done-marks.

A step's result depends only on its parameters (and its input), so the hash of the
parameters decides whether finished work can be reused: same hash, skip; new hash, redo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os


def params_hash(params) -> str:
    """A short, stable hash of a dataclass (or dict) of JSON-able parameters."""
    data = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_identity(path) -> list:
    """What says a file is the same file: its absolute path, size and modification time
    (a replaced input or model changes the hash of the work that used it)."""
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
