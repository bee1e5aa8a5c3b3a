"""Where model weights come from: a path the user gives, or a weights folder, never the network.

Resolution order for a named weight file: the explicit path, then ``--weights DIR``, then the
``CRYODASK_WEIGHTS`` environment variable, then ``weights:`` in the cryodask config file
(``~/.config/cryodask/config.yaml``). A missing file is a one-line error that names the file
and where it is published, so a user on an offline cluster knows what to copy where.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError, where

CONFIG = Path("~/.config/cryodask/config.yaml")

# file name -> where it is published (shown when it is missing)
PUBLISHED = {
    "etsam_stage1_v1.pt": "ETSAM stage 1, Zenodo record 17571925 (https://zenodo.org/records/17571925)",
    "etsam_stage2_v1.pt": "ETSAM stage 2, Zenodo record 17571925 (https://zenodo.org/records/17571925)",
    "sam2.1_hiera_tiny.pt": "SAM 2.1, https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_small.pt": "SAM 2.1, https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt",
    "sam2.1_hiera_base_plus.pt": "SAM 2.1, https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_large.pt": "SAM 2.1, https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt",
    "dinov2-large": "DINOv2 ViT-L/14, https://huggingface.co/facebook/dinov2-large (save_pretrained folder)",
    "dinov2-with-registers-large": "DINOv2 ViT-L/14 with registers, https://huggingface.co/facebook/dinov2-with-registers-large",
}


def weights_folder(folder=None) -> Path | None:
    """The weights folder from the argument, ``CRYODASK_WEIGHTS`` or the config file."""
    if folder:
        return Path(folder).expanduser()
    if os.environ.get("CRYODASK_WEIGHTS"):
        return Path(os.environ["CRYODASK_WEIGHTS"]).expanduser()
    config = CONFIG.expanduser()
    if config.exists():
        import yaml

        try:
            value = (yaml.safe_load(config.read_text()) or {}).get("weights")
        except yaml.YAMLError as exc:
            raise where(config, f"not valid YAML ({exc.__class__.__name__})") from None
        if value:
            return Path(value).expanduser()
    return None


def published(name: str) -> str:
    return PUBLISHED.get(Path(name).name, "")


def resolve(path=None, *, default_name: str, folder=None, option: str) -> Path:
    """The local file (or folder) for a weight: ``path`` if given, else ``default_name`` inside
    the weights folder. Raises a one-line ``InputError`` when it does not exist."""
    if path:
        path = Path(path).expanduser()
        if not path.exists():
            hint = published(path.name)
            raise where(path, "checkpoint not found" + (f"; {hint}" if hint else ""))
        return path
    base = weights_folder(folder)
    hint = published(default_name)
    if base is None:
        raise InputError(f"{option} not given and no weights folder set (--weights, CRYODASK_WEIGHTS or "
                         f"'weights:' in {CONFIG}); needs {default_name}" + (f" ({hint})" if hint else ""))
    candidate = base / default_name
    if not candidate.exists():
        raise where(candidate, "checkpoint not found" + (f"; {hint}" if hint else ""))
    return candidate
