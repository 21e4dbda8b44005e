"""A user's labelled images: pairing each image with its true nuclei, and reading them as label images.

Pairing rules, for an image file ``<stem>.<ext>`` and a labels folder LABELS (not the images' folder):

* a label image ``LABELS/<stem>.png|.tif|.tiff``, or with the suffix ``_labels`` (what ``segment`` writes)
  or ``_masks`` (Cellpose's naming) before the extension: 0 = background, one integer per nucleus;
* an ImageJ ROI zip ``LABELS/<stem>.zip`` or ``LABELS/<stem>_rois.zip`` (ROI Manager > More > Save),
  one polygon, freehand, traced, oval or rectangle ROI per nucleus;
* a folder of per-nucleus masks ``LABELS/<stem>/`` or ``LABELS/<stem>/masks/``: one binary image per nucleus.

Exactly one of these must exist for every image, and every label file or folder of LABELS must belong to
an image; otherwise one error lists every image without labels, with several, and every label left over.
A competition-layout folder (``<id>/images/<id>.png`` with ``<id>/masks/*.png``) pairs itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.draw import polygon

from nucleiseg.io import (
    IMAGE_SUFFIXES,
    Sample,
    find_images,
    is_dsb_layout,
    read_labels,
    read_masks,
    read_sample_image,
    stack_masks,
)

LABEL_SUFFIXES = ("", "_labels", "_masks")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff")
ROI_SUFFIXES = ("", "_rois")


@dataclass(frozen=True)
class LabelledImage:
    """An image file and its labels: a label image, an ImageJ ROI zip or a folder of per-nucleus masks."""

    image: Path
    labels: Path

    def read(self) -> Sample:
        """The image (RGB uint8 or gray) and its (H, W) label image; a mismatch in size names both files."""
        image = read_sample_image(self.image)
        return Sample(self.image.stem, image, read_truth(self.labels, image.shape[:2], self.image))


def _candidates(folder: Path, stem: str) -> list[Path]:
    files = [folder / f"{stem}{suffix}{ext}" for suffix in LABEL_SUFFIXES for ext in LABEL_EXTENSIONS]
    files += [folder / f"{stem}{suffix}.zip" for suffix in ROI_SUFFIXES]
    files += [folder / stem]
    return [path for path in files if path.is_file() or (path.is_dir() and _mask_files(path))]


def _mask_files(folder: Path) -> list[Path]:
    inner = folder / "masks" if (folder / "masks").is_dir() else folder
    return sorted(p for p in inner.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pair_labels(images: str | os.PathLike, labels: str | os.PathLike | None = None) -> list[LabelledImage]:
    """Pair every image with its labels by the rules of this module.

    Parameters
    ----------
    images : path
        A folder of images, one image file, or (with ``labels`` None) a competition-layout folder.
    labels : path, optional
        The folder holding the labels.

    Raises
    ------
    ValueError
        Listing every image without labels or with several, and every label file that matches no image.
    """
    images = Path(images)
    if labels is None:
        if not (images.is_dir() and is_dsb_layout(images)):
            raise ValueError(f"{images}: give the labels folder too, or a competition-layout folder "
                             "(<id>/images/<id>.png with <id>/masks/*.png)")
        pairs = [LabelledImage(p, p.parent.parent / "masks") for p in find_images([images])]
        missing = [str(p.image) for p in pairs if not (p.labels.is_dir() and _mask_files(p.labels))]
        if missing:
            raise ValueError(f"{len(missing)} images have no masks folder: {', '.join(missing)}")
        return pairs
    labels = Path(labels)
    if not labels.is_dir():
        raise FileNotFoundError(f"{labels}: no such labels folder")
    paths = find_images([images])
    if any(p.parent.resolve() == labels.resolve() for p in paths):
        raise ValueError(f"{labels}: keep the labels in a folder of their own, apart from the images")
    pairs, problems, used = [], [], set()
    for path in paths:
        if not path.is_file():
            problems.append(f"{path}: no such image file")
            continue
        found = _candidates(labels, path.stem)
        used.update(found)
        if len(found) == 1:
            pairs.append(LabelledImage(path, found[0]))
        elif found:
            problems.append(f"{path}: several labels ({', '.join(str(p) for p in found)}); keep one")
        else:
            problems.append(f"{path}: no labels in {labels} (looked for {path.stem}.png/.tif, "
                            f"{path.stem}_labels.*, {path.stem}_masks.*, {path.stem}.zip, {path.stem}/)")
    kinds = (*LABEL_EXTENSIONS, ".zip")
    leftover = sorted(p for p in labels.iterdir() if p not in used and (p.is_dir() or p.suffix.lower() in kinds))
    problems += [f"{p}: labels of no image in {images}" for p in leftover]
    if problems:
        raise ValueError("images and labels do not pair up:\n  " + "\n  ".join(problems))
    return pairs


def read_truth(path: str | os.PathLike, shape: tuple[int, int], image: str | os.PathLike = "") -> np.ndarray:
    """Read labels as a (H, W) label image: a label image file, an ImageJ ROI zip or a masks folder.

    ``shape`` is the image's; labels of another size raise ValueError naming ``path`` and ``image``.
    """
    path = Path(path)
    if path.is_dir():
        labels = read_masks(_mask_files(path), shape, str(path), overlap="warn")
    elif path.suffix.lower() == ".zip":
        labels = read_roi_zip(path, shape)
    else:
        labels = read_labels(path)
        labels = labels[..., 0] if labels.ndim == 3 else labels
    if labels.shape != tuple(shape):
        raise ValueError(f"{path}: labels are {labels.shape[0]}x{labels.shape[1]} pixels, but the image {image} "
                         f"is {shape[0]}x{shape[1]}")
    return labels


def read_roi_zip(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise the ROIs of an ImageJ ROI zip into a label image, one label per ROI in file order.

    ImageJ puts polygon vertices on pixel corners, so a pixel is inside when its centre is; pixels claimed
    by two ROIs go to neither (as with overlapping masks).
    """
    import roifile

    rois = roifile.roiread(path)
    rois = rois if isinstance(rois, list) else [rois]

    def masks():
        for index, roi in enumerate(rois, start=1):
            xy = roi.coordinates()
            if xy is None or len(xy) < 3:
                raise ValueError(f"{path}: ROI {roi.name or index} is not an area (a point or a line)")
            mask = np.zeros(shape, bool)
            rows, cols = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape)
            mask[rows, cols] = True
            yield roi.name or f"ROI {index}", mask

    return stack_masks(masks(), tuple(shape), str(path), overlap="warn")
