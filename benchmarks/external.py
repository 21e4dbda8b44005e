"""Scores of a model on the validation split and on the external test sets, per image type, with the
diameter estimate's error on every image.

    python benchmarks/external.py [--models default runs/x/model] [--set tta=true] [--json out.json]

Sets: the validation split the shipped model's recipe (configs/default.json) holds out (10% of
stage1_train plus tnbc slide 08), and the two external test sets of ../shared/data (tnbc slides 09-11,
bbbc039), which no model of this project was trained, tuned or selected on. Every image is segmented
with the diameter estimate, as a user would run it. Prints, per model and set, the DSB score (the
competition's mean over IoU thresholds 0.5-0.95), AP@0.5 and F1@0.5 pooled over all images, and the
estimated / true median nucleus diameter: median and worst ratio, and how many images are off by more
than 1.5x.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from nucleiseg.cli import parse_overrides
from nucleiseg.config import TrainConfig, load_json
from nucleiseg.data import image_type, load_split, select_samples
from nucleiseg.metrics import evaluate
from nucleiseg.segment import Segmenter
from nucleiseg.targets import median_diameter

REPO = Path(__file__).resolve().parents[1]
EXTERNAL = {"tnbc 09-11": ["../shared/data/tnbc/tnbc_09_*", "../shared/data/tnbc/tnbc_1[01]_*"],
            "bbbc039": ["../shared/data/bbbc039/*"]}


def test_sets(limit: int = 0) -> dict[str, list]:
    _, val = load_split(load_json(TrainConfig, REPO / "configs" / "default.json"), progress=False)
    sets = {"validation": val}
    for name, specs in EXTERNAL.items():
        sets[name] = [s for spec in specs for s in select_samples(spec, progress=False)]
    return {name: samples[:limit] if limit else samples for name, samples in sets.items()}


def score_set(segmenter: Segmenter, samples: list) -> dict[str, dict]:
    """Scores per image type (and all) of one set, and the diameter ratios."""
    predicted, ratios, kinds = {}, {}, {}
    for s in samples:
        result = segmenter.segment(s.image)
        predicted[s.id] = result.labels
        ratios[s.id] = result.diameter / median_diameter(s.labels)
        kinds[s.id] = image_type(s.image)
    groups = {"all": list(predicted)}
    if len(set(kinds.values())) > 1:
        for kind in sorted(set(kinds.values())):
            groups[kind] = [i for i in predicted if kinds[i] == kind]
    truth = {s.id: s.labels for s in samples}
    out = {}
    for group, ids in groups.items():
        report = evaluate((i, truth[i], predicted[i]) for i in ids).as_dict()
        r = np.array([ratios[i] for i in ids])
        worst = float(r[np.argmax(np.abs(np.log(r)))])
        report.update(n_images=len(ids), ratio_median=float(np.median(r)), ratio_worst=worst,
                      off_1_5x=int((np.abs(np.log(r)) > np.log(1.5)).sum()))
        out[group] = report
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default"], help="model names or folders")
    parser.add_argument("--limit", type=int, default=0, help="first N images of each set (0 = all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="inference settings for every model, e.g. tta=true (JSON values)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    settings = parse_overrides(args.set)
    sets = test_sets(args.limit)
    results = {}
    print("| model | set | images | DSB score | AP@0.5 | F1@0.5 | diameter est./true: median | worst | >1.5x off |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        segmenter = Segmenter(model, **settings)
        for name, samples in sets.items():
            started = time.perf_counter()
            groups = score_set(segmenter, samples)
            results[f"{model} | {name}"] = groups
            for group, r in groups.items():
                label = name if group == "all" else f"{name}: {group}"
                print(f"| {model} | {label} | {r['n_images']} | {r['dsb_score']:.3f} | {r['ap50']:.3f} | "
                      f"{r['f1_50']:.3f} | {r['ratio_median']:.2f} | {r['ratio_worst']:.2f} | {r['off_1_5x']} |",
                      flush=True)
            results[f"{model} | {name}"]["seconds"] = time.perf_counter() - started
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
