"""Training targets from instance labels: foreground and a per-nucleus normalised centre distance.

The distance map is 1 at the centre of every nucleus and falls to 0 at its border, also where two
nuclei touch, so thresholding it gives one seed per nucleus whatever the nucleus size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def foreground(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W) float32, 1 inside any nucleus."""
    return (labels > 0).astype(np.float32)


def centre_distance(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W) float32 in [0, 1]: each pixel's distance to its nucleus border,
    divided by the largest such distance inside that nucleus. Background is 0."""
    out = np.zeros(labels.shape, np.float32)
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == index
        # pad by one pixel so that the border of the crop counts as outside
        dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        out[box][mask] = dist[mask] / dist.max()
    return out


def median_diameter(labels: np.ndarray) -> float:
    """Median equivalent diameter (diameter of the disc of equal area) of the nuclei; 0 if there are none."""
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    return float(np.median(np.sqrt(4 * areas / np.pi))) if areas.size else 0.0


def nucleus_diameters(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W) float32: the equivalent diameter of each pixel's nucleus, 0 on background."""
    areas = np.bincount(labels.ravel()).astype(np.float32)
    diameters = np.sqrt(4 * areas / np.pi)
    diameters[0] = 0
    return diameters[labels]


def make_targets(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (2, H, W) float32: foreground, centre distance."""
    return np.stack([foreground(labels), centre_distance(labels)])
