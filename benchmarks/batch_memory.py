"""Peak memory of `nucleiseg segment` for batches of 10, 65 (every test image once) and 1,000 images.

    python benchmarks/batch_memory.py [--counts 10 65 1000] [--model default]

The 65 stage1_test images are copied over and over into a temporary folder to make each batch (links would be
one input each: `nucleiseg segment` takes a file reached twice once),
and `nucleiseg segment` runs on it in a child process; its peak resident memory is read from the OS.
The ratio of the last peak to the first shows whether memory grows with the number of images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nucleiseg.io import find_images

TEST_ROOT = "../shared/data/dsb2018/stage1_test"


def segment_peak_rss(inputs: list[str], out: Path, model: str) -> tuple[float, float]:
    """Run `nucleiseg segment INPUTS --out OUT` in a child process; return its peak RSS (MB) and seconds."""
    started = time.perf_counter()
    code = (
        "import resource, sys\nfrom nucleiseg.cli import main\nrc = main(sys.argv[1:])\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "segment", *inputs, "--out", str(out), "--model", model],
        capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"},
    )
    if "PEAK" not in result.stdout or result.returncode != 0:
        raise RuntimeError(f"nucleiseg segment failed:\n{result.stderr}")
    peak_kb = int(result.stdout.split("PEAK")[-1].split()[0])
    return peak_kb / 1024, time.perf_counter() - started


def peak_rss_of_batch(count: int, model: str, work: Path) -> tuple[float, float]:
    sources = find_images([TEST_ROOT])
    folder = work / f"in{count}"
    folder.mkdir()
    for i in range(count):
        shutil.copyfile(sources[i % len(sources)], folder / f"{i:05d}.png")
    return segment_peak_rss([str(folder)], work / f"out{count}", model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 65, 1000])
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.counts:
            peaks[count], seconds = peak_rss_of_batch(count, args.model, Path(tmp))
            print(f"{count} images: peak RSS {peaks[count]:.0f} MB, {seconds:.0f} s", flush=True)
    first, last = args.counts[0], args.counts[-1]
    print(f"peak at {last} / peak at {first} images: {peaks[last] / peaks[first]:.2f}")


if __name__ == "__main__":
    main()
