"""CRISP building blocks on hand-made arrays: losses against closed forms, network shapes, the
dense CRF, tiled inference, label disks and particle extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from cryodask.errors import InputError
from cryodask.metrics.segmentation import segmentation_scores
from cryodask.micrographs.crisp.crf import CRFParams, refine
from cryodask.micrographs.crisp.extract import components, extract, peaks
from cryodask.micrographs.crisp.labels import bin_mask, disk_mask, to_full_resolution, unbin_mask
from cryodask.micrographs.crisp.losses import LOSSES, get_loss, soft_cross_entropy
from cryodask.micrographs.crisp.networks import build_network
from cryodask.micrographs.crisp.tiles import predict_tiled, tile_starts

BIG = 30.0  # a logit margin that makes softmax probabilities 0/1 to float precision


def hard_logits(pred: np.ndarray) -> torch.Tensor:
    """(1, 2, H, W) logits whose argmax is ``pred`` with probability ~1."""
    p = torch.from_numpy(pred.astype(np.float32))
    return torch.stack([BIG * (1 - 2 * p), BIG * (2 * p - 1)])[None] / 2


def soft_logits(prob1: np.ndarray) -> torch.Tensor:
    """(1, 2, H, W) logits with softmax probability ``prob1`` for class 1."""
    p = torch.from_numpy(prob1.astype(np.float64))
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])[None]


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    truth = (rng.random((12, 16)) < 0.3).astype(np.int64)
    pred = truth.copy()
    flip = rng.random(truth.shape) < 0.2
    pred[flip] = 1 - pred[flip]
    return truth, pred


def per_class(pred, truth):
    return [(np.sum((pred == c) & (truth == c)), np.sum((pred == c) & (truth != c)), np.sum((pred != c) & (truth == c)))
            for c in (0, 1)]


# ------------------------------------------------------------------------------------ losses

@pytest.mark.parametrize("name", ["dice", "jaccard", "tversky", "lovasz"])
def test_region_losses_are_zero_for_a_perfect_prediction_and_grow_with_errors(name, case):
    truth, pred = case
    loss = get_loss(name)
    target = torch.from_numpy(truth)[None]
    perfect = float(loss(hard_logits(truth), target))
    some = float(loss(hard_logits(pred), target))
    worst = float(loss(hard_logits(1 - truth), target))
    assert perfect == pytest.approx(0, abs=1e-5)
    assert perfect < some < worst
    assert worst == pytest.approx(1, abs=1e-5)  # nothing right in either class


def test_dice_jaccard_tversky_lovasz_match_closed_forms_on_hard_predictions(case):
    truth, pred = case
    target, logits = torch.from_numpy(truth)[None], hard_logits(pred)
    counts = per_class(pred, truth)
    dice = 1 - np.mean([2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts])
    iou = 1 - np.mean([tp / (tp + fp + fn) for tp, fp, fn in counts])
    tversky = (1 - np.mean([tp / (tp + 0.45 * fp + 0.55 * fn) for tp, fp, fn in counts])) ** 2
    assert float(get_loss("dice")(logits, target)) == pytest.approx(dice, abs=1e-5)
    assert float(get_loss("jaccard")(logits, target)) == pytest.approx(iou, abs=1e-5)
    assert float(get_loss("tversky")(logits, target)) == pytest.approx(tversky, abs=1e-5)
    # the Lovász extension equals the set function (1 − IoU) at the vertices of the cube
    assert float(get_loss("lovasz")(logits, target)) == pytest.approx(iou, abs=1e-5)


def test_soft_dice_and_jaccard_closed_forms_at_uniform_probability(case):
    truth, _ = case
    n, n1 = truth.size, truth.sum()
    logits, target = soft_logits(np.full(truth.shape, 0.5)), torch.from_numpy(truth)[None]
    dice = 1 - np.mean([2 * 0.5 * nc / (0.5 * n + nc) for nc in (n - n1, n1)])
    iou = 1 - np.mean([0.5 * nc / (0.5 * n + nc - 0.5 * nc) for nc in (n - n1, n1)])
    assert float(get_loss("dice")(logits, target)) == pytest.approx(dice, rel=1e-6)
    assert float(get_loss("jaccard")(logits, target)) == pytest.approx(iou, rel=1e-6)


def lovasz_by_definition(prob1: np.ndarray, truth: np.ndarray) -> float:
    """Σ_i m_(i) · (Δ(M_i) − Δ(M_{i−1})), Δ(M) = 1 − |gt∖M| / |gt ∪ M|, per class, averaged."""
    losses = []
    for c, p in ((0, 1 - prob1), (1, prob1)):
        gt = (truth == c).ravel()
        errors = np.abs(gt - p.ravel())
        order = np.argsort(-errors, kind="stable")
        total, previous, mispredicted = 0.0, 0.0, np.zeros_like(gt)
        for i in order:
            mispredicted[i] = True
            delta = 1 - np.sum(gt & ~mispredicted) / np.sum(gt | mispredicted)
            total += errors[i] * (delta - previous)
            previous = delta
        losses.append(total)
    return float(np.mean(losses))


def test_lovasz_softmax_matches_its_definition_on_soft_probabilities(case):
    truth, _ = case
    prob1 = np.random.default_rng(1).uniform(0.05, 0.95, truth.shape)
    got = float(get_loss("lovasz")(soft_logits(prob1), torch.from_numpy(truth)[None]))
    assert got == pytest.approx(lovasz_by_definition(prob1, truth), rel=1e-6)


def test_cross_entropy_label_smoothing_moves_the_optimum_off_certainty(case):
    truth, _ = case
    target = torch.from_numpy(truth)[None]
    at = {q: float(soft_cross_entropy(soft_logits(np.where(truth == 1, q, 1 - q)), target))
          for q in (0.8, 0.95, 0.9999)}
    assert at[0.95] < at[0.8] and at[0.95] < at[0.9999]  # smoothing 0.1 over 2 classes: optimum at 0.95
    expected = -(0.95 * np.log(0.95) + 0.05 * np.log(0.05))
    assert at[0.95] == pytest.approx(expected, rel=1e-6)
    assert float(soft_cross_entropy(hard_logits(truth), target, smoothing=0.0)) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_has_a_gradient_that_lowers_it(name, case):
    truth, _ = case
    logits = torch.zeros(1, 2, *truth.shape, requires_grad=True)
    target = torch.from_numpy(truth)[None]
    loss = get_loss(name)
    before = loss(logits, target)
    before.backward()
    with torch.no_grad():
        after = loss(logits - 0.5 * logits.grad / logits.grad.abs().max(), target)
    assert after.item() < before.item()


def test_unknown_loss_and_network_are_input_errors():
    with pytest.raises(InputError, match="--loss"):
        get_loss("focal")
    with pytest.raises(InputError, match="--model"):
        build_network("segformer")


# ------------------------------------------------------------------------------------ networks

@pytest.mark.parametrize("name,widths", [("unet", (4, 8, 16)), ("deeplab", (4, 8, 16)), ("unet", None)])
@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (17, 100)])
def test_networks_keep_any_image_size(name, widths, shape):
    torch.manual_seed(0)
    net = build_network(name, widths).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, 2, *shape)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ CRF

def noisy_case(seed=0):
    rng = np.random.default_rng(seed)
    centres = [[20, 20], [20, 60], [60, 30], [64, 70], [40, 44]]
    truth = disk_mask((84, 90), centres, 18)
    image = truth * 1.0 + rng.normal(0, 0.3, truth.shape)
    p = np.where(truth == 1, 0.7, 0.3)
    salt = rng.random(truth.shape) < 0.06
    p[salt] = 1 - p[salt] + np.where(truth[salt] == 1, -0.1, 0.1)  # isolated confident mistakes
    return truth, image, np.stack([1 - p, p]).astype(np.float32)


@pytest.mark.parametrize("features", ["image", "logits"])
def test_crf_removes_isolated_noise_and_improves_iou(features):
    truth, image, probabilities = noisy_case()
    raw = probabilities[1] > 0.5
    params = CRFParams(features=features, iterations=10, sxy=8, srgb=30, compat=3, gaussian_sxy=1.5,
                       gaussian_compat=10)
    refined = refine(probabilities, image=image, params=params)[1] > 0.5
    small = lambda m: int(np.sum(np.bincount(ndi.label(m)[0].ravel())[1:] <= 4))  # noqa: E731  specks and holes
    noise = small(raw) + small(~raw)
    assert noise > 300
    # the image separates particles from the salt; the logits carry the salt themselves, so a few specks stay
    assert small(refined) + small(~refined) <= (0 if features == "image" else 0.02 * noise)
    before, after = segmentation_scores(raw, truth)["iou"], segmentation_scores(refined, truth)["iou"]
    assert after > before + 0.2 and after > 0.95


def test_crf_without_pairwise_terms_keeps_the_unary_decision():
    truth, image, probabilities = noisy_case(1)
    q = refine(probabilities, image=image, params=CRFParams(compat=0, gaussian_compat=0))
    assert np.array_equal(q.argmax(0), probabilities.argmax(0))


def test_crf_parameters_are_checked():
    for bad in ({"features": "rgb"}, {"iterations": 0}, {"sxy": 0}, {"compat": -1}):
        with pytest.raises(InputError, match="--crf-"):
            CRFParams(**bad)


# ------------------------------------------------------------------------------------ tiles

def test_tiles_cover_with_the_requested_overlap():
    for size, tile, overlap in ((1000, 512, 64), (513, 512, 64), (300, 64, 16), (64, 64, 8)):
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, size) == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_tiled_inference_equals_whole_image_for_a_pointwise_network():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.Tanh(), torch.nn.Conv2d(3, 2, 1)).eval()
    image = np.random.default_rng(0).normal(size=(101, 133)).astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(image)[None, None])[0].numpy()
    tiled = predict_tiled(net, image, tile=32, overlap=8, batch=3)
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-6)


def test_ramp_blending_leaves_no_seams():
    """A U-Net sees its zero padding at tile edges; hard-cut tiles show it as seams inside the
    image, ramp-blended tiles hide it: their error is a fraction of the hard-cut one's."""
    torch.manual_seed(1)
    net = build_network("unet", (4, 8, 16)).eval()
    image = ndi.gaussian_filter(np.random.default_rng(2).normal(size=(160, 160)), 3).astype(np.float32) * 3
    with torch.no_grad():
        whole = net(torch.from_numpy(image)[None, None])[0].numpy()
    hard = np.abs(predict_tiled(net, image, tile=64, overlap=0) - whole).max()
    blended = np.abs(predict_tiled(net, image, tile=64, overlap=24) - whole).max()
    assert hard > 1e-3  # seams exist without blending
    assert blended < 0.3 * hard


# ------------------------------------------------------------------------------------ labels + extraction

def test_disk_labels_and_binning_round_trip():
    centres = np.array([[10.0, 12.0], [30.0, 40.0]])
    mask = disk_mask((48, 64), centres, 11)
    assert mask.sum() == 2 * disk_mask((11, 11), [[5, 5]], 11).sum()
    assert mask[10, 12] == 1 and mask[10, 18] == 0  # radius 5.5
    binned = bin_mask(mask, 4)
    assert binned.shape == (12, 16)
    full = unbin_mask(binned, 4, (50, 66))
    assert full.shape == (50, 66) and segmentation_scores(full[:48, :64], mask)["iou"] > 0.7
    np.testing.assert_allclose(to_full_resolution([[0, 0], [2, 3]], 4), [[1.5, 1.5], [9.5, 13.5]])


def test_components_recover_disk_centres_exactly():
    centres = np.array([[15.0, 15.0], [15.0, 52.0], [47.0, 30.0], [50.0, 60.0]])
    mask = disk_mask((70, 80), centres, 13)
    mask[2:4, 70:72] = 1  # a speck far below the area filter
    found, areas = components(mask, diameter=13)
    assert len(found) == 4
    np.testing.assert_allclose(found[np.lexsort(found.T[::-1])], centres, atol=1e-9)
    assert np.all(areas > 100)


@pytest.mark.parametrize("separation", [20.0, 16.0])
def test_peaks_separate_touching_disks(separation):
    centres = np.array([[30.0, 30.0], [30.0, 30.0 + separation], [60.0, 20.0]])
    mask = disk_mask((80, 80), centres, 20)
    assert ndi.label(mask)[1] == 2  # the first two touch: one component
    assert len(components(mask, diameter=20)[0]) == 2
    found, _ = peaks(mask, diameter=20)
    assert len(found) == 3
    distances = np.linalg.norm(found[:, None] - centres[None], axis=2).min(axis=0)
    assert distances.max() <= 1.0


def test_extract_checks_its_method():
    assert len(extract(np.zeros((10, 10)), 5, "components")[0]) == 0
    assert len(extract(np.zeros((10, 10)), 5, "peaks")[0]) == 0
    with pytest.raises(InputError, match="--extract"):
        extract(np.zeros((4, 4)), 3, "contours")


# ------------------------------------------------------------------------------------ training from masks

def test_training_from_masks_saves_a_model_that_reloads_identically(tmp_path):
    """The second network and a second loss, labels from a masks folder: the loss falls, the
    saved model rebuilds with the same outputs, and the particle size is measured from the masks."""
    from PIL import Image

    from cryodask.io.mrc import write_mrc
    from cryodask.micrographs.crisp.train import TrainParams, load_model, train
    from cryodask.synth import synth_micrograph

    (tmp_path / "mics").mkdir()
    (tmp_path / "masks").mkdir()
    for seed in (3, 4):
        synth = synth_micrograph((128, 128), diameter=16, seed=seed, snr=1.0)
        write_mrc(tmp_path / "mics" / f"g{seed}.mrc", synth.image, 1.77)
        Image.fromarray(synth.mask * 255).save(tmp_path / "masks" / f"g{seed}_mask.png")
    params = TrainParams(model="deeplab", loss="lovasz", widths=(4, 8, 16), epochs=6, crop=64, lr=0.01, seed=1)
    result = train([tmp_path / "mics"], tmp_path / "model", masks=tmp_path / "masks", params=params, threads=1)
    assert result.micrographs == 2 and result.losses[-1] < result.losses[0]
    network, config = load_model(tmp_path / "model")
    assert config["network"] == "deeplab" and config["labels"] == "masks"
    assert 12 < config["diameter"] < 17  # median disk area → diameter; disks touching the edge are cut
    state = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    again = build_network("deeplab", (4, 8, 16))
    again.load_state_dict(state["state_dict"])
    x = torch.randn(1, 1, 40, 44)
    with torch.no_grad():
        assert torch.equal(network(x), again.eval()(x))
