"""How the score holds up when nuclei are smaller or larger than in training.

    python benchmarks/scale_curve.py [--model default] [--scales 0.25 0.5 1 2 3 4] [--limit N] [--fixed-limit N]

The validation images and their masks are resized by each factor (images bilinear, masks nearest) and
segmented twice: with nucleiseg's automatic size handling, and without it (the image goes to the network
at its own scale, as a fixed-scale model would see it). Prints the DSB score at each scale and its ratio
to the 1x score. Without size handling a 4x image costs 16 times the network time, hence --fixed-limit.
"""

from __future__ import annotations

import argparse

import numpy as np

from nucleiseg.config import TrainConfig
from nucleiseg.data import rescale
from nucleiseg.metrics import evaluate
from nucleiseg.segment import Segmenter
from nucleiseg.train import load_split


def scaled(samples, factor: float):
    for s in samples:
        yield s.id, rescale(s.image, factor, order=1), rescale(s.labels.astype(np.int32), factor, order=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 3, 4])
    parser.add_argument("--limit", type=int, default=0, help="use only the first N validation images")
    parser.add_argument("--fixed-limit", type=int, default=0,
                        help="score the run without size handling on only the first N of those")
    args = parser.parse_args()

    _, val = load_split(TrainConfig())
    val = val[: args.limit] if args.limit else val
    segmenter = Segmenter(args.model)
    fixed = segmenter.target_diameter  # giving the training diameter switches the rescaling off
    rows = []
    for factor in args.scales:
        images = list(scaled(val, factor))
        auto = evaluate((i, y, segmenter.segment(x).labels) for i, x, y in images).dsb_score
        subset = images[: args.fixed_limit] if args.fixed_limit else images
        plain = evaluate((i, y, segmenter.segment(x, diameter=fixed).labels) for i, x, y in subset).dsb_score
        rows.append((factor, auto, plain))
        print(f"scale {factor:g}: auto {auto:.4f}  fixed {plain:.4f}", flush=True)
    base_auto = next((a for f, a, _ in rows if f == 1), rows[0][1])
    base_plain = next((p for f, _, p in rows if f == 1), rows[0][2])
    n_fixed = min(len(val), args.fixed_limit or len(val))
    print(f"\n| scale | DSB, size handling ({len(val)} images) | ratio to 1x | "
          f"DSB, no size handling ({n_fixed} images) | ratio to 1x |")
    print("|---|---|---|---|---|")
    for factor, auto, plain in rows:
        print(f"| {factor:g}x | {auto:.3f} | {auto / base_auto:.2f} | {plain:.3f} | {plain / base_plain:.2f} |")


if __name__ == "__main__":
    main()
