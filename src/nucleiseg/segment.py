"""Whole-image segmentation: normalise, estimate the nucleus size, rescale, predict, split instances.

The network was trained with nuclei rescaled to ``target_diameter`` pixels. An image with other nuclei
sizes is rescaled so its nuclei reach that size; the diameter is estimated by segmenting a central crop
and repeating at the scale that estimate implies until it settles.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from nucleiseg.config import PostprocessConfig
from nucleiseg.data import MIN_SCALE, prepare_input, scale_factor
from nucleiseg.io import check_image
from nucleiseg.model import DEFAULT_MODEL, ModelBundle, load_model
from nucleiseg.postprocess import instances
from nucleiseg.predict import predict_probabilities
from nucleiseg.targets import median_diameter

log = logging.getLogger(__name__)

ESTIMATE_CROP = 768  # side of the central crop used to estimate the diameter
SETTLED = math.log(1.15)  # stop refining once the scale changes by less than 15%
# where the network finds nothing, it looks again at up to this scale (nuclei of 4-8 px then reach
# training size); an image where nothing is found at all is segmented at scale 1
LOOK_FINER_UP_TO = 2.0


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

        Segments a central crop, coarse to fine: first at scale 1/8, where even large nuclei look like
        training-sized ones (at scale 1 the network would cut a large nucleus into training-sized pieces
        and the estimate would agree with itself); finer, up to 2x, where nothing is found; then at the
        scale each estimate implies until it changes by less than 15%. Returns the diameter (None if no
        nucleus was found; the scale is then 1), the settled scale and, when the crop was the whole image,
        the probabilities at that scale.
        """
        h, w = x.shape
        top, left = max(0, (h - ESTIMATE_CROP) // 2), max(0, (w - ESTIMATE_CROP) // 2)
        crop = x[top : top + ESTIMATE_CROP, left : left + ESTIMATE_CROP]
        scale, diameter, settled = MIN_SCALE, None, None
        for _ in range(6):
            probabilities = self.probabilities(crop, scale)
            # objects down to a quarter of the size the network expects at this scale still count
            found = median_diameter(instances(probabilities, self.thresholds, self.target_diameter / scale / 4))
            if found == 0:
                if diameter is None and scale < LOOK_FINER_UP_TO:
                    if scale == 1:
                        settled = (scale, probabilities)  # used if nothing is found at any scale
                    scale *= 2  # nothing at this scale: the nuclei may be small, look finer
                    continue
                break  # keep the last scale where nuclei were found (or scale 1)
            diameter, settled = found, (scale, probabilities)
            new_scale = scale_factor(diameter, self.target_diameter)
            if abs(math.log(new_scale / scale)) < SETTLED:
                break
            scale = new_scale
        scale, probabilities = settled
        return diameter, scale, probabilities if crop.shape == x.shape else None

    def image_probabilities(
        self, x: np.ndarray, diameter: float | None = None
    ) -> tuple[np.ndarray, float | None, float]:
        """(H, W) normalised image -> (2, H, W) probabilities, the nucleus diameter (as given, estimated, or
        None if the estimate found no nucleus) and the scale factor the network saw the image at."""
        probabilities = None
        if diameter is None:
            diameter, scale, probabilities = self.estimate_diameter(x)
        else:
            scale = scale_factor(diameter, self.target_diameter)
        if probabilities is None:
            probabilities = self.probabilities(x, scale)
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

