"""Probability maps -> instance labels: markers from the centre map, marker-controlled watershed."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label
from skimage.segmentation import watershed

from nucleiseg.config import TARGET_DIAMETER, PostprocessConfig

BLOCK = 2048  # images larger than this (per side) are post-processed in blocks to bound memory
FRAGMENT_FRACTION = 0.25  # objects under this share of a disc of the diameter that touch others are merged


def instances(
    probabilities: np.ndarray, thresholds: PostprocessConfig, diameter: float = TARGET_DIAMETER, block: int = BLOCK
) -> np.ndarray:
    """(K, H, W) probabilities, K >= 2 (foreground, centre, then any others) -> (H, W) int32 labels 1..N.

    Markers are the connected regions where the centre map exceeds ``marker_threshold``; each grows by
    watershed on the inverted centre map inside the foreground, and a foreground region that holds no
    marker becomes one object. Objects under ``FRAGMENT_FRACTION`` of a disc of ``diameter`` that touch larger
    ones are merged into them, objects smaller than ``min_area_fraction`` of it are removed and holes are
    filled (``clean``).

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
    disc = np.pi * diameter**2 / 4
    return clean(labels, thresholds.min_area_fraction * disc, FRAGMENT_FRACTION * disc)


def merge_fragments(labels: np.ndarray, max_area: float) -> np.ndarray:
    """Give each object under ``max_area`` pixels that touches larger ones to the larger one it shares the
    longest border with: a lobe of a large nucleus whose centre map has two peaks, not a nucleus of its own."""
    area = np.bincount(labels.ravel())
    small = (area > 0) & (area < max_area)
    small[0] = False
    if not small.any():
        return labels
    in_small = small[labels]
    pairs = []
    for here, there in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1], np.s_[1:])):
        near = in_small[here] | in_small[there]  # side-by-side pixels where one is a small object's
        a, b = labels[here][near], labels[there][near]
        touch = (a != b) & (a > 0) & (b > 0)
        pairs += [np.stack([a[touch], b[touch]]), np.stack([b[touch], a[touch]])]
    pairs = np.concatenate(pairs, axis=1)
    # into a larger neighbour only, so that chains of merges end and no two fragments swap
    pairs = pairs[:, small[pairs[0]] & (area[pairs[1]] > area[pairs[0]])]
    if not pairs.size:
        return labels
    (fragment, neighbour), border = np.unique(pairs, axis=1, return_counts=True)
    # the longest border first, then the larger neighbour: the first row of each fragment is its target
    order = np.lexsort((-area[neighbour], -border, fragment))
    fragment, neighbour = fragment[order], neighbour[order]
    first = np.r_[True, fragment[1:] != fragment[:-1]]
    target = np.arange(len(area))
    target[fragment[first]] = neighbour[first]
    while (target[target] != target).any():  # a fragment merged into a larger fragment follows it
        target = target[target]
    return target.astype(labels.dtype)[labels]


def clean(labels: np.ndarray, min_area: float, fragment_area: float = 0.0) -> np.ndarray:
    """Keep the largest connected piece of each object, merge the objects under ``fragment_area`` pixels into
    a larger one they touch (``merge_fragments``; after the pieces, so that a fragment joins a piece that
    stays), drop objects under ``min_area`` pixels, fill the holes that one object encloses (an object inside
    another's hole stays an object), relabel 1..N in the order of the labels. All objects at once."""
    labels = largest_pieces(labels)
    if fragment_area > 0:
        labels = merge_fragments(labels, fragment_area)
    area = np.bincount(labels.ravel())
    keep = (area > 0) & (area >= min_area)
    keep[0] = False
    labels = _fill_enclosed(np.where(keep[labels], labels, 0))
    relabel = np.zeros(len(keep), np.int32)
    relabel[keep] = np.arange(1, np.count_nonzero(keep) + 1)
    return relabel[labels]


def largest_pieces(labels: np.ndarray) -> np.ndarray:
    """Keep the largest connected piece of each object (the first of equal ones): watershed can leave
    detached fragments."""
    pieces, n_pieces = label(labels, connectivity=1, return_num=True)
    if n_pieces == np.count_nonzero(np.bincount(labels.ravel())[1:]):  # one piece each
        return labels
    owner = np.zeros(n_pieces + 1, np.int64)
    owner[pieces.ravel()] = labels.ravel()
    size = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
    order = np.lexsort((np.arange(n_pieces + 1), -size, owner))
    largest = np.zeros(n_pieces + 1, bool)
    largest[order[np.r_[True, owner[order][1:] != owner[order][:-1]]]] = True
    largest[0] = False
    return np.where(largest[pieces], labels, 0)


def _fill_enclosed(labels: np.ndarray) -> np.ndarray:
    """Give each background region that touches no image edge and borders one object only to that object
    (``ndi.binary_fill_holes`` on each object; a region bordered by several objects stays background)."""
    inside = labels > 0
    background, n_regions = ndi.label(~inside)
    enclosed = np.ones(n_regions + 1, bool)
    enclosed[0] = False
    enclosed[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
    if not enclosed.any():  # every background region reaches the image's edge: no hole anywhere
        return labels
    # (region, object) for every pair of side-by-side pixels, a pixel of an enclosed region beside one of an
    # object, both ways: the holes' rims only, not every object's outline
    hole = enclosed[background]
    region, neighbour = [], []
    for here, there in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:, 1:], np.s_[:, :-1]),
                        (np.s_[:-1], np.s_[1:]), (np.s_[1:], np.s_[:-1])):
        pair = hole[here] & inside[there]
        region.append(background[here][pair])
        neighbour.append(labels[there][pair])
    region, neighbour = np.concatenate(region), np.concatenate(neighbour)
    # of the labels' own type: ufunc.at is many times slower where it has to convert
    lowest = np.full(n_regions + 1, np.iinfo(labels.dtype).max, labels.dtype)
    highest = np.zeros(n_regions + 1, labels.dtype)
    np.minimum.at(lowest, region, neighbour)
    np.maximum.at(highest, region, neighbour)
    enclosed &= lowest == highest
    filled = labels.copy()
    regions = background[hole]
    filled[hole] = np.where(enclosed[regions], highest[regions], 0)
    return filled
