"""The parameter classes of the steps (``*/params.py``): one default per field, the method as the
parameters' type, and the builders the command line and ``cryodask run`` share."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask.errors import InputError
from cryodask.membranes.params import ClassicalParams, EtsamParams, MembraneParams, membrane_params
from cryodask.picking.params import CryosamParams, LogParams, pick_params
from cryodask.prompting.params import FeatureParams, MatchParams, SelfPromptParams
from cryodask.validate import FieldError, cli_message


def test_membrane_params_choose_the_method_by_its_options(tmp_path, monkeypatch):
    monkeypatch.delenv("CRYODASK_WEIGHTS", raising=False)
    params = membrane_params("auto", thickness=40, post_process=True)
    assert isinstance(params.method, ClassicalParams) and params.method.thickness == 40.0
    assert params.method_name == "classical" and params.post_process and params.min_slices == MembraneParams.min_slices

    for name in ("etsam_stage1_v1.pt", "etsam_stage2_v1.pt"):  # found in the weights folder: auto is ETSAM
        (tmp_path / name).write_bytes(b"weights")
    etsam = membrane_params("auto", tmp_path, grid_interval=10)
    assert isinstance(etsam.method, EtsamParams) and etsam.method.grid_interval == 10
    assert etsam.method.stage1_checkpoint == str(tmp_path / "etsam_stage1_v1.pt")
    assert etsam.method.weights_id[0].startswith("etsam_stage1_v1.pt:7:")  # name, size, mtime: not the path
    moved = membrane_params("etsam", stage1_checkpoint=str(tmp_path / "etsam_stage1_v1.pt"),
                            stage2_checkpoint=str(tmp_path / "etsam_stage2_v1.pt"), grid_interval=10)
    assert moved.key() == etsam.key()


def test_membrane_params_refuse_what_the_method_does_not_take():
    with pytest.raises(FieldError) as info:
        membrane_params("classical", grid_interval=10)
    assert cli_message(info.value) == "--grid-interval is an option of the etsam method, not of classical"
    with pytest.raises(InputError, match="unknown option 'thicknes' \\(did you mean thickness\\?\\)"):
        membrane_params("classical", thicknes=40)
    with pytest.raises(FieldError, match="stage1_checkpoint must be given"):
        EtsamParams()  # no weights and not asked for random ones: never a silent untrained model
    assert EtsamParams(random_weights=True).weights_id == ("random", "random")
    with pytest.raises(FieldError, match="method must be ClassicalParams or EtsamParams"):
        MembraneParams("classical")


def test_post_processing_steps_follow_etsams_flags():
    assert MembraneParams().post_steps() == (False, False)
    assert MembraneParams(post_process=True).post_steps() == (True, True)  # ETSAM's --post-process: both
    assert MembraneParams(remove_bridges=True).post_steps() == (False, True)  # a step named: that one alone
    assert MembraneParams(post_process=True, remove_thin_noise=True).post_steps() == (True, False)


def test_pick_params_are_the_method():
    log = pick_params("log", diameter=250, threshold=5)
    assert isinstance(log, LogParams) and (log.diameter, log.threshold) == (250.0, 5.0)
    with pytest.raises(FieldError) as info:
        pick_params("log", diameter=250, top_k=10)
    assert cli_message(info.value) == "--top-k is an option of --method cryosam, not of log"
    with pytest.raises(FieldError) as info:
        pick_params("log")
    assert cli_message(info.value) == "--diameter is needed by --method log (Å)"
    with pytest.raises(FieldError, match="method must be one of log, cryosam"):
        pick_params("blob", diameter=250)


def test_cryosam_defaults_are_its_parts_defaults():
    """CryoSAM's options are the defaults of the parts they configure, not copies of them."""
    assert CryosamParams.feature_image_size == FeatureParams.image_size
    assert CryosamParams.iou_threshold == SelfPromptParams.iou_threshold
    assert (CryosamParams.sim_threshold, CryosamParams.top_k, CryosamParams.matching) == \
        (MatchParams.sim_threshold, MatchParams.top_k, MatchParams.matching)
    with pytest.raises(FieldError, match="sim_threshold must be a number >= -1 and <= 1"):
        CryosamParams(sim_threshold=2)


def test_preset_cryosam_is_cryosams_published_settings():
    """--preset cryosam: z only, the binarised mask prompt, IoU > 0.5 strictly, CryoSAM's area
    prior whatever the diameter, the query at the mask centroids; the default keeps cryodask's."""
    import doctest

    from cryodask.picking import params as module

    assert doctest.testmod(module).failed == 0
    published = CryosamParams(diameter=250, preset="cryosam").self_prompt(voxel_size=10.0)
    assert published.views == ("z",) and published.mask_prompt == "binary"
    assert published.iou_threshold > 0.5 and np.nextafter(published.iou_threshold, 0) == 0.5  # > 0.5, strictly
    assert published.diameter_voxels is None and published.area_limit(928, 928) == 928 * 928 // 64
    improved = CryosamParams(diameter=250).self_prompt(voxel_size=10.0)
    assert improved.views == ("z", "y", "x") and improved.mask_prompt == "logits" and improved.iou_threshold == 0.5
    assert improved.diameter_voxels == 25.0
    assert CryosamParams(preset="cryosam").match() == CryosamParams().match() == MatchParams()
    with pytest.raises(FieldError) as info:
        CryosamParams(preset="relion")
    assert cli_message(info.value) == "--preset must be one of cryodask, cryosam, got 'relion'"


def test_an_open_volume_passes_through_open_volume(tmp_path):
    import numpy as np

    from conftest import write_raw_mrc
    from cryodask.io.volumes import open_volume

    write_raw_mrc(tmp_path / "t.mrc", np.zeros((4, 8, 8), np.float32), voxel_size=7.0)
    volume = open_volume(tmp_path / "t.mrc", 10.0, chunks=(2, 8, 8))
    assert open_volume(volume) is volume
    again = open_volume(volume, dtype="float64")
    assert (again.voxel_size, again.chunks, again.dtype) == ((10.0, 10.0, 10.0), (2, 8, 8), "<f8")


def test_without_a_diameter_self_prompting_keeps_cryosams_size_prior():
    """CryoSAM accepts a mask under 1024 px of SAM's 256x256 low-res mask of the slice: 1/64 of it."""
    assert SelfPromptParams().area_limit(1024, 1024) == 1024 ** 2 // 64
    assert SelfPromptParams().area_limit(256, 256) == 1024  # CryoSAM's own number at its scale
    assert SelfPromptParams(diameter_voxels=27).area_limit(928, 928) == 1050  # a diameter sizes it instead
    assert SelfPromptParams(max_area=50).area_limit(928, 928) == 50
