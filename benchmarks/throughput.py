"""Training and segmentation throughput on this machine's CPU.

    python benchmarks/throughput.py [--config configs/default.json] [--model default] [--steps 20]

Prints: plain matrix-multiply GFLOP/s (the CPU's practical limit, measured in the same run); training
patches per second and the network's achieved GFLOP/s as a ratio of that limit; segmentation megapixels
per second over the 65 stage1_test images in-process, split into network and the rest, with the network
work per image as a multiple of one pass at the image's own size (the diameter estimate's passes
included); and the whole `nucleiseg segment` command in a child process (start-up, reading, default
outputs written), as MP/s and as MP/s per 100 GFLOP/s of the same run's matmul (comparable across
machines).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from nucleiseg.config import TrainConfig, load_json
from nucleiseg.data import PatchSampler, load_split, prepare_training_image
from nucleiseg.io import load_dataset
from nucleiseg.model import build_model
from nucleiseg.segment import Segmenter
from nucleiseg.train import loss_fn

TEST_ROOT = "../shared/data/dsb2018/stage1_test"


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def training_throughput(cfg: TrainConfig, steps: int) -> dict:
    train, _ = load_split(cfg, progress=False)
    images = [prepare_training_image(s, cfg.data.target_diameter) for s in train[:60]]
    sampler = PatchSampler(images, cfg.data.patch_size, cfg.augment, seed=0)
    network = build_model(cfg.model).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)

    def step(x, y):
        loss = loss_fn(network(torch.from_numpy(x)), torch.from_numpy(y), cfg.dice_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    x, y = sampler.batch(cfg.batch_size)
    with FlopCounterMode(display=False) as counter:
        step(x, y)
    flops_per_step = counter.get_total_flops()
    data_time = compute_time = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        x, y = sampler.batch(cfg.batch_size)
        data_time += time.perf_counter() - started
        started = time.perf_counter()
        step(x, y)
        compute_time += time.perf_counter() - started
    return {
        "patches_per_s": steps * cfg.batch_size / (data_time + compute_time),
        "network_gflops": flops_per_step * steps / compute_time / 1e9,
        "data_share": data_time / (data_time + compute_time),
    }


class TimedSegmenter(Segmenter):
    """Segmenter that adds up the time spent in the network."""

    network_seconds = 0.0
    network_pixels = 0.0  # pixels the network saw, after rescaling

    def probabilities(self, x, scale):
        started = time.perf_counter()
        out = super().probabilities(x, scale)
        self.network_seconds += time.perf_counter() - started
        self.network_pixels += x.size * scale**2
        return out


def segmentation_throughput(model: str, bf16: bool = False) -> dict:
    samples = load_dataset(TEST_ROOT, progress=False)
    segmenter = TimedSegmenter(model, bf16=bf16)
    megapixels = sum(s.image.shape[0] * s.image.shape[1] for s in samples) / 1e6
    started = time.perf_counter()
    nuclei = sum(int(segmenter.segment(s.image).labels.max()) for s in samples)
    total = time.perf_counter() - started
    return {
        "images": len(samples),
        "megapixels": megapixels,
        "nuclei": nuclei,
        "seconds": total,
        "mp_per_s": megapixels / total,
        "network_share": segmenter.network_seconds / total,
        "passes": segmenter.network_pixels / (megapixels * 1e6),
    }


def command_throughput(model: str) -> dict:
    """The whole `nucleiseg segment` command on the test images, default outputs, in a child process."""
    megapixels = sum(s.image.shape[0] * s.image.shape[1] for s in load_dataset(TEST_ROOT, progress=False)) / 1e6
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nucleiseg.cli", "segment", TEST_ROOT, "--out", out, "--model", model],
                       check=True, capture_output=True)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "mp_per_s": megapixels / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.json")
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="also measure segmentation with --bf16")
    args = parser.parse_args()

    torch.manual_seed(0)
    np.random.seed(0)
    limit = matmul_gflops()
    print(f"threads {torch.get_num_threads()}; matmul {limit:.1f} GFLOP/s (2048x2048 fp32)")
    if not args.skip_training:
        t = training_throughput(load_json(TrainConfig, args.config), args.steps)
        print(f"training: {t['patches_per_s']:.2f} patches/s; network {t['network_gflops']:.1f} GFLOP/s = "
              f"{t['network_gflops'] / limit:.2f} of matmul; data preparation {t['data_share']:.0%} of step time")
    for bf16 in (False, True) if args.bf16 else (False,):
        s = segmentation_throughput(args.model, bf16)
        print(f"segmentation{' (bf16)' if bf16 else ''}: {s['images']} images, {s['megapixels']:.1f} MP, "
              f"{s['nuclei']} nuclei in {s['seconds']:.1f} s "
              f"= {s['mp_per_s']:.2f} MP/s in-process; network {s['network_share']:.0%}, the rest "
              f"(reading the input, post-processing, measurements) {1 - s['network_share']:.0%}; the network "
              f"saw {s['passes']:.2f}x the images' pixels")
    c = command_throughput(args.model)
    print(f"nucleiseg segment (whole command, default outputs): {c['seconds']:.1f} s = {c['mp_per_s']:.2f} MP/s "
          f"= {100 * c['mp_per_s'] / limit:.2f} MP/s per 100 GFLOP/s of matmul")


if __name__ == "__main__":
    main()
