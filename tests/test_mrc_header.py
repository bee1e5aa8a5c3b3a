"""MRC header fidelity: origin and nstart through OME-Zarr and back onto every MRC output,
unsigned mode-0 bytes, and the stored header, checked with mrcfile and ome-zarr-models."""

from __future__ import annotations

import json
import warnings

import mrcfile
import numpy as np
import pytest
import zarr

from conftest import validate_ome_zarr
from cryodask.cli import main
from cryodask.convert import ConvertParams, convert, downsample_mean
from cryodask.export import export
from cryodask.io import mrc as mrcio
from cryodask.io.omezarr import open_image, write_labels
from cryodask.postprocess.pipeline import PostprocessParams, postprocess

ORIGIN = (1230.0, 4560.0, 7890.0)  # x, y, z Å
NSTART = (5, 6, 7)  # nxstart, nystart, nzstart


def placed_mrc(path, data, voxel_size=10.0, origin=ORIGIN, nstart=NSTART):
    """An MRC written by mrcfile with an origin and nstart, as IMOD's trimvol or a subvolume tool would."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data))
        m.voxel_size = voxel_size
        m.header.origin = origin
        m.header.nxstart, m.header.nystart, m.header.nzstart = nstart
    return path


def assert_placed(path, origin=ORIGIN, nstart=NSTART):
    """The MRC file (valid by mrcfile.validate) has exactly this origin and nstart."""
    assert mrcfile.validate(str(path)), path
    with mrcfile.open(path, header_only=True) as m:
        assert tuple(float(m.header.origin[a]) for a in "xyz") == origin, path
        assert (int(m.header.nxstart), int(m.header.nystart), int(m.header.nzstart)) == nstart, path


def transforms(group_path):
    attrs = zarr.open_group(str(group_path), mode="r").attrs.asdict()
    datasets = attrs.get("ome", attrs)["multiscales"][0]["datasets"]
    return [{t["type"]: t[t["type"]] for t in d["coordinateTransformations"]} for d in datasets]


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_origin_and_nstart_go_through_convert_and_export(tmp_path, client, ngff):
    data = np.random.default_rng(0).normal(size=(20, 24, 28)).astype(np.float32)
    placed_mrc(tmp_path / "tomo.mrc", data)
    report = convert([tmp_path / "tomo.mrc"], tmp_path / "zarr", ConvertParams(chunks=(8, 8, 8), levels=3, ngff=ngff),
                     client=client)
    assert report.results[0].status == "converted", report.results[0].message
    store = tmp_path / "zarr" / "tomo.zarr"
    levels = transforms(store)
    t0 = [ORIGIN[2], ORIGIN[1], ORIGIN[0]]  # z, y, x: the origin is non-zero, so it (not nstart) places voxel 0
    for level, t in enumerate(levels):
        assert list(t) == ["scale", "translation"]  # NGFF: the translation after the scale
        assert t["scale"] == [10.0 * 2**level] * 3
        # the centre of a level-l voxel (mean of 2**l voxels per axis) is (2**l - 1) / 2 voxels on
        assert t["translation"] == pytest.approx([v + 10.0 * (2**level - 1) / 2 for v in t0])
    source = zarr.open_group(str(store), mode="r").attrs["cryodask"]["source"]
    assert source["position"] == {"origin": list(ORIGIN), "nstart": list(NSTART)}
    assert source["header"]["origin"] == list(ORIGIN) and source["header"]["nzstart"] == 7

    labels = (data > 0.5).astype(np.uint8)
    write_labels(store, "membranes", labels)
    for t in transforms(store / "labels" / "membranes"):  # nearest levels: voxel 0 stays voxel 0
        assert t["translation"] == pytest.approx(t0)
    image = validate_ome_zarr(store)
    assert len(image.datasets[0]) == 3

    export(store, tmp_path / "image.mrc")
    export(store, tmp_path / "labels.mrc", labels="membranes")
    for name, expected in (("image.mrc", data), ("labels.mrc", labels)):
        assert_placed(tmp_path / name)
        with mrcfile.open(tmp_path / name) as m:
            np.testing.assert_array_equal(m.data, expected)
    export(store, tmp_path / "level1.mrc", level=1)  # nstart counts level-0 voxels: the origin says it all
    t1 = levels[1]["translation"]
    assert_placed(tmp_path / "level1.mrc", origin=(t1[2], t1[1], t1[0]), nstart=(0, 0, 0))


def test_nstart_alone_places_voxel_zero_real_map(tmp_path, client, data_dir):
    """EMD-3197 has origin 0 and nxstart -2: the position is nstart x voxel size (ChimeraX's rule)."""
    path = data_dir / "mrc" / "EMD-3197.map"
    with mrcfile.open(path, permissive=True) as m:
        vx = float(m.voxel_size.x)
        nstart = (int(m.header.nxstart), int(m.header.nystart), int(m.header.nzstart))
    assert nstart == (-2, 0, 0)
    convert([path], tmp_path, ConvertParams(chunks=(8, 8, 8), levels=2), client=client)
    t = transforms(tmp_path / "EMD-3197.zarr")[0]["translation"]
    assert t == pytest.approx([0.0, 0.0, -2 * round(vx, 4)])
    export(tmp_path / "EMD-3197.zarr", tmp_path / "back.mrc")
    assert_placed(tmp_path / "back.mrc", origin=(0.0, 0.0, 0.0), nstart=nstart)


def test_membrane_masks_logits_and_postprocess_outputs_carry_the_origin(tmp_path, client, monkeypatch):
    from cryodask.synth.tomogram import synth_tomogram

    monkeypatch.delenv("CRYODASK_WEIGHTS", raising=False)
    synth = synth_tomogram((32, 64, 64), voxel_size=10.0, seed=3, snr=0.1)
    placed_mrc(tmp_path / "tomo.mrc", synth.volume.astype(np.float32))
    out = tmp_path / "out"
    assert main(["membranes", str(tmp_path / "tomo.mrc"), "--out", str(out), "--post-process", "--store-logits",
                 "--cluster", client.scheduler.address]) == 0
    for name in ("mask", "logits", "post_processed_mask"):
        assert_placed(out / f"tomo_classical_predicted_{name}.mrc")
    t0 = [ORIGIN[2], ORIGIN[1], ORIGIN[0]]
    for name in ("classical_predicted_mask", "classical_predicted_post_processed_mask"):
        assert transforms(out / "tomo.zarr" / "labels" / name)[0]["translation"] == pytest.approx(t0)
    # postprocess on its own: from the exported MRC mask, and from the label image
    mask = out / "tomo_classical_predicted_mask.mrc"
    postprocess(mask, tmp_path / "from_mrc.mrc", PostprocessParams(min_slices=2, labels=True), client=client)
    assert_placed(tmp_path / "from_mrc.mrc")
    assert_placed(tmp_path / "from_mrc_labels.mrc")
    postprocess(out / "tomo.zarr" / "labels" / "classical_predicted_mask", tmp_path / "from_zarr.zarr", client=client)
    assert transforms(tmp_path / "from_zarr.zarr")[0]["translation"] == pytest.approx(t0)
    validate_ome_zarr(tmp_path / "from_zarr.zarr")
    export(tmp_path / "from_zarr.zarr", tmp_path / "from_zarr.mrc")
    assert_placed(tmp_path / "from_zarr.mrc")


# ------------------------------------------------------------------ unsigned mode 0

def byte_mrc(path, values: np.ndarray, *, dmin=None, dmax=None, imod_flags=None, old_style=False):
    """A mode-0 MRC holding the bytes of ``values`` (uint8), with its header set by hand."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(values.astype(np.uint8).view(np.int8))
        m.voxel_size = 5.0
        if dmin is not None:
            m.header.dmin, m.header.dmax = dmin, dmax
    raw = bytearray(path.read_bytes())
    if imod_flags is not None:
        raw[152:160] = np.array([mrcio.IMOD_STAMP, imod_flags], "<i4").tobytes()
    if old_style:
        raw[208:212] = b"\0\0\0\0"
    path.write_bytes(bytes(raw))
    return path


def test_unsigned_bytes_rules(tmp_path):
    values = np.arange(200, dtype=np.uint8).reshape(2, 10, 10)
    cases = {  # name: (header settings, unsigned?)
        "imod-unsigned": (dict(imod_flags=0, dmin=-1, dmax=-1), True),  # IMOD's flags win over the range
        "imod-signed": (dict(imod_flags=1, dmin=141, dmax=163), False),
        "range-unsigned": (dict(dmin=141, dmax=163), True),
        "range-signed": (dict(dmin=-115, dmax=-93), False),
        "range-says-nothing": (dict(dmin=0, dmax=100), False),
        "old-style-header": (dict(dmin=0, dmax=100, old_style=True), True),
    }
    for name, (settings, unsigned) in cases.items():
        path = byte_mrc(tmp_path / f"{name}.mrc", values, **settings)
        shape, dtype, _, meta = mrcio.describe(path)
        assert dtype == (np.uint8 if unsigned else np.int8), name
        assert ("unsigned_bytes" in meta) == unsigned, name
    path = byte_mrc(tmp_path / "u.mrc", values, dmin=0, dmax=199)
    np.testing.assert_array_equal(mrcio.read_region(path, np.s_[:, :, :]), values)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_serialem_crop_converts_to_its_unsigned_values(tmp_path, client, data_dir, dtype):
    path = data_dir / "mrc" / "serialem-int8-3d.mrc"
    with mrcfile.mmap(path, permissive=True) as m:
        assert m.header.mode == 0 and (m.header.dmin, m.header.dmax) == (141, 163)
        expected = np.array(m.data).view(np.uint8)  # mrcfile gives int8 -115..-93
    report = convert([path], tmp_path, ConvertParams(chunks=(16, 32, 32), levels=2, dtype=dtype), client=client)
    assert report.results[0].status == "converted", report.results[0].message
    _, arrays, _, _ = open_image(tmp_path / "serialem-int8-3d.zarr")
    level0 = arrays[0][:]
    assert level0.dtype == (np.float32 if dtype else np.uint8)
    assert (level0.min(), level0.max()) == (141, 163)
    np.testing.assert_array_equal(level0, expected.astype(level0.dtype))
    level1 = arrays[1][:]
    np.testing.assert_array_equal(level1, downsample_mean(expected, level1.shape, level0.dtype))
    assert 141 <= level1.min() and level1.max() <= 163
    if dtype is None:  # uint8 out again: values above 127 go out as mode 6, so mrcfile reads them unwrapped
        export(tmp_path / "serialem-int8-3d.zarr", tmp_path / "back.mrc")
        with mrcfile.open(tmp_path / "back.mrc") as m:
            assert m.header.mode == 6
            np.testing.assert_array_equal(m.data, expected)


def test_unsigned_gradient_pyramid_does_not_average_across_a_wrap(tmp_path, client):
    gradient = np.broadcast_to(np.arange(256, dtype=np.uint8), (4, 8, 256)).copy()
    byte_mrc(tmp_path / "gradient.mrc", gradient, dmin=0, dmax=255)
    convert([tmp_path / "gradient.mrc"], tmp_path / "zarr", ConvertParams(chunks=(4, 8, 64), levels=2), client=client)
    _, arrays, _, _ = open_image(tmp_path / "zarr" / "gradient.zarr")
    np.testing.assert_array_equal(arrays[0][:], gradient)
    row = arrays[1][0, 0].astype(int)
    # level 1 averages 2k and 2k + 1: a smooth ramp, where int8 bytes would drop from 126 to -128
    assert (np.diff(row) >= 0).all() and row[0] == 0 and row[-1] == 254
    assert row[63] == 126 and row[64] == 128


# ------------------------------------------------------------------ the stored header

def test_header_dict_is_json_and_matches_mrcfile(data_dir):
    for path in sorted((data_dir / "mrc").glob("*.m*")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as m:
                header = m.header.copy()
        stored = json.loads(json.dumps(mrcio.header_dict(header)))
        for name in ("cella", "cellb", "origin"):
            assert stored[name] == [float(header[name][a]) for a in header[name].dtype.names], (path.name, name)
            assert len(stored[name]) == 3
        for name in ("nx", "ny", "nz", "mode", "nxstart", "nystart", "nzstart", "mx", "my", "mz", "mapc", "mapr",
                     "maps", "ispg", "nsymbt", "nversion", "nlabl"):
            assert stored[name] == int(header[name]), (path.name, name)
        for name in ("dmin", "dmax", "dmean", "rms"):
            assert stored[name] == pytest.approx(float(header[name])), (path.name, name)
        assert stored["machst"] == [int(b) for b in header.machst]
        raw_map = header.tobytes()[208:212]
        assert stored["map"] == ("MAP " if raw_map == b"MAP " else {"hex": raw_map.hex()}), path.name
        assert stored["exttyp"] == header.tobytes()[104:108].rstrip(b"\0").decode("ascii")  # "FEI1" or ""
        assert bytes.fromhex(stored["extra2"]) == header.tobytes()[112:196]
        assert stored["label"] == [bytes(v).decode("ascii").strip() for v in header.label[: int(header.nlabl)]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(data_dir / "mrc" / "serialem-int8-3d.mrc", header_only=True, permissive=True) as m:
            serialem = mrcio.header_dict(m.header)
    assert serialem["cella"] == pytest.approx([742.3984, 1484.7969, 1809.6], abs=1e-3)
    assert serialem["map"] == {"hex": "00009145"}  # a pre-2000 header: no "MAP " there
