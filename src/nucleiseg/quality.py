"""How good a segmentation probably is: an estimate of its competition score from signals the run already
has, and a flag on the images a person should look at.

The signals cost no extra network pass: they are read from the network's outputs and the labels.

- ``border_uncertainty``: pixels where the foreground probability is undecided (0.25-0.75), per pixel of
  foreground. Crisp nuclei have a thin undecided rim; faint, blurred or unfamiliar images a wide one.
- ``size_disagreement``: the network's size output says how wide the nucleus under each pixel is; a
  nucleus drawn around several nuclei, or cut into pieces, disagrees with it. Mean over nuclei of
  |log2(size output / the nucleus' own diameter)|.
- ``centre_peak``: mean over nuclei of the centre map's highest value in them: low where nuclei were found
  without a clear centre.
- ``faint_objects``: blobs of weak foreground (probability above 0.2) outside every nucleus and as large as
  the smallest nucleus kept, per nucleus: nuclei the network half saw and the thresholds dropped.
- ``crowding``: share of nuclei that touch another one (touching nuclei are the hardest to split).
- ``area_spread``: standard deviation of log area over nuclei (merges and fragments widen it).
- ``foreground_confidence``: mean foreground probability inside the nuclei.
- ``concavity``: mean over nuclei of the share of their convex outline they leave empty (1 - solidity, with
  the convex hull approximated by the 16-sided polygon around the nucleus): two nuclei drawn as one, and
  pieces of a cut nucleus, are concave.
- ``stained``: 1 for stained colour images read through their haematoxylin channel (the model's weakest
  type), else 0.

``QualityModel`` maps them to an estimated score by a linear fit on the validation split
(``benchmarks/quality.py`` fits it and writes ``quality.json`` into the model folder).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from nucleiseg.config import from_dict
from nucleiseg.data import decode_size
from nucleiseg.io import atomic_path
from nucleiseg.measure import label_maximum
from nucleiseg.viz import inner_boundaries

QUALITY_FILE = "quality.json"
SIGNALS = ("border_uncertainty", "size_disagreement", "centre_peak", "area_spread", "foreground_confidence",
           "faint_objects", "crowding", "stained", "concavity")
FAINT = 0.2  # foreground probability of a faint object
CONCAVITY_MIN_AREA = 9  # pixels: smaller nuclei are too coarse to have a shape


def quality_signals(probabilities: np.ndarray, labels: np.ndarray, target_diameter: float, scale: float,
                    stained: bool) -> dict[str, float]:
    """The signals of ``SIGNALS``, and the number of nuclei, for one segmented image.

    Parameters
    ----------
    probabilities : (3, H, W) ndarray
        Foreground, centre and size outputs on the image's grid.
    labels : (H, W) int ndarray
        The nuclei found in them.
    target_diameter, scale : float
        The nucleus diameter the network was trained at, and the factor the image was rescaled by.
    stained : bool
        Whether the image was read through its haematoxylin channel.
    """
    foreground, centre, size = probabilities[:3]
    n = int(labels.max())
    found = max(int((foreground > 0.5).sum()), 1)
    signals = {"nuclei": n, "border_uncertainty": float(((foreground > 0.25) & (foreground < 0.75)).sum() / found),
               "stained": float(stained)}
    if n == 0:  # nothing to measure; QualityModel.estimate gives 0 (a person should look)
        return signals | {name: 0.0 for name in SIGNALS if name not in signals}
    inside = labels > 0
    owner = labels[inside]  # per-nucleus sums over nucleus pixels only: most pixels are background
    area = np.bincount(owner, minlength=n + 1)[1:].astype(float)
    present = area > 0
    area = np.maximum(area, 1)
    # the size output as log2(diameter in the network's pixels / training diameter), averaged per nucleus
    size_code = np.log2(decode_size(size[inside], target_diameter) / target_diameter)
    predicted = np.bincount(owner, weights=size_code, minlength=n + 1)[1:] / area
    own = np.log2(np.sqrt(4 * area / np.pi) * scale / target_diameter)
    peak = label_maximum(owner, centre[inside], n + 1)
    confidence = np.bincount(owner, weights=foreground[inside], minlength=n + 1)[1:] / area
    faint, _ = ndi.label((foreground > FAINT) & ~inside)
    faint_areas = np.bincount(faint.ravel())[1:]
    # nuclei with a pixel next to (8-connected) a pixel of another nucleus
    touching = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:]),
                 (labels[:-1, :-1], labels[1:, 1:]), (labels[:-1, 1:], labels[1:, :-1])):
        contact = (a != b) & (a > 0) & (b > 0)
        touching.update(np.unique(a[contact]), np.unique(b[contact]))
    shaped = area >= CONCAVITY_MIN_AREA
    return signals | {
        "size_disagreement": float(np.mean(np.abs(predicted - own)[present])),
        "centre_peak": float(np.mean(peak[1:][present])),
        "area_spread": float(np.std(np.log(area[present]))),
        "foreground_confidence": float(np.mean(confidence[present])),
        "faint_objects": float((faint_areas >= area[present].min()).sum() / n),
        "crowding": float(len(touching) / n),
        "concavity": float(np.mean(1 - solidity(labels, n)[shaped])) if shaped.any() else 0.0,
    }


def solidity(labels: np.ndarray, n: int, directions: int = 16) -> np.ndarray:
    """Area / convex area of each of the ``n`` labels, the convex hull approximated by the polygon of
    ``directions`` support lines at equal angles around the label's pixels (squares), in one vectorised pass
    over the boundary pixels instead of a hull per nucleus; 1 for an absent label."""
    ys, xs = np.nonzero(inner_boundaries(np.pad(labels, 1))[1:-1, 1:-1])  # the image's edge bounds a nucleus too
    owner = labels[ys, xs]
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    present = area > 0
    angles = np.arange(directions) * 2 * np.pi / directions
    normals = np.stack([np.cos(angles), np.sin(angles)], 1)  # (x, y) of each support line's normal
    # support value of each label in each direction: its farthest pixel centre plus half a pixel's extent
    projections = np.stack([xs * ux + ys * uy for ux, uy in normals], 1)
    support = label_maximum(owner, projections, n + 1)[1:][present] + np.abs(normals).sum(1) / 2
    # corners of the polygon where consecutive support lines meet, then its area (shoelace)
    following, support_next = np.roll(normals, -1, 0), np.roll(support, -1, 1)
    det = normals[:, 0] * following[:, 1] - normals[:, 1] * following[:, 0]
    cx = (support * following[:, 1] - support_next * normals[:, 1]) / det
    cy = (normals[:, 0] * support_next - following[:, 0] * support) / det
    hull = 0.5 * np.abs(np.sum(cx * np.roll(cy, -1, 1) - np.roll(cx, -1, 1) * cy, 1))
    out = np.ones(n)
    out[present] = area[present] / hull
    return out


@dataclass
class QualityModel:
    """A linear estimate of the competition score from standardised signals, and the flag threshold."""

    signals: list[str]
    mean: list[float]
    std: list[float]
    weights: list[float]
    intercept: float
    flag_below: float  # an image whose estimate is below this is flagged for checking
    calibrated_on: str = ""

    def estimate(self, signals: dict[str, float]) -> float:
        """Estimated competition score in [0, 1]; 0 where no nucleus was found."""
        if signals["nuclei"] == 0:
            return 0.0
        x = (np.array([signals[name] for name in self.signals]) - self.mean) / self.std
        return float(np.clip(self.intercept + x @ np.array(self.weights), 0.0, 1.0))

    def flagged(self, estimate: float) -> bool:
        return estimate < self.flag_below

    @classmethod
    def fit(cls, signals: list[dict[str, float]], scores: list[float], flag_share: float = 0.1,
            ridge: float = 1.0, calibrated_on: str = "") -> QualityModel:
        """Least squares with a small ridge on standardised signals; the flag threshold is the estimate at
        which ``flag_share`` of the fitted images are flagged."""
        x = np.array([[s[name] for name in SIGNALS] for s in signals])
        y = np.asarray(scores, float)
        mean, std = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
        z = (x - mean) / std
        weights = np.linalg.solve(z.T @ z + ridge * np.eye(z.shape[1]), z.T @ (y - y.mean()))
        model = cls(list(SIGNALS), mean.tolist(), std.tolist(), weights.tolist(), float(y.mean()), 0.0, calibrated_on)
        estimates = [model.estimate(s) for s in signals]
        model.flag_below = float(np.quantile(estimates, flag_share))
        return model

    def save(self, folder: str | os.PathLike) -> None:
        with atomic_path(Path(folder) / QUALITY_FILE) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")


def load_quality(folder: str | os.PathLike | None) -> QualityModel | None:
    """The model folder's quality.json, or None where it has none."""
    path = Path(folder) / QUALITY_FILE if folder is not None else None
    if path is None or not path.exists():
        return None
    model = from_dict(QualityModel, json.loads(path.read_text()))
    if set(model.signals) - set(SIGNALS):
        raise ValueError(f"{path}: unknown signals {sorted(set(model.signals) - set(SIGNALS))}")
    return model
