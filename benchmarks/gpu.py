"""Segmentation speed on the CPU (8-bit and float32 network) and on a CUDA GPU, and whether they give the
same nuclei.

    python benchmarks/gpu.py [--data ../shared/data/dsb2018/stage1_test] [--model default] [--cpu-only]

Segments every image of ``--data`` (a competition-layout folder, read with ``nucleiseg.io.load_dataset``)
with the default settings (automatic diameter) in each of the three runs, after one warm-up image. Prints per run
the megapixels per second end to end and where the time goes: the network (the predictor's calls, GPU
transfers included), the rest of the prediction (tiling, rescaling, blending, the diameter estimate's
bookkeeping) and post-processing (always on the CPU). Then the agreement of the label images of CUDA with
each CPU run (float32 first: the same arithmetic): per image the difference in nucleus count, and the mean IoU
of the nuclei matched at IoU > 0.5 (``nucleiseg.metrics.match``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from throughput import TimedPredictor  # its output is on the CPU: the GPU has finished when a call returns

from nucleiseg.io import load_dataset
from nucleiseg.metrics import match
from nucleiseg.segment import Segmenter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018" / "stage1_test"


def run(images: list[np.ndarray], model: str, device: str, **settings) -> tuple[list[np.ndarray], dict]:
    segmenter = Segmenter(model, device=device, **settings)
    timed = segmenter.predictor = TimedPredictor(segmenter.predictor)
    segmenter.segment(images[0])  # warm-up: CUDA context, cuDNN's choice of kernels
    timed.seconds = 0.0
    labels, predict, postprocess = [], 0.0, 0.0
    started = time.perf_counter()
    for image in images:
        result = segmenter.segment(image)
        labels.append(result.labels)
        predict += result.timings["predict"]
        postprocess += result.timings["postprocess"]
    total = time.perf_counter() - started
    return labels, {"seconds": total, "network": timed.seconds, "prediction_rest": predict - timed.seconds,
                    "postprocess": postprocess}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="competition-layout folder of images")
    parser.add_argument("--model", default="default")
    parser.add_argument("--cpu-only", action="store_true", help="run where there is no GPU (checks the script)")
    args = parser.parse_args()
    if not args.cpu_only and not torch.cuda.is_available():
        parser.error("PyTorch sees no CUDA GPU here (use --cpu-only to run the CPU half alone)")

    images = [s.image for s in load_dataset(args.data, progress=False, use_cache=False)]
    megapixels = sum(i.shape[0] * i.shape[1] for i in images) / 1e6
    gpu = "" if args.cpu_only else f", GPU {torch.cuda.get_device_name()}"
    print(f"{len(images)} images, {megapixels:.1f} MP; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads{gpu}")
    # the CPU runs the 8-bit network by default, a GPU float32: the agreement is checked against float32 on both
    runs = {"cpu int8": ("cpu", {}), "cpu float32": ("cpu", {"int8": False}), "cuda": ("cuda", {})}
    results = {}
    for name, (device, settings) in runs.items():
        if args.cpu_only and device == "cuda":
            continue
        labels, t = run(images, args.model, device, **settings)
        results[name] = labels
        print(f"{name}: {megapixels / t['seconds']:.2f} MP/s ({len(images) / t['seconds']:.2f} images/s, "
              f"{t['seconds']:.1f} s); network {t['network']:.1f} s ({t['network'] / t['seconds']:.0%}), "
              f"rest of prediction {t['prediction_rest']:.1f} s, post-processing {t['postprocess']:.1f} s")
    pairs = [("cpu float32", "cpu int8")] if args.cpu_only else [("cpu float32", "cuda"), ("cpu int8", "cuda")]
    for first, second in pairs:
        a_labels, b_labels = results[first], results[second]
        counts = np.array([abs(int(a.max()) - int(b.max())) for a, b in zip(a_labels, b_labels, strict=True)])
        matches = [match(a, b) for a, b in zip(a_labels, b_labels, strict=True)]
        ious = np.concatenate([m.ious for m in matches])
        same = sum(np.array_equal(a, b) for a, b in zip(a_labels, b_labels, strict=True))
        print(f"agreement {first} vs {second}: {same}/{len(images)} label images identical; nucleus count differs "
              f"on {(counts > 0).sum()} images (at most {counts.max()}, {counts.sum()} of "
              f"{sum(int(a.max()) for a in a_labels)} in all); mean IoU of matched nuclei {ious.mean():.4f} "
              f"(lowest image mean {min(m.ious.mean() for m in matches if len(m.ious)):.4f})")


if __name__ == "__main__":
    main()
