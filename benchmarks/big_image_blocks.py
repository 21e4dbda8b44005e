"""Block-wise segmentation of a large zarr image against the single-process result on the same image.

    python benchmarks/big_image_blocks.py [--side 8192] [--block 2048] [--workers 0]

A real stage1_test image is tiled to side x side pixels (RGB uint8) and written as a zarr array. The
single-process run (``Segmenter.segment`` on the whole array in memory, automatic diameter) gives the
reference; ``bigimage.segment_large`` then segments the zarr array block by block, also with the automatic
diameter (estimated on the same central crop, so the same diameter and scale), in this process or, with
``--workers N``, on a local Dask cluster of N worker processes. Prints both times, the nucleus counts, and
how many reference nuclei are matched at IoU > 0.5 with their lowest and mean IoU (``metrics.match``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from big_image import mosaic

from nucleiseg.bigimage import segment_large
from nucleiseg.metrics import match
from nucleiseg.segment import Segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=0, help="local Dask worker processes (0: this process)")
    parser.add_argument("--image", default="8b59819fbc92", help="prefix of the stage1_test image id to tile")
    args = parser.parse_args()

    image = mosaic(args.image, args.side)
    segmenter = Segmenter()
    started = time.perf_counter()
    whole = segmenter.segment(image)
    whole_s = time.perf_counter() - started
    print(f"{args.side} x {args.side} mosaic of {args.image}: single process {whole_s:.0f} s, "
          f"{whole.labels.max()} nuclei, diameter {whole.diameter:.1f} px, scale {whole.scale:.3f}")
    client = cluster = None
    if args.workers:
        from nucleiseg.cluster import connect

        client, cluster = connect(f"local:{args.workers}")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "big.zarr"
        zarr.create_array(source, data=image, chunks=(args.block, args.block, 3))
        started = time.perf_counter()
        result = segment_large(source, Path(tmp) / "labels.zarr", segmenter, block=args.block, client=client)
        blocks_s = time.perf_counter() - started
        labels = zarr.open_array(result.path, mode="r")[:]
    if client is not None:
        client.close()
        cluster.close()
    matched = match(whole.labels, labels)
    ious = matched.ious
    print(f"blocks {result.blocks[0]} x {result.blocks[1]} of {args.block}"
          f"{f' on {args.workers} workers' if args.workers else ''}: {blocks_s:.0f} s, {result.nuclei} nuclei, "
          f"diameter {result.diameter:.1f} px, scale {result.scale:.3f} (single process {whole.labels.max()}); "
          f"{len(ious)} of {whole.labels.max()} matched at IoU > 0.5, "
          f"IoU lowest {ious.min():.4f}, mean {ious.mean():.4f}; "
          f"{'same' if np.array_equal(labels > 0, whole.labels > 0) else 'different'} foreground")


if __name__ == "__main__":
    main()
