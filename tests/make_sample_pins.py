"""Pin the label images the shipped model gives on the bundled samples (tests/data/sample_pins.json).

Run it only when a new model is shipped, in the same commit as the model:

    python tests/make_sample_pins.py

``tests/test_sample_pins.py`` then checks that code changes leave every label image unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "src" / "nucleiseg" / "samples"
PINS = HERE / "data" / "sample_pins.json"


def pin(labels: np.ndarray) -> dict:
    """Nucleus count and SHA-256 of the (H, W) labels as little-endian int32: equal pins, equal label images."""
    labels = np.ascontiguousarray(labels, dtype="<i4")
    return {"shape": list(labels.shape), "nuclei": int(labels.max()),
            "sha256": hashlib.sha256(labels.tobytes()).hexdigest()}


def sample_pins() -> dict[str, dict]:
    """Segment every bundled sample with the shipped model and pin its labels."""
    from nucleiseg import Segmenter, read_image

    segmenter = Segmenter()
    return {path.name: pin(segmenter.segment(read_image(path)).labels) for path in sorted(SAMPLES.glob("*.png"))}


if __name__ == "__main__":
    PINS.write_text(json.dumps(sample_pins(), indent=2) + "\n")
    print(f"wrote {PINS}")
