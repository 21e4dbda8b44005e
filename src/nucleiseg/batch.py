"""Segmenting many images: outputs per image, a summary, a failures list, and resuming after a stop.

For an image ``<name>`` the output folder gets the outputs asked for (``outputs.WRITERS``; by default
``<name>_labels.png``, ``<name>_overlay.png``, ``<name>_nuclei.csv``) and, written last,
``<name>.done.json``. Every file is written atomically, and an image counts as done only when its record
matches the input file's size and modification time and the hash of the run's settings (package version,
model weights, every inference setting, diameter, outputs and their options) and its outputs still exist;
a rerun of the same command skips it. ``summary.csv`` and ``failures.csv`` are rewritten at the end of
every run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from nucleiseg.io import ImageReadError, atomic_path
from nucleiseg.measure import write_table
from nucleiseg.outputs import DEFAULT_OUTPUTS, OutputOptions, check_outputs, write_outputs
from nucleiseg.segment import Segmentation, Segmenter

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


def settings_key(settings: dict) -> str:
    """Hash of the settings that determine an image's outputs, stored in its record."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def run_settings(segmenter: Segmenter, diameter: float | None, outputs: tuple[str, ...],
                 options: OutputOptions) -> dict:
    """Everything that determines a batch's outputs: the segmenter's settings, the diameter and the outputs."""
    return segmenter.settings() | {"diameter": diameter, "outputs": list(outputs), "options": asdict(options)}


def _finished(record_path: Path, path: Path, key: str) -> dict | None:
    """The summary row of an earlier run, if it finished this very input file with the same settings."""
    try:
        record = json.loads(record_path.read_text())
        same = record["input"] == _input_stamp(path) and record["key"] == key
        complete = all((record_path.parent / name).exists() for name in record["outputs"])
        return record["summary"] if same and complete else None
    except (OSError, ValueError, KeyError):
        return None


def summary_row(name: str, path: Path, result: Segmentation) -> dict:
    """One row of summary.csv."""
    areas = np.bincount(result.labels.ravel())[1:]
    areas = areas[areas > 0]
    return {
        "image": name,
        "nuclei": int(len(areas)),
        "median_area": float(np.median(areas)) if len(areas) else 0.0,
        "diameter": round(result.diameter, 3),
        "diameter_estimated": result.diameter_estimated,
        "scale": round(result.scale, 4),
        "path": str(path),
    }


def segment_batch(
    inputs: list[Path],
    out_dir: str | os.PathLike,
    segmenter: Segmenter,
    diameter: float | None = None,
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
    options: OutputOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
    names: list[str] | None = None,
    tables: bool = True,
) -> BatchResult:
    """Segment every path of ``inputs`` into ``out_dir``; a bad file is logged and listed, never fatal.

    Parameters
    ----------
    inputs : list of Path
        Image files.
    out_dir : path
        Output folder, created if needed.
    segmenter : Segmenter
        Its settings (``Segmenter.config``) include the largest image accepted.
    diameter : float, optional
        Nucleus diameter in pixels for every image; estimated per image when not given.
    outputs : tuple of str
        Names of ``outputs.WRITERS`` to write per image.
    options : OutputOptions, optional
        Label image format and other writer choices.
    overwrite : bool
        Redo images an earlier run finished.
    progress : bool
        Show a progress bar.
    names : list of str, optional
        Output name per input; by default ``output_names(inputs)``. A part of a larger batch (``cluster``)
        passes the names given in the whole batch.
    tables : bool
        Write summary.csv and failures.csv at the end; a part of a larger batch leaves them to the caller.
    """
    outputs, options = check_outputs(outputs), options or OutputOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = BatchResult()
    names = output_names(inputs) if names is None else names
    settings = run_settings(segmenter, diameter, outputs, options)
    key = settings_key(settings)
    with logging_redirect_tqdm():  # error lines are printed whole, not mixed into the progress bar
        for path, name in tqdm(list(zip(inputs, names, strict=True)), desc="segmenting", unit="img",
                               disable=not progress):
            record_path = out_dir / f"{name}.done.json"
            try:
                previous = None if overwrite else _finished(record_path, path, key)
                if previous is not None:
                    result.done.append(previous)
                    result.skipped += 1
                    continue
                segmentation = segmenter.segment_file(path, diameter)
                written = write_outputs(segmentation, out_dir / name, outputs, options)
                summary = summary_row(name, path, segmentation)
                log.debug("%s: %s", path, ", ".join(f"{k} {v:.2f} s" for k, v in segmentation.timings.items()))
                del segmentation  # the image and labels are not needed while the record is written
                record = {"input": _input_stamp(path), "key": key, "settings": settings, "outputs": written,
                          "summary": summary}
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
    if tables:
        write_tables(out_dir, result)
    return result


def write_tables(out_dir: Path, result: BatchResult) -> None:
    """Write summary.csv (one row per done image) and failures.csv (removed when nothing failed)."""
    write_table(out_dir / "summary.csv", {k: [row[k] for row in result.done] for k in SUMMARY_FIELDS})
    failures_path = out_dir / "failures.csv"
    if result.failed:
        write_table(failures_path, {"path": [p for p, _ in result.failed], "reason": [r for _, r in result.failed]})
    else:
        failures_path.unlink(missing_ok=True)

