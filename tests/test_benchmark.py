"""The benchmark command and the pairing of images with labels, on the committed validation images."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import roifile
from skimage.measure import find_contours

from nucleiseg.cli import main
from nucleiseg.io import load_dataset, write_labels
from nucleiseg.labelled import pair_labels
from nucleiseg.metrics import evaluate

from .conftest import VALIDATION


@pytest.fixture(scope="module")
def samples():
    return load_dataset(VALIDATION, progress=False, use_cache=False)


def write_roi_zip(path, labels):
    """An ImageJ ROI zip of the outlines of a label image, vertices on pixel corners as ImageJ traces them."""
    rois = []
    for value in np.unique(labels)[1:]:
        contour = max(find_contours(np.pad(labels == value, 1).astype(float), 0.5), key=len) - 1
        rois.append(roifile.ImagejRoi.frompoints(contour[:, ::-1] + 0.5, name=str(value)))
    roifile.roiwrite(path, rois)


@pytest.fixture
def user_folders(tmp_path, samples):
    """Images in one folder and their labels in another, in the three forms a user may have them."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for s in samples[:3]:
        shutil.copy(VALIDATION / s.id / "images" / f"{s.id}.png", images / f"{s.id[:8]}.png")
    a, b, c = (s.id for s in samples[:3])
    write_labels(labels / f"{a[:8]}_labels.png", samples[0].labels)
    write_roi_zip(labels / f"{b[:8]}.zip", samples[1].labels)
    shutil.copytree(VALIDATION / c / "masks", labels / c[:8])
    return images, labels


def test_every_label_form_reads_as_the_true_nuclei(user_folders, samples):
    pairs = pair_labels(*user_folders)
    assert [p.labels.name for p in pairs] == [f"{samples[0].id[:8]}_labels.png", f"{samples[1].id[:8]}.zip",
                                              samples[2].id[:8]]
    for pair, sample in zip(pairs, samples, strict=False):
        truth = pair.read().labels
        assert len(np.unique(truth)) == len(np.unique(sample.labels))
        assert evaluate([("x", sample.labels, truth)]).dsb_score == 1.0  # every nucleus exactly


def test_a_mismatch_is_one_error_naming_every_file(user_folders, samples):
    images, labels = user_folders
    lone = images / f"{samples[0].id[:8]}.png"
    shutil.copy(lone, images / "unlabelled.png")
    shutil.copy(labels / f"{samples[0].id[:8]}_labels.png", labels / "orphan.png")
    shutil.copy(labels / f"{samples[1].id[:8]}.zip", labels / f"{samples[1].id[:8]}_rois.zip")
    with pytest.raises(ValueError) as error:
        pair_labels(images, labels)
    message = str(error.value)
    assert "unlabelled.png: no labels" in message
    assert "orphan.png: labels of no image" in message
    assert f"{samples[1].id[:8]}.png: several labels" in message
    with pytest.raises(ValueError, match="folder of their own"):
        pair_labels(images, images)


def test_labels_of_another_size_name_both_files(user_folders, samples):
    images, labels = user_folders
    name = samples[0].id[:8]
    write_labels(labels / f"{name}_labels.png", samples[0].labels[:-3])
    pair = pair_labels(images, labels)[0]
    with pytest.raises(ValueError, match=rf"{name}_labels.png: labels are .* image .*{name}.png"):
        pair.read()


def test_benchmark_scores_equal_evaluate(tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    # a given diameter and two outputs keep the test fast; the scores do not depend on them
    assert main(["benchmark", str(VALIDATION), "--out", str(out), "--model", str(tiny_model), "--worst", "2",
                 "--diameter", "17", "--outputs", "labels,overlay"]) == 0
    printed = capsys.readouterr().out
    scores = json.loads((out / "benchmark.json").read_text())
    assert f"DSB score {scores['dsb_score']:.4f}" in printed
    assert main(["evaluate", str(out), "--truth", str(VALIDATION), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == scores
    assert scores["n_pred"] > 0  # the comparison is of real predictions, not of empty images
    # segmented exactly as segment does: its outputs and summary
    assert (out / "summary.csv").exists() and (out / "worst.png").stat().st_size > 0
    assert len(list(out.glob("*_overlay.png"))) == len(list(out.glob("*_labels.png"))) == 5
    with open(out / "benchmark.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows[:-1]] == sorted(p.name for p in VALIDATION.iterdir())
    assert rows[-1]["image"] == "(all)"
    assert float(rows[-1]["dsb_score"]) == pytest.approx(scores["dsb_score"], abs=1e-4)
    assert np.mean([float(r["dsb_score"]) for r in rows[:-1]]) == pytest.approx(scores["dsb_score"], abs=1e-4)
    assert sum(int(r["nuclei"]) for r in rows[:-1]) == scores["n_pred"]
    assert sum(int(r["matched"]) for r in rows[:-1]) == round(scores["ap50"] * (scores["n_true"] + scores["n_pred"])
                                                             / (1 + scores["ap50"]))


def test_unmatched_names_the_missed_and_the_false_nuclei(samples):
    from nucleiseg.metrics import unmatched

    true = samples[0].labels
    first, second = np.unique(true)[1:3]
    pred = true.copy()
    pred[pred == first] = 0  # missed
    pred[(true == 0) & (np.arange(true.shape[1]) < 3)] = 999  # a false nucleus along the left border
    missed, false = unmatched(true, pred)
    assert missed.tolist() == [first] and false.tolist() == [999]
    assert second not in missed
