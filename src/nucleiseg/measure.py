"""Per-nucleus measurements as table rows (one dict per nucleus)."""

from __future__ import annotations

import csv
import os

import numpy as np
from skimage.measure import regionprops_table

from nucleiseg.io import atomic_path

# output column -> regionprops property column
COLUMNS = {
    "label": "label",
    "area": "area",
    "centroid_y": "centroid-0",
    "centroid_x": "centroid-1",
    "bbox_min_y": "bbox-0",
    "bbox_min_x": "bbox-1",
    "bbox_max_y": "bbox-2",
    "bbox_max_x": "bbox-3",
    "equivalent_diameter": "equivalent_diameter_area",
    "eccentricity": "eccentricity",
    "solidity": "solidity",
}
INTENSITIES = {"mean_intensity": "intensity_mean", "max_intensity": "intensity_max"}
PROPERTIES = ("label", "area", "centroid", "bbox", "equivalent_diameter_area", "eccentricity", "solidity",
              *INTENSITIES.values())
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
        Columns named as in COLUMNS (in pixels), then the micrometre columns, then intensities named by
        channel (``mean_intensity_gray``, or ``mean_intensity_red`` ... ``max_intensity_blue`` for a colour
        image); bounding boxes are half-open [min, max).
    """
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    intensity, names = measurement_channels(image)
    table = regionprops_table(labels, intensity_image=intensity, properties=PROPERTIES)
    columns = {name: np.asarray(table[key]) for name, key in COLUMNS.items()}
    if pixel_size is not None:
        columns["area_um2"] = columns["area"] * (pixel_size[0] * pixel_size[1])
        columns["equivalent_diameter_um"] = np.sqrt(4 * columns["area_um2"] / np.pi)
    for name, key in INTENSITIES.items():
        for i, channel in enumerate(names):
            columns[f"{name}_{channel}"] = np.asarray(table[key if len(names) == 1 else f"{key}-{i}"])
    return columns


def write_table(path: str | os.PathLike, columns: dict[str, np.ndarray | list]) -> None:
    """Write equal-length columns as a CSV file, atomically; floats with 4 decimals."""
    names = list(columns)
    rows = zip(*(columns[n] for n in names), strict=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for row in rows:
            writer.writerow([f"{v:.4f}" if isinstance(v, float | np.floating) else v for v in row])
