"""Writing a segmentation: one writer per kind of output, selected by name (``--outputs labels,overlay,csv``).

A writer is a function ``(result, base, options) -> file name`` that writes one file, atomically, next to
``base`` (the output folder joined with the image's output name). Adding a kind of output is one function
plus one line in ``WRITERS``.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nucleiseg.io import atomic_path, write_labels, write_ome_labels
from nucleiseg.measure import measure_nuclei, write_table
from nucleiseg.shapes import nucleus_outlines, polygons

if TYPE_CHECKING:
    from nucleiseg.segment import Segmentation

log = logging.getLogger(__name__)

LABEL_FORMATS = ("png", "tif")  # png: 16-bit, up to 65535 nuclei; tif: 32-bit
LABELS_SUFFIX = "_labels"
PNG_MAX_LABEL = 65535


@dataclass(frozen=True)
class OutputOptions:
    """Choices that change what the writers write (part of the resume record)."""

    label_format: str = "png"
    # micrometres per pixel for every image, overriding the pixel size of the image files (None: theirs)
    pixel_size: float | None = None

    def __post_init__(self):
        if self.label_format not in LABEL_FORMATS:
            raise ValueError(f"label format must be one of {LABEL_FORMATS}, not {self.label_format!r}")
        if self.pixel_size is not None and not (math.isfinite(self.pixel_size) and self.pixel_size > 0):
            raise ValueError(f"pixel size must be a positive number of micrometres, not {self.pixel_size}")


def pixel_size(result: Segmentation, options: OutputOptions) -> tuple[float, float] | None:
    """(y, x) micrometres per pixel: as given in ``options``, else from the image file, else None."""
    if options.pixel_size is not None:
        return (options.pixel_size, options.pixel_size)
    return result.metadata.pixel_size


def labels_name(name: str, label_format: str) -> str:
    """File name of the label image of the image called ``name``."""
    return f"{name}{LABELS_SUFFIX}.{label_format}"


def find_labels(folder: Path, name: str) -> Path | None:
    """The label image of ``name`` in ``folder``: as ``write_label_image`` names it, or plain ``<name>.<format>``."""
    candidates = [folder / file for fmt in LABEL_FORMATS for file in (f"{name}.{fmt}", labels_name(name, fmt))]
    return next((path for path in candidates if path.exists()), None)


def write_label_image(result: Segmentation, base: Path, options: OutputOptions) -> str:
    """(H, W) labels, 0 = background; a TIFF where a PNG cannot hold the number of nuclei."""
    label_format = options.label_format
    if label_format == "png" and result.labels.max(initial=0) > PNG_MAX_LABEL:
        log.warning("%s: %d nuclei do not fit a 16-bit PNG; labels written as TIFF", result.metadata.path,
                    result.labels.max())
        label_format = "tif"
    name = labels_name(base.name, label_format)
    write_labels(base.parent / name, result.labels)
    return name


def write_overlay(result: Segmentation, base: Path, options: OutputOptions) -> str:
    """The image as read (colour stays colour), every nucleus outlined in its own colour."""
    from nucleiseg.viz import overlay, save_png

    name = f"{base.name}_overlay.png"
    save_png(base.parent / name, overlay(result.image, result.labels))
    return name


def nucleus_measurements(result: Segmentation, options: OutputOptions) -> dict[str, np.ndarray]:
    """The per-nucleus columns of the CSV (and of the GeoJSON's measurements)."""
    return measure_nuclei(result.labels, result.image, pixel_size(result, options))


def write_nuclei_table(result: Segmentation, base: Path, options: OutputOptions) -> str:
    """One row per nucleus: shape measurements (also in µm when the pixel size is known) and intensities per
    channel (``measure.measure_nuclei``)."""
    name = f"{base.name}_nuclei.csv"
    write_table(base.parent / name, nucleus_measurements(result, options))
    return name


def write_ome_tiff(result: Segmentation, base: Path, options: OutputOptions) -> str:
    """The label image as OME-TIFF, with the physical pixel size when known (Fiji/Bio-Formats, QuPath, napari)."""
    name = f"{base.name}{LABELS_SUFFIX}.ome.tif"
    write_ome_labels(base.parent / name, result.labels, pixel_size(result, options))
    return name


def write_imagej_rois(result: Segmentation, base: Path, options: OutputOptions) -> str:
    """An ImageJ/Fiji ROI set (open with the ROI Manager): one ROI per nucleus, named by its label.

    A nucleus of one piece without holes is a traced polygon ROI, as Fiji's wand gives; one with holes or in
    several pieces is one composite ROI, so the ROI always covers exactly the nucleus' pixels.
    """
    import roifile

    name = f"{base.name}_rois.zip"
    outlines = nucleus_outlines(result.labels)
    digits = len(str(max(outlines, default=0)))
    rois = []
    for label, outline in outlines.items():
        pieces = polygons(outline)
        if len(pieces) == 1 and not pieces[0].interiors:
            roi = roifile.ImagejRoi.frompoints(np.asarray(pieces[0].exterior.coords[:-1], np.int32))
            roi.roitype = roifile.ROI_TYPE.TRACED
        else:  # ImageJ's ShapeRoi: a rectangle type with a path of closed rings (MOVETO, LINETO..., CLOSE)
            roi = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT)
            path = []
            for ring in (r for piece in pieces for r in (piece.exterior, *piece.interiors)):
                (x, y), *rest = ring.coords[:-1]
                path += [0, x, y] + [v for xy in rest for v in (1, *xy)] + [4]
            roi.multi_coordinates = np.asarray(path, np.float32)
            roi.shape_roi_size = len(path)
            left, top, right, bottom = (int(v) for v in outline.bounds)
            roi.left, roi.top, roi.right, roi.bottom = left, top, right, bottom
        roi.name = f"{label:0{digits}d}"
        rois.append(roi)
    with atomic_path(base.parent / name) as tmp:
        tmp.unlink()  # roiwrite appends to an existing zip
        if rois:
            roifile.roiwrite(tmp, rois)
        else:  # an image without nuclei: an empty zip, so the file list is the same for every image
            zipfile.ZipFile(tmp, "w").close()
    return name


def write_geojson(result: Segmentation, base: Path, options: OutputOptions) -> str:
    """A GeoJSON FeatureCollection for QuPath (File > Import objects): one detection per nucleus, its outline
    in full-resolution pixel coordinates (a Polygon, or a MultiPolygon for a nucleus in pieces) and the CSV's
    measurements."""
    from shapely.geometry import mapping

    name = f"{base.name}_nuclei.geojson"
    columns = nucleus_measurements(result, options)
    rows = {int(label): i for i, label in enumerate(columns["label"])}
    features = []
    for label, outline in nucleus_outlines(result.labels).items():
        measurements = {key: values[rows[label]].item() for key, values in columns.items()}
        features.append({
            "type": "Feature",
            "geometry": mapping(outline),
            "properties": {"objectType": "detection", "name": str(label), "measurements": measurements},
        })
    with atomic_path(base.parent / name) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return name


WRITERS: dict[str, Callable[[Segmentation, Path, OutputOptions], str]] = {
    "labels": write_label_image,
    "overlay": write_overlay,
    "csv": write_nuclei_table,
    "rois": write_imagej_rois,
    "geojson": write_geojson,
    "ome-tiff": write_ome_tiff,
}
DEFAULT_OUTPUTS = ("labels", "overlay", "csv")


def check_outputs(outputs: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate output names; raise ValueError naming the known ones."""
    unknown = [o for o in outputs if o not in WRITERS]
    if unknown or not outputs:
        raise ValueError(f"unknown outputs {unknown}; choose among {', '.join(WRITERS)}")
    return tuple(outputs)


def write_outputs(result: Segmentation, base: Path, outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
                  options: OutputOptions | None = None) -> list[str]:
    """Write each of ``outputs`` for ``result`` next to ``base``; returns the file names written."""
    options = options or OutputOptions()
    return [WRITERS[output](result, base, options) for output in check_outputs(outputs)]
