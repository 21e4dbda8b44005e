"""Grid search of the post-processing thresholds on validation images (StarDist's optimize_thresholds)."""

from __future__ import annotations

import itertools
import logging

from tqdm import tqdm

from nucleiseg.config import PostprocessConfig
from nucleiseg.data import prepare_input
from nucleiseg.io import Sample
from nucleiseg.metrics import Report, evaluate
from nucleiseg.model import ModelBundle
from nucleiseg.postprocess import instances
from nucleiseg.segment import Segmenter

log = logging.getLogger(__name__)

FOREGROUND = (0.3, 0.4, 0.5, 0.6, 0.7)
MARKER = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MIN_AREA = (0.1, 0.2, 0.3)  # fractions of a disc of the estimated diameter


def tune_thresholds(
    model: ModelBundle, samples: list[Sample], progress: bool = True
) -> tuple[PostprocessConfig, Report]:
    """Try every (foreground, marker, smallest area) combination on ``samples``; return the best by DSB score.

    The probability maps are computed once per image, at the scale the model's diameter estimate
    picks with its current thresholds, so only the cheap post-processing is repeated.
    """
    segmenter = Segmenter(model)
    cached = []
    for s in tqdm(samples, desc="predicting", unit="img", disable=not progress, leave=False):
        probabilities, diameter, _ = segmenter.image_probabilities(prepare_input(s.image))
        cached.append((s, probabilities, diameter or model.target_diameter))
    best: tuple[PostprocessConfig, Report] | None = None
    grid = list(itertools.product(FOREGROUND, MARKER, MIN_AREA))
    for fg, marker, min_area in tqdm(grid, desc="thresholds", disable=not progress, leave=False):
        thresholds = PostprocessConfig(fg, marker, min_area)
        report = evaluate((s.id, s.labels, instances(p, thresholds, d)) for s, p, d in cached)
        log.info("foreground %.2f marker %.2f min area %.2f: DSB %.4f", fg, marker, min_area, report.dsb_score)
        if best is None or report.dsb_score > best[1].dsb_score:
            best = (thresholds, report)
    return best
