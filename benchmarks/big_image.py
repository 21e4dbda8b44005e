"""Peak memory and time of `nucleiseg segment` on one very large image file.

    python benchmarks/big_image.py [--side 10000] [--model default]

The image is a real stage1_test image tiled to side x side pixels (RGB uint8), written as an uncompressed
TIFF and segmented by `nucleiseg segment` in a child process with the default settings (automatic
diameter, tiled prediction, block-wise post-processing), so the figure covers everything a user's run
does: reading the file, the network, post-processing, measurements, the overlay and writing the outputs.
Prints the child's peak resident memory (Python and PyTorch included) and the time.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from batch_memory import TEST_ROOT, segment_peak_rss

from nucleiseg.io import load_sample, sample_ids


def mosaic(image_prefix: str, side: int) -> np.ndarray:
    """A side x side RGB image tiled from the stage1_test image whose id starts with ``image_prefix``."""
    image_id = next(i for i in sample_ids(TEST_ROOT) if i.startswith(image_prefix))
    tile = load_sample(f"{TEST_ROOT}/{image_id}").image[..., :3]
    reps = (-(-side // tile.shape[0]), -(-side // tile.shape[1]), 1)
    return np.tile(tile, reps)[:side, :side]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=10000)
    parser.add_argument("--model", default="default")
    parser.add_argument("--image", default="8b59819fbc92", help="prefix of the stage1_test image id to tile")
    args = parser.parse_args()

    image = mosaic(args.image, args.side)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.tif"
        tifffile.imwrite(path, image)
        del image
        peak_mb, seconds = segment_peak_rss([str(path)], Path(tmp) / "out", args.model)
        with open(Path(tmp) / "out" / "summary.csv", newline="") as f:
            summary = next(csv.DictReader(f))
    print(f"{args.side}x{args.side} image ({args.side**2 * 3 / 1e9:.2f} GB as RGB uint8): {summary}")
    print(f"peak RSS {peak_mb / 1024:.2f} GB, {seconds:.0f} s ({args.side**2 / 1e6 / seconds:.2f} MP/s)")


if __name__ == "__main__":
    main()
