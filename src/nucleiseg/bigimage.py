"""Images larger than memory (zarr, OME-Zarr, large TIFF) segmented block by block into a zarr label array.

The image is cut into ``block`` x ``block`` cores. Each core is segmented with a margin of ``overlap``
pixels of image around it; a nucleus belongs to the one block whose core holds its centre (as StarDist's
``predict_instances_big`` does). The network's outputs of a block are those of the whole image: the block
is predicted with the tiles of one image-wide tile grid that reach it, with the whole image's blending
weights (``predict.predict_region``), reading the image as far as those tiles go. The margin must hold the
network's context (``InferenceConfig.overlap``, in the network's pixels, brought to the image's) plus the
largest nucleus, so that post-processing sees every kept nucleus whole, with the surroundings the whole
image gives it. ``check_overlap`` refuses a smaller margin before anything runs, and a nucleus that
reaches into the context band anyway (larger than ``MAX_NUCLEUS`` x the diameter) is an error that says
which overlap to use.

Two passes over the blocks (dask tasks; on a ``distributed.Client`` when given): the first writes the
kept nuclei of each block, numbered 1..n, to a scratch zarr array (one chunk per block); the second
numbers them globally (block offsets) and pastes them into the output chunks, a pixel claimed by two
nuclei going to the earlier block, as ``postprocess._blockwise`` does. The output is written next to its
final path and moved there at the end.

Normalisation (``data.prepare_input``) needs image-wide percentiles: they are taken on the whole image up
to ``SAMPLE_PIXELS`` (8192 x 8192), so the labels are those of a single-process run, and beyond that on a
regular subsample of about that many pixels; then applied to every block.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import tifffile
import zarr
from scipy import ndimage as ndi

from nucleiseg.data import BRIGHT_BACKGROUND, STAIN, haematoxylin, input_kind
from nucleiseg.io import ImageReadError, to_gray, to_rgb_uint8
from nucleiseg.postprocess import instances
from nucleiseg.segment import ESTIMATE_CROP, Segmenter

BLOCK = 2048  # core side: with the margin, a block stays under postprocess.BLOCK + 2 x overlap
MAX_NUCLEUS = 3.0  # the largest nucleus the margin must hold, in median diameters
SAMPLE_PIXELS = 8192**2  # normalisation percentiles are taken on at most this many pixels


def open_large(path: str | os.PathLike) -> zarr.Array:
    """A lazy (H, W) or (H, W, C) view of a zarr array, the full-resolution level of an OME-Zarr image, or
    a TIFF (through tifffile's zarr store)."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            node = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
        else:
            node = zarr.open(path, mode="r")
        if isinstance(node, zarr.Group):  # OME-Zarr (0.4: attrs; 0.5: under "ome"), or tifffile's levels
            attrs = node.attrs.asdict()
            multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
            node = node[multiscales[0]["datasets"][0]["path"] if multiscales else "0"]
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable zarr, OME-Zarr or TIFF image ({exc})") from None
    shape, squeezed = node.shape, _plane_shape(node)
    if len(squeezed) == 3 and squeezed[0] <= 4 < squeezed[-1]:
        raise ImageReadError(f"{path}: channels come first {shape}; nucleiseg reads (Y, X) or (Y, X, C) arrays")
    if len(squeezed) not in (2, 3) or (len(squeezed) == 3 and squeezed[-1] > 4):
        raise ImageReadError(f"{path}: shape {shape} is not one (Y, X) or (Y, X, C<=4) plane")
    return node


def _plane_shape(array: zarr.Array) -> tuple[int, ...]:
    """(H, W) or (H, W, C): the shape without leading singleton axes (OME-Zarr's t, c, z)."""
    return tuple(s for s in array.shape if s != 1)


def _plane(array: zarr.Array, ys: slice, xs: slice) -> np.ndarray:
    """Pixels ``ys, xs`` of the one plane of ``array``."""
    lead = array.ndim - len(_plane_shape(array))
    return np.asarray(array[(0,) * lead + (ys, xs)])


class _Normalised:
    """A lazy (H, W) view of the normalised image: slicing reads and normalises those pixels only."""

    def __init__(self, array: zarr.Array, normalise: Normalisation):
        self.array, self.normalise = array, normalise
        self.shape = _plane_shape(array)[:2]

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return self.normalise(_plane(self.array, *key))


@dataclass(frozen=True)
class Normalisation:
    """``data.prepare_input`` with percentiles fixed on the whole image, applicable to any block."""

    kind: str
    low: float
    high: float

    @classmethod
    def of(cls, image: np.ndarray) -> Normalisation:
        kind = input_kind(image)
        if kind == STAIN and image.dtype != np.uint8:
            raise ValueError("block-wise segmentation of colour stains needs 8-bit RGB")
        low, high = (float(v) for v in np.percentile(cls._signal(image, kind), (1.0, 99.8)))
        return cls(kind, low, high)

    @staticmethod
    def _signal(image: np.ndarray, kind: str) -> np.ndarray:
        return haematoxylin(to_rgb_uint8(image)) if kind == STAIN else to_gray(image)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = (self._signal(image, self.kind) - self.low) / max(self.high - self.low, 1e-6)
        if self.kind == BRIGHT_BACKGROUND:
            x = 1.0 - x
        return np.clip(x, 0.0, 1.0).astype(np.float32)


def context(segmenter: Segmenter, scale: float) -> int:
    """Image pixels around a pixel that its prediction depends on: the tiling overlap of the settings,
    which is in the network's pixels."""
    return math.ceil(segmenter.config.overlap / scale)


def check_overlap(overlap: int, block: int, segmenter: Segmenter, diameter: float, scale: float) -> None:
    """Refuse an ``overlap`` that cannot hold the network's context plus the largest nucleus."""
    needed = context(segmenter, scale) + math.ceil(MAX_NUCLEUS * diameter)
    if overlap < needed:
        raise ValueError(f"overlap {overlap} px is below the network's context ({context(segmenter, scale)} px) "
                         f"plus the largest nucleus ({MAX_NUCLEUS:g} x {diameter:.0f} px); use at least {needed}")
    if overlap > block:
        raise ValueError(f"overlap ({overlap}) must not exceed the block size ({block})")


@dataclass
class LargeResult:
    """What ``segment_large`` wrote."""

    path: Path  # the zarr label array: (H, W) int32, 0 = background, nuclei 1..N
    nuclei: int
    diameter: float
    scale: float
    blocks: tuple[int, int]


def segment_large(
    source: str | os.PathLike,
    out: str | os.PathLike,
    segmenter: Segmenter,
    diameter: float | None = None,
    block: int = BLOCK,
    overlap: int | None = None,
    client=None,
) -> LargeResult:
    """Segment an image block by block with dask and write its labels to the zarr array ``out``.

    Parameters
    ----------
    source : path
        Zarr array, OME-Zarr image or TIFF; (Y, X) or (Y, X, C), read a block at a time.
    out : path
        The zarr label array to write, (Y, X) int32 in chunks of ``block``; replaced if it exists.
    segmenter : Segmenter
        From a model folder or name when ``client`` is given (it travels pickled, see ``cluster``).
    diameter : float, optional
        Median nucleus diameter in pixels; estimated on the central crop when not given.
    block : int
        Side of the core each task owns.
    overlap : int, optional
        Margin of image around each core; by default the least that ``check_overlap`` accepts.
    client : distributed.Client, optional
        Run the blocks on this cluster; by default one after another in this process.
    """
    from nucleiseg.cluster import segmenter_spec

    source, out = Path(source).resolve(), Path(out).resolve()
    image = open_large(source)
    h, w = _plane_shape(image)[:2]
    step = max(1, math.ceil(math.sqrt(h * w / SAMPLE_PIXELS)))
    normalise = Normalisation.of(_plane(image, slice(None, None, step), slice(None, None, step)))
    if diameter is None:
        top, left = max(0, (h - ESTIMATE_CROP) // 2), max(0, (w - ESTIMATE_CROP) // 2)
        crop = normalise(_plane(image, slice(top, top + ESTIMATE_CROP), slice(left, left + ESTIMATE_CROP)))
        diameter, scale, _ = segmenter.estimate_diameter(crop)
        diameter = diameter or segmenter.target_diameter
    elif not diameter > 0:
        raise ValueError(f"diameter must be a positive number of pixels, got {diameter}")
    else:
        scale = segmenter.segmentation_scale(diameter)
    if overlap is None:
        overlap = context(segmenter, scale) + math.ceil(MAX_NUCLEUS * diameter)
    check_overlap(overlap, block, segmenter, diameter, scale)

    grid = (math.ceil(h / block), math.ceil(w / block))
    side = block + 2 * overlap
    partial = out.with_name(f".{out.name}.partial")
    scratch = out.with_name(f".{out.name}.blocks")
    for folder in (partial, scratch):
        shutil.rmtree(folder, ignore_errors=True)
    zarr.create_array(scratch, shape=grid + (side, side), chunks=(1, 1, side, side), dtype="int32",
                             fill_value=0)
    labels = zarr.create_array(partial, shape=(h, w), chunks=(block, block), dtype="int32", fill_value=0)
    spec = segmenter_spec(segmenter) if client is not None else None
    plan = _Plan(source, scratch, partial, (h, w), block, overlap, diameter, scale, context(segmenter, scale),
                 normalise, spec)
    cells = [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    if client is None:
        counts = [plan.first_pass(cell, segmenter) for cell in cells]
    else:
        counts = client.gather(client.map(plan.first_pass, cells, pure=False))
    reach = max(r for _, r in counts)
    if reach > overlap - plan.context:
        raise ValueError(f"a nucleus reaches {reach} px beyond its block, into the network's context; "
                         f"rerun with overlap >= {reach + plan.context}")
    offsets = np.cumsum([0] + [n for n, _ in counts])
    plan.offsets = {cell: int(o) for cell, o in zip(cells, offsets[:-1], strict=True)}
    tasks = [dask.delayed(plan.second_pass)(cell) for cell in cells]
    present = dask.compute(*tasks, scheduler=client if client is not None else "synchronous")
    total = int(offsets[-1])
    found = np.unique(np.concatenate([np.zeros(0, np.int32), *present]))
    if len(found) < total:  # nuclei wholly covered by earlier blocks' ones: renumber the rest 1..N
        lut = np.zeros(total + 1, np.int32)
        lut[found] = np.arange(1, len(found) + 1, dtype=np.int32)
        for i, j in cells:
            region = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            labels[region] = lut[labels[region]]
    shutil.rmtree(scratch)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return LargeResult(out, len(found), float(diameter), float(scale), grid)


@dataclass
class _Plan:
    """The two passes of ``segment_large``, picklable so that workers run them."""

    source: Path
    scratch: Path
    out: Path
    shape: tuple[int, int]
    block: int
    overlap: int
    diameter: float
    scale: float
    context: int
    normalise: Normalisation
    spec: bytes | None
    offsets: dict | None = None

    def first_pass(self, cell: tuple[int, int], segmenter: Segmenter | None = None) -> tuple[int, int]:
        """Segment block ``cell`` with its margin; keep the nuclei centred in its core, numbered 1..n.
        Returns n and how far the kept nuclei reach beyond the core, where the margin is not the image's
        edge."""
        from nucleiseg.cluster import worker_segmenter

        segmenter = segmenter or worker_segmenter(self.spec)
        (h, w), b, m = self.shape, self.block, self.overlap
        y, x = cell[0] * b, cell[1] * b
        y0, x0, y1, x1 = max(0, y - m), max(0, x - m), min(h, y + b + m), min(w, x + b + m)
        view = _Normalised(open_large(self.source), self.normalise)
        probabilities = segmenter.probabilities(view, self.scale, (y0, y1, x0, x1))
        found = instances(probabilities, segmenter.config.thresholds_for(self.normalise.kind == STAIN), self.diameter)
        kept = np.zeros((b + 2 * m, b + 2 * m), np.int32)
        count, reach = 0, 0
        for index, box in enumerate(ndi.find_objects(found), start=1):
            if box is None:
                continue
            mask = found[box] == index
            cy, cx = (np.mean(axis) for axis in np.nonzero(mask))
            if not (y <= cy + box[0].start + y0 < y + b and x <= cx + box[1].start + x0 < x + b):
                continue
            count += 1
            top, left = box[0].start + y0, box[1].start + x0
            bottom, right = box[0].stop + y0, box[1].stop + x0
            beyond = ((y - top, y0 > 0), (bottom - y - b, y1 < h), (x - left, x0 > 0), (right - x - b, x1 < w))
            reach = max([reach] + [d for d, inside in beyond if inside])  # the image's edge needs no margin
            target = kept[top - y + m : bottom - y + m, left - x + m : right - x + m]
            target[mask] = count
        zarr.open_array(self.scratch, mode="r+")[cell] = kept
        return count, reach

    def second_pass(self, cell: tuple[int, int]) -> np.ndarray:
        """Write the output chunk of ``cell`` from the kept nuclei of it and its neighbours; return the
        labels it holds."""
        (h, w), b, m = self.shape, self.block, self.overlap
        y, x = cell[0] * b, cell[1] * b
        hy, hx = min(b, h - y), min(b, w - x)
        canvas = np.zeros((hy, hx), np.int32)
        kept = zarr.open_array(self.scratch, mode="r")
        for i in (cell[0] - 1, cell[0], cell[0] + 1):  # raster order: an earlier block wins a shared pixel
            for j in (cell[1] - 1, cell[1], cell[1] + 1):
                if not (0 <= i < kept.shape[0] and 0 <= j < kept.shape[1]):
                    continue
                # the owner's array starts at (i * b - m, j * b - m) in the image
                dy, dx = y - (i * b - m), x - (j * b - m)
                if dy >= b + 2 * m or dx >= b + 2 * m or dy + hy <= 0 or dx + hx <= 0:
                    continue
                theirs = np.zeros((hy, hx), np.int32)
                sy, sx = slice(max(0, dy), min(b + 2 * m, dy + hy)), slice(max(0, dx), min(b + 2 * m, dx + hx))
                theirs[sy.start - dy : sy.stop - dy, sx.start - dx : sx.stop - dx] = kept[i, j, sy, sx]
                free = (theirs > 0) & (canvas == 0)
                canvas[free] = theirs[free] + self.offsets[(i, j)]
        zarr.open_array(self.out, mode="r+")[y : y + hy, x : x + hx] = canvas
        return np.unique(canvas[canvas > 0])
