"""Validation score against training time: the snapshots a run took at fixed minutes of training.

    python benchmarks/learning_curve.py runs/default [--thresholds src/nucleiseg/models/default/thresholds.json]

Scores every model folder in RUN/snapshots/ and RUN/model (the best one) on the validation split with the
full pipeline (estimated diameters), all with the same post-processing thresholds, and prints a table.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from nucleiseg.config import PostprocessConfig, TrainConfig, load_json
from nucleiseg.data import load_split
from nucleiseg.metrics import score
from nucleiseg.segment import Segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--thresholds", type=Path, help="thresholds.json to use for every snapshot")
    args = parser.parse_args()

    cfg = load_json(TrainConfig, args.run / "config.json")
    _, val = load_split(cfg, progress=False)
    thresholds = load_json(PostprocessConfig, args.thresholds) if args.thresholds else None
    folders = sorted((args.run / "snapshots").glob("*min"), key=lambda p: float(p.name[:-3]))
    with open(args.run / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    print(f"{len(val)} validation images; run {args.run}: {history[-1]['epoch']} epochs, "
          f"{float(history[-1]['minutes']):.0f} minutes of training")
    print("| model | DSB score | AP@0.5 | AP@0.75 | F1@0.5 |\n|---|---|---|---|---|")
    for folder in folders + [args.run / "model"]:
        report = score(Segmenter(folder, thresholds=thresholds), val)
        name = f"after {folder.name}" if folder.parent.name == "snapshots" else "best checkpoint"
        print(f"| {name} | {report.dsb_score:.3f} | {report.ap50:.3f} | {report.ap75:.3f} | {report.f1_50:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
