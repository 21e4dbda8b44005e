"""Writing a segmentation: one writer per kind of output, selected by name (``--outputs labels,overlay,csv``).

A writer is a function ``(result, base, options) -> file name`` that writes one file, atomically, next to
``base`` (the output folder joined with the image's output name). Adding a kind of output is one function
plus one line in ``WRITERS``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nucleiseg.io import write_labels
from nucleiseg.measure import measure_nuclei, write_table

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

    def __post_init__(self):
        if self.label_format not in LABEL_FORMATS:
            raise ValueError(f"label format must be one of {LABEL_FORMATS}, not {self.label_format!r}")


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


def write_nuclei_table(result: Segmentation, base: Path, options: OutputOptions) -> str:
    """One row per nucleus: shape measurements and intensities per channel (``measure.measure_nuclei``)."""
    name = f"{base.name}_nuclei.csv"
    write_table(base.parent / name, measure_nuclei(result.labels, result.image))
    return name


WRITERS: dict[str, Callable[[Segmentation, Path, OutputOptions], str]] = {
    "labels": write_label_image,
    "overlay": write_overlay,
    "csv": write_nuclei_table,
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
