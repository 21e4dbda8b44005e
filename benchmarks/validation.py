"""Validation scores of the seed recipe and the full-resolution model, measured in one run.

    python benchmarks/validation.py [--model default] [--seed-run runs/seed] [--json out.json]

Trains the 128x128 seed recipe (or reuses the weights in --seed-run when they exist and --reuse-seed is
given), then scores both methods on the same validation split (config defaults: 10% of stage1_train,
stratified by image type, seed 0) and prints a Markdown table, overall and per image type.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nucleiseg.config import TrainConfig
from nucleiseg.data import image_type, load_split
from nucleiseg.metrics import evaluate
from nucleiseg.seed import SeedConfig, load_seed_network, predict_seed, resize_images, train_seed
from nucleiseg.segment import Segmenter

KEYS = ("dsb_score", "ap50", "ap75", "f1_50")


def score_table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| method | images | DSB score | AP@0.5 | AP@0.75 | F1@0.5 |", "|---|---|---|---|---|---|"]
    for method, groups in results.items():
        for group, report in groups.items():
            values = " | ".join(f"{report[k]:.3f}" for k in KEYS)
            lines.append(f"| {method} | {group} ({report['n_images']}) | {values} |")
    return "\n".join(lines)


def by_type(samples, predictions) -> dict[str, dict]:
    kinds = {s.id: image_type(s.image) for s in samples}
    groups = {"all": [s.id for s in samples]}
    for kind in sorted(set(kinds.values())):
        groups[kind] = [i for i, k in kinds.items() if k == kind]
    truth = {s.id: s.labels for s in samples}
    return {
        name: evaluate((i, truth[i], predictions[i]) for i in ids).as_dict() for name, ids in groups.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model name or folder")
    parser.add_argument("--data", default=TrainConfig().data.root)
    parser.add_argument("--seed-run", default="runs/seed", help="folder for the seed recipe's weights")
    parser.add_argument("--reuse-seed", action="store_true", help="load seed weights instead of training")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--uninverted-row", action="store_true",
                        help="add an ablation row: the model with brightfield/H&E images left un-inverted")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    cfg = TrainConfig()
    cfg.data.root = args.data
    train_samples, val_samples = load_split(cfg)
    results: dict[str, dict] = {}
    timings = {}
    if not args.skip_seed:
        seed_cfg = SeedConfig()
        train, val = resize_images(train_samples), resize_images(val_samples)
        weights = Path(args.seed_run) / "seed_weights.pt"
        started = time.perf_counter()
        if args.reuse_seed and weights.exists():
            network = load_seed_network(args.seed_run, seed_cfg)
        else:
            network, _ = train_seed(train, val, seed_cfg, args.seed_run)
        timings["seed training (min)"] = (time.perf_counter() - started) / 60
        predicted = dict(zip(val.ids, predict_seed(network, val), strict=True))
        results["seed recipe (128x128 U-Net)"] = by_type(val_samples, predicted)
    segmenter = Segmenter(args.model, tta=args.tta)
    started = time.perf_counter()
    predicted = {s.id: segmenter.segment(s.image).labels for s in val_samples}
    timings["full-resolution segmentation (s)"] = time.perf_counter() - started
    results[f"nucleiseg ({args.model}{', TTA' if args.tta else ''})"] = by_type(val_samples, predicted)
    if args.uninverted_row:
        import nucleiseg.segment
        from nucleiseg.data import normalise
        from nucleiseg.io import to_gray

        nucleiseg.segment.prepare_input = lambda image: normalise(to_gray(image))
        predicted = {s.id: segmenter.segment(s.image).labels for s in val_samples}
        results[f"nucleiseg ({args.model}), no polarity normalisation"] = by_type(val_samples, predicted)
    print(score_table(results))
    print(" ".join(f"{k}: {v:.1f}" for k, v in timings.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "timings": timings}, indent=2))


if __name__ == "__main__":
    main()
