"""Tests of nucleiseg.rle: the competition's run-length convention, round trips and submission files."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from nucleiseg.rle import decode, encode, encode_labels, read_submission, write_submission


def consecutive(labels: np.ndarray) -> np.ndarray:
    """Relabel to 1..n in the order of the original labels (the images have background, so 0 stays 0)."""
    values, inverse = np.unique(labels, return_inverse=True)
    assert values[0] == 0
    return inverse.reshape(labels.shape)


# --- the convention ------------------------------------------------------------------------------------------


def test_column_major_one_indexed_runs():
    mask = np.zeros((3, 3), bool)
    mask[0, 0] = mask[1, 0] = True  # pixels 1 and 2 (down the first column)
    assert encode(mask) == "1 2"
    mask = np.zeros((3, 3), bool)
    mask[0, 1] = True  # top of the second column: pixel 4
    assert encode(mask) == "4 1"


def test_runs_continue_across_columns():
    mask = np.zeros((3, 3), bool)
    mask[2, 0] = mask[0, 1] = True  # pixels 3 and 4 form one run
    mask[2, 2] = True  # the last pixel, 9
    assert encode(mask) == "3 2 9 1"
    assert np.array_equal(decode("3 2 9 1", (3, 3)), mask)


def test_full_and_empty_masks():
    assert encode(np.ones((2, 3), bool)) == "1 6"
    assert encode(np.zeros((2, 3), bool)) == ""
    assert not decode("", (2, 3)).any()
    assert decode("", (2, 3)).shape == (2, 3)


def test_decode_of_a_non_square_image():
    mask = decode("2 1 5 2", (2, 3))  # column-major pixels 2, 5, 6 of a 2x3 image
    assert np.array_equal(mask, [[False, False, True], [True, False, True]])


def test_encode_accepts_label_values():
    labels = np.zeros((3, 3), np.uint16)
    labels[1:, 1] = 7
    assert encode(labels) == "5 2"


def test_encode_labels_in_label_order():
    labels = np.zeros((3, 3), np.int32)
    labels[0, 2] = 9
    labels[0, 0] = 4
    assert encode_labels(labels) == ["1 1", "7 1"]
    assert encode_labels(np.zeros((3, 3), np.int32)) == []


@pytest.mark.parametrize("rle", ["1", "1 2 3", "4 1 7"])
def test_decode_rejects_odd_counts(rle):
    with pytest.raises(ValueError, match="odd"):
        decode(rle, (3, 3))


@pytest.mark.parametrize("rle", ["0 1", "9 2", "10 1", "1 10", "3 0", "-1 2"])
def test_decode_rejects_out_of_range_runs(rle):
    with pytest.raises(ValueError, match="outside"):
        decode(rle, (3, 3))


def test_decode_rejects_non_numbers():
    with pytest.raises(ValueError):
        decode("1 a", (3, 3))


def test_round_trip_of_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((7, 5)) < 0.4
        assert np.array_equal(decode(encode(mask), mask.shape), mask)


# --- real nuclei ---------------------------------------------------------------------------------------------


def test_round_trip_of_every_real_nucleus(real_labels):
    n = 0
    for labels in real_labels.values():
        for value in np.unique(labels)[1:]:
            mask = labels == value
            rle = encode(mask)
            assert rle
            decoded = decode(rle, labels.shape)
            assert decoded.dtype == bool
            assert np.array_equal(decoded, mask)
            n += 1
    assert n == sum(len(np.unique(lab)) - 1 for lab in real_labels.values())


def test_submission_round_trip_on_real_labels(tmp_path, real_labels):
    path = tmp_path / "submission.csv"
    write_submission(path, real_labels.items())
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "EncodedPixels"]
    assert len(rows) - 1 == sum(len(np.unique(lab)) - 1 for lab in real_labels.values())
    back = read_submission(path, {name: lab.shape for name, lab in real_labels.items()})
    assert back.keys() == real_labels.keys()
    for name, labels in real_labels.items():
        assert np.array_equal(back[name], consecutive(labels))


def test_image_without_nuclei_gets_one_empty_row(tmp_path, real_labels):
    name, labels = next(iter(real_labels.items()))
    empty = np.zeros((12, 9), np.uint16)
    path = tmp_path / "sub.csv"
    write_submission(path, [("blank", empty), (name, labels)])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    blank_rows = [row for row in rows if row["ImageId"] == "blank"]
    assert blank_rows == [{"ImageId": "blank", "EncodedPixels": ""}]
    back = read_submission(path, {"blank": empty.shape, name: labels.shape})
    assert back["blank"].shape == (12, 9)
    assert not back["blank"].any()
    assert np.array_equal(back[name], consecutive(labels))


def test_read_submission_rejects_unknown_images_and_bad_headers(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("ImageId,EncodedPixels\nmystery,1 2\n")
    with pytest.raises(ValueError, match="mystery"):
        read_submission(path, {"other": (3, 3)})
    path.write_text("Id,Pixels\nx,1 2\n")
    with pytest.raises(ValueError, match="header"):
        read_submission(path, {"x": (3, 3)})


def test_write_submission_leaves_no_temporary_files(tmp_path):
    write_submission(tmp_path / "sub.csv", [("a", np.eye(3, dtype=np.int32))])
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]
    assert (tmp_path / "sub.csv").read_text().splitlines() == ["ImageId,EncodedPixels", "a,1 1 5 1 9 1"]
