"""Whole-image segmentation: normalise, estimate the nucleus size, rescale, predict, split instances.

The network was trained with nuclei rescaled to ``target_diameter`` pixels. An image with other nuclei
sizes is rescaled so its nuclei reach that size; the diameter is estimated by segmenting a central crop
and repeating at the scale that estimate implies until it settles.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from skimage import transform

from nucleiseg.config import PostprocessConfig
from nucleiseg.data import prepare_input, rescale, scale_factor
from nucleiseg.model import DEFAULT_MODEL, ModelBundle, load_model
from nucleiseg.postprocess import instances
from nucleiseg.predict import bf16_is_fast, predict_probabilities
from nucleiseg.targets import median_diameter

log = logging.getLogger(__name__)

ESTIMATE_CROP = 768  # side of the central crop used to estimate the diameter
SETTLED = math.log(1.15)  # stop refining once the scale changes by less than 15%


@dataclass
class Segmentation:
    """Result for one image, on the image's own pixel grid."""

    labels: np.ndarray  # (H, W) int32, 0 = background
    diameter: float  # median nucleus diameter in pixels: estimated, or as given
    scale: float  # factor the image was resized by before the network


class Segmenter:
    """Segments images with a trained model.

    Parameters
    ----------
    model : ModelBundle or str
        A loaded model, a model folder, or the name of a model shipped with nucleiseg.
    thresholds : PostprocessConfig, optional
        Overrides the model's tuned thresholds.
    tile, overlap : int
        Images larger than ``tile`` are predicted in overlapping tiles, so memory stays bounded.
    tta : bool
        Average the predictions of the four flips (4x slower, slightly better).
    bf16 : bool, optional
        Run the network in bfloat16; by default where the CPU does it natively (AVX512-BF16, AMX).
    """

    def __init__(
        self,
        model: ModelBundle | str | os.PathLike = DEFAULT_MODEL,
        thresholds: PostprocessConfig | None = None,
        tile: int = 512,
        overlap: int = 64,
        tta: bool = False,
        bf16: bool | None = None,
    ):
        self.model = model if isinstance(model, ModelBundle) else load_model(model)
        self.model.network.eval()
        self.thresholds = thresholds or self.model.thresholds
        self.tile, self.overlap, self.tta = tile, overlap, tta
        self.bf16 = bf16_is_fast() if bf16 is None else bf16

    @property
    def target_diameter(self) -> float:
        return self.model.target_diameter

    def probabilities(self, x: np.ndarray, scale: float) -> np.ndarray:
        """(H, W) normalised image -> (2, H*scale, W*scale) probabilities at the network's scale."""
        x = rescale(x, scale, order=1)
        return predict_probabilities(self.model.network, x, self.tile, self.overlap, self.tta, self.bf16)

    def estimate_diameter(self, x: np.ndarray) -> tuple[float | None, float, np.ndarray | None]:
        """Estimate the median nucleus diameter of normalised image ``x`` (in its own pixels).

        Segments a central crop at scale 1, then again at the scale the estimate implies, until the scale
        changes by less than 15%. Returns the diameter (None if no nucleus was found), the settled scale,
        and, when the crop was the whole image, the network's probabilities at that scale for reuse.
        """
        h, w = x.shape
        top, left = max(0, (h - ESTIMATE_CROP) // 2), max(0, (w - ESTIMATE_CROP) // 2)
        crop = x[top : top + ESTIMATE_CROP, left : left + ESTIMATE_CROP]
        scale, diameter, settled = 1.0, None, (1.0, None)
        for _ in range(4):
            probabilities = self.probabilities(crop, scale)
            found = median_diameter(instances(probabilities, self.thresholds, self.target_diameter))
            if found == 0:
                if diameter is None:
                    settled = (scale, probabilities)
                break
            diameter, settled = found / scale, (scale, probabilities)
            new_scale = scale_factor(diameter, self.target_diameter)
            if abs(math.log(new_scale / scale)) < SETTLED:
                break
            scale = new_scale
        scale, probabilities = settled
        return diameter, scale, probabilities if crop.shape == x.shape else None

    def image_probabilities(self, x: np.ndarray, diameter: float | None = None) -> tuple[np.ndarray, float, float]:
        """(H, W) normalised image -> (2, H, W) probabilities on the image's own grid, the nucleus diameter
        (as given, or estimated) and the scale factor the network saw the image at."""
        probabilities = None
        if diameter is None:
            diameter, scale, probabilities = self.estimate_diameter(x)
            diameter = diameter or self.target_diameter
        else:
            scale = scale_factor(diameter, self.target_diameter)
        if probabilities is None:
            probabilities = self.probabilities(x, scale)
        if probabilities.shape[1:] != x.shape:  # back to the image's own pixel grid
            probabilities = np.moveaxis(rescale_to(np.moveaxis(probabilities, 0, -1), x.shape), -1, 0)
        return probabilities, diameter, scale

    def segment(self, image: np.ndarray, diameter: float | None = None) -> Segmentation:
        """Segment one image.

        Parameters
        ----------
        image : (H, W) or (H, W, C) ndarray
            Gray, RGB or RGBA; any dtype. Fluorescence, brightfield and H&E are told apart automatically.
        diameter : float, optional
            Typical nucleus diameter in pixels. Estimated from the image when not given.
        """
        image = np.asarray(image)
        if image.ndim not in (2, 3) or min(image.shape[:2]) < 2:
            raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
        if diameter is not None and not diameter > 0:
            raise ValueError(f"diameter must be a positive number of pixels, got {diameter}")
        probabilities, diameter, scale = self.image_probabilities(prepare_input(image), diameter)
        labels = instances(probabilities, self.thresholds, diameter)
        return Segmentation(labels, float(diameter), scale)


def rescale_to(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize the first two axes of ``array`` to ``shape`` (bilinear)."""
    return transform.resize(array, tuple(shape) + array.shape[2:], order=1, preserve_range=True).astype(array.dtype)

