"""``cryodask postprocess``: exact connected-component filtering (and bridge removal) of a mask."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app
from ..engine.collection import Outcome, find_items
from ..postprocess.params import PostprocessParams as P
from .collection import IN_FLIGHT, over_collection
from .options import (CHUNKS, CLUSTER, CLUSTER_CONFIG, MEMORY, REPORT, THREADS, WORKERS, check_device,
                      parse_triple)


@app.command()
def postprocess(
    inputs: list[str] = typer.Argument(..., help="Masks: MRC files, OME-Zarr images or x.zarr/labels/<name>, folders, "
                                                 "globs."),
    out: Path = typer.Option(..., "--out", help="Output .mrc or .zarr for one mask; for several, a folder of "
                                                "<name>_post_processed.mrc."),
    min_slices: int = typer.Option(P.min_slices, "--min-slices",
                                   help="Keep components whose z extent is at least N (ETSAM's 10; 0: off)."),
    min_voxels: int = typer.Option(P.min_voxels, "--min-voxels", help="Keep components of at least N voxels."),
    connectivity: int = typer.Option(P.connectivity, "--connectivity", help="6, 18 or 26."),
    remove_bridges: bool = typer.Option(P.remove_bridges, "--remove-bridges",
                                        help="ETSAM's per-slice removal of short bridges between parallel membranes."),
    max_bridge_len: int = typer.Option(P.max_bridge_len, "--max-bridge-len", help="Longest bridge removed, in pixels."),
    max_spur_len: int = typer.Option(P.max_spur_len, "--max-spur-len",
                                     help="With --remove-bridges: if > 0, also prune dead-end spurs up to this length "
                                          "(pixels)."),
    labels: bool = typer.Option(P.labels, "--labels", help="Also write the component labels."),
    chunks: str = CHUNKS,
    voxel_size: str = typer.Option(None, "--voxel-size", help="Voxel size in Å (default: the input's header)."),
    device: str = typer.Option("cpu", "--device",
                               help="cpu (cc3d) | cuda (CuPy on the workers) | auto (cuda where a worker has a GPU)."),
    layout: str = typer.Option(P.layout, "--layout", help="default, or portal for a .zarr output: the CryoET Data "
                                                           "Portal's (int8 mask, 3 levels, 256³ chunks, Blosc lz4; "
                                                           "--labels as its own <out>_components.zarr)."),
    copick: Path = typer.Option(None, "--copick", help="copick config JSON (created if missing): also write the mask "
                                                       "as a segmentation of user cryodask-postprocess."),
    copick_run: str = typer.Option(None, "--copick-run",
                                   help="Its copick run (default: the run the mask lies in, else the mask's name)."),
    copick_object: str = typer.Option("membrane", "--copick-object", help="Its pickable object (added to the config)."),
    cluster: str = CLUSTER, workers: int = WORKERS, threads_per_worker: int = THREADS,
    memory_limit: str = MEMORY, cluster_config: Path = CLUSTER_CONFIG, report_dir: Path = REPORT,
    in_flight: int = IN_FLIGHT,
):
    """Keep the connected components of a mask that pass the filters; identical to scipy on the whole array."""
    from ..engine.cluster import check_spec
    from ..errors import where
    from ..io.volumes import open_volume
    from ..postprocess.pipeline import postprocess as run

    check_spec(cluster)
    params = P(connectivity, min_slices, min_voxels, remove_bridges, max_bridge_len, max_spur_len, labels, layout)
    check_device(device)
    block = parse_triple(chunks, "--chunks")
    vs = parse_triple(voxel_size, "--voxel-size", float)
    items = find_items(inputs)
    one_file = len(items) == 1 and out.suffix.lower() in (".mrc", ".zarr")
    if len(items) == 1 and not one_file and out.suffix:
        raise where(out, "output must end in .mrc or .zarr (or be a folder)")
    if layout == "portal" and not (one_file and out.suffix.lower() == ".zarr"):
        raise where(out, "--layout portal writes an OME-Zarr: the output must end in .zarr")
    target = (lambda item: out) if one_file else (lambda item: out / f"{item.name}_post_processed.mrc")
    project = None
    if copick is not None:
        from ..io.copick import check_writable, copick_part, open_project

        project = check_writable(open_project(copick, create=True))
        copick_object = copick_part(copick_object)
    if not one_file:
        from ..io.folders import check_output_dir

        check_output_dir(out)

    def work(item, client):
        dest = target(item)
        result = run(item.path, dest, params, chunks=block, voxel_size=vs, client=client,
                     device=_device(device, client))
        if project is not None:
            from ..io.copick import mask_run, segmentation_from_file

            result.files.append(segmentation_from_file(project, copick_run or item.run or mask_run(item.path),
                                                       result.out, tool="postprocess", name=copick_object,
                                                       voxel_size=vs, chunks=block))
        if result.status == "skipped":
            return Outcome(item, "skipped", value=result, lines=[f"{dest}: already done with these parameters"])
        lines = [f"{item.path}: components: {result.n_components}, kept: {result.n_kept} ({result.voxels_kept} "
                 f"voxels); blocks written: {result.blocks_written}",
                 "  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()),
                 *(f"  wrote {path}" for path in result.files)]
        return Outcome(item, "done", value=result, lines=lines)

    over_collection("postprocess", inputs, work, check=lambda item: open_volume(item.path, vs, chunks=block),
                    cluster=cluster, workers=workers, threads_per_worker=threads_per_worker,
                    memory_limit=memory_limit, cluster_config=cluster_config, report_dir=report_dir,
                    lock_folder=out.parent if one_file else out, in_flight=in_flight, items=items)


def _device(device: str, client) -> str:
    """The component step's device: auto is cuda where a worker has a GPU, else cpu."""
    if device == "auto":
        workers = client.scheduler_info().get("workers", {}).values() if client is not None else ()
        return "cuda" if any("GPU" in w.get("resources", {}) for w in workers) else "cpu"
    return device
