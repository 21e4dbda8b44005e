"""Fine-tune the shipped model on a handful of H&E images and score it before and after, on H&E images it
never saw (tnbc slides 09-11, the external test set) and on fluorescence (bbbc039), to show what it gains
and whether it forgets.

    nice -n 15 python benchmarks/finetune_he.py [--images 'tnbc_0[1-7]_[12]'] [--bbbc 30] [--epochs 8]
        [--out runs/finetune_he]

Training and scoring run on ``--threads`` torch threads (2: the issue's "2 cores"; pin the process to two
cores as well, e.g. ``taskset -c 0,1``, so that nothing else runs beside them).

The fine-tune images come from tnbc slides 01-07 only (slide 08 is the shipped model's validation slide,
09-11 the external test set). The shipped model was trained on slides 01-07 already, so this measures
what a fine-tune adds to a model that has seen these images, not how it adapts to an unseen kind.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from fnmatch import fnmatch
from pathlib import Path

import torch

from nucleiseg.data import select_samples
from nucleiseg.finetune import finetune, finetune_config
from nucleiseg.labelled import pair_labels
from nucleiseg.segment import Segmenter

sys.path.insert(0, str(Path(__file__).parent))
from external import EXTERNAL, score_set  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="tnbc_0[1-7]_[12]", help="fine-tune images: tnbc ids (fnmatch)")
    parser.add_argument("--bbbc", type=int, default=30, help="first N bbbc039 images scored")
    parser.add_argument("--out", default="runs/finetune_he", help="run folder of the fine-tune")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="epochs of 25 steps (default: the recipe's)")
    parser.add_argument("--data", default="../shared/data", help="folder holding tnbc/ and bbbc039/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = sorted(d for d in Path(args.data, "tnbc").iterdir() if fnmatch(d.name, args.images))
    if any(not fnmatch(d.name, "tnbc_0[1-7]_*") for d in chosen):
        raise SystemExit("fine-tune images must come from tnbc slides 01-07")
    specs = {name: [spec.replace("../shared/data", args.data) for spec in specs] for name, specs in EXTERNAL.items()}
    sets = {"tnbc 09-11": [s for spec in specs["tnbc 09-11"] for s in select_samples(spec, progress=False)],
            "bbbc039": select_samples(specs["bbbc039"][0], progress=False)[: args.bbbc]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:  # a competition-layout folder of the chosen images only
        for d in chosen:
            (Path(tmp) / d.name).symlink_to(d.resolve())
        started = time.perf_counter()
        changes = {"epochs": args.epochs} if args.epochs else {}
        model = finetune(pair_labels(tmp), args.out, finetune_config("default", device="cpu", **changes))
        results["finetune_minutes"] = (time.perf_counter() - started) / 60
    print(f"fine-tuned on {len(chosen)} images in {results['finetune_minutes']:.1f} min (threads {args.threads})")
    print("| model | set | images | DSB score | AP@0.5 | F1@0.5 |\n|---|---|---|---|---|---|")
    for name, folder in (("shipped", "default"), ("fine-tuned", model)):
        segmenter = Segmenter(folder, int8=False)  # float32 both: the fine-tune changes weights, not precision
        for set_name, samples in sets.items():
            r = score_set(segmenter, samples)["all"]
            results[f"{name} | {set_name}"] = r
            print(f"| {name} | {set_name} | {r['n_images']} | {r['dsb_score']:.3f} | {r['ap50']:.3f} | "
                  f"{r['f1_50']:.3f} |", flush=True)
    Path(args.out, "finetune_he.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
