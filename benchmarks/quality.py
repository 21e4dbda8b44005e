"""Calibrate the quality estimate on the validation split and check it on the external test sets.

    python benchmarks/quality.py [--model default] [--write] [--ridge 1 5 20]

Segments every image of the validation split of the shipped recipe and of the external test sets (tnbc
09-11, bbbc039; see external.py) as a user would, keeps each image's quality signals and true DSB score,
and fits `quality.QualityModel` on the validation split: the ridge strength is the one of `--ridge` with
the best leave-one-out rank correlation on the validation split (the external sets pick nothing). Prints,
per set, the Spearman rank correlation between the estimate and the true score (for the validation split
also leave-one-out, the honest figure for images the fit did not see), and how many of the set's worst
10% of images the flag catches, against how many images it flags. `--write` saves the fit as the model
folder's quality.json.
"""

from __future__ import annotations

import argparse

import numpy as np
from external import test_sets
from scipy.stats import spearmanr

from nucleiseg.metrics import match
from nucleiseg.model import model_folder
from nucleiseg.quality import QualityModel
from nucleiseg.segment import Segmenter


def flag_catch(estimates: np.ndarray, scores: np.ndarray, model: QualityModel) -> tuple[int, int, int]:
    """(worst 10% caught by the flag, size of the worst 10%, images flagged)."""
    worst = set(np.argsort(scores)[: max(1, round(0.1 * len(scores)))])
    flagged = {i for i, e in enumerate(estimates) if model.flagged(e)}
    return len(worst & flagged), len(worst), len(flagged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--ridge", type=float, nargs="+", default=[1.0, 5.0, 20.0])
    parser.add_argument("--write", action="store_true", help="save the fit as the model folder's quality.json")
    args = parser.parse_args()
    segmenter = Segmenter(args.model)
    sets = {}
    for name, samples in test_sets().items():
        rows = []
        for sample in samples:
            result = segmenter.segment(sample.image)
            rows.append((result.signals, match(sample.labels, result.labels).dsb_score()))
        sets[name] = rows
        print(f"{name}: {len(rows)} images segmented", flush=True)
    signals, scores = zip(*sets["validation"], strict=True)
    signals, scores = list(signals), np.array(scores)

    def leave_one_out(ridge: float) -> np.ndarray:
        return np.array([QualityModel.fit(signals[:i] + signals[i + 1 :], list(np.delete(scores, i)), ridge=ridge)
                         .estimate(signals[i]) for i in range(len(signals))])

    loo = {ridge: spearmanr(leave_one_out(ridge), scores)[0] for ridge in args.ridge}
    ridge = max(loo, key=loo.get)
    model = QualityModel.fit(signals, list(scores), ridge=ridge,
                             calibrated_on=f"validation split of configs/default.json ({len(scores)} images)")
    print(f"ridge {ridge:g} (leave-one-out Spearman on the validation split: "
          + ", ".join(f"{r:g}: {v:.3f}" for r, v in loo.items()) + ")")
    print("| set | images | Spearman (estimate, DSB score) | worst 10% caught by the flag | images flagged |")
    print("|---|---|---|---|---|")
    sets["external (tnbc 09-11 + bbbc039)"] = sets["tnbc 09-11"] + sets["bbbc039"]
    for name, rows in sets.items():
        estimates = np.array([model.estimate(s) for s, _ in rows])
        truth = np.array([score for _, score in rows])
        caught, worst, flagged = flag_catch(estimates, truth, model)
        rho = f"{spearmanr(estimates, truth)[0]:.3f}"
        if name == "validation":
            rho += f" (fitted; leave-one-out {loo[ridge]:.3f})"
        print(f"| {name} | {len(rows)} | {rho} | {caught} of {worst} | {flagged} |")
    print("weights on standardised signals: " + ", ".join(f"{k} {w:+.3f}" for k, w in zip(model.signals, model.weights,
                                                                                           strict=True)))
    if args.write:
        model.save(model_folder(args.model))
        print(f"wrote {model_folder(args.model) / 'quality.json'}")


if __name__ == "__main__":
    main()
