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


def test_tune_command_tunes_each_kind_of_image_on_its_own_kind(tiny_model, validation_samples, tmp_path,
                                                                 monkeypatch):
    """The general thresholds serve unstained images only, so they are tuned on those; stained ones get theirs."""
    import shutil

    from nucleiseg import data
    from nucleiseg.cli import main
    from nucleiseg.config import PostprocessConfig, load_json

    from .conftest import REPO

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    monkeypatch.setattr(data, "load_split", lambda cfg, progress=True: ([], validation_samples))
    tuned_on = []
    real = tune.tune_thresholds
    monkeypatch.setattr(tune, "tune_thresholds", lambda m, s: tuned_on.append([x.id for x in s]) or real(m, s, False))
    assert main(["tune", "--model", str(folder), "--config", str(REPO / "configs" / "default.json")]) == 0

    stained = {s.id for s in validation_samples if data.input_kind(s.image) == data.STAIN}
    assert 0 < len(stained) < len(validation_samples)
    assert set(tuned_on[0]) == {s.id for s in validation_samples} - stained and set(tuned_on[1]) == stained
    general = load_json(PostprocessConfig, folder / "thresholds.json")
    unstained = len(validation_samples) - len(stained)
    assert general.tuned_on == f"unstained images of the validation split of default.json ({unstained} images)"
    assert "stained images" in load_json(PostprocessConfig, folder / "thresholds_stained.json").tuned_on
