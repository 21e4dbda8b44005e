"""Per-nucleus measurements as table rows (one dict per nucleus)."""

from __future__ import annotations

import csv
import os

import numpy as np
import shapely
from scipy import ndimage as ndi

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
    equivalent_diameter_area, eccentricity, solidity, intensity_mean, intensity_max), computed for every
    nucleus at once (regionprops computes them nucleus by nucleus in Python, which cost more than writing the
    outputs; its convex hulls most of all).

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
        "solidity": area / convex_areas(labels, present),
    }
    if pixel_size is not None:
        columns["area_um2"] = columns["area"] * (pixel_size[0] * pixel_size[1])
        columns["equivalent_diameter_um"] = np.sqrt(4 * columns["area_um2"] / np.pi)
    values = intensity[inside].reshape(len(owner), len(names))
    for i, channel in enumerate(names):
        columns[f"mean_intensity_{channel}"] = per_nucleus(values[:, i].astype(float))
    highest = label_maximum(owner, values, len(counts))
    for i, channel in enumerate(names):
        columns[f"max_intensity_{channel}"] = highest[present, i]
    return columns


def label_maximum(owner: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """The largest of the (N, ...) ``values`` of each label of ``owner`` (N labels in 0..size-1), as (size, ...);
    the type's lowest value for a label without any. By sorting on the label: ``np.maximum.at`` took ten times
    as long on the values of real images."""
    order = np.argsort(owner, kind="stable")
    owner, values = owner[order], values[order]
    highest = np.full((size, *values.shape[1:]), _lowest(values.dtype), values.dtype)
    if len(owner):
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        highest[owner[starts]] = np.maximum.reduceat(values, starts, axis=0)
    return highest


# the offsets of a pixel's edge midpoints from its centre: skimage's convex hull of a region is that of the
# midpoints of its pixels' edges (``skimage.morphology.convex_hull_image``)
EDGE_MIDPOINTS = np.array([[0, -0.5], [0, 0.5], [-0.5, 0], [0.5, 0]])


def convex_areas(labels: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The convex area of each nucleus in ``present`` (sorted labels of ``labels``), as regionprops'
    ``area_convex`` counts it: the pixels whose centres lie in or on the convex hull of the nucleus' pixel
    edges. All nuclei at once: shapely's hulls, then the pixels each hull spans on each row."""
    if not len(present):
        return np.zeros(0)
    # a corner of a nucleus' hull is its first or last pixel both on its row and on its column
    padded = np.pad(labels, 1)
    middle = padded[1:-1, 1:-1]
    ends = ((middle > 0) & ((middle != padded[1:-1, :-2]) | (middle != padded[1:-1, 2:]))
            & ((middle != padded[:-2, 1:-1]) | (middle != padded[2:, 1:-1])))
    rows, cols = np.nonzero(ends)
    index = np.searchsorted(present, labels[rows, cols])
    centres = _hulls(np.stack([cols, rows], axis=1).astype(float), index)
    # the hull of the pixels' edge midpoints is that of the corners of the centres' hull, each moved by each offset
    corners, owner = shapely.get_coordinates(centres, return_index=True)
    points = (corners[:, None, :] + EDGE_MIDPOINTS).reshape(-1, 2)
    corners, owner = shapely.get_coordinates(_hulls(points, np.repeat(owner, len(EDGE_MIDPOINTS))), return_index=True)
    edge = owner[:-1] == owner[1:]  # each ring is closed, so consecutive corners of one hull are its edges
    (x0, y0), (x1, y1), owner = corners[:-1][edge].T, corners[1:][edge].T, owner[:-1][edge]
    # where each edge that is not horizontal crosses each pixel row (centres at integer rows, ends included):
    # the two ends of the hull on every row it spans (a horizontal edge's ends are those of its neighbours)
    eps = 1e-9  # points on the hull count as inside
    first = np.ceil(np.minimum(y0, y1) - eps).astype(int)
    crossed = np.where(y0 != y1, np.floor(np.maximum(y0, y1) + eps).astype(int) - first + 1, 0)
    which = np.repeat(np.arange(len(x0)), crossed)
    row = first[which] + np.arange(len(which)) - np.repeat(np.cumsum(crossed) - crossed, crossed)
    x = x0[which] + (row - y0[which]) * (x1[which] - x0[which]) / (y1[which] - y0[which])
    hull = owner[which]
    order = np.argsort(hull * (labels.shape[0] + 1) + row, kind="stable")
    hull, row, x = hull[order], row[order], x[order]
    starts = np.flatnonzero(np.r_[True, (hull[1:] != hull[:-1]) | (row[1:] != row[:-1])])
    left, right = np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)
    pixels = np.floor(right + eps) - np.ceil(left - eps) + 1
    return np.bincount(hull[starts], weights=pixels, minlength=len(present))


def _hulls(points: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """The convex hull of the (x, y) ``points`` of each ``owner`` 0..N-1 (each owns at least one point). As the
    hulls of lines through the points, which shapely makes from the coordinates at once: from points it makes
    each point a geometry first, at ten times the cost."""
    order = np.argsort(owner, kind="stable")
    points, owner = points[order], owner[order]
    first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    # a line needs two points: each owner's first point twice
    return shapely.convex_hull(shapely.linestrings(np.insert(points, first, points[first], axis=0),
                                                   indices=np.insert(owner, first, owner[first])))


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
