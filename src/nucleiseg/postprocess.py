"""Probability maps -> instance labels: markers from the centre map, marker-controlled watershed."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from nucleiseg.config import TARGET_DIAMETER, PostprocessConfig

BLOCK = 2048  # images larger than this (per side) are post-processed in blocks to bound memory


def instances(
    probabilities: np.ndarray, thresholds: PostprocessConfig, diameter: float = TARGET_DIAMETER, block: int = BLOCK
) -> np.ndarray:
    """(K, H, W) probabilities, K >= 2 (foreground, centre, then any others) -> (H, W) int32 labels 1..N.

    Markers are the connected regions where the centre map exceeds ``marker_threshold``; each grows by
    watershed on the inverted centre map inside the foreground, and a foreground region that holds no
    marker becomes one object. Objects smaller than
    ``min_area_fraction`` of a disc of ``diameter`` are removed and holes are filled.

    Above ``block`` pixels per side the image is processed in overlapping blocks (see ``_blockwise``).
    """
    if probabilities.ndim != 3 or probabilities.shape[0] < 2:
        raise ValueError(f"expected (K, H, W) probabilities with K >= 2, got shape {probabilities.shape}")
    probabilities = probabilities[:2]  # a size output, if any, is not needed here
    if max(probabilities.shape[1:]) > block:
        return _blockwise(probabilities, thresholds, diameter, block)
    return _instances(probabilities, thresholds, diameter)


def _blockwise(probabilities: np.ndarray, thresholds: PostprocessConfig, diameter: float, block: int) -> np.ndarray:
    """Post-process blocks with a margin and give each object to the one block whose core holds its
    centroid (as StarDist's predict_instances_big does). With a margin wider than any nucleus, every kept
    object is complete and equal to what the whole image would give."""
    h, w = probabilities.shape[1:]
    margin = int(max(64, 4 * diameter))
    out = np.zeros((h, w), np.int32)
    next_label = 1
    for y in range(0, h, block):
        for x in range(0, w, block):
            y0, x0 = max(0, y - margin), max(0, x - margin)
            y1, x1 = min(h, y + block + margin), min(w, x + block + margin)
            labels = _instances(probabilities[:, y0:y1, x0:x1], thresholds, diameter)
            for index, box in enumerate(ndi.find_objects(labels), start=1):
                if box is None:
                    continue
                mask = labels[box] == index
                cy, cx = (np.mean(axis) for axis in np.nonzero(mask))
                cy, cx = cy + box[0].start + y0, cx + box[1].start + x0
                if not (y <= cy < y + block and x <= cx < x + block):
                    continue
                target = out[box[0].start + y0 : box[0].stop + y0, box[1].start + x0 : box[1].stop + x0]
                free = mask & (target == 0)
                if free.any():
                    target[free] = next_label
                    next_label += 1
    return out


def _instances(probabilities: np.ndarray, thresholds: PostprocessConfig, diameter: float) -> np.ndarray:
    foreground, centre = probabilities[:2]
    mask = foreground > thresholds.foreground_threshold
    markers, n_markers = ndi.label((centre > thresholds.marker_threshold) & mask)
    labels = watershed(-centre, markers, mask=mask)
    # foreground regions without any marker (small or faint nuclei) are nuclei too, not background
    unmarked, _ = ndi.label(mask & (labels == 0))
    labels[unmarked > 0] = unmarked[unmarked > 0] + n_markers
    min_area = thresholds.min_area_fraction * np.pi * diameter**2 / 4
    return clean(labels, min_area)


def clean(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Drop objects under ``min_area`` pixels, fill holes, keep one connected piece per object, relabel 1..N."""
    out = np.zeros(labels.shape, np.int32)
    next_label = 1
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == index
        if mask.sum() < min_area:
            continue
        pieces, n = ndi.label(mask)
        if n > 1:  # watershed can leave detached fragments: keep the largest
            mask = pieces == np.argmax(np.bincount(pieces.ravel())[1:]) + 1
        free = ndi.binary_fill_holes(mask) & (out[box] == 0)
        if free.any():  # a nucleus inside another's filled hole has nothing left
            out[box][free] = next_label
            next_label += 1
    return out
