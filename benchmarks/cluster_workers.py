"""Images per second on a local Dask cluster with 1 and N worker processes, against one process.

    python benchmarks/cluster_workers.py [--workers 1 2] [--images ../shared/data/dsb2018/stage1_test]

Segments the images with the default outputs three ways, each into a fresh folder: `segment_batch` in
this process (the network on every core), then `segment_on_cluster` on a `LocalCluster` of 1, then N worker
processes (each worker's network threads pinned to its share of the cores). Prints images/s, the speed-up
over one worker, the cost per image of going through the cluster (one worker against this process: the
same cores, so the difference is scheduling, transfer and the model loaded in the worker), and whether
every label image equals the single-process one. The cluster's start-up is timed apart.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster

from nucleiseg.batch import segment_batch
from nucleiseg.cluster import segment_on_cluster
from nucleiseg.io import find_images, read_labels
from nucleiseg.predict import set_threads
from nucleiseg.segment import Segmenter


def same_labels(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*_labels.png"))
    return files == sorted(p.name for p in b.glob("*_labels.png")) and all(
        np.array_equal(read_labels(a / f), read_labels(b / f)) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", default="../shared/data/dsb2018/stage1_test")
    args = parser.parse_args()
    paths = find_images([args.images])
    cores = len(os.sched_getaffinity(0))
    set_threads(cores)
    segmenter = Segmenter()
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "single"
        started = time.perf_counter()
        result = segment_batch(paths, single, segmenter, progress=False)
        base = time.perf_counter() - started
        assert not result.failed, result.failed
        print(f"{len(paths)} images, {cores} cores")
        print("| run | seconds | images/s | speed-up over 1 worker | labels equal to one process |")
        print("|---|---|---|---|---|")
        print(f"| one process ({cores} threads) | {base:.1f} | {len(paths) / base:.2f} | | |", flush=True)
        seconds = {}
        for n in args.workers:
            out = Path(tmp) / f"workers{n}"
            started = time.perf_counter()
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                client.wait_for_workers(n)
                startup = time.perf_counter() - started
                started = time.perf_counter()
                result = segment_on_cluster(paths, out, segmenter, client, progress=False)
                seconds[n] = time.perf_counter() - started
            assert not result.failed, result.failed
            speed_up = f"{seconds[1] / seconds[n]:.2f}" if 1 in seconds else ""
            print(f"| {n} workers (start-up {startup:.1f} s) | {seconds[n]:.1f} | {len(paths) / seconds[n]:.2f} | "
                  f"{speed_up} | {same_labels(single, out)} |", flush=True)
        if 1 in seconds:
            print(f"cluster cost per image (1 worker against one process): {(seconds[1] - base) / len(paths):.3f} s")


if __name__ == "__main__":
    main()
