"""Previews a person reads: membranes and pick orthoslices, micrograph overlays, report.png.

Each PNG is opened as a picture and checked for its overlay colours, not only for existing;
the tomogram previews are checked to read a coarse level (or three slices), never the volume.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from cryodask.viz import (Reader, densest, micrograph_preview, nice_length, orthoslices_figure, picks_preview,
                          preview_level, tomogram_preview)

SHAPE, VOXEL = (48, 160, 160), 10.0


def picture(path) -> np.ndarray:
    """The PNG as RGB, after PIL's own check that it is a whole, valid PNG."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def orange(rgb) -> np.ndarray:
    """Pixels of the mask colour (#ff8c00 at 45 % over grey): red well above blue."""
    return (rgb[..., 0] - rgb[..., 2] > 60) & (rgb[..., 1] - rgb[..., 2] > 10)


def cyan(rgb) -> np.ndarray:
    """Pixels of the pick circles (#00e5ff): green and blue well above red."""
    return (rgb[..., 1] - rgb[..., 0] > 100) & (rgb[..., 2] - rgb[..., 0] > 100)


@pytest.fixture(scope="module")
def tomogram(tmp_path_factory):
    from cryodask.synth import synth_tomogram, write_tomogram

    root = tmp_path_factory.mktemp("previews")
    return write_tomogram(root / "tomo.mrc", synth_tomogram(SHAPE, voxel_size=VOXEL, seed=3))


def test_membranes_writes_a_preview_with_the_mask_drawn(tomogram, tmp_path, client):
    from cryodask.membranes.classical import ClassicalParams
    from cryodask.membranes.pipeline import MembraneParams, segment

    report = segment([tomogram["tomogram"]], tmp_path, MembraneParams(ClassicalParams()), client=client)
    png = tmp_path / "tomo_classical_preview.png"
    assert [r.status for r in report.results] == ["done"] and png in report.results[0].files
    rgb = picture(png)
    assert min(rgb.shape[:2]) > 500  # readable: not a thumbnail
    fraction = report.results[0].mask_fraction
    assert 0.01 < fraction < 0.5
    # the mask is drawn: orange pixels cover a share of the picture of the order of the mask's
    assert 0.2 * fraction < orange(rgb).mean() < 3 * fraction, (orange(rgb).mean(), fraction)
    # and without the mask, the same slices have none (the tomogram itself is grey)
    store = Path(report.results[0].store)
    bare = tomogram_preview(store, tmp_path / "bare.png")
    assert orange(picture(bare)).mean() < 1e-3


def test_pick_writes_a_preview_with_the_picks_drawn(tomogram, tmp_path, client):
    from cryodask.picking.log import LogParams
    from cryodask.picking.pipeline import pick

    result = pick(tomogram["tomogram"], tmp_path, LogParams(250.0), client=client)
    png = tmp_path / "tomo_log_picks.png"
    assert png in result.files and len(result.picks) > 5
    rgb = picture(png)
    assert min(rgb.shape[:2]) > 500 and cyan(rgb).sum() > 200
    # the same slices without picks: no cyan at all
    bare = orthoslices_figure(np.zeros(SHAPE, np.float32))
    FigureCanvasAgg(bare).draw()
    assert not cyan(np.asarray(bare.canvas.buffer_rgba())[..., :3].astype(int)).any()


def test_picks_are_drawn_only_on_the_slices_they_are_near():
    points = np.array([[10, 50, 50], [12, 60, 70], [30, 20, 20], [40, 100, 100]], float)
    fig = orthoslices_figure(np.random.default_rng(0).random((48, 128, 128)), points=points, at=(11, 50, 20),
                             near=3)
    xy, xz, yz = fig.axes[:3]
    drawn = [sum(len(c.get_offsets()) for c in ax.collections) for ax in (xy, xz, yz)]
    assert drawn == [2, 1, 1]  # |z − 11| ≤ 3: two; |y − 50| ≤ 3: one; |x − 20| ≤ 3: one
    assert "2/4 within ±3 vox" in xy.get_title()
    # with no slice given, slices go through where the picks are densest
    assert densest(points[:2], (48, 128, 128), near=3) == (11, 50, 50)
    assert densest(np.empty((0, 3)), (48, 128, 128), near=3) == (24, 64, 64)


def test_scale_bar_and_legend_are_drawn():
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    assert [nice_length(v) for v in (7, 320, 1999, 0.3)] == [5, 200, 1000, 0.2]
    fig = orthoslices_figure(np.random.default_rng(0).random((300, 400)), voxel_size=1.77,
                             overlay=[(np.eye(300, 400, dtype=np.uint8), "mask: 300 px")],
                             points=[(np.array([[10.0, 10.0]]), "picks: 1")], title="mic")
    bars = [a for a in fig.axes[0].artists if isinstance(a, AnchoredSizeBar)]
    assert len(bars) == 1 and bars[0].txt_label.get_text() == "100 Å"  # a fifth of 400 px × 1.77 Å = 141 Å
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["mask: 300 px", "picks: 1"]
    unknown = orthoslices_figure(np.zeros((30, 40)))
    assert not unknown.axes[0].artists and not unknown.legends


def test_tomogram_preview_reads_a_coarse_level_only(tomogram, tmp_path):
    """Levels 0 and 1 are made unreadable: the preview still draws, from level 2."""
    import zarr

    from cryodask.convert import ConvertParams, convert

    report = convert([tomogram["tomogram"]], tmp_path, ConvertParams(chunks=(16, 64, 64), levels=3))
    store = Path(report.results[0].store)
    arrays = [zarr.open_array(str(store / str(level)), mode="r") for level in range(3)]
    assert preview_level(arrays, max_pixels=50) == 2 and preview_level(arrays) == 0
    reference = np.asarray(arrays[2][:])
    broken = 0
    for level in ("0", "1"):
        for chunk in (store / level).rglob("*"):
            if chunk.is_file() and not chunk.name.startswith(".") and chunk.name != "zarr.json":
                chunk.write_bytes(b"not a compressed chunk")
                broken += 1
    assert broken > 10
    with pytest.raises(Exception):
        np.asarray(zarr.open_array(str(store / "0"), mode="r")[0])
    points = np.array([[24.0, 80.0, 80.0]])
    png = tomogram_preview(store, tmp_path / "coarse.png", points=[(points, "one pick")], max_pixels=50,
                           radius=12)
    assert cyan(picture(png)).sum() > 20
    assert reference.shape == (12, 40, 40)


def test_pick_preview_of_an_mrc_reads_three_slices(tomogram, tmp_path):
    from cryodask.io.volumes import open_volume

    read = open_volume(tomogram["tomogram"])
    shape, vs = read.shape, read.voxel_size
    regions = []

    def recording(region):
        regions.append(region)
        return read(region)

    png = picks_preview(recording, shape, tmp_path / "p.png", [[20, 40, 60]], name="tomo", method="log",
                        voxel_size=vs[2], radius=12.5)
    assert len(regions) == 3 and all(sum(isinstance(i, int) for i in r) == 1 for r in regions)
    assert cyan(picture(png)).sum() > 20
    assert Reader(read, shape).shape == SHAPE


def test_real_micrograph_overlay_from_crisp(data_dir, tmp_path):
    """The CRISP overlay on EMPIAR-10017 (4096², binned 8): its mask in orange where the mask is,
    its picks as cyan circles; the mask files themselves are left as they are."""
    from cryodask.io.micrographs import bin_image, read_micrograph
    from cryodask.io.picks import read_picks
    from cryodask.micrographs.crisp.predict import overlay_png

    name = "Falcon_2012_06_12-14_33_35_0"
    image = read_micrograph(data_dir / "empiar10017" / "micrographs" / f"{name}.jpg").image
    mask = np.asarray(Image.open(data_dir / "empiar10017" / "masks" / f"{name}_mask.jpg").convert("L")) > 127
    coords = read_picks(data_dir / "empiar10017" / "cryoppp" / f"{name}.star").coords
    parts = {"image": bin_image(image, 8), "crf": bin_image(mask.astype(np.float32), 8) > 0.5}
    png = overlay_png(tmp_path / f"{name}_overlay.png", parts, "crf", coords, 8, 108.0, name=name, pixel_size=1.77,
                      truth=coords[:5])
    rgb = picture(png)
    assert min(rgb.shape[:2]) > 800
    assert orange(rgb).mean() > 0.5 * parts["crf"].mean() * 0.6  # the image takes ≈ 60 % of the picture
    assert cyan(rgb).sum() > 5000 and not list(tmp_path.glob("*.partial"))


def test_repick_overlay_has_both_kinds_and_counts(tmp_path):
    from cryodask.micrographs.autopick.repick import overlay_png

    rng = np.random.default_rng(1)
    png = overlay_png(rng.random((256, 256)).astype(np.float32), tmp_path / "m_picks.png",
                      rng.uniform(10, 240, (12, 2)), 8.0, rng.uniform(10, 240, (5, 2)), name="m", pixel_size=3.54)
    rgb = picture(png)
    green = (rgb[..., 1] - rgb[..., 0] > 100) & (rgb[..., 1] - rgb[..., 2] > 100)
    red = (rgb[..., 0] - rgb[..., 1] > 100) & (rgb[..., 0] - rgb[..., 2] > 100)
    assert green.sum() > 300 and red.sum() > 100


def test_micrograph_preview_fits_a_4k_image_into_a_readable_png(tmp_path):
    image = np.random.default_rng(2).random((4096, 4096), dtype=np.float32)
    png = micrograph_preview(image, tmp_path / "big.png", points=[(np.array([[2048.0, 2048.0]]), "one")],
                             pixel_size=1.0, radius=50)
    height, width = picture(png).shape[:2]
    assert 800 < width < 1200 and 800 < height < 1300


def test_report_png_stage_names_do_not_overlap(tmp_path):
    """Twenty stages with long names: every name readable (no two labels' boxes intersect),
    each stage in its own colour, the legend outside the timeline."""
    from cryodask.report.plots import report_figure, report_png

    steps = [f"classical-score-step-{i}" for i in range(5)]
    stages = ["read", "preprocess", "infer", "write"]
    rows = [{"step": s, "stage": t, "wall_s": 1.0 + i, "cpu_s": 0.5, "read_mb_per_s": 10.0, "write_mb_per_s": 5.0}
            for i, (s, t) in enumerate((s, t) for s in steps for t in stages)]
    records = [{"step": r["step"], "stage": r["stage"], "worker": f"tcp://w:{k % 3}", "start": float(i + k),
                "wall": 0.5} for i, r in enumerate(rows) for k in range(2)]
    summary = {"command": "membranes", "wall_s": 30.0, "stages": rows, "records": records,
               "worker_peak_rss_mb": {"tcp://w:0": 100.0, "tcp://w:1": 120.0}}
    fig = report_figure(summary)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    time_ax, _, _, line_ax = fig.axes
    labels = [t for t in time_ax.get_yticklabels() if t.get_text()]
    assert len(labels) == 20
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    colours = {tuple(p.get_facecolor()) for p in time_ax.containers[0].patches}
    assert len(colours) == 20
    legend = line_ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= line_ax.get_window_extent(renderer).x1  # beside the timeline, not over it
    png = report_png(summary, tmp_path / "report.png")
    assert picture(png).shape[1] >= 1200
    json.dumps(summary)  # the summary is the JSON one; nothing added to it
