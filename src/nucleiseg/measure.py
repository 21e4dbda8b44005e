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
    "mean_intensity": "intensity_mean",
    "max_intensity": "intensity_max",
}
PROPERTIES = ("label", "area", "centroid", "bbox", "equivalent_diameter_area", "eccentricity", "solidity",
              "intensity_mean", "intensity_max")


def measure_nuclei(labels: np.ndarray, intensity: np.ndarray) -> dict[str, np.ndarray]:
    """Measure every nucleus of (H, W) ``labels`` on the (H, W) ``intensity`` image (the gray image in
    its own units). Returns columns named as in COLUMNS; bounding boxes are half-open [min, max)."""
    if labels.shape != intensity.shape:
        raise ValueError(f"labels {labels.shape} and intensity {intensity.shape} differ in shape")
    table = regionprops_table(labels, intensity_image=intensity, properties=PROPERTIES)
    return {name: np.asarray(table[key]) for name, key in COLUMNS.items()}


def write_table(path: str | os.PathLike, columns: dict[str, np.ndarray | list]) -> None:
    """Write equal-length columns as a CSV file, atomically; floats with 4 decimals."""
    names = list(columns)
    rows = zip(*(columns[n] for n in names), strict=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for row in rows:
            writer.writerow([f"{v:.4f}" if isinstance(v, float | np.floating) else v for v in row])
