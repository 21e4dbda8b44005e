"""Tests of nucleiseg.metrics on hand-made label images (answers worked out by hand) and on real masks."""

from __future__ import annotations

import numpy as np
import pytest

from nucleiseg.metrics import DSB_THRESHOLDS, evaluate, iou_matrix, match


def square(shape=(20, 20), top=5, left=5, size=10, label=1, out=None):
    """Label image with a size x size square of ``label`` at (top, left), drawn into ``out`` if given."""
    labels = np.zeros(shape, np.int32) if out is None else out
    labels[top : top + size, left : left + size] = label
    return labels


def score(true, pred):
    return match(true, pred).dsb_score()


# --- thresholds --------------------------------------------------------------------------------------------


def test_dsb_thresholds_are_the_ten_competition_values():
    assert len(DSB_THRESHOLDS) == 10
    assert np.allclose(DSB_THRESHOLDS, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])


# --- iou_matrix ----------------------------------------------------------------------------------------------


def test_iou_matrix_of_a_perfect_prediction_is_the_identity():
    true = square(top=0, left=0, size=5, label=1)
    square(top=10, left=10, size=5, label=2, out=true)
    assert np.array_equal(iou_matrix(true, true), np.eye(2))


def test_iou_matrix_of_a_shifted_square():
    true = square()
    pred = square(left=7)  # shifted 2 px right: overlap 10x8 = 80, union 100 + 100 - 80 = 120
    iou = iou_matrix(true, pred)
    assert iou.shape == (1, 1)
    assert iou[0, 0] == pytest.approx(80 / 120)


def test_iou_matrix_with_non_consecutive_labels_keeps_unique_order():
    true = square(top=0, left=0, size=4, label=3)
    square(top=10, left=10, size=4, label=7, out=true)
    pred = square(top=10, left=10, size=4, label=5)  # matches true label 7 exactly
    square(top=0, left=0, size=2, label=9, out=pred)  # 4 px inside true label 3 (16 px): IoU 4/16
    iou = iou_matrix(true, pred)
    assert iou.shape == (2, 2)  # rows: labels 3, 7; columns: labels 5, 9
    assert np.allclose(iou, [[0.0, 0.25], [1.0, 0.0]])


def test_iou_matrix_of_empty_images():
    empty = np.zeros((8, 8), np.int32)
    assert iou_matrix(empty, empty).shape == (0, 0)
    assert iou_matrix(square((8, 8), 0, 0, 4), empty).shape == (1, 0)
    assert iou_matrix(empty, square((8, 8), 0, 0, 4)).shape == (0, 1)


def test_iou_matrix_without_background():
    true = np.ones((4, 4), np.int32)
    pred = np.ones((4, 4), np.int32)
    pred[:, 2:] = 2  # two halves of a nucleus that fills the image: IoU 8/16 each
    assert np.allclose(iou_matrix(true, pred), [[0.5, 0.5]])


def test_iou_matrix_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        iou_matrix(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32))


# --- per-image DSB score -------------------------------------------------------------------------------------


def test_perfect_prediction_scores_one():
    true = square(top=0, left=0, size=5, label=1)
    square(top=10, left=10, size=5, label=2, out=true)
    pred = np.where(true > 0, 3 - true, 0)  # same nuclei, labels swapped
    assert score(true, pred) == 1.0


def test_empty_prediction_of_an_image_with_nuclei_scores_zero():
    assert score(square(), np.zeros((20, 20), np.int32)) == 0.0


def test_both_empty_scores_one():
    empty = np.zeros((20, 20), np.int32)
    assert score(empty, empty) == 1.0


def test_prediction_on_an_empty_image_scores_zero():
    assert score(np.zeros((20, 20), np.int32), square()) == 0.0


def test_nucleus_split_in_two_equal_halves_scores_zero():
    true = square()
    pred = square()
    pred[5:15, 10:15] = 2  # halves of 50 px: IoU exactly 0.5, not above any threshold
    m = match(true, pred)
    assert (m.n_true, m.n_pred) == (1, 2)
    for t in DSB_THRESHOLDS:
        assert m.counts(t) == (0, 2, 1)
    assert m.dsb_score() == 0.0


def test_nucleus_split_six_four():
    true = square()
    pred = square()
    pred[5:15, 11:15] = 2  # 60 px (IoU 0.6) and 40 px (IoU 0.4)
    m = match(true, pred)
    assert np.allclose(m.ious, [0.6])
    # thresholds 0.5, 0.55: TP 1, FP 1, FN 0 -> 1/2; thresholds 0.6 .. 0.95: TP 0, FP 2, FN 1 -> 0
    assert m.counts(0.5) == (1, 1, 0)
    assert m.counts(0.55) == (1, 1, 0)
    assert m.counts(0.6) == (0, 2, 1)
    assert m.dsb_score() == pytest.approx(2 * 0.5 / 10)


def test_two_nuclei_merged_into_one():
    true = np.zeros((20, 20), np.int32)
    true[5:15, 5:10] = 1  # 50 px
    true[5:15, 10:15] = 2  # 50 px
    pred = square()  # their union: IoU 0.5 with each
    m = match(true, pred)
    assert m.counts(0.5) == (0, 1, 2)
    assert m.dsb_score() == 0.0
    true[5:15, 10] = 1  # now 60 px and 40 px: IoU 0.6 with the first, 0.4 with the second
    m = match(true, pred)
    assert m.counts(0.5) == (1, 0, 1)
    assert m.dsb_score() == pytest.approx(0.1)


def test_shifted_square_counts_at_the_four_lowest_thresholds():
    # IoU 80/120 = 0.667 exceeds 0.5, 0.55, 0.6, 0.65 and no higher threshold: score 4/10
    m = match(square(), square(left=7))
    assert [m.counts(t)[0] for t in DSB_THRESHOLDS] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert m.dsb_score() == pytest.approx(0.4)


def test_non_consecutive_labels_score_like_consecutive_ones():
    true = square(top=0, left=0, size=5, label=3)
    square(top=10, left=10, size=5, label=7, out=true)
    pred = np.zeros_like(true)
    pred[true == 3] = 1
    pred[true == 7] = 2
    assert score(true, pred) == 1.0
    # one nucleus found, one missed: TP 1, FP 0, FN 1 at every threshold -> 1/2
    assert score(true, np.where(true == 7, 40, 0)) == pytest.approx(0.5)


def test_extra_false_positive():
    true = square(top=0, left=0, size=5)
    pred = true.copy()
    square(top=10, left=10, size=5, label=2, out=pred)
    assert match(true, pred).counts(0.9) == (1, 1, 0)
    assert score(true, pred) == pytest.approx(0.5)


# --- evaluate ------------------------------------------------------------------------------------------------


def test_evaluate_pools_counts_over_images():
    # image a: two nuclei, both found exactly -> TP 2, FP 0, FN 0, DSB 1
    true_a = square(top=0, left=0, size=5, label=1)
    square(top=10, left=10, size=5, label=2, out=true_a)
    # image b: one nucleus missed, one shifted (IoU 80/120), one false positive
    true_b = square((30, 30), top=0, left=0, size=10, label=1)
    square((30, 30), top=15, left=15, size=10, label=2, out=true_b)
    pred_b = square((30, 30), top=0, left=2, size=10, label=1)
    square((30, 30), top=26, left=0, size=4, label=2, out=pred_b)
    report = evaluate([("a", true_a, true_a.copy()), ("b", true_b, pred_b)])
    # at 0.5: TP 2 + 1 = 3, FP 0 + 1 = 1, FN 0 + 1 = 1; at 0.75: TP 2 + 0, FP 0 + 2, FN 0 + 2
    assert report.ap50 == pytest.approx(3 / 5)
    assert report.ap75 == pytest.approx(2 / 6)
    assert report.precision50 == pytest.approx(3 / 4)
    assert report.recall50 == pytest.approx(3 / 4)
    assert report.f1_50 == pytest.approx(3 / 4)
    # image b: TP 1 (FP 1, FN 1) -> 1/3 at 0.5..0.65, TP 0 (FP 2, FN 2) -> 0 above: DSB 4/3/10
    assert report.per_image == pytest.approx({"a": 1.0, "b": 4 / 30})
    assert report.dsb_score == pytest.approx((1.0 + 4 / 30) / 2)
    assert report.mean_matched_iou == pytest.approx((1.0 + 1.0 + 80 / 120) / 3)
    assert (report.n_images, report.n_true, report.n_pred) == (2, 4, 4)


def test_evaluate_precision_recall_f1_differ():
    # three true nuclei, two found exactly, no false positives: precision 1, recall 2/3, F1 0.8
    true = square((30, 30), top=0, left=0, size=5, label=1)
    square((30, 30), top=10, left=10, size=5, label=2, out=true)
    square((30, 30), top=20, left=20, size=5, label=3, out=true)
    pred = np.where(true == 3, 0, true)
    report = evaluate([("x", true, pred)])
    assert report.precision50 == 1.0
    assert report.recall50 == pytest.approx(2 / 3)
    assert report.f1_50 == pytest.approx(0.8)
    assert report.ap50 == pytest.approx(2 / 3)
    assert report.dsb_score == pytest.approx(2 / 3)


def test_evaluate_of_empty_images_is_perfect():
    empty = np.zeros((10, 10), np.int32)
    report = evaluate([("e", empty, empty)])
    assert report.dsb_score == 1.0
    assert report.ap50 == 1.0
    assert report.ap75 == 1.0
    assert report.mean_matched_iou == 0.0
    assert (report.n_true, report.n_pred) == (0, 0)


def test_evaluate_of_an_empty_prediction():
    report = evaluate([("x", square(), np.zeros((20, 20), np.int32))])
    assert report.dsb_score == 0.0
    assert report.ap50 == 0.0
    assert report.recall50 == 0.0
    assert report.f1_50 == 0.0


def test_evaluate_of_an_empty_list_raises():
    with pytest.raises(ValueError, match="no images"):
        evaluate([])


def test_report_as_dict_and_table():
    report = evaluate([("x", square(), square())])
    assert "per_image" not in report.as_dict()
    assert report.as_dict(per_image=True)["per_image"] == {"x": 1.0}
    assert "DSB score" in report.table()


# --- real masks ----------------------------------------------------------------------------------------------


def test_real_ground_truth_against_itself_is_perfect(real_labels):
    report = evaluate((name, labels, labels.copy()) for name, labels in real_labels.items())
    for key in ("dsb_score", "ap50", "ap75", "precision50", "recall50", "f1_50", "mean_matched_iou"):
        assert getattr(report, key) == pytest.approx(1.0), key
    assert report.n_true == report.n_pred == sum(len(np.unique(lab)) - 1 for lab in real_labels.values())


def test_real_ground_truth_with_one_nucleus_removed(real_labels):
    pairs = []
    for name, labels in real_labels.items():
        removed = int(np.unique(labels)[1])  # smallest nonzero label
        pairs.append((name, labels, np.where(labels == removed, 0, labels)))
    report = evaluate(pairs)
    n_true = sum(len(np.unique(lab)) - 1 for lab in real_labels.values())
    assert report.precision50 == 1.0
    assert report.recall50 < 1.0
    assert report.recall50 == pytest.approx((n_true - 3) / n_true)
    assert report.n_pred == n_true - 3
    assert report.dsb_score < 1.0
