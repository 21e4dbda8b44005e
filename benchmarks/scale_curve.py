"""How the score and the diameter estimate hold up when nuclei are smaller or larger than in training.

    python benchmarks/scale_curve.py [--model default] [--scales 0.25 0.5 1 2 3 4] [--limit N] [--fixed N]
                                     [--set int8=false]

The validation images of the model's own recipe (its train_config.json) and their masks are resized by
each factor (images bilinear, masks nearest) and segmented with nucleiseg's automatic size handling.
Prints, per scale and image type, the DSB score, its ratio to the 1x score, and the estimated / true
median nucleus diameter (median and worst image). With --fixed N the first N images are also segmented
without size handling (at their own scale, as a fixed-scale model sees them; a 4x image then costs 16
times the network time).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from nucleiseg.cli import parse_overrides
from nucleiseg.config import TrainConfig, load_json
from nucleiseg.data import image_type, load_split, rescale
from nucleiseg.metrics import evaluate
from nucleiseg.model import TRAIN_CONFIG, model_folder
from nucleiseg.segment import Segmenter
from nucleiseg.targets import median_diameter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 3, 4])
    parser.add_argument("--limit", type=int, default=0, help="use only the first N validation images")
    parser.add_argument("--fixed", type=int, default=0, help="also score the first N without size handling")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="inference settings to change (InferenceConfig fields or thresholds)")
    args = parser.parse_args()

    _, val = load_split(load_json(TrainConfig, model_folder(args.model) / TRAIN_CONFIG), progress=False)
    val = val[: args.limit] if args.limit else val
    kinds = {s.id: image_type(s.image) for s in val}
    groups = {"all": [s.id for s in val]}
    groups |= {k: [i for i in kinds if kinds[i] == k] for k in sorted(set(kinds.values()))}
    segmenter = Segmenter(args.model, **parse_overrides(args.set))
    scores, ratios, fixed = defaultdict(dict), defaultdict(dict), {}
    for factor in args.scales:
        truth, predicted, ratio = {}, {}, {}
        for s in val:
            image, labels = rescale(s.image, factor, order=1), rescale(s.labels.astype(np.int32), factor, order=0)
            result = segmenter.segment(image)
            truth[s.id], predicted[s.id] = labels, result.labels
            ratio[s.id] = result.diameter / median_diameter(labels)
        for group, ids in groups.items():
            scores[group][factor] = evaluate((i, truth[i], predicted[i]) for i in ids).dsb_score
            r = np.array([ratio[i] for i in ids])
            ratios[group][factor] = (float(np.median(r)), float(r[np.argmax(np.abs(np.log(r)))]))
        if args.fixed:
            ids = [s.id for s in val[: args.fixed]]
            plain = {i: segmenter.segment(rescale(s.image, factor, order=1), diameter=segmenter.target_diameter)
                     for i, s in zip(ids, val, strict=False)}
            fixed[factor] = evaluate((i, truth[i], plain[i].labels) for i in ids).dsb_score
        print(f"scale {factor:g}: " + "  ".join(f"{g} {scores[g][factor]:.3f}" for g in groups), flush=True)
    print("\n| scale | images | DSB score | ratio to 1x | diameter est./true: median | worst |")
    print("|---|---|---|---|---|---|")
    for group, ids in groups.items():
        base = scores[group].get(1.0, next(iter(scores[group].values())))
        for factor in args.scales:
            median, worst = ratios[group][factor]
            print(f"| {factor:g}x | {group} ({len(ids)}) | {scores[group][factor]:.3f} | "
                  f"{scores[group][factor] / base:.2f} | {median:.2f} | {worst:.2f} |")
    if fixed:
        print(f"\nwithout size handling (first {args.fixed} images): "
              + "  ".join(f"{f:g}x {v:.3f}" for f, v in fixed.items()))


if __name__ == "__main__":
    main()
