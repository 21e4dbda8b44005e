"""Per-nucleus measurements as table rows (one dict per nucleus)."""

from __future__ import annotations

import csv
import os

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import regionprops_table

from nucleiseg.io import atomic_path

CHANNEL_NAMES = {1: ("gray",), 3: ("red", "green", "blue")}


def measurement_channels(image: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """(H, W[, C]) image -> the (H, W[, C']) intensities measured and their channel names: gray stays gray,
    colour is measured per channel (alpha dropped), in the image's own units."""
    if image.ndim == 2:
        return image, CHANNEL_NAMES[1]
    channels = image[..., :3] if image.shape[2] >= 3 else image[..., 0]
    return channels, CHANNEL_NAMES[1 if channels.ndim == 2 else 3]


def measure_nuclei(labels: np.ndarray, image: np.ndarray,
                   pixel_size: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    """Measure every nucleus of (H, W) ``labels`` on the (H, W[, C]) ``image`` as read.

    The values are those of ``skimage.measure.regionprops`` (area, centroid, bbox,
    equivalent_diameter_area, eccentricity, solidity, intensity_mean, intensity_max); all but the solidity
    are computed for every nucleus at once from sums over the pixels (regionprops computes them nucleus by
    nucleus in Python, which cost more than writing the outputs).

    Parameters
    ----------
    labels : (H, W) ndarray of int
        0 = background.
    image : (H, W) or (H, W, C) ndarray
        The image as read.
    pixel_size : (float, float), optional
        (y, x) micrometres per pixel; when given, ``area_um2`` and ``equivalent_diameter_um`` follow the
        pixel columns.

    Returns
    -------
    dict of str to ndarray
        ``label``, ``area``, ``centroid_y/x``, ``bbox_min_y/x``, ``bbox_max_y/x`` (half-open [min, max)),
        ``equivalent_diameter``, ``eccentricity``, ``solidity`` (in pixels), then the micrometre columns,
        then intensities named by channel (``mean_intensity_gray``, or ``mean_intensity_red`` ...
        ``max_intensity_blue`` for a colour image).
    """
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    intensity, names = measurement_channels(image)
    inside = labels > 0
    owner = labels[inside].astype(np.intp)
    rows, cols = np.nonzero(inside)
    counts = np.bincount(owner)
    present = np.flatnonzero(counts)
    present = present[present > 0]
    area = counts[present].astype(float)

    def per_nucleus(values: np.ndarray) -> np.ndarray:
        return np.bincount(owner, weights=values, minlength=len(counts))[present] / area

    cy, cx = per_nucleus(rows), per_nucleus(cols)
    # second central moments -> the eigenvalues of the inertia tensor, as regionprops' eccentricity takes them
    var_y = np.maximum(per_nucleus(rows.astype(float) ** 2) - cy**2, 0)
    var_x = np.maximum(per_nucleus(cols.astype(float) ** 2) - cx**2, 0)
    cov = per_nucleus(rows.astype(float) * cols) - cy * cx
    spread = np.sqrt(((var_y - var_x) / 2) ** 2 + cov**2)
    major, minor = (var_y + var_x) / 2 + spread, np.maximum((var_y + var_x) / 2 - spread, 0)
    eccentricity = np.sqrt(1 - np.divide(minor, major, out=np.ones_like(major), where=major > 0))
    boxes = ndi.find_objects(labels)
    columns = {
        "label": present,
        "area": area,
        "centroid_y": cy,
        "centroid_x": cx,
        "bbox_min_y": np.array([boxes[i - 1][0].start for i in present], int),
        "bbox_min_x": np.array([boxes[i - 1][1].start for i in present], int),
        "bbox_max_y": np.array([boxes[i - 1][0].stop for i in present], int),
        "bbox_max_x": np.array([boxes[i - 1][1].stop for i in present], int),
        "equivalent_diameter": np.sqrt(4 * area / np.pi),
        "eccentricity": eccentricity,
        "solidity": np.asarray(regionprops_table(labels, properties=("solidity",))["solidity"], float),
    }
    if pixel_size is not None:
        columns["area_um2"] = columns["area"] * (pixel_size[0] * pixel_size[1])
        columns["equivalent_diameter_um"] = np.sqrt(4 * columns["area_um2"] / np.pi)
    values = intensity[inside].reshape(len(owner), len(names))
    highest = np.full((len(counts), len(names)), _lowest(values.dtype), values.dtype)
    np.maximum.at(highest, owner, values)
    for i, channel in enumerate(names):
        columns[f"mean_intensity_{channel}"] = per_nucleus(values[:, i].astype(float))
    for i, channel in enumerate(names):
        columns[f"max_intensity_{channel}"] = highest[present, i]
    return columns


def _lowest(dtype: np.dtype):
    return np.iinfo(dtype).min if np.issubdtype(dtype, np.integer) else -np.inf if dtype.kind == "f" else False


def write_table(path: str | os.PathLike, columns: dict[str, np.ndarray | list]) -> None:
    """Write equal-length columns as a CSV file, atomically; floats with 4 decimals."""
    names = list(columns)
    rows = zip(*(columns[n] for n in names), strict=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for row in rows:
            writer.writerow([f"{v:.4f}" if isinstance(v, float | np.floating) else v for v in row])
