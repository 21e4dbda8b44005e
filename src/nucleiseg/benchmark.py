"""Scoring a model on the user's labelled images: segment them as ``segment`` does, then compare.

The output folder gets everything ``segment`` writes (``batch.segment_batch``: outputs per image,
``summary.csv``) plus ``benchmark.csv`` (one row per image and a last row ``(all)``: DSB score, AP@0.5,
F1@0.5, true and predicted counts, matches, misses and false nuclei at IoU 0.5, estimated and true median
diameter), ``benchmark.json`` (the overall scores, as ``nucleiseg evaluate --json`` prints them) and
``worst.png`` (the images with the lowest DSB scores: image / truth / prediction, misses and false
nuclei tinted).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nucleiseg.batch import BatchResult, output_names, segment_batch
from nucleiseg.io import atomic_path, read_labels
from nucleiseg.labelled import LabelledImage
from nucleiseg.measure import write_table
from nucleiseg.metrics import Report, evaluate, match
from nucleiseg.outputs import OutputOptions, find_labels
from nucleiseg.segment import Segmenter
from nucleiseg.targets import median_diameter

log = logging.getLogger(__name__)


@dataclass
class BenchmarkResult:
    report: Report  # overall scores
    rows: list[dict]  # benchmark.csv, one row per image scored, in input order
    batch: BatchResult  # what segment_batch did


def image_row(name: str, true: np.ndarray, pred: np.ndarray, estimated: float) -> dict:
    """One row of benchmark.csv."""
    m = match(true, pred)
    tp, fp, fn = m.counts(0.5)
    ap50 = tp / (tp + fp + fn) if tp + fp + fn else 1.0  # no nucleus in either: nothing wrong, as dsb_score says
    return {"image": name, "dsb_score": round(m.dsb_score(), 4), "ap50": round(ap50, 4),
            "f1_50": round(2 * ap50 / (1 + ap50), 4), "true_nuclei": m.n_true, "nuclei": m.n_pred,
            "matched": tp, "missed": fn, "false": fp, "diameter": estimated,
            "true_diameter": round(median_diameter(true), 3)}


def benchmark(
    pairs: list[LabelledImage],
    out_dir: str | os.PathLike,
    segmenter: Segmenter,
    diameter: float | None = None,
    outputs: tuple[str, ...] = ("labels",),
    options: OutputOptions | None = None,
    overwrite: bool = False,
    worst: int = 4,
    progress: bool = True,
) -> BenchmarkResult:
    """Segment the images of ``pairs`` into ``out_dir`` with ``batch.segment_batch`` and score them.

    Parameters
    ----------
    pairs : list of LabelledImage
        Images and their labels (``labelled.pair_labels``).
    out_dir : path
        Output folder.
    segmenter : Segmenter
        The model and settings to segment with.
    diameter : float, optional
        Nucleus diameter for every image; estimated per image when not given.
    outputs : tuple of str
        Outputs per image (``outputs.WRITERS``); the label image is always written, it is what is scored.
    options : OutputOptions, optional
        Label image format.
    overwrite : bool
        Redo images an earlier run finished.
    worst : int
        Images in ``worst.png`` (0: no figure).
    progress : bool
        Show progress bars.

    Returns
    -------
    BenchmarkResult
        Images that failed to segment are in ``batch.failed`` and not scored.
    """
    from nucleiseg.viz import error_figure

    out_dir = Path(out_dir)
    options = options or OutputOptions()
    outputs = ("labels", *(o for o in outputs if o != "labels"))
    paths = [p.image for p in pairs]
    batch = segment_batch(paths, out_dir, segmenter, diameter, outputs, options, overwrite, progress)
    done = {row["path"]: row for row in batch.done}
    scored = []  # (name, sample, prediction, summary row)
    for pair, name in zip(pairs, output_names(paths), strict=True):
        if str(pair.image) in done:
            scored.append((name, pair.read(), read_labels(find_labels(out_dir, name)), done[str(pair.image)]))
    if not scored:
        raise ValueError(f"no image of {len(pairs)} could be segmented; see {out_dir / 'failures.csv'}")
    report = evaluate((name, sample.labels, pred) for name, sample, pred, _ in scored)
    rows = [image_row(name, sample.labels, pred, row["diameter"]) for name, sample, pred, row in scored]
    overall = {"image": "(all)", "dsb_score": round(report.dsb_score, 4), "ap50": round(report.ap50, 4),
               "f1_50": round(report.f1_50, 4), "true_nuclei": report.n_true, "nuclei": report.n_pred}
    overall |= {key: int(sum(r[key] for r in rows)) for key in ("matched", "missed", "false")}
    overall |= {key: round(float(np.median([r[key] for r in rows])), 3) for key in ("diameter", "true_diameter")}
    write_table(out_dir / "benchmark.csv", {key: [r[key] for r in [*rows, overall]] for key in overall})
    with atomic_path(out_dir / "benchmark.json") as tmp:
        tmp.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if worst:
        order = np.argsort([r["dsb_score"] for r in rows], kind="stable")[:worst]
        figure_rows = [(f"{scored[i][0][:24]}: DSB {rows[i]['dsb_score']:.3f}", scored[i][1].image, scored[i][1].labels,
                        scored[i][2]) for i in order]
        error_figure(figure_rows, out_dir / "worst.png")
    return BenchmarkResult(report, rows, batch)
