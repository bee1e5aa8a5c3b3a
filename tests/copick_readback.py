"""Open a copick project written by cryodask with copick's own API and report what copick sees.

Runs in the separate environment that ``tests/test_copick.py`` makes (``.venv-copick``:
copick 1.31, which pins zarr < 3, where cryodask needs zarr 3), so it imports nothing of
cryodask. Usage: ``python copick_readback.py CONFIG DUMP_FOLDER``; prints one JSON report and
saves every segmentation and tomogram copick reads as ``DUMP_FOLDER/<run>-<kind>-<...>.npy``,
for the test to compare with what cryodask wrote.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

import copick


def read_back(config: str, dump: Path) -> dict:
    dump.mkdir(parents=True, exist_ok=True)
    root = copick.from_file(config)
    report = {"copick": copick.__version__, "objects": {o.name: {"is_particle": o.is_particle, "label": o.label}
                                                        for o in root.pickable_objects}, "runs": {}}
    users = set()
    for run in root.runs:
        seen = {"picks": [], "segmentations": [], "tomograms": []}
        for picks in run.get_picks():
            folder = Path(picks.path).parent
            before = sorted(os.listdir(folder))
            points, _ = picks.numpy()  # x, y, z in Å
            picks.store()  # what a copick tool does after loading: must rewrite the same file
            seen["picks"].append({
                "user": picks.user_id, "session": picks.session_id, "object": picks.pickable_object_name,
                "file": Path(picks.path).name, "points_xyz": points.tolist(), "scores": picks.scores().tolist(),
                "found_by_user": len(run.get_picks(object_name=picks.pickable_object_name, user_id=picks.user_id,
                                                   session_id=picks.session_id)),
                "files_before_store": before, "files_after_store": sorted(os.listdir(folder))})
            users.add(picks.user_id)
        for seg in run.get_segmentations():
            data = seg.numpy()
            name = f"{run.name}-segmentation-{seg.user_id}-{seg.name}.npy"
            np.save(dump / name, data)
            seen["segmentations"].append({"user": seg.user_id, "session": seg.session_id, "name": seg.name,
                                          "voxel_size": seg.voxel_size, "multilabel": seg.is_multilabel,
                                          "file": Path(seg.path).name, "npy": name})
            users.add(seg.user_id)
        for vs in run.voxel_spacings:
            for tomo in vs.tomograms:
                data = tomo.numpy()
                name = f"{run.name}-tomogram-{vs.voxel_size:.3f}-{tomo.tomo_type}.npy"
                np.save(dump / name, data)
                seen["tomograms"].append({"voxel_size": vs.voxel_size, "type": tomo.tomo_type, "npy": name,
                                          "shape": list(data.shape)})
        report["runs"][run.name] = seen
    report["users"] = sorted(users)
    return report


if __name__ == "__main__":
    print(json.dumps(read_back(sys.argv[1], Path(sys.argv[2]))))
