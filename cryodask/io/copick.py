"""copick picks files: ``ExperimentRuns/<run>/Picks/<tool>_<session>_<object>.json``.

copick (and the CryoET Data Portal tools built on it) keep particle locations in Å with one
identity transform per point; cryodask works in pixels, so the voxel size converts both ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import where

IDENTITY = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def copick_name(tool: str, session: str, object_name: str) -> str:
    """copick's file name; its parts may not contain underscores."""
    parts = [str(p).replace("_", "-") for p in (tool, session, object_name)]
    return "_".join(parts) + ".json"


def write_copick(path, coords_zyx, voxel_size: float, *, scores=None, object_name: str = "particle",
                 user_id: str = "cryodask", session_id: str = "0", run_name: str = "") -> Path:
    """Write (N, 3) z, y, x pixel coordinates as a copick picks JSON (locations in Å)."""
    coords = np.asarray(coords_zyx, dtype=np.float64).reshape(-1, 3)
    scores = np.ones(len(coords)) if scores is None else np.asarray(scores, dtype=np.float64)
    points = [{"location": {"x": float(x * voxel_size), "y": float(y * voxel_size), "z": float(z * voxel_size)},
               "transformation_": IDENTITY, "instance_id": 0, "score": float(score)}
              for (z, y, x), score in zip(coords, scores)]
    payload = {"pickable_object_name": object_name, "user_id": user_id, "session_id": str(session_id),
               "run_name": run_name, "voxel_spacing": float(voxel_size), "unit": "angstrom",
               "trust_orientation": False, "points": points}
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=1))
    partial.replace(path)
    return path


def read_copick(path, voxel_size: float | None = None):
    """A copick picks JSON as ``Picks`` in pixels (``voxel_size`` Å, else the file's ``voxel_spacing``)."""
    from .picks import Picks

    path = Path(path)
    try:
        payload = json.loads(path.read_text())
        points = payload["points"] or []
        coords = np.array([[p["location"]["z"], p["location"]["y"], p["location"]["x"]] for p in points],
                          dtype=np.float64).reshape(-1, 3)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise where(path, "not a readable JSON file") from None
    except (KeyError, TypeError, ValueError):
        raise where(path, "not a copick picks file (points[].location.x/y/z expected)") from None
    size = voxel_size or payload.get("voxel_spacing")
    if not size or not np.isfinite(size) or size <= 0:
        raise where(path, "copick locations are in Å: the voxel size is needed to convert them to pixels")
    if not np.isfinite(coords).all():
        raise where(path, "coordinates contain NaN or Inf")
    pixels = coords / float(size)
    table = pd.DataFrame({"z": pixels[:, 0], "y": pixels[:, 1], "x": pixels[:, 2],
                          "score": [p.get("score", np.nan) for p in points]})
    return Picks(pixels, table, float(size))
