"""Label images as polygons: the outline of each nucleus along its pixels' edges.

Coordinates are full-resolution pixel coordinates (x, y) of pixel corners: pixel (row r, column c) is the
square [c, c+1] x [r, r+1]. This is the convention of ImageJ's traced ROIs and of QuPath, so an outline
filled back on the pixel grid (a pixel is inside when its centre is) gives exactly the nucleus' pixels,
including one-pixel-wide nuclei and nuclei on the image border.
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient


def nucleus_outlines(labels: np.ndarray) -> dict[int, Polygon | MultiPolygon]:
    """The outline of every nucleus of a label image.

    Parameters
    ----------
    labels : (H, W) ndarray of int
        0 = background, 1..N = nuclei.

    Returns
    -------
    dict of int to Polygon or MultiPolygon
        One valid geometry per label present, in label order: a Polygon (with holes where the nucleus has
        them), or a MultiPolygon for a nucleus in several pieces (never split into several entries).
        Exteriors run counter-clockwise and holes clockwise (in x right, y down coordinates: the
        orientation ``shapely.geometry.polygon.orient`` gives), collinear vertices are dropped.
    """
    outlines = {}
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == label
        # each run of pixels in a row is one rectangle; their union is the nucleus, holes and pieces kept
        edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
        rows, starts = np.nonzero(edges == 1)
        _, ends = np.nonzero(edges == -1)
        y0, x0 = box[0].start, box[1].start
        runs = shapely.box(x0 + starts, y0 + rows, x0 + ends, y0 + rows + 1)
        outline = shapely.union_all(runs).simplify(0)
        if isinstance(outline, MultiPolygon):
            outline = MultiPolygon([orient(part) for part in outline.geoms])
        else:
            outline = orient(outline)
        outlines[label] = outline
    return outlines


def polygons(outline: Polygon | MultiPolygon) -> list[Polygon]:
    """The pieces of an outline, each a Polygon."""
    return list(outline.geoms) if isinstance(outline, MultiPolygon) else [outline]
