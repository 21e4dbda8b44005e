"""Figures: nucleus outlines over images, side-by-side comparisons, training curves.

The only module that imports matplotlib, and only where a figure is drawn (an overlay does not need it,
and importing it costs a second of every segmentation run). Figures are drawn without pyplot, so no
display is needed and a notebook's plotting backend is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from skimage.color import hsv2rgb

from nucleiseg.io import atomic_path, to_rgb_uint8


def label_colours(n: int, random_seed: int = 0) -> np.ndarray:
    """(n + 1, 3) uint8 distinct-looking colours, row 0 black; shuffled so neighbours differ."""
    rng = np.random.default_rng(random_seed)
    hues = rng.permutation(n) / max(n, 1)
    rgb = hsv2rgb(np.stack([hues, np.full(n, 0.9), np.full(n, 1.0)], axis=1))
    return np.vstack([[0, 0, 0], (rgb * 255).astype(np.uint8)]).astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W[, C]) image and (H, W) labels -> (H, W, 3) uint8 with each nucleus outlined in its own colour."""
    rgb = to_rgb_uint8(image).copy()
    edges = inner_boundaries(labels)
    colours = label_colours(int(labels.max()))
    rgb[edges] = colours[labels[edges]]
    return rgb


def inner_boundaries(labels: np.ndarray) -> np.ndarray:
    """The pixels of each nucleus next to another label (4-neighbours; the image's edge is no boundary):
    ``skimage.segmentation.find_boundaries(labels, mode="inner")`` in a few comparisons."""
    edges = np.zeros(labels.shape, bool)
    for a, b in (np.s_[1:], np.s_[:-1]), (np.s_[:-1], np.s_[1:]):
        edges[a] |= labels[a] != labels[b]
        edges[:, a] |= labels[:, a] != labels[:, b]
    return edges & (labels > 0)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        # level 1: a third of the default level's time on overlays, for files 15% larger
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)


def _save_figure(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def comparison_figure(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]], path: str | os.PathLike
) -> None:
    """One row per image: image / ground truth / prediction, nuclei outlined. ``rows`` holds
    (title, image, true labels or None, predicted labels)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for ax_row, (title, image, true, pred) in zip(axes, rows, strict=True):
        panels = [
            (to_rgb_uint8(image), title),
            (overlay(image, true) if true is not None else to_rgb_uint8(image) * 0, "ground truth"
             + (f" ({int(len(np.unique(true)) - 1)} nuclei)" if true is not None else ": none")),
            (overlay(image, pred), f"prediction ({int(len(np.unique(pred)) - 1)} nuclei)"),
        ]
        for ax, (picture, name) in zip(ax_row, panels, strict=True):
            ax.imshow(picture)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    _save_figure(fig, path)


def mark(rgb: np.ndarray, labels: np.ndarray, marked: np.ndarray, colour=(255, 255, 0)) -> np.ndarray:
    """Tint the nuclei of ``labels`` listed in ``marked`` with ``colour`` (half opacity), on a copy of ``rgb``."""
    rgb = rgb.copy()
    inside = np.isin(labels, marked) & (labels > 0)
    rgb[inside] = (rgb[inside] // 2 + np.asarray(colour, np.uint8) // 2).astype(np.uint8)
    return rgb


def error_figure(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str | os.PathLike) -> None:
    """One row per image: image / truth with the missed nuclei tinted / prediction with the false nuclei
    tinted yellow (no match at IoU > 0.5: visible on fluorescence and on H&E). ``rows`` holds (title, image,
    true labels, predicted labels)."""
    from matplotlib.figure import Figure

    from nucleiseg.metrics import unmatched

    fig = Figure(figsize=(12, 4 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for ax_row, (title, image, true, pred) in zip(axes, rows, strict=True):
        missed, false = unmatched(true, pred)
        panels = [
            (to_rgb_uint8(image), title),
            (mark(overlay(image, true), true, missed), f"truth: {len(missed)} of {len(np.unique(true)) - 1} missed"),
            (mark(overlay(image, pred), pred, false), f"prediction: {len(false)} of {len(np.unique(pred)) - 1} false"),
        ]
        for ax, (picture, name) in zip(ax_row, panels, strict=True):
            ax.imshow(picture)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    _save_figure(fig, path)


def plot_history(history: Sequence[dict], path: str | os.PathLike, x_key: str = "epoch") -> None:
    """Training loss (and validation loss or score, where given) per epoch (rows as in history.csv) -> PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    loss_ax = fig.subplots()
    x = [float(r[x_key]) for r in history]
    loss_ax.plot(x, [float(r["train_loss"]) for r in history], color="tab:blue", label="training loss")
    if history and "val_loss" in history[0]:  # the seed recipe's early stopping watches the validation loss
        loss_ax.plot(x, [float(r["val_loss"]) for r in history], "--", color="tab:blue", label="validation loss")
        loss_ax.legend(loc="upper center")
    loss_ax.set_xlabel(x_key)
    loss_ax.set_ylabel("loss", color="tab:blue")
    score_key = "val_dsb" if history and "val_dsb" in history[0] else "val_score"
    scored = [(xi, float(r[score_key])) for xi, r in zip(x, history, strict=True) if r.get(score_key) not in ("", None)]
    if scored:
        score_ax = loss_ax.twinx()
        score_ax.plot(*zip(*scored, strict=True), "o-", color="tab:orange", label="validation score")
        score_ax.set_ylabel(f"validation {score_key}", color="tab:orange")
    fig.tight_layout()
    _save_figure(fig, path)
