"""Segmenting many images: outputs per image, a summary, a failures list, and resuming after a stop.

For an image ``<name>`` the output folder gets ``<name>_labels.png`` (16-bit labels; .tif when asked for or
when there are more than 65535 nuclei), ``<name>_overlay.png``, ``<name>_nuclei.csv`` and, written last,
``<name>.done.json``. Every file is written atomically, and an image counts as done only when its record
matches the input file's size and modification time and the run's settings (model weights, thresholds,
diameter, label format, TTA, tiling) and its outputs still exist; a rerun of the same command skips it.
``summary.csv`` and ``failures.csv`` are rewritten at the end of every run.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from nucleiseg.io import ImageReadError, atomic_path, read_image, to_gray, write_labels
from nucleiseg.measure import measure_nuclei, write_table

log = logging.getLogger(__name__)

SUMMARY_FIELDS = ["image", "nuclei", "median_area", "diameter", "diameter_estimated", "scale", "path"]


@dataclass
class BatchResult:
    done: list[dict] = field(default_factory=list)  # summary rows, in input order
    skipped: int = 0  # already done by an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def release_freed_memory() -> None:
    """Give the heap memory freed by the last image back to the OS. glibc keeps it otherwise, and over
    thousands of images of varied sizes the resident memory of a batch keeps growing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def output_names(paths: list[Path]) -> list[str]:
    """A distinct output name per input: the file stem, with the parent folder's name where stems repeat."""
    stems = Counter(p.stem for p in paths)
    names = [p.stem if stems[p.stem] == 1 else f"{p.parent.name}_{p.stem}" for p in paths]
    repeats = Counter(names)
    return [n if repeats[n] == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _input_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _finished(record_path: Path, path: Path, settings: dict) -> dict | None:
    """The summary row of an earlier run, if it finished this very input file with the same settings."""
    try:
        record = json.loads(record_path.read_text())
        same = record["input"] == _input_stamp(path) and record["settings"] == settings
        complete = all((record_path.parent / name).exists() for name in record["outputs"])
        return record["summary"] if same and complete else None
    except (OSError, ValueError, KeyError):
        return None


def segment_one(segmenter, path: Path, name: str, out_dir: Path, diameter: float | None, label_format: str,
                max_megapixels: float) -> tuple[dict, list[str]]:
    """Segment one file and write its outputs; returns its summary row and output file names.
    Raises ImageReadError for unusable files."""
    from nucleiseg.viz import overlay, save_png

    gray = to_gray(read_image(path, max_megapixels))  # the segmenter works on gray: no need to keep colour
    low, high = float(gray.min()), float(gray.max())
    if low == high:
        raise ImageReadError(f"{path}: image is blank (every pixel is {low:g})")
    result = segmenter.segment(gray, diameter=diameter)
    if label_format == "png" and result.labels.max() > 65535:
        log.warning("%s: %d nuclei do not fit a 16-bit PNG; labels written as TIFF", path, result.labels.max())
        label_format = "tif"
    outputs = [f"{name}_labels.{label_format}", f"{name}_overlay.png", f"{name}_nuclei.csv"]
    write_labels(out_dir / outputs[0], result.labels)
    save_png(out_dir / outputs[1], overlay(gray, result.labels))
    table = measure_nuclei(result.labels, gray)
    write_table(out_dir / outputs[2], table)
    areas = table["area"]
    summary = {
        "image": name,
        "nuclei": int(len(areas)),
        "median_area": float(np.median(areas)) if len(areas) else 0.0,
        "diameter": round(result.diameter, 3),
        "diameter_estimated": diameter is None and result.diameter_known,
        "scale": round(result.scale, 4),
        "path": str(path),
    }
    return summary, outputs


def segment_batch(
    inputs: list[Path],
    out_dir: str | os.PathLike,
    segmenter,
    diameter: float | None = None,
    label_format: str = "png",
    overwrite: bool = False,
    max_megapixels: float = 150.0,
    progress: bool = True,
) -> BatchResult:
    """Segment every path of ``inputs`` into ``out_dir``; a bad file is logged and listed, never fatal."""
    if label_format not in ("png", "tif"):
        raise ValueError(f"label_format must be 'png' or 'tif', not {label_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = BatchResult()
    names = output_names(inputs)
    settings = segmenter.settings() | {"diameter": diameter, "format": label_format}
    with logging_redirect_tqdm():  # error lines are printed whole, not mixed into the progress bar
        for path, name in tqdm(list(zip(inputs, names, strict=True)), desc="segmenting", unit="img",
                               disable=not progress):
            record_path = out_dir / f"{name}.done.json"
            try:
                previous = None if overwrite else _finished(record_path, path, settings)
                if previous is not None:
                    result.done.append(previous)
                    result.skipped += 1
                    continue
                summary, outputs = segment_one(segmenter, path, name, out_dir, diameter, label_format, max_megapixels)
                record = {"input": _input_stamp(path), "settings": settings, "outputs": outputs, "summary": summary}
                with atomic_path(record_path) as tmp:
                    tmp.write_text(json.dumps(record))
                result.done.append(summary)
            except ImageReadError as exc:
                result.failed.append((str(path), str(exc)))
                log.error("%s", exc)
            except Exception as exc:  # any failure of one image must leave the rest of the batch running
                message = f"{path}: segmentation failed ({type(exc).__name__}: {exc})"
                result.failed.append((str(path), message))
                log.error("%s", message)
            release_freed_memory()  # after a segmented or failed image; skipped ones freed nothing
    write_table(out_dir / "summary.csv", {k: [row[k] for row in result.done] for k in SUMMARY_FIELDS})
    failures_path = out_dir / "failures.csv"
    if result.failed:
        write_table(failures_path, {"path": [p for p, _ in result.failed], "reason": [r for _, r in result.failed]})
    else:
        failures_path.unlink(missing_ok=True)
    return result

