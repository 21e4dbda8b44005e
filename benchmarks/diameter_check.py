"""Per-image diameter estimate against the truth, and the score with each, for validation images of one type.

    python benchmarks/diameter_check.py [--type brightfield] [--models default runs/default2h/model]

For every validation image of the type: true median diameter, estimated diameter and the scale it chose,
nuclei found / true, DSB score with the estimate and with the true diameter given.
"""

from __future__ import annotations

import argparse

from nucleiseg.config import TrainConfig
from nucleiseg.data import image_type, load_split
from nucleiseg.metrics import evaluate
from nucleiseg.segment import Segmenter
from nucleiseg.targets import median_diameter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", default="brightfield", choices=("fluorescence", "brightfield", "histology"))
    parser.add_argument("--models", nargs="+", default=["default"])
    args = parser.parse_args()
    _, val = load_split(TrainConfig(), progress=False)
    samples = [s for s in val if image_type(s.image) == args.type]
    print("| model | image | true diameter | estimated | scale | nuclei found / true | DSB | DSB, true diameter |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        segmenter = Segmenter(name)
        for s in samples:
            true = median_diameter(s.labels)
            estimated = segmenter.segment(s.image)
            given = segmenter.segment(s.image, diameter=true)
            dsb = evaluate([(s.id, s.labels, estimated.labels)]).dsb_score
            dsb_given = evaluate([(s.id, s.labels, given.labels)]).dsb_score
            print(f"| {name} | {s.id[:10]} | {true:.1f} | {estimated.diameter:.1f} | {estimated.scale:.3f} | "
                  f"{estimated.labels.max()} / {s.labels.max()} | {dsb:.3f} | {dsb_given:.3f} |")


if __name__ == "__main__":
    main()
