"""Instance segmentation scores: the Data Science Bowl score, pooled AP, precision, recall, F1.

A predicted and a true nucleus match at threshold t when their IoU exceeds t. For t >= 0.5 such matches
are one-to-one (two objects cannot both overlap a third by more than half), so no assignment problem
has to be solved: counting pairs with IoU > t gives the true positives.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from nucleiseg.targets import median_diameter

DSB_THRESHOLDS = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2))


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every pair of objects.

    Parameters
    ----------
    true, pred : (H, W) integer ndarray
        Label images, 0 = background. Labels need not be consecutive.

    Returns
    -------
    (n_true, n_pred) float ndarray, rows and columns in the order of ``np.unique`` of the nonzero labels.
    """
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {true.shape} vs {pred.shape}")
    _, t = np.unique(true, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    t, p = t.reshape(-1), p.reshape(-1)
    # index 0 is background only if the image has background; make it so by checking the first unique value
    t_has_bg, p_has_bg = (true == 0).any(), (pred == 0).any()
    nt, np_ = t.max() + 1, p.max() + 1
    overlap = np.bincount(t * np_ + p, minlength=nt * np_).reshape(nt, np_).astype(np.float64)
    area_t, area_p = overlap.sum(1, keepdims=True), overlap.sum(0, keepdims=True)
    iou = overlap / np.maximum(area_t + area_p - overlap, 1)
    return iou[int(t_has_bg) :, int(p_has_bg) :]


@dataclass
class ImageMatch:
    """Matched pairs of one image: the IoU of every pair with IoU > 0.5, and the object counts."""

    ious: np.ndarray
    n_true: int
    n_pred: int

    def counts(self, threshold: float) -> tuple[int, int, int]:
        tp = int((self.ious > threshold).sum())
        return tp, self.n_pred - tp, self.n_true - tp

    def dsb_score(self, thresholds: Iterable[float] = DSB_THRESHOLDS) -> float:
        """Mean over thresholds of TP / (TP + FP + FN); 1.0 when both images are empty."""
        if self.n_true == 0 and self.n_pred == 0:
            return 1.0
        return float(np.mean([self.counts(t)[0] / (self.n_true + self.n_pred - self.counts(t)[0]) for t in thresholds]))


def match(true: np.ndarray, pred: np.ndarray) -> ImageMatch:
    iou = iou_matrix(np.asarray(true), np.asarray(pred))
    return ImageMatch(ious=iou[iou > 0.5], n_true=iou.shape[0], n_pred=iou.shape[1])


def unmatched(true: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the true nuclei no prediction matches (misses) and of the predicted ones that match no true
    nucleus (false nuclei), at IoU > ``threshold``."""
    iou = iou_matrix(np.asarray(true), np.asarray(pred)) > threshold
    true_ids, pred_ids = (np.unique(a)[np.unique(a) != 0] for a in (true, pred))
    return true_ids[~iou.any(axis=1)], pred_ids[~iou.any(axis=0)]


@dataclass
class Report:
    """Scores over a set of images. ``ap50``/``ap75`` pool TP, FP, FN over all images (StarDist, Cellpose)."""

    dsb_score: float
    ap50: float
    ap75: float
    precision50: float
    recall50: float
    f1_50: float
    mean_matched_iou: float
    n_images: int
    n_true: int
    n_pred: int
    per_image: dict[str, float] = field(default_factory=dict)

    def as_dict(self, per_image: bool = False) -> dict:
        out = asdict(self)
        if not per_image:
            out.pop("per_image")
        return out

    def table(self) -> str:
        rows = [
            ("images", f"{self.n_images}"),
            ("true / predicted nuclei", f"{self.n_true} / {self.n_pred}"),
            ("DSB score (mean AP@0.50:0.95)", f"{self.dsb_score:.4f}"),
            ("AP@0.5 (pooled)", f"{self.ap50:.4f}"),
            ("AP@0.75 (pooled)", f"{self.ap75:.4f}"),
            ("precision@0.5", f"{self.precision50:.4f}"),
            ("recall@0.5", f"{self.recall50:.4f}"),
            ("F1@0.5", f"{self.f1_50:.4f}"),
            ("mean IoU of matched pairs", f"{self.mean_matched_iou:.4f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _ratio(a: float, b: float, empty: float = 1.0) -> float:
    return a / b if b else empty


def evaluate(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> Report:
    """Score (name, true_labels, pred_labels) triples."""
    matches = {name: match(true, pred) for name, true, pred in pairs}
    if not matches:
        raise ValueError("no images to evaluate")
    totals = {}
    for t in (0.5, 0.75):
        tp, fp, fn = (sum(m.counts(t)[i] for m in matches.values()) for i in range(3))
        totals[t] = (tp, fp, fn)
    tp, fp, fn = totals[0.5]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    all_ious = np.concatenate([m.ious for m in matches.values()])
    per_image = {name: m.dsb_score() for name, m in matches.items()}
    return Report(
        dsb_score=float(np.mean(list(per_image.values()))),
        ap50=_ratio(tp, tp + fp + fn),
        ap75=_ratio(totals[0.75][0], sum(totals[0.75])),
        precision50=precision,
        recall50=recall,
        f1_50=_ratio(2 * precision * recall, precision + recall, empty=0.0),
        mean_matched_iou=float(all_ious.mean()) if all_ious.size else 0.0,
        n_images=len(matches),
        n_true=sum(m.n_true for m in matches.values()),
        n_pred=sum(m.n_pred for m in matches.values()),
        per_image=per_image,
    )


def score(segmenter, samples: list, true_diameter: bool = False, progress: bool = False) -> Report:
    """Segment samples (``io.Sample``) with ``segmenter`` and score them. ``true_diameter`` uses each image's
    true median nucleus diameter instead of the estimate (during training, where only the network is judged)."""
    def pairs():
        for s in tqdm(samples, desc="scoring", unit="img", disable=not progress, leave=False):
            diameter = median_diameter(s.labels) if true_diameter else None
            yield s.id, s.labels, segmenter.segment(s.image, diameter=diameter or None).labels

    return evaluate(pairs())
