"""How often the polarity rule for gray images reads an image inverted, on whole images and on their densest part.

    python benchmarks/polarity.py [--window 256]

A gray image's polarity (nuclei bright on a dark background, or dark on a light one) is decided by where its
median pixel lies between its 1st and 99.8th percentiles (``data.has_bright_background``: above half-way, a
light background). Dense images fool it: where nuclei cover most pixels, the median is a nucleus pixel.
Colour images are read through their haematoxylin channel and do not use this rule; here they are converted to
gray, as a gray camera would see the same tissue. For every labelled image of ../shared/data (stage1_train,
tnbc, bbbc039), whole and its window of ``--window`` pixels with the most nucleus pixels, the truth is
whether the nuclei are darker than the rest on average; the kind of image (H&E as gray, gray brightfield,
gray fluorescence) is that truth on the whole image, not the rule's answer. Prints, per kind and part, how
many are read inverted, the range of the median's position (0 = at the 1st percentile, 1 = at the 99.8th),
which shows how close each kind comes to the half-way line, and the largest share of nucleus pixels;
windows all nucleus (no background to tell) are counted apart.
"""

from __future__ import annotations

import argparse

import numpy as np

from nucleiseg.data import GRAY_LEVELS, has_bright_background, is_colour
from nucleiseg.io import load_dataset, to_gray

ROOTS = ("../shared/data/dsb2018/stage1_train", "../shared/data/tnbc", "../shared/data/bbbc039")


def densest_window(labels: np.ndarray, side: int) -> tuple[slice, slice]:
    """The ``side`` x ``side`` window (or the whole image, where smaller) with the most nucleus pixels."""
    side_y, side_x = min(side, labels.shape[0]), min(side, labels.shape[1])
    cumulative = np.pad((labels > 0).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = (cumulative[side_y:, side_x:] - cumulative[:-side_y, side_x:] - cumulative[side_y:, :-side_x]
              + cumulative[:-side_y, :-side_x])
    y, x = np.unravel_index(np.argmax(counts), counts.shape)
    return slice(y, y + side_y), slice(x, x + side_x)


def median_position(gray: np.ndarray) -> float:
    low, median, high = np.percentile(gray, GRAY_LEVELS)
    return float((median - low) / max(high - low, 1e-6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    rows: dict[tuple[str, str], list[tuple[bool, float, float]]] = {}
    all_nucleus = 0
    for root in ROOTS:
        for s in load_dataset(root, progress=False):
            gray = to_gray(s.image).astype(np.float32)
            nuclei = s.labels > 0
            dark_nuclei = gray[nuclei].mean() < gray[~nuclei].mean()
            kind = "H&E as gray" if is_colour(s.image) else "gray brightfield" if dark_nuclei else "gray fluorescence"
            for part, window in (("whole", np.s_[:, :]), ("densest window", densest_window(s.labels, args.window))):
                g, inside = gray[window], nuclei[window]
                if inside.all():
                    all_nucleus += 1
                    continue
                dark_here = g[inside].mean() < g[~inside].mean()
                rows.setdefault((kind, part), []).append(
                    (has_bright_background(g) != dark_here, median_position(g), inside.mean()))
    print("| images | part | read inverted | median's position: range | nucleus pixels: most |")
    print("|---|---|---|---|---|")
    for (kind, part), values in sorted(rows.items()):
        inverted, position, cover = (np.array(v) for v in zip(*values, strict=True))
        print(f"| {kind} | {part} | {int(inverted.sum())} of {len(values)} | {position.min():.2f}-{position.max():.2f}"
              f" | {cover.max():.0%} |")
    print(f"windows all nucleus, left out: {all_nucleus}")


if __name__ == "__main__":
    main()
