"""``--compile``: the compiled SAM2 image encoder and DINOv2 (``models/compiled.py``) give eager's
outputs on the CPU, within float rounding: 1e-4 absolute on DINOv2's patch tokens and on SAM2's
backbone features (unit-scale values from random weights; fused kernels reorder float32 sums).
Also: the flag reaches the cached models, and ``cryodask features --compile`` writes the
same store as eager."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import write_raw_mrc

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="torch.compile on the CPU needs a C compiler")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    folder = tmp_path_factory.mktemp("dinov2") / "tiny"
    torch.manual_seed(0)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
        image_size=56, num_register_tokens=4)).save_pretrained(folder)
    return folder


def test_compiled_dinov2_equals_eager(dinov2):
    from cryodask.models.dinov2 import load_dinov2, patch_maps

    eager, fast = load_dinov2(dinov2, "cpu"), load_dinov2(dinov2, "cpu", compile=True)
    assert fast is not eager and load_dinov2(dinov2, "cpu", compile=True) is fast  # cached per flag
    assert type(fast).__name__ == "OptimizedModule" and fast.config.patch_size == 14  # attributes reach through
    slices = np.random.default_rng(0).normal(size=(3, 40, 36)).astype(np.float32)
    a, b = patch_maps(eager, slices, image_size=56).numpy(), patch_maps(fast, slices, image_size=56).numpy()
    assert a.shape == b.shape == (3, 32, 4, 4)
    np.testing.assert_allclose(b, a, atol=TOLERANCE, rtol=0)


def test_compiled_sam2_image_encoder_equals_eager():
    import torch

    from cryodask.models.sam2 import cached_predictor

    eager = cached_predictor("sam2.1_hiera_t", None, device="cpu", image_size=128, seed=3)
    fast = cached_predictor("sam2.1_hiera_t", None, device="cpu", image_size=128, seed=3, compile=True)
    assert fast is not eager and type(fast.image_encoder).__name__ == "OptimizedModule"
    images = torch.as_tensor(np.random.default_rng(1).normal(size=(2, 3, 128, 128)).astype(np.float32))
    with torch.inference_mode():
        a, b = eager.forward_image(images), fast.forward_image(images)
    for x, y in zip(a["backbone_fpn"], b["backbone_fpn"]):
        np.testing.assert_allclose(y.numpy(), x.numpy(), atol=TOLERANCE, rtol=0)


def test_features_compile_flag_writes_eagers_store(dinov2, tmp_path, capsys):
    from cryodask.cli import main
    from cryodask.prompting.features import open_features

    volume = np.random.default_rng(2).normal(size=(12, 28, 28)).astype(np.float32)
    write_raw_mrc(tmp_path / "t.mrc", volume, voxel_size=10.0)
    stores = []
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        code = main(["features", str(tmp_path / "t.mrc"), "--out", str(tmp_path / name), "--checkpoint", str(dinov2),
                     "--image-size", "56", "--device", "cpu", "--workers", "1", *flags])
        assert code == 0, capsys.readouterr().err
        stores.append(open_features(tmp_path / name / "t_features.zarr")[4][:])
    np.testing.assert_allclose(stores[1], stores[0], atol=2e-3)  # float16 storage of values within 1e-4
