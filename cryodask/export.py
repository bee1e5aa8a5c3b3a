"""OME-Zarr back to MRC, for the tools that read MRC only (IMOD, ChimeraX, RELION).

The array is streamed in z-slabs, so exporting needs a few slabs of memory; the MRC gets the
voxel size of the level (level ``n`` has ``2**n`` times the level-0 voxel size) and its place:
level 0 the source MRC's own origin and nstart, exactly; a lower level the physical origin of
its first voxel (its NGFF translation, x, y, z) with nstart 0, since nstart counts voxels of a
size the level no longer has. uint8 (unsigned mode-0 input) goes out as mode 0 when its values
fit a signed byte and as mode 6 (uint16) otherwise: mrcfile reads MRC2014 mode 0 as signed, so
only that way do mrcfile, IMOD and ChimeraX all read the same values back.
"""

from __future__ import annotations

from pathlib import Path

from .errors import where
from .io.folders import check_output_dir
from .io.mrc import write_mrc
from .io.omezarr import image_translation, open_image
from .io.volumes import source_position


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
    check_output_dir(out.parent)  # created as every command creates its output folder
    try:
        array = arrays[level]
        if level == 0:
            position = source_position(image)
        else:
            t = image_translation(image, level)
            position = {"origin": [t[2], t[1], t[0]], "nstart": [0, 0, 0]}
        return write_mrc(out, array, tuple(v * 2**level for v in voxel_size), slab=max(1, array.chunks[0]),
                         position=position)
    except OSError as exc:
        raise where(out, f"cannot write ({exc.strerror or exc})") from None
    except (ValueError, RuntimeError) as exc:  # e.g. chunks that do not decode to the array's shape and dtype
        raise where(image, f"cannot export level {level} ({str(exc).splitlines()[0]})") from None
