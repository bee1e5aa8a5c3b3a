"""Typed parameters of a step and their hash, the key of that step's done-marks.

A step's result depends only on its parameters (and its input), so the hash of the
parameters decides whether finished work can be reused: same hash, skip; new hash, redo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json


def params_hash(params) -> str:
    """A short, stable hash of a dataclass (or dict) of JSON-able parameters."""
    data = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
