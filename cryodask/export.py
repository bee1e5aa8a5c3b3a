"""OME-Zarr back to MRC, for the tools that read MRC only (IMOD, ChimeraX, RELION).

The array is streamed in z-slabs, so exporting needs a few slabs of memory; the MRC gets the
voxel size of the level (level ``n`` has ``2**n`` times the level-0 voxel size).
"""

from __future__ import annotations

from pathlib import Path

from .errors import where
from .io.mrc import write_mrc
from .io.omezarr import open_image


def export(store, out, *, level: int = 0, labels: str | None = None) -> Path:
    """Write one level of an OME-Zarr image, or of its label image ``labels``, to ``out`` (MRC).

    >>> export("tomo.zarr", "tomo_membranes.mrc", labels="membranes")  # doctest: +SKIP
    """
    image = f"{store}/labels/{labels}" if labels else store
    if labels and not Path(image).exists():
        raise where(store, f"has no label image {labels!r}")
    _, arrays, voxel_size, _ = open_image(image)
    if not 0 <= level < len(arrays):
        raise where(store, f"has levels 0..{len(arrays) - 1}, not {level}")
    out = Path(out)
    if not out.parent.exists():
        raise where(out.parent, "output folder does not exist")
    try:
        array = arrays[level]
        return write_mrc(out, array, tuple(v * 2**level for v in voxel_size), slab=max(1, array.chunks[0]))
    except OSError as exc:
        raise where(out, f"cannot write ({exc.strerror or exc})") from None
    except (ValueError, RuntimeError) as exc:  # e.g. chunks that do not decode to the array's shape and dtype
        raise where(image, f"cannot export level {level} ({str(exc).splitlines()[0]})") from None
