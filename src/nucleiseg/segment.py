"""Whole-image segmentation: normalise, estimate the nucleus size, rescale, predict, split instances.

The network was trained with nuclei rescaled to ``target_diameter`` pixels. An image with other nuclei
sizes is rescaled so its nuclei reach that size; the diameter is read from the network's size output on
a central crop (see ``Segmenter.estimate_diameter``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from nucleiseg.config import PostprocessConfig
from nucleiseg.data import decode_size, prepare_input, scale_factor
from nucleiseg.io import check_image
from nucleiseg.model import DEFAULT_MODEL, ModelBundle, load_model
from nucleiseg.postprocess import instances
from nucleiseg.predict import predict_probabilities

log = logging.getLogger(__name__)

ESTIMATE_CROP = 768  # side of the central crop used to estimate the diameter
KEEP_WITHIN = math.log(1.3)  # a pass within 1.3x of the scale its size output implies is kept
MAX_ESTIMATE_PASSES = 3
# where the network finds nothing at scale 1 it looks again at this scale (nuclei of 2-4 px then reach
# the smallest size it was trained on); an image where nothing is found at all is segmented at scale 1
LOOK_FINER = 2.0


@dataclass
class Segmentation:
    """Result for one image, on the image's own pixel grid."""

    labels: np.ndarray  # (H, W) int32, 0 = background
    diameter: float  # median nucleus diameter in pixels: estimated, or as given
    scale: float  # factor the image was resized by before the network
    diameter_known: bool  # False when the estimate found no nucleus and the training diameter was used


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
    bf16 : bool
        Run the network in bfloat16: faster on CPUs that compute it natively (AVX512-BF16, AMX; see
        ``predict.bf16_is_fast``), probabilities differ by about 0.01 and labels very slightly.
    """

    def __init__(
        self,
        model: ModelBundle | str | os.PathLike = DEFAULT_MODEL,
        thresholds: PostprocessConfig | None = None,
        tile: int = 512,
        overlap: int = 64,
        tta: bool = False,
        bf16: bool = False,
    ):
        self.model = model if isinstance(model, ModelBundle) else load_model(model)
        self.model.network.eval()
        self.thresholds = thresholds or self.model.thresholds
        if tile % 16 or tile <= 2 * overlap:
            raise ValueError(f"tile ({tile}) must be a multiple of 16 and more than twice the overlap ({overlap})")
        self.tile, self.overlap, self.tta, self.bf16 = tile, overlap, tta, bf16

    def settings(self) -> dict:
        """What determines the output: a hash of the weights, the thresholds and the prediction options."""
        digest = hashlib.sha1()
        for name, tensor in self.model.network.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.cpu().numpy().tobytes())
        return {"weights": digest.hexdigest()[:16], "target_diameter": self.target_diameter,
                "thresholds": asdict(self.thresholds), "tile": self.tile, "overlap": self.overlap,
                "tta": self.tta, "bf16": self.bf16}

    @property
    def target_diameter(self) -> float:
        return self.model.target_diameter

    def probabilities(self, x: np.ndarray, scale: float) -> np.ndarray:
        """(H, W) normalised image -> (2, H, W) probabilities, the network seeing it resized by ``scale``."""
        return predict_probabilities(self.model.network, x, scale, self.tile, self.overlap, self.tta, self.bf16)

    def estimate_diameter(self, x: np.ndarray) -> tuple[float | None, float, np.ndarray | None]:
        """Estimate the median nucleus diameter of normalised image ``x`` (in its own pixels).

        The network's size output says, for every nucleus pixel, how large its nucleus is; it was
        trained on nuclei from 0.3x to 4x the training size, so one pass over a central crop at scale 1
        reads the size directly, with no iteration that could settle on clusters or texture. A second
        pass, at the scale that reading implies, runs only when that scale is off by more than 1.3x
        (the network was trained at 0.6-1.6x, so a pass within 1.3x is kept as it is), and a third only if
        the second disagrees. Where nothing is found at scale 1, one pass at 2x looks for small nuclei.

        Returns the diameter (None if no nucleus was found; the scale is then 1), the scale of the last
        pass and, when the crop was the whole image, the outputs of that pass.
        """
        h, w = x.shape
        top, left = max(0, (h - ESTIMATE_CROP) // 2), max(0, (w - ESTIMATE_CROP) // 2)
        crop = x[top : top + ESTIMATE_CROP, left : left + ESTIMATE_CROP]
        scale, diameter, settled = 1.0, None, None
        for _ in range(MAX_ESTIMATE_PASSES):
            outputs = self.probabilities(crop, scale)
            found = self.read_diameter(outputs, scale)
            if found is None:
                if diameter is None and scale == 1.0:
                    settled = (scale, outputs)  # used if nothing is found at 2x either
                    scale = LOOK_FINER
                    continue
                break
            diameter, settled = found, (scale, outputs)
            new_scale = scale_factor(diameter, self.target_diameter)
            if abs(math.log(new_scale / scale)) < KEEP_WITHIN:
                break
            scale = new_scale
        scale, outputs = settled
        return diameter, scale, outputs if crop.shape == x.shape else None

    def read_diameter(self, outputs: np.ndarray, scale: float) -> float | None:
        """Median nucleus diameter (image pixels) from the size output over the predicted foreground of a
        pass at ``scale``; None when less than one nucleus' worth of foreground was found.

        Each pixel is weighted by 1 / (its nucleus' area), so that every nucleus counts once, as in the
        median over nuclei that the training targets use."""
        foreground = outputs[0] > self.thresholds.foreground_threshold
        if foreground.sum() < np.pi * (self.target_diameter / scale / 2) ** 2 / 4:
            return None
        diameters = decode_size(outputs[2][foreground], self.target_diameter) / scale
        order = np.argsort(diameters)
        weights = np.cumsum(1.0 / diameters[order] ** 2)
        return float(diameters[order][np.searchsorted(weights, weights[-1] / 2)])

    def image_probabilities(
        self, x: np.ndarray, diameter: float | None = None
    ) -> tuple[np.ndarray, float | None, float]:
        """(H, W) normalised image -> (K, H, W) network outputs, the nucleus diameter (as given, estimated,
        or None if the estimate found no nucleus) and the scale factor the network saw the image at."""
        outputs = None
        if diameter is None:
            diameter, scale, outputs = self.estimate_diameter(x)
        else:
            scale = scale_factor(diameter, self.target_diameter)
        if outputs is None:
            outputs = self.probabilities(x, scale)
        return outputs, diameter, scale

    def segment(self, image: np.ndarray, diameter: float | None = None) -> Segmentation:
        """Segment one image.

        Parameters
        ----------
        image : (H, W) or (H, W, C) ndarray
            Gray, RGB or RGBA; any dtype. Fluorescence, brightfield and H&E are told apart automatically.
        diameter : float, optional
            Typical nucleus diameter in pixels. Estimated from the image when not given.
        """
        # raises ImageReadError (a ValueError) that says what is wrong and how to fix it
        image = check_image(image, max_megapixels=np.inf)
        if diameter is not None and not diameter > 0:
            raise ValueError(f"diameter must be a positive number of pixels, got {diameter}")
        given = diameter is not None
        probabilities, diameter, scale = self.image_probabilities(prepare_input(image), diameter)
        if diameter is None:
            log.info("no nucleus found while estimating the diameter; using %.0f px", self.target_diameter)
        labels = instances(probabilities, self.thresholds, diameter or self.target_diameter)
        return Segmentation(labels, diameter or self.target_diameter, scale, given or diameter is not None)

