"""Slices per encoder call (``models/batching.py``): the user's batch as given; on the CPU the
caller's default without measuring anything; the steps' defaults leave the choice to it."""

from __future__ import annotations

import pytest

from cryodask.models.batching import batch_for


def test_a_given_batch_is_used_and_the_cpu_never_probes():
    def probe():
        raise AssertionError("the CPU path must not run the encoder to measure it")

    assert batch_for(probe, device="cpu", key="k", requested=5) == 5
    assert batch_for(probe, device="cuda", key="k", requested=3) == 3  # given: no measurement on CUDA either
    assert batch_for(probe, device="cpu", key="k", cpu_default=8) == 8
    assert batch_for(probe, device="cpu", key="k") == 1


def test_the_defaults_leave_the_batch_to_the_device():
    from cryodask.membranes.params import EtsamParams
    from cryodask.picking.params import CryosamParams
    from cryodask.prompting.params import FeatureParams
    from cryodask.validate import FieldError

    assert FeatureParams().batch is None and CryosamParams().batch is None
    assert FeatureParams(batch=4).batch == 4
    with pytest.raises(FieldError, match="batch must be a whole number >= 1 or None, got 0"):
        FeatureParams(batch=0)
    assert "batch" not in {f for f in EtsamParams.__dataclass_fields__}  # membranes: a runtime choice


def test_sam2_batch_on_the_cpu_is_the_callers_default():
    from cryodask.models.batching import sam2_batch
    from cryodask.models.sam2 import cached_predictor

    predictor = cached_predictor("sam2.1_hiera_t", None, device="cpu", image_size=128, seed=0)
    assert sam2_batch(predictor, "cpu", None, config="sam2.1_hiera_t") == 1
    assert sam2_batch(predictor, "cpu", None, config="sam2.1_hiera_t", cpu_default=8) == 8
    assert sam2_batch(predictor, "cpu", 2, config="sam2.1_hiera_t") == 2
