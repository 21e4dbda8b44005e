"""Run-length encoding in the Data Science Bowl submission format.

Pixels are numbered from 1, top to bottom and then left to right (column-major), and a mask is written
as 'start length start length ...'. A submission CSV has the header ``ImageId,EncodedPixels`` and one
row per nucleus; an image without nuclei gets one row with empty EncodedPixels.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from nucleiseg.io import atomic_path


def encode(mask: np.ndarray) -> str:
    """(H, W) binary mask -> 'start length ...' string (empty for an empty mask)."""
    pixels = np.concatenate([[0], np.asarray(mask, bool).ravel(order="F"), [0]]).astype(np.int8)
    edges = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends, strict=True))


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """'start length ...' string -> (H, W) bool mask. Raises ValueError for malformed or out-of-range runs."""
    values = rle.split()
    if len(values) % 2:
        raise ValueError(f"run-length string has an odd number of values: {rle[:60]!r}")
    flat = np.zeros(shape[0] * shape[1], bool)
    numbers = np.asarray(values, dtype=np.int64).reshape(-1, 2)
    for start, length in numbers:
        if start < 1 or length < 1 or start - 1 + length > flat.size:
            raise ValueError(f"run {start} {length} lies outside a {shape[0]}x{shape[1]} image")
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape(shape, order="F")


def encode_labels(labels: np.ndarray) -> list[str]:
    """(H, W) label image -> one run-length string per nucleus, in label order."""
    return [encode(labels == value) for value in np.unique(labels) if value != 0]


def write_submission(path: str | os.PathLike, items: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write (image id, label image) pairs as a submission CSV, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "EncodedPixels"])
        for image_id, labels in items:
            runs = encode_labels(labels)
            for rle in runs or [""]:
                writer.writerow([image_id, rle])


def read_submission(path: str | os.PathLike, shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Read a submission CSV into label images (one label per row), given each image's (H, W)."""
    labels: dict[str, np.ndarray] = {}
    counts: dict[str, int] = defaultdict(int)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or {"ImageId", "EncodedPixels"} - set(reader.fieldnames):
            raise ValueError(f"{path}: expected the header 'ImageId,EncodedPixels'")
        for row in reader:
            image_id = row["ImageId"]
            if image_id not in shapes:
                raise ValueError(f"{path}: image {image_id!r} is not in the reference folder")
            out = labels.setdefault(image_id, np.zeros(shapes[image_id], np.int32))
            if row["EncodedPixels"].strip():
                counts[image_id] += 1
                out[decode(row["EncodedPixels"], shapes[image_id]) & (out == 0)] = counts[image_id]
    return labels
