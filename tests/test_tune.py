"""tune_thresholds on the committed validation images, with a tiny untrained model (fast, exact checks)."""

from nucleiseg import tune
from nucleiseg.metrics import evaluate
from nucleiseg.model import load_model
from nucleiseg.segment import Segmenter


def test_tuned_thresholds_are_the_best_of_the_grid(tiny_model, validation_samples, monkeypatch):
    model = load_model(tiny_model)
    samples = validation_samples[:3]
    best, report = tune.tune_thresholds(model, samples, progress=False)
    assert best.foreground_threshold in tune.FOREGROUND and best.marker_threshold in tune.MARKER
    assert report.n_images == 3

    # a grid of the model's own thresholds only: tune's cached maps give what the segmenter gives
    monkeypatch.setattr(tune, "FOREGROUND", (model.thresholds.foreground_threshold,))
    monkeypatch.setattr(tune, "MARKER", (model.thresholds.marker_threshold,))
    own, own_report = tune.tune_thresholds(model, samples, progress=False)
    assert own == model.thresholds
    segmenter = Segmenter(model)
    direct = evaluate((s.id, s.labels, segmenter.segment(s.image).labels) for s in samples)
    assert own_report.dsb_score == direct.dsb_score
    assert report.dsb_score >= own_report.dsb_score  # the whole grid does at least as well
