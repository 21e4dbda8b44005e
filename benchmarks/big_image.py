"""Peak memory and time to segment one very large image.

    python benchmarks/big_image.py [--side 10000] [--model default]

The image is a real stage1_test image tiled to side x side pixels (RGB uint8), segmented with the
default settings (automatic diameter, tiled prediction, block-wise post-processing). Prints the peak
resident memory of this process (which includes Python, PyTorch and the image itself) and the time.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from nucleiseg.io import load_sample, sample_ids
from nucleiseg.segment import Segmenter

TEST_ROOT = "../shared/data/dsb2018/stage1_test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=10000)
    parser.add_argument("--model", default="default")
    parser.add_argument("--image", default="8b59819fbc92", help="prefix of the stage1_test image id to tile")
    args = parser.parse_args()

    image_id = next(i for i in sample_ids(TEST_ROOT) if i.startswith(args.image))
    tile = load_sample(f"{TEST_ROOT}/{image_id}").image
    reps = (-(-args.side // tile.shape[0]), -(-args.side // tile.shape[1]), 1)
    image = np.tile(tile, reps)[: args.side, : args.side]
    del tile
    segmenter = Segmenter(args.model)
    started = time.perf_counter()
    result = segmenter.segment(image)
    seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"{args.side}x{args.side} image ({image.nbytes / 1e9:.2f} GB as RGB uint8): {int(result.labels.max())} "
          f"nuclei, diameter {result.diameter:.1f} px, {seconds:.0f} s, peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
