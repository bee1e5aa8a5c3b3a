"""LoG picker F1 with its defaults on three generators that share no code (issue 14).

(a) ``tests/log_generator.py``: soft spheres, a Fourier missing wedge, white noise, planes and
vesicles as distractors; (b) ``synth_projection_tomogram`` (WBP of a CTF tilt series, EMD-3197
as the large kind); (c) ``synth_tomogram``. Beside it, the issue's ten lines of scipy
(``log_generator.scipy_baseline``). F1 by Hungarian matching within the particle radius.

    python benchmarks/log_picker.py            # every case, one line each
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from log_generator import scipy_baseline, soft_spheres

from cryodask.metrics import picking_scores
from cryodask.picking.log import LogParams, describe, log_pick
from cryodask.synth.projection import synth_projection_tomogram
from cryodask.synth.tomogram import synth_tomogram


def cases():
    """(name, volume, voxel size Å, diameter Å, true centres)."""
    for seed in range(5):  # the volumes: 22 nm at 10 Å, ±60°, SNR 0.1, 25 particles
        v, c, _ = soft_spheres(seed=seed, snr=0.1)
        yield f"(a) 10 Å SNR 0.1 seed {seed}", v, 10.0, 220.0, c
    for seed in range(2):
        v, c, _ = soft_spheres(seed=seed, snr=0.1, planes=2, vesicles=2)
        yield f"(a) + 2 planes, 2 vesicles seed {seed}", v, 10.0, 220.0, c
    v, c, _ = soft_spheres(seed=7, snr=0.05, planes=2, vesicles=2)
    yield "(a) + membranes SNR 0.05", v, 10.0, 220.0, c
    v, c, _ = soft_spheres(seed=8, snr=0.1, planes=2, vesicles=2, wedge=45)
    yield "(a) + membranes ±45° tilts", v, 10.0, 220.0, c
    v, c, _ = soft_spheres((64, 224, 224), voxel_size=7.0, seed=5, snr=0.1, planes=2, vesicles=1)
    yield "(a) + membranes 7 Å", v, 7.0, 220.0, c
    v, c, _ = soft_spheres((40, 96, 96), voxel_size=20.0, seed=6, snr=0.05, planes=2, vesicles=1)
    yield "(a) + membranes 20 Å SNR 0.05", v, 20.0, 220.0, c
    v, c, _ = soft_spheres((24, 64, 64), voxel_size=40.0, diameter=300, n=20, seed=8, snr=0.1, planes=1)
    yield "(a) + plane 40 Å, 300 Å particles", v, 40.0, 300.0, c
    for make, label in ((synth_projection_tomogram, "(b) projection"), (synth_tomogram, "(c) synth")):
        for seed, vs, shape, snr in ((0, 10.0, (64, 160, 160), 0.1), (1, 10.0, (64, 160, 160), 0.1),
                                     (2, 20.0, (40, 96, 96), 0.3)):
            t = make(shape, voxel_size=vs, seed=seed, snr=snr)
            for kind in (1, 2):
                d = t.diameters_A[kind]
                if d >= 4 * vs:
                    yield (f"{label} {vs:g} Å SNR {snr} seed {seed} kind {kind} ({d:.0f} Å)", t.volume, vs, d,
                           t.particles[t.kinds == kind])


def main():
    print(f"{'case':52s} {'n':>3s} {'scipy':>6s} {'LoG':>6s}  P     R     time")
    for name, volume, vs, diameter, truth in cases():
        radius = diameter / 2 / vs
        baseline = picking_scores(scipy_baseline(volume, vs, diameter), truth, radius)["f1"]
        clock = time.perf_counter()
        params = LogParams(diameter=diameter)
        picks = log_pick(volume, volume.shape, vs, params, chunks=(64, 128, 128))
        s = picking_scores(picks[["z", "y", "x"]].to_numpy(), truth, radius)
        print(f"{name:52s} {len(truth):3d} {baseline:6.2f} {s['f1']:6.2f}  {s['precision']:.2f}  {s['recall']:.2f}  "
              f"{time.perf_counter() - clock:.1f} s", flush=True)
        if "-v" in sys.argv:
            print("   ", describe(picks, params))


if __name__ == "__main__":
    main()
