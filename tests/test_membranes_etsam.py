"""ETSAM through cryodask: the real SAM2 code with small random hiera-t models saved and loaded
as ETSAM checkpoints, compared with ETSAM's own frame-by-frame procedure."""

from __future__ import annotations

import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from conftest import write_raw_mrc  # noqa: E402
from cryodask.engine.blocks import DoneMarks  # noqa: E402
from cryodask.cli import main  # noqa: E402
from cryodask.errors import InputError  # noqa: E402
from cryodask.io.omezarr import open_image  # noqa: E402
from cryodask.membranes.etsam import EtsamParams, TiledLogits, tiles, two_stage_column  # noqa: E402
from cryodask.io.normalize import from_extremes  # noqa: E402
from cryodask.membranes.pipeline import MembraneParams, membrane_params, segment  # noqa: E402
from cryodask.models.sam2 import build_predictor  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from references import reference_two_stage  # noqa: E402  (ETSAM's own procedure, outside the package)

CONFIG, SIZE = "sam2.1_hiera_t", 128


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """ETSAM's two checkpoint files, made from seeded random hiera-t models ({"model": state_dict})."""
    folder = tmp_path_factory.mktemp("weights")
    for seed, name in ((11, "etsam_stage1_v1.pt"), (12, "etsam_stage2_v1.pt")):
        torch.manual_seed(seed)
        model = build_predictor(CONFIG, image_size=SIZE)
        torch.save({"model": model.state_dict(), "epoch": 3}, folder / name)
    return folder


@pytest.fixture(scope="module")
def models(weights):
    return tuple(build_predictor(CONFIG, weights / f"etsam_stage{i}_v1.pt", image_size=SIZE) for i in (1, 2))


@pytest.fixture(scope="module")
def tomogram():
    """Bright rings on noise: a non-square stack, positive and negative values."""
    z, y, x = np.mgrid[:7, :36, :44]
    ring = np.abs(np.hypot(y - 18, x - 22) - 10 - 0.5 * z) < 1.5
    rng = np.random.default_rng(3)
    return (ring * 2.0 + rng.normal(0, 0.7, ring.shape)).astype(np.float32)


def column(models_dir, tomogram, tmp_path, batch, **params):
    params = {"grid_interval": 10, **params}
    p = EtsamParams(CONFIG, str(models_dir / "etsam_stage1_v1.pt"), str(models_dir / "etsam_stage2_v1.pt"),
                    image_size=SIZE, **params)
    norm = from_extremes(p.normalize, float(tomogram.min()), float(tomogram.max()))
    marks = DoneMarks(tmp_path / f"marks{batch}", "etsam", "k")
    folder = tmp_path / f"logits{batch}"
    for ys, xs in tiles(*tomogram.shape[1:], p.tile, p.split):
        two_stage_column(lambda r: tomogram[r], norm, tomogram.shape[0], ys, xs, p, str(folder), marks, batch=batch)
    return (TiledLogits(str(folder), tomogram.shape, p.tile, p.split, stage=1)[:],
            TiledLogits(str(folder), tomogram.shape, p.tile, p.split)[:])


def test_checkpoints_load_in_etsam_format_and_give_the_saved_model(weights, models):
    torch.manual_seed(11)
    fresh = build_predictor(CONFIG, image_size=SIZE)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, models[0].state_dict()[name]), name
    assert not torch.equal(models[0].sam_mask_decoder.iou_token.weight, models[1].sam_mask_decoder.iou_token.weight)


def test_bad_checkpoints_are_one_line_errors(weights, tmp_path):
    with pytest.raises(InputError, match="not found"):
        build_predictor(CONFIG, tmp_path / "absent.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint"):
        build_predictor(CONFIG, tmp_path / "garbage.pt")
    raw = (weights / "etsam_stage1_v1.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint"):
        build_predictor(CONFIG, tmp_path / "truncated.pt")
    torch.save({"state": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"expected \{'model': state_dict\}"):
        build_predictor(CONFIG, tmp_path / "other.pt")
    with pytest.raises(InputError, match="does not match config sam2.1_hiera_s"):
        build_predictor("sam2.1_hiera_s", weights / "etsam_stage1_v1.pt", image_size=SIZE)
    state = torch.load(weights / "etsam_stage1_v1.pt", weights_only=True)["model"]
    state.pop("maskmem_tpos_enc")
    torch.save({"model": state}, tmp_path / "missing.pt")
    with pytest.raises(InputError, match="1 missing"):
        build_predictor(CONFIG, tmp_path / "missing.pt", image_size=SIZE)
    with pytest.raises(InputError, match="SAM2 config not found"):
        build_predictor("sam2.1_hiera_xl")
    with pytest.raises(InputError) as caught:
        build_predictor(CONFIG, tmp_path / "garbage.pt")
    assert "\n" not in str(caught.value) and "garbage.pt" in str(caught.value)


def test_streamed_batched_path_equals_etsams_frame_by_frame_loop(weights, models, tomogram, tmp_path):
    """Same weights, same input: batch 1 is bitwise ETSAM's; a batched encoder differs by rounding."""
    ref1, ref2 = reference_two_stage(*models, tomogram, grid_interval=10)
    one1, one2 = column(weights, tomogram, tmp_path, batch=1)
    np.testing.assert_array_equal(one1, ref1)
    np.testing.assert_array_equal(one2, ref2)
    many1, many2 = column(weights, tomogram, tmp_path, batch=4)
    np.testing.assert_allclose(many2, ref2, atol=1e-4)
    decided = np.abs(ref2 + 0.25) > 1e-3
    assert np.array_equal((many2 > -0.25)[decided], (ref2 > -0.25)[decided])
    assert ref2.std() > 0 and not np.array_equal(ref1, ref2)


@pytest.mark.parametrize("options", [
    {"normalize": "softplus_minmax", "stage1_prompt": "grid", "stage2_prompt": "etsam_stage1_partial",
     "grid_interval": 3},
    {"split": True, "stage2_prompt": "grid_zero", "grid_interval": 10},
])
def test_options_match_the_reference(weights, models, tomogram, tmp_path, options):
    """Other normalisation and prompts, and ETSAM's split processing (four quadrants), bitwise."""
    split = options.get("split", False)
    reference = {k: v for k, v in options.items() if k != "split"}
    _, ref = reference_two_stage(*models, tomogram, split_processing=split, **reference)
    ours = column(weights, tomogram, tmp_path, batch=1, **options)[1]
    assert len(tiles(*tomogram.shape[1:], None, split)) == (4 if split else 1)
    np.testing.assert_array_equal(ours, ref)


def test_collection_on_a_cluster_writes_etsams_files_and_labels(weights, models, tomogram, tmp_path, client):
    write_raw_mrc(tmp_path / "tomo_a.rec", tomogram, voxel_size=13.48)
    write_raw_mrc(tmp_path / "tomo_b.mrc", tomogram[:, ::-1].copy(), voxel_size=13.48)
    out = tmp_path / "out"
    etsam = EtsamParams(CONFIG, str(weights / "etsam_stage1_v1.pt"), str(weights / "etsam_stage2_v1.pt"),
                        image_size=SIZE, grid_interval=10, tile=(20, 44))
    params = MembraneParams(etsam, store_logits=True, post_process=True, min_slices=3)
    run = dict(batch=2, chunks=(4, 16, 16), client=client)
    report = segment([tmp_path / "tomo_a.rec", tmp_path / "tomo_b.mrc"], out, params, **run)
    assert [r.status for r in report.results] == ["done", "done"], report
    for stem in ("tomo_a", "tomo_b"):
        mask_file = out / f"{stem}_etsam_predicted_mask.mrc"
        logits_file = out / f"{stem}_etsam_predicted_logits.mrc"
        post_file = out / f"{stem}_etsam_predicted_post_processed_mask.mrc"
        with mrcfile.open(mask_file) as m, mrcfile.open(logits_file) as l, mrcfile.open(post_file) as p:
            assert m.header.mode == 0 and l.header.mode == 2 and p.header.mode == 0
            assert m.data.shape == l.data.shape == p.data.shape == tomogram.shape
            for f in (m, l, p):
                assert np.allclose([f.voxel_size.x, f.voxel_size.y, f.voxel_size.z], 13.48, atol=1e-3)
            assert np.array_equal(m.data, (l.data > -0.25).astype(np.int8))
            assert set(np.unique(p.data)) <= {0, 1} and (p.data <= m.data).all()
            mask = m.data.copy()
        _, arrays, vs, _ = open_image(out / f"{stem}.zarr" / "labels" / "etsam_predicted_mask")
        assert np.array_equal(arrays[0][...], mask) and np.allclose(vs, 13.48, atol=1e-3)
        assert (out / f"{stem}.zarr" / "labels" / "etsam_predicted_post_processed_mask").exists()
    # tile (20, 44) makes two columns, each ETSAM on its own part of the slices
    assert len(tiles(36, 44, (20, 44))) == 2
    again = segment([tmp_path / "tomo_a.rec"], out, params, **run)
    assert again.results[0].status == "skipped"


def test_zarr_input_gets_labels_in_place_and_bad_inputs_fail_alone(weights, tomogram, tmp_path, client):
    from cryodask.convert import ConvertParams, convert

    write_raw_mrc(tmp_path / "t.mrc", tomogram, voxel_size=10)
    store = convert([tmp_path / "t.mrc"], tmp_path / "zarr", ConvertParams(chunks=(4, 16, 16), levels=2),
                    client=client).results[0].store
    nan = tomogram.copy()
    nan[2, 3, 4] = np.nan
    write_raw_mrc(tmp_path / "bad.mrc", nan, voxel_size=10)
    params = membrane_params(method="auto", weights=weights, config=CONFIG, image_size=SIZE, grid_interval=10)
    report = segment([store, tmp_path / "bad.mrc"], tmp_path / "out", params, client=client)
    status = {r.source.split("/")[-1]: r for r in report.results}
    assert status["t.zarr"].status == "done"
    assert status["bad.mrc"].status == "failed" and "NaN" in status["bad.mrc"].message
    assert "\n" not in status["bad.mrc"].message
    _, arrays, _, _ = open_image(f"{store}/labels/etsam_predicted_mask")
    assert arrays[0].shape == tomogram.shape


def test_cli_loads_checkpoints_and_fails_in_one_line(weights, tomogram, tmp_path, capsys, client, monkeypatch):
    import cryodask.engine.cluster

    write_raw_mrc(tmp_path / "t.mrc", tomogram, voxel_size=10)
    base = ["membranes", str(tmp_path / "t.mrc"), "--out", str(tmp_path / "out"), "--model-config", CONFIG,
            "--image-size", str(SIZE), "--grid-interval", "10"]
    code = main(base + ["--weights", str(weights), "--cluster", client.scheduler.address, "--store-logits"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "t_etsam_predicted_mask.mrc" in out and (tmp_path / "out" / "t_etsam_predicted_logits.mrc").exists()

    monkeypatch.setattr(cryodask.engine.cluster, "make_cluster", lambda *a, **k: pytest.fail("a cluster was started"))
    monkeypatch.delenv("CRYODASK_WEIGHTS", raising=False)
    cases = [
        (["--method", "etsam", "--weights", str(tmp_path)], ["etsam_stage1_v1.pt", "17571925"]),
        (["--stage1-checkpoint", str(tmp_path / "nope.pt"), "--stage2-checkpoint", str(weights / "etsam_stage2_v1.pt")],
         ["nope.pt", "not found"]),
        (["--weights", str(weights), "--stage1-prompt", "dots"], ["--stage1-prompt"]),
        (["--weights", str(weights), "--model-config", "sam9"], ["SAM2 config not found"]),
        (["--weights", str(weights), "--tile", "8,x"], ["--tile"]),
        (["--weights", str(weights), "--device", "tpu"], ["--device"]),
    ]
    for extra, words in cases:
        code = main(base + extra)
        _, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (extra, err)
        assert all(w in lines[0] for w in words), (extra, lines[0])
