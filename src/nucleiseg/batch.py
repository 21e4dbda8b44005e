"""Segmenting many images: outputs per image, a summary, a failures list, and resuming after a stop.

For an image ``<name>`` the output folder gets ``<name>_labels.png`` (16-bit labels, or .tif),
``<name>_overlay.png``, ``<name>_nuclei.csv`` and, written last, ``<name>.done.json``. Every file is written
atomically, so an image counts as done only when its record exists and matches the input file's size and
modification time; a rerun of the same command skips it. ``summary.csv`` and ``failures.csv`` are
rewritten at the end of every run from those records.
"""

from __future__ import annotations

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


def output_names(paths: list[Path]) -> list[str]:
    """A distinct output name per input: the file stem, with the parent folder's name where stems repeat."""
    stems = Counter(p.stem for p in paths)
    names = [p.stem if stems[p.stem] == 1 else f"{p.parent.name}_{p.stem}" for p in paths]
    repeats = Counter(names)
    return [n if repeats[n] == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _input_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _finished(record_path: Path, path: Path) -> dict | None:
    """The summary row of an earlier run, if it finished this very input file."""
    try:
        record = json.loads(record_path.read_text())
        return record["summary"] if record["input"] == _input_stamp(path) else None
    except (OSError, ValueError, KeyError):
        return None


def segment_one(segmenter, path: Path, name: str, out_dir: Path, diameter: float | None, label_suffix: str,
                max_megapixels: float) -> dict:
    """Segment one file and write its outputs; raises ImageReadError for unusable files."""
    from nucleiseg.viz import overlay, save_png

    image = read_image(path, max_megapixels)
    gray = to_gray(image)
    low, high = float(gray.min()), float(gray.max())
    if low == high:
        raise ImageReadError(f"{path}: image is blank (every pixel is {low:g})")
    result = segmenter.segment(image, diameter=diameter)
    del image
    write_labels(out_dir / f"{name}_labels{label_suffix}", result.labels)
    save_png(out_dir / f"{name}_overlay.png", overlay(gray, result.labels))
    table = measure_nuclei(result.labels, gray)
    write_table(out_dir / f"{name}_nuclei.csv", table)
    areas = table["area"]
    return {
        "image": name,
        "nuclei": int(len(areas)),
        "median_area": float(np.median(areas)) if len(areas) else 0.0,
        "diameter": round(result.diameter, 3),
        "diameter_estimated": diameter is None,
        "scale": round(result.scale, 4),
        "path": str(path),
    }


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
    with logging_redirect_tqdm():  # error lines are printed whole, not mixed into the progress bar
        for path, name in tqdm(list(zip(inputs, names, strict=True)), desc="segmenting", unit="img",
                               disable=not progress):
            record_path = out_dir / f"{name}.done.json"
            try:
                previous = None if overwrite else _finished(record_path, path)
                if previous is not None:
                    result.done.append(previous)
                    result.skipped += 1
                    continue
                summary = segment_one(segmenter, path, name, out_dir, diameter, f".{label_format}", max_megapixels)
                with atomic_path(record_path) as tmp:
                    tmp.write_text(json.dumps({"input": _input_stamp(path), "summary": summary}))
                result.done.append(summary)
            except ImageReadError as exc:
                result.failed.append((str(path), str(exc)))
                log.error("%s", exc)
            except (MemoryError, ValueError, OSError, RuntimeError) as exc:
                message = f"{path}: segmentation failed ({type(exc).__name__}: {exc})"
                result.failed.append((str(path), message))
                log.error("%s", message)
    write_table(out_dir / "summary.csv", {k: [row[k] for row in result.done] for k in SUMMARY_FIELDS})
    failures_path = out_dir / "failures.csv"
    if result.failed:
        write_table(failures_path, {"path": [p for p, _ in result.failed], "reason": [r for _, r in result.failed]})
    else:
        failures_path.unlink(missing_ok=True)
    return result

