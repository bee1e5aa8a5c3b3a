"""The weight-free click → instance and find-similar (``prompting/classical.py``), scored on the
independent simulator (``synth_projection_tomogram``: a tilt series reconstructed by WBP, a real
ribosome map) at two voxel sizes and both contrast polarities, not only on the generator the
widget's test uses."""

from __future__ import annotations

import numpy as np
import pytest

from cryodask.errors import InputError
from cryodask.metrics.picking import picking_scores
from cryodask.polarity import Polarity, dark_reader
from cryodask.prompting.classical import click_instance, find_similar, template_from_instances
from cryodask.synth.projection import synth_projection_tomogram


def dice_with_ball(instance, centre, radius, shape):
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    truth = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2
    pred = np.zeros(shape, bool)
    pred[instance.box] = instance.mask
    return 2 * (pred & truth).sum() / (pred.sum() + truth.sum())


@pytest.mark.parametrize("voxel, polarity", [(10.0, "dark"), (10.0, "bright"), (7.0, "dark")])
def test_a_click_segments_the_particle_under_it(voxel, polarity):
    t = synth_projection_tomogram((48, 128, 128), voxel_size=voxel, seed=2, polarity=polarity)
    read = dark_reader(lambda r: t.volume[r], Polarity(polarity, "given"))
    dices = [dice_with_ball(click_instance(read, t.volume.shape, voxel, c, t.diameters_A[k]), c,
                            t.diameters_A[k] / 2 / voxel, t.volume.shape) for c, k in zip(t.particles, t.kinds)]
    assert len(dices) >= 4 and np.mean(dices) > 0.6 and min(dices) > 0.4, np.round(dices, 2)


def test_a_negative_click_cuts_its_side_away_and_bad_clicks_are_one_line():
    t = synth_projection_tomogram((48, 128, 128), seed=2)
    read, shape = (lambda r: t.volume[r]), t.volume.shape
    c, d = t.particles[0], t.diameters_A[t.kinds[0]]
    whole = click_instance(read, shape, 10.0, c, d)
    negative = c + np.array([0.0, 0.0, 3.0])
    cut = click_instance(read, shape, 10.0, c, d, negatives=[negative])
    points = np.argwhere(cut.mask) + [b.start for b in cut.box]
    assert 0 < cut.mask.sum() < whole.mask.sum()
    assert (np.linalg.norm(points - negative, axis=1) >= np.linalg.norm(points - c, axis=1)).all()
    with pytest.raises(InputError, match="outside the volume"):
        click_instance(read, shape, 10.0, (0, 0, 500), d)
    with pytest.raises(InputError, match="diameter"):
        click_instance(read, shape, 10.0, c, -1.0)


def test_find_similar_ranks_the_accepted_kind_first(client):
    t = synth_projection_tomogram((48, 128, 128), seed=5, polarity="bright")
    read = dark_reader(lambda r: t.volume[r], Polarity("bright", "given"))
    shape, d = t.volume.shape, t.diameters_A[1]
    large = t.particles[t.kinds == 1]
    accepted = [click_instance(read, shape, 10.0, c, d) for c in large[:2]]
    template = template_from_instances(read, shape, 10.0, accepted, d)
    found = find_similar(read, shape, 10.0, template, d, client=client)
    assert list(found.columns) == ["z", "y", "x", "score", "log_score"] and (np.diff(found["score"]) <= 0).all()
    scores = picking_scores(found.loc[found["score"] > 0, ["z", "y", "x"]].to_numpy(), large, radius=5.0)
    assert scores["recall"] == 1.0 and scores["f1"] > 0.7, scores
