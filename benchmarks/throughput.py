"""Training and segmentation throughput on this machine's CPU.

    python benchmarks/throughput.py [--config configs/default.json] [--model default] [--steps 20]

Prints: plain matrix-multiply GFLOP/s (the CPU's practical limit, measured in the same run); training
patches per second and the network's achieved GFLOP/s as a ratio of that limit; segmentation megapixels
per second over the 65 stage1_test images in-process, split into network and the rest, with the network
work per image as a multiple of one pass at the image's own size (the diameter estimate's passes
included); the seconds per stage of what `nucleiseg segment` does (start-up, reading, input preparation,
network, post-processing, each default output written); and the whole `nucleiseg segment` command in a
child process (start-up, reading, default outputs written), as MP/s and as MP/s per 100 GFLOP/s of a
matmul measured just before and after it (comparable across machines; the median of ``--command-runs``
runs), alone and beside another CPU-bound process. Segmentation
is measured with the default engine (auto: onnxruntime on the CPU, the 8-bit export), with onnxruntime on the
float32 export (--no-int8) and with torch, each with its network
GFLOP/s (useful work: the FLOPs of one pass over the pixels the network had to see, so tile overlaps and
padding count as lost time) and MP/s per image type. `--model fast` measures the fast model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from nucleiseg.config import TrainConfig, load_json
from nucleiseg.data import PatchSampler, image_type, load_split, prepare_training_image
from nucleiseg.io import load_dataset
from nucleiseg.model import load_model
from nucleiseg.network import build_model
from nucleiseg.outputs import DEFAULT_OUTPUTS, WRITERS, OutputOptions
from nucleiseg.predict import threads
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
    network = build_model(cfg.model).train().to(memory_format=torch.channels_last)  # as train.fit runs it
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)

    def step(x, y):
        x = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        loss = loss_fn(network(x), torch.from_numpy(y), cfg.dice_weight)
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


class TimedPredictor:
    """A predictor that adds up the seconds spent in it: the network alone."""

    def __init__(self, predictor):
        self.predictor, self.seconds = predictor, 0.0

    def __getattr__(self, name):  # size_multiple, out_channels and the optional batch_size: the predictor's
        return getattr(self.predictor, name)

    def __call__(self, batch):
        started = time.perf_counter()
        out = self.predictor(batch)
        self.seconds += time.perf_counter() - started
        return out


class TimedSegmenter(Segmenter):
    """Segmenter that adds up the time spent in the network and the pixels the network saw."""

    network_pixels = 0.0  # after rescaling

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.predictor = TimedPredictor(self.predictor)

    @property
    def network_seconds(self) -> float:
        return self.predictor.seconds

    def probabilities(self, x, scale):
        self.network_pixels += x.size * scale**2
        return super().probabilities(x, scale)


def network_flops_per_pixel(model: str) -> float:
    bundle = load_model(model)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        bundle.network.eval()(torch.zeros(1, bundle.config.in_channels, 256, 256))
    return counter.get_total_flops() / 256**2


def segmentation_throughput(model: str, bf16: bool = False, engine: str = "auto", int8: bool = True) -> dict:
    samples = load_dataset(TEST_ROOT, progress=False)
    segmenter = TimedSegmenter(model, bf16=bf16, engine=engine, int8=int8)
    megapixels = sum(s.image.shape[0] * s.image.shape[1] for s in samples) / 1e6
    per_type: dict[str, list[float]] = {}  # image type -> [seconds, megapixels]
    nuclei = 0
    for s in samples:
        started = time.perf_counter()
        nuclei += int(segmenter.segment(s.image).labels.max())
        seconds_mp = per_type.setdefault(image_type(s.image), [0.0, 0.0])
        seconds_mp[0] += time.perf_counter() - started
        seconds_mp[1] += s.image.shape[0] * s.image.shape[1] / 1e6
    total = sum(seconds for seconds, _ in per_type.values())
    inner = segmenter.predictor.predictor
    return {
        "engine": f"{type(inner).__name__} {getattr(inner, 'path', '')}".strip(),
        "images": len(samples),
        "megapixels": megapixels,
        "nuclei": nuclei,
        "seconds": total,
        "mp_per_s": megapixels / total,
        "network_share": segmenter.network_seconds / total,
        "network_gflops": network_flops_per_pixel(model) * segmenter.network_pixels / segmenter.network_seconds / 1e9,
        "passes": segmenter.network_pixels / (megapixels * 1e6),
        "per_type": {kind: mp / seconds for kind, (seconds, mp) in sorted(per_type.items())},
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


def stage_profile(model: str) -> dict[str, float]:
    """Seconds per stage of what `nucleiseg segment` does with the default outputs, measured in this process:
    start-up (imports and model loading, in a child process), reading, input preparation with rescaling and
    tiling, the network (every pass, the diameter estimate's included), post-processing with the quality
    signals, and writing each default output."""
    load = (f"import time; started = time.perf_counter(); import nucleiseg.cli; from nucleiseg.segment import "
            f"Segmenter; Segmenter({model!r}); print(time.perf_counter() - started)")
    startup = float(subprocess.run([sys.executable, "-c", load], check=True, capture_output=True, text=True).stdout)
    segmenter = TimedSegmenter(model)
    stages = {"start-up": startup, "read": 0.0, "input, rescaling, tiling": 0.0, "network": 0.0,
              "post-processing, quality": 0.0} | {f"write {output}": 0.0 for output in DEFAULT_OUTPUTS}
    with tempfile.TemporaryDirectory() as out:
        for path in sorted(Path(TEST_ROOT).glob("*/images/*.png")):
            network_before = segmenter.network_seconds
            result = segmenter.segment_file(path)
            network = segmenter.network_seconds - network_before
            stages["read"] += result.timings["read"]
            stages["network"] += network
            stages["input, rescaling, tiling"] += result.timings["predict"] - network
            stages["post-processing, quality"] += result.timings["postprocess"]
            for output in DEFAULT_OUTPUTS:
                started = time.perf_counter()
                WRITERS[output](result, Path(out) / path.stem, OutputOptions())
                stages[f"write {output}"] += time.perf_counter() - started
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.json")
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="also measure segmentation with --bf16")
    parser.add_argument("--command-runs", type=int, default=3, help="runs of the whole command (the median counts)")
    args = parser.parse_args()

    torch.manual_seed(0)
    np.random.seed(0)
    limit = matmul_gflops()
    print(f"threads {threads()}; matmul {limit:.1f} GFLOP/s (2048x2048 fp32)")
    if not args.skip_training:
        t = training_throughput(load_json(TrainConfig, args.config), args.steps)
        print(f"training: {t['patches_per_s']:.2f} patches/s; network {t['network_gflops']:.1f} GFLOP/s = "
              f"{t['network_gflops'] / limit:.2f} of matmul; data preparation {t['data_share']:.0%} of step time")
    runs = [("auto", False, True), ("onnx", False, False), ("torch", False, True)]
    for engine, bf16, int8 in runs + ([("torch", True, True)] if args.bf16 else []):
        s = segmentation_throughput(args.model, bf16, engine, int8)
        types = ", ".join(f"{kind} {mp_per_s:.2f}" for kind, mp_per_s in s["per_type"].items())
        print(f"segmentation, engine {engine}{' (bf16)' if bf16 else ''}{'' if int8 else ' --no-int8'} "
              f"({s['engine']}): {s['images']} images, "
              f"{s['megapixels']:.1f} MP, {s['nuclei']} nuclei in {s['seconds']:.1f} s = {s['mp_per_s']:.2f} MP/s "
              f"in-process (per image type: {types}); network {s['network_share']:.0%} at "
              f"{s['network_gflops']:.1f} GFLOP/s = {s['network_gflops'] / limit:.2f} of matmul, the rest (input "
              f"preparation, post-processing, quality signals) {1 - s['network_share']:.0%}; the network saw "
              f"{s['passes']:.2f}x the images' pixels", flush=True)
    stages = stage_profile(args.model)
    print(f"stages of nucleiseg segment, in-process ({sum(stages.values()):.1f} s): "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stages.items()), flush=True)
    # these cores' speed drifts from minute to minute: each run is measured against the matrix multiply just
    # before and after it, and the median of the runs is the figure
    runs = []
    for _ in range(max(1, args.command_runs)):
        before = matmul_gflops()
        c = command_throughput(args.model)
        runs.append(c | {"gflops": (before + matmul_gflops()) / 2})
    for c in runs:
        c["per_100_gflops"] = 100 * c["mp_per_s"] / c["gflops"]
    print("nucleiseg segment (whole command, default outputs): " + "; ".join(
        f"{c['seconds']:.1f} s = {c['mp_per_s']:.2f} MP/s at matmul {c['gflops']:.1f} GFLOP/s = "
        f"{c['per_100_gflops']:.2f} MP/s per 100 GFLOP/s" for c in runs), flush=True)
    c = sorted(runs, key=lambda c: c["per_100_gflops"])[len(runs) // 2]
    print(f"median of {len(runs)} runs: {c['seconds']:.1f} s = {c['mp_per_s']:.2f} MP/s = "
          f"{c['per_100_gflops']:.2f} MP/s per 100 GFLOP/s of matmul", flush=True)
    # another CPU-bound process beside it: a matrix multiply loop on every core (as another analysis would)
    busy = subprocess.Popen([sys.executable, "-c", "import torch\na = torch.randn(2048, 2048)\nwhile True: a @ a"])
    try:
        time.sleep(2)
        loaded = command_throughput(args.model)
    finally:
        busy.kill()
    print(f"the same beside a CPU-bound process (matmul on every core): {loaded['seconds']:.1f} s = "
          f"{loaded['seconds'] / sorted(c['seconds'] for c in runs)[len(runs) // 2]:.2f}x the median time alone")


if __name__ == "__main__":
    main()
