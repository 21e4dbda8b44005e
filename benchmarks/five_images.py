"""Scores behind the floors of tests/test_shipped_model.py: the seed recipe and the shipped model on the five
committed validation images, and the shipped model on the first of them at 3x.

    python benchmarks/five_images.py [--model default] [--seed-run runs/seed]  # `nucleiseg seed --out runs/seed`
"""
import argparse

import numpy as np

from nucleiseg.data import rescale
from nucleiseg.io import load_dataset
from nucleiseg.metrics import evaluate, match
from nucleiseg.seed import load_seed_network, predict_seed, resize_images
from nucleiseg.segment import Segmenter
from nucleiseg.targets import median_diameter

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--seed-run", default="runs/seed", help="folder with the seed recipe's seed_weights.pt")
parser.add_argument("--model", default="default", help="shipped model name or model folder")
args = parser.parse_args()
samples = load_dataset("tests/data/validation", progress=False)
seed_labels = predict_seed(load_seed_network(args.seed_run), resize_images(samples))
seed = evaluate((s.id, s.labels, p) for s, p in zip(samples, seed_labels, strict=True))
segmenter = Segmenter(args.model)
shipped = evaluate((s.id, s.labels, segmenter.segment(s.image).labels) for s in samples)
s = samples[0]
image, labels = rescale(s.image, 3.0, order=1), rescale(s.labels.astype(np.int32), 3.0, order=0)
result = segmenter.segment(image)
print(f"seed {seed.dsb_score:.4f} shipped {shipped.dsb_score:.4f} ap50 {shipped.ap50:.4f}; "
      f"3x: diameter {result.diameter:.1f} vs true {median_diameter(labels):.1f}, "
      f"DSB {match(labels, result.labels).dsb_score():.4f}")
