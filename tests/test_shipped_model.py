"""Regression tests of the model shipped inside the package, on committed real validation images."""

import subprocess
import sys

import numpy as np
import pytest

from nucleiseg.data import rescale
from nucleiseg.io import load_dataset, read_image
from nucleiseg.metrics import evaluate, match
from nucleiseg.model import load_model, model_folder
from nucleiseg.postprocess import instances
from nucleiseg.segment import Segmenter
from nucleiseg.targets import median_diameter

from .conftest import REPO

VALIDATION = REPO / "tests" / "data" / "validation"
SAMPLES = REPO / "src" / "nucleiseg" / "samples"
# On these five validation images (hard ones: dense tissue and faint nuclei) the seed recipe's weights from
# `nucleiseg seed` score SEED_SCORE and each shipped model scored SHIPPED (DSB score, AP@0.5) when it was
# committed (with today's code: fast 0.469, 0.660); on the first of them at 3x default and fast score 0.496
# and 0.475 (`python benchmarks/five_images.py --model NAME`). The floors sit below the measured values.
SEED_SCORE = 0.289
SHIPPED = {"default": (0.479, 0.683), "fast": (0.447, 0.643)}
FLOOR = 0.42
SCALED_FLOOR = 0.45


@pytest.fixture(scope="module")
def samples():
    return load_dataset(VALIDATION, progress=False)


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def segmenter(request):
    return Segmenter(request.param)


def test_the_fast_model_costs_under_a_third_of_the_default_per_pixel():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def flops(name):
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            load_model(name).network(torch.zeros(1, 1, 256, 256))
        return counter.get_total_flops()

    assert flops("fast") < flops("default") / 3


def test_shipped_model_is_complete_small_and_strict():
    folder = model_folder("default")
    assert {p.name for p in folder.iterdir()} >= {"model.json", "weights.pt", "thresholds.json"}
    assert sum(p.stat().st_size for p in folder.iterdir()) < 30 * 2**20
    thresholds = load_model("default").thresholds  # tuned with `nucleiseg tune`, read from thresholds.json
    assert 0 < thresholds.foreground_threshold < 1 and 0 < thresholds.marker_threshold < 1


def test_stained_images_are_drawn_with_their_own_thresholds(segmenter):
    """The shipped models have thresholds tuned on the stained validation images (thresholds_stained.json):
    an H&E image gets those, a fluorescence image the others."""
    config = segmenter.config
    assert config.stained_thresholds is not None and config.stained_thresholds != config.thresholds
    he = segmenter.predict(read_image(SAMPLES / "histology_he.png"))
    assert he.stained
    own = instances(he.probabilities, config.stained_thresholds, he.diameter)
    general = instances(he.probabilities, config.thresholds, he.diameter)
    assert not np.array_equal(own, general)
    assert np.array_equal(segmenter.label_nuclei(he).labels, own)
    fluorescence = segmenter.predict(read_image(SAMPLES / "fluorescence_dense.png"))
    assert not fluorescence.stained
    expected = instances(fluorescence.probabilities, config.thresholds, fluorescence.diameter)
    assert np.array_equal(segmenter.label_nuclei(fluorescence).labels, expected)


def test_shipped_model_scores_well_above_the_seed_recipe(samples, segmenter):
    report = evaluate((s.id, s.labels, segmenter.segment(s.image).labels) for s in samples)
    assert report.dsb_score >= FLOOR > SEED_SCORE
    assert report.ap50 >= SHIPPED[segmenter.source][1] - 0.05


def test_nuclei_three_times_larger_are_found_at_their_size(samples, segmenter):
    sample = samples[0]  # fluorescence, nuclei about 11 px wide
    image = rescale(sample.image, 3.0, order=1)
    labels = rescale(sample.labels.astype(np.int32), 3.0, order=0)
    result = segmenter.segment(image)
    assert abs(result.diameter / median_diameter(labels) - 1) < 0.25
    assert match(labels, result.labels).dsb_score() >= SCALED_FLOOR


def test_demo_segments_every_bundled_sample(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nucleiseg.cli", "segment", str(SAMPLES), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for image in SAMPLES.glob("*.png"):
        assert (tmp_path / f"{image.stem}_overlay.png").exists()
        rows = (tmp_path / f"{image.stem}_nuclei.csv").read_text().splitlines()
        assert len(rows) > 3, image.name  # every sample shows several nuclei (three large ones at least)


def test_dense_tissue_gives_nuclei_not_the_gaps_between_them(dense_tissue, segmenter):
    for s in dense_tissue:
        result = segmenter.segment(s.image)
        assert abs(np.log(result.diameter / median_diameter(s.labels))) < np.log(1.5), s.id
        predicted, true = result.labels > 0, s.labels > 0
        assert (predicted & true).sum() > 0.7 * predicted.sum(), s.id  # what is found lies on nuclei
        assert 0.5 < result.labels.max() / s.labels.max() < 1.5, s.id
        assert match(s.labels, result.labels).counts(0.5)[0] > 0.3 * s.labels.max(), s.id


def test_large_faint_nuclei_are_found_whole(segmenter):
    """The bundled sample with three large nuclei (~50 to ~130 px wide): three nuclei, not fragments."""
    from nucleiseg.io import read_image

    result = segmenter.segment(read_image(SAMPLES / "fluorescence_large_nuclei.png"))
    areas = np.bincount(result.labels.ravel())[1:]
    assert len(areas) == 3 and areas.max() > 10000  # the largest, ~130 px wide, in one piece


def shrunk_sample(train_root, image_id: str, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """A stage1_train image and its labels resized by ``factor``."""
    from nucleiseg.io import load_sample

    sample = load_sample(train_root / image_id, overlap="warn")
    return rescale(sample.image, factor, order=1), rescale(sample.labels.astype(np.int32), factor, order=0)


def segment_recording_scales(image: np.ndarray, monkeypatch, **settings) -> tuple:
    """The default model's segmentation of ``image`` and the scale of each network pass it made, in order."""
    segmenter, scales = Segmenter("default", **settings), []
    probabilities = segmenter.probabilities
    monkeypatch.setattr(segmenter, "probabilities", lambda x, scale, region=None: scales.append(scale)
                        or probabilities(x, scale, region))
    return segmenter.segment(image), scales


SMALL_NUCLEI = "20b20ab049372d184c705acebe7af026d3580f5fd5a72ed796e3622e1685af2f"


def test_small_nuclei_that_vanish_at_half_size_are_not_read_as_texture(train_root, segmenter):
    """A real fluorescence image shrunk to half (nuclei ~6 px): at the first pass (half size again) the nuclei
    vanish and the size output reads the texture as nuclei of 75-145 px; a look at the centre at full size
    finds the small nuclei instead."""
    image, labels = shrunk_sample(train_root, SMALL_NUCLEI, 0.5)
    result = segmenter.segment(image)
    assert abs(np.log(result.diameter / median_diameter(labels))) < np.log(1.5)
    assert result.diameter_estimated and result.scale > 2


@pytest.mark.parametrize("int8", [True, False])
def test_nuclei_read_at_half_size_that_vanish_at_full_size_send_the_estimate_finer(train_root, monkeypatch, int8):
    """A real fluorescence image shrunk to a quarter (nuclei ~2.5 px), default model: the half-size pass reads
    the texture as nuclei of ~34 px, twice the training size; at full size, where such nuclei would be plain,
    there are none, so the reading is set aside and the estimate looks finer until it reads the small nuclei
    (without the rule it kept ~34 px, 13x too large). The float32 network reads just over 34 px, and the
    look at the centre (the whole image here) finds none; the 8-bit one reads just under, so the next pass
    is at full size anyway and finds none."""
    image, labels = shrunk_sample(train_root, "648636ee314d7bdba3ab2fc0fe49a863de35c3e2caf619039f678df67b526868",
                                  0.25)
    result, scales = segment_recording_scales(image, monkeypatch, int8=int8)
    assert scales[:3] == [0.5, 1.0, 2.0]  # half size, the whole image at full size, finer
    assert abs(np.log(result.diameter / median_diameter(labels))) < np.log(2)


def test_the_estimate_makes_no_pass_twice_where_the_centre_look_was_the_whole_image(train_root, monkeypatch):
    """A real image shrunk to 64x64, default model: the half-size pass reads large nuclei, the look at the
    centre at full size (the whole image here) reads nuclei a third that size, so the estimate goes on from
    the full-size reading: that look is its full-size pass, not made again."""
    image, _ = shrunk_sample(train_root, "c89ac06daef5c819309f03d6a35792d1a8a66abb8cb3414013ffe71d3dd9fe96", 0.25)
    assert image.shape[:2] == (64, 64)
    result, scales = segment_recording_scales(image, monkeypatch)
    assert scales[:2] == [0.5, 1.0] and result.scale > 1.0  # half size, the centre, then finer
    assert len(scales) == len(set(scales))  # every pass is over the whole image: no scale twice


def test_nuclei_too_small_for_half_size_read_as_large_at_full_size_send_the_estimate_finer(train_root, monkeypatch):
    """The image of the half-size test shrunk to a quarter (nuclei ~3 px), default model: both the half-size
    pass and the look at the centre at full size read the texture as nuclei of 50-70 px, but at full size the
    foreground is ten times what it was at half size (real nuclei cover about as much at both); the estimate
    looks at twice the size and reads the nuclei (without the rule: ~76 px, 24x too large)."""
    image, labels = shrunk_sample(train_root, SMALL_NUCLEI, 0.25)
    result, scales = segment_recording_scales(image, monkeypatch)
    assert scales[:3] == [0.5, 1.0, 2.0]  # half size, the centre at full size, finer
    assert abs(np.log(result.diameter / median_diameter(labels))) < np.log(1.5)


def test_the_estimate_looks_at_half_size_first_and_segments_at_the_scale_it_reads(samples, segmenter,
                                                                                  monkeypatch):
    """The first pass sees the crop at half size; an image is segmented with its nuclei at 1.2x the training
    size (or as it is, within 1.3x), whether its diameter was estimated or given; no pass is repeated."""
    from nucleiseg import segment

    scales = []
    probabilities = segmenter.probabilities
    monkeypatch.setattr(segmenter, "probabilities", lambda x, scale, region=None: scales.append((scale, x.shape))
                        or probabilities(x, scale, region))
    check = (segment.CHECK_CROP, segment.CHECK_CROP)  # the look at the centre that checks a large first reading
    for sample in samples:
        scales.clear()
        result = segmenter.segment(sample.image)
        scales[:] = [(scale, shape) for scale, shape in scales if shape != check]
        crop = [scale for scale, shape in scales if shape != sample.image.shape[:2]] or [s for s, _ in scales]
        assert scales[0][0] == segment.FIRST_SCALE and len(crop) == len(set(crop)) <= segment.MAX_ESTIMATE_PASSES
        seen = result.diameter * result.scale / segmenter.target_diameter  # nuclei as the network saw them
        assert result.scale == 1.0 or 1.0 <= seen < 1.3 or abs(seen - segment.SEEN_LARGER) < 0.3
        assert segmenter.segment(sample.image, diameter=result.diameter).scale == segmenter.segmentation_scale(
            result.diameter)
    assert segmenter.segmentation_scale(segmenter.target_diameter) == 1.0  # within 1.3x: not rescaled
    assert segmenter.segmentation_scale(3 * segmenter.target_diameter) == pytest.approx(segment.SEEN_LARGER / 3)
    assert segmenter.segmentation_scale(1000.0) == segmenter.config.min_scale
