"""The quality estimate: its signals react to the errors they are meant to see, the shipped calibration gives
an estimate in [0, 1] that ranks real images by their score, and summary.csv lists flagged images first."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import ndimage as ndi

from nucleiseg.data import STAIN, input_kind, prepare_input
from nucleiseg.metrics import match
from nucleiseg.quality import SIGNALS, QualityModel, quality_signals
from nucleiseg.segment import Segmenter


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter()


def _signals(segmenter, image, labels=None):
    probabilities, diameter, scale = segmenter.image_probabilities(prepare_input(image))
    if labels is None:
        labels = segmenter.segment(image).labels
    return quality_signals(probabilities, labels, segmenter.target_diameter, scale,
                           input_kind(image) == STAIN)


def test_merged_nuclei_disagree_with_the_size_output(segmenter, validation_samples):
    """Nuclei merged into clumps (the error of a diameter estimate that locked onto clusters) raise the size
    disagreement well above that of the model's own segmentation."""
    image = validation_samples[0].image
    own = _signals(segmenter, image)
    labels = segmenter.segment(image).labels
    clumps, _ = ndi.label(ndi.binary_dilation(labels > 0, iterations=4))
    merged = _signals(segmenter, image, np.where(labels > 0, clumps, 0))
    assert merged["nuclei"] < 0.8 * own["nuclei"]
    assert merged["size_disagreement"] > 2 * own["size_disagreement"]
    assert set(SIGNALS) <= set(own) and own["nuclei"] == labels.max()


def test_merged_nuclei_are_concave(segmenter, validation_samples):
    """The clumps of the test above are concave: the concavity signal rises; and the polygon solidity ranks
    real nuclei as scikit-image's convex-hull solidity does."""
    from skimage.measure import regionprops_table

    from nucleiseg.quality import solidity

    image = validation_samples[0].image
    labels = segmenter.segment(image).labels
    clumps, _ = ndi.label(ndi.binary_dilation(labels > 0, iterations=4))
    merged = np.where(labels > 0, clumps, 0)
    assert _signals(segmenter, image, merged)["concavity"] > 1.5 * _signals(segmenter, image)["concavity"]
    n = int(labels.max())
    ours = solidity(labels, n)
    theirs = regionprops_table(labels, properties=("label", "solidity", "area"))
    big = theirs["area"] >= 30
    assert np.corrcoef(ours[theirs["label"][big] - 1], theirs["solidity"][big])[0, 1] > 0.8


def test_estimate_ranks_real_images_by_their_score(segmenter, validation_samples):
    """On the five committed validation images the estimate is in [0, 1] and the image the model segments
    best is estimated above the one it segments worst."""
    assert segmenter.quality is not None, "the shipped model has a quality calibration"
    estimates, scores = [], []
    for sample in validation_samples:
        result = segmenter.segment(sample.image)
        assert 0.0 <= result.quality <= 1.0 and result.flagged == (result.quality < segmenter.quality.flag_below)
        estimates.append(result.quality)
        scores.append(match(sample.labels, result.labels).dsb_score())
    assert estimates[int(np.argmax(scores))] > estimates[int(np.argmin(scores))]


def test_fit_recovers_a_linear_score_and_flags_the_lowest_share():
    rng = np.random.default_rng(0)
    signals = [dict(zip(SIGNALS, rng.normal(size=len(SIGNALS)), strict=True)) | {"nuclei": 10} for _ in range(200)]
    scores = [0.5 + 0.1 * s["size_disagreement"] - 0.05 * s["stained"] for s in signals]
    model = QualityModel.fit(signals, scores, flag_share=0.1, ridge=1e-6)
    estimates = np.array([model.estimate(s) for s in signals])
    assert np.allclose(estimates, np.clip(scores, 0, 1), atol=1e-4)
    assert np.mean(estimates < model.flag_below) == pytest.approx(0.1, abs=0.01)
    assert model.estimate(signals[0] | {"nuclei": 0}) == 0.0


def test_summary_lists_flagged_images_first(tmp_path, segmenter):
    from nucleiseg.batch import segment_batch
    from nucleiseg.io import find_images
    from nucleiseg.segment import DEFAULT_MODEL

    strict = Segmenter(DEFAULT_MODEL)
    strict.quality.flag_below = 0.5  # flags the weaker samples (H&E, brightfield) of the bundled set
    paths = find_images([segmenter.bundle.folder.parents[1] / "samples"])
    segment_batch(paths, tmp_path, strict, outputs=("csv",), progress=False)
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    flags = [row["flagged"] == "True" for row in rows]
    assert len(rows) == len(paths) and any(flags) and not all(flags)
    assert flags == sorted(flags, reverse=True), "flagged images come first"
    flagged = [float(row["quality"]) for row in rows if row["flagged"] == "True"]
    assert flagged == sorted(flagged) and all(q < 0.5 for q in flagged)
