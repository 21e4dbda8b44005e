"""Whole-image segmentation: normalise, estimate the nucleus size, rescale, predict, split instances.

The network was trained with nuclei rescaled to ``target_diameter`` pixels. An image with other nuclei
sizes is rescaled so its nuclei reach that size; the diameter is read from the network's size output on
a central crop (see ``Segmenter.estimate_diameter``).

Segmentation returns a ``Segmentation`` and writes nothing; ``outputs`` writes it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nucleiseg.config import InferenceConfig
from nucleiseg.data import STAIN, decode_size, network_input, scale_factor
from nucleiseg.io import ImageMetadata, ImageReadError, check_image, read_image, read_metadata, to_gray
from nucleiseg.model import DEFAULT_MODEL, ModelBundle, gpu_driver_present, load_model
from nucleiseg.postprocess import instances
from nucleiseg.predict import OnnxPredictor, Predictor, make_predictor, predict_probabilities
from nucleiseg.quality import load_quality, quality_signals

log = logging.getLogger(__name__)

ESTIMATE_CROP = 768  # side of the central crop used to estimate the diameter
CHECK_CROP = 128  # side of its central part where a first reading of large nuclei is checked at full size
# the first pass sees the crop at half size, a quarter of the cost of a pass at scale 1: the size output
# reads nuclei of 10-140 px there (0.3-4x the training size); smaller ones vanish, and what it then reads
# may be texture (~30 px on brightfield images of 4 px nuclei), so it is trusted only to shrink the image
FIRST_SCALE = 0.5
KEEP_WITHIN = math.log(1.3)  # a pass within 1.3x of the scale its size output implies is kept
# an image is segmented with its nuclei at 1.2x the training size (or as it is, where that is within 1.3x):
# the network outlines nuclei a little larger than that size better than smaller ones (validation split and
# external sets, with the diameter estimated or the true one given: as good or better than at exactly the
# training size)
SEEN_LARGER = 1.2
MAX_ESTIMATE_PASSES = 4  # the half-size look, then at most three, as many as a first look at scale 1 had
# where the network finds nothing it looks again at twice the scale, up to this one (nuclei of 2-4 px then
# reach the smallest size it was trained on); an image where nothing is found at all is segmented at scale 1
LOOK_FINER = 2.0
# the network was trained on nuclei 0.6-1.6x its training size: a given diameter is usable where the rescaling
# bounds bring it within that range
TRAINED_SPREAD = 1.6


@dataclass
class Segmentation:
    """Result for one image, on the image's own pixel grid."""

    labels: np.ndarray  # (H, W) int32, 0 = background
    diameter: float  # median nucleus diameter in pixels: estimated, or as given
    scale: float  # factor the image was resized by before the network
    # True when the diameter was estimated from the image; False when it was given, or when the
    # estimate found no nucleus and the training diameter was used
    diameter_estimated: bool
    image: np.ndarray | None = None  # the image as given or read: (H, W) or (H, W, C), its own dtype
    metadata: ImageMetadata = field(default_factory=ImageMetadata)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: read, predict, postprocess
    # what the quality estimate is made of (``quality.quality_signals``); the estimated competition score in
    # [0, 1] and whether it is low enough that a person should check the image (None for a model folder
    # without quality.json)
    signals: dict[str, float] = field(default_factory=dict)
    quality: float | None = None
    flagged: bool | None = None


@dataclass
class Prediction:
    """The network's outputs for one image (``Segmenter.predict``), before its nuclei are drawn from them
    (``Segmenter.label_nuclei``)."""

    probabilities: np.ndarray  # (K, H, W) on the image's grid: foreground, centre, size
    diameter: float  # as given, estimated, or the training diameter where the estimate found nothing
    scale: float
    diameter_estimated: bool
    stained: bool  # read through its haematoxylin channel
    image: np.ndarray
    metadata: ImageMetadata = field(default_factory=ImageMetadata)
    timings: dict[str, float] = field(default_factory=dict)


class Segmenter:
    """Segments images with a trained model.

    Parameters
    ----------
    model : ModelBundle, str or path
        A loaded model, a model folder, or the name of a model shipped with nucleiseg.
    config : InferenceConfig, optional
        The settings to segment with; by default the model's own (``ModelBundle.inference``).
    predictor : Predictor, optional
        Runs the network; by default the one of ``config.engine`` (``predict.PREDICTORS``).
    device : str
        Where the network runs: "auto" (a CUDA GPU when PyTorch sees one, else Apple's MPS, else the CPU),
        "cpu", "cuda" or "mps"; a device that is not there is an error. Post-processing runs on the CPU.
    **settings
        Settings to change (``InferenceConfig.updated``), e.g. ``tta=True``, ``marker_threshold=0.4`` or
        ``thresholds=PostprocessConfig(...)``; None keeps the setting as it is. Thresholds given so apply to
        every image: the model's thresholds for stained images are then not used.

    A Segmenter built from a model folder or name pickles as that folder and its settings, so that a
    worker process rebuilds it.

    Examples
    --------
    >>> from nucleiseg import Segmenter, read_image
    >>> result = Segmenter(tta=True).segment(read_image("cells.tif"))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: ModelBundle | str | os.PathLike = DEFAULT_MODEL,
        config: InferenceConfig | None = None,
        predictor: Predictor | None = None,
        device: str = "auto",
        **settings,
    ):
        if isinstance(model, ModelBundle):
            self.bundle, self.source = model, None
        else:
            self.bundle = load_model(model, lazy=True)  # the onnx engine does not read the weights
            folder = Path(model)
            self.source = str(folder.resolve()) if folder.is_dir() else str(model)  # a shipped model's name
        config = config or self.bundle.inference
        self.config = config.updated(**{k: v for k, v in settings.items() if v is not None})
        self.custom_predictor = predictor is not None
        # the name, not the torch.device: a worker process that rebuilds this Segmenter picks its own GPU
        self.device = device
        # on a machine without a GPU driver the network stays on the CPU, where it is read, without asking
        # PyTorch (its import is most of the start-up)
        if predictor is None and device != "cpu" and (device != "auto" or gpu_driver_present()):
            from nucleiseg.network import select_device

            self.bundle.network.to(select_device(device))
        self.predictor = predictor or make_predictor(self.bundle, self.config)
        self.quality = load_quality(self.bundle.folder)

    def __reduce__(self):
        if self.source is None or self.custom_predictor:
            raise TypeError("only a Segmenter made from a model folder or name, with its own predictor, can be "
                            "pickled; save the model with save_model and pass its folder")
        return Segmenter, (self.source, self.config, None, self.device)

    @property
    def network_on_cpu(self) -> bool:
        """True where the network is one of nucleiseg's engines running on the CPU, which several threads may
        call at once (``batch.segment_batch`` segments images side by side then)."""
        if self.custom_predictor:
            return False
        return isinstance(self.predictor, OnnxPredictor) or self.bundle.on_cpu

    @property
    def thresholds(self):
        return self.config.thresholds

    @property
    def target_diameter(self) -> float:
        return self.config.target_diameter

    def settings(self) -> dict:
        """What determines the output: the package version, the architecture, a hash of the weights, the
        predictor and every inference setting."""
        import nucleiseg

        network_file = ""
        if isinstance(self.predictor, OnnxPredictor) and not self.custom_predictor:  # checked: these weights
            weights, network_file = self.predictor.weights, f":{Path(self.predictor.path).name}"
        else:
            from nucleiseg.network import weights_digest

            weights = weights_digest(self.bundle.network)
        return {"version": nucleiseg.__version__, "architecture": self.bundle.architecture,
                "weights": weights, "predictor": type(self.predictor).__name__ + network_file,
                "inference": asdict(self.config), "quality": self.quality and asdict(self.quality)}

    def check_diameter(self, diameter: float) -> None:
        """Raise ValueError for a diameter that is not a positive number or that no rescaling within the
        bounds brings to a size the network was trained on (it would find nothing)."""
        if not diameter > 0 or not math.isfinite(diameter):
            raise ValueError(f"diameter must be a positive number of pixels, got {diameter}")
        low = self.target_diameter / self.config.max_scale / TRAINED_SPREAD
        high = self.target_diameter / self.config.min_scale * TRAINED_SPREAD
        if not low <= diameter <= high:
            raise ValueError(f"diameter {diameter:g} px is outside what this model segments ({low:.1f}-{high:.0f} "
                             f"px: nuclei of {self.target_diameter:g} px rescaled by {self.config.min_scale:g}-"
                             f"{self.config.max_scale:g}x)")

    def scale_for(self, diameter: float) -> float:
        """The factor that brings nuclei of ``diameter`` pixels to the training size, within the bounds."""
        return scale_factor(diameter, self.target_diameter, self.config.min_scale, self.config.max_scale)

    def segmentation_scale(self, diameter: float) -> float:
        """The factor an image with nuclei of ``diameter`` pixels is segmented at: its nuclei at 1.2x the
        training size (``SEEN_LARGER``), or the image as it is where that is within 1.3x."""
        scale = self.scale_for(diameter / SEEN_LARGER)
        return 1.0 if abs(math.log(scale)) < KEEP_WITHIN else scale

    def probabilities(self, x: np.ndarray, scale: float, region: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """(H, W) normalised image -> (K, H, W) probabilities, the network seeing it resized by ``scale``;
        with ``region`` (y0, y1, x0, x1), that part only, as the whole image's prediction has it."""
        return predict_probabilities(self.predictor, x, scale, self.config, region)

    def estimate_diameter(self, x: np.ndarray) -> tuple[float | None, float, np.ndarray | None]:
        """Estimate the median nucleus diameter of normalised image ``x`` (in its own pixels).

        The network's size output says, for every nucleus pixel, how large its nucleus is; it was
        trained on nuclei from 0.3x to 4x the training size, so one pass over a central crop reads the size
        directly, with no iteration that could settle on clusters or texture. That pass sees the crop at half
        size (``FIRST_SCALE``): cheap, and enough to read large nuclei. It is kept where the nuclei it saw were
        1-1.3x the training size; where they looked larger, the next pass runs at the scale the image is
        segmented at (``segmentation_scale``); where they looked smaller (or were too small to see), at that
        scale but at least the image's own. Where it reads nuclei larger than the training size, a look at the
        centre at full size (``CHECK_CROP``) checks that they are not texture over nuclei too small to see at
        half size: where that look finds nuclei less than a third the size, the whole crop is looked at at full
        size instead; where it finds none although it saw the whole crop, or more than three times the
        foreground the half-size pass found there (nuclei too small for half size, read as large at full size
        too), the crop is looked at at twice its size (up to ``max_scale``), as it is where the full-size pass
        that follows a half-size reading finds no nuclei. A pass is kept where its own reading
        agrees within 1.3x (the network was trained at 0.6-1.6x), else one more runs. Where nothing is found,
        the scale doubles up to 2x, to look for small nuclei.

        Returns the diameter (None if no nucleus was found; the scale is then 1), the scale of the last
        pass that found nuclei and, when the crop was the whole image, the outputs of that pass.
        """
        h, w = x.shape
        top, left = max(0, (h - ESTIMATE_CROP) // 2), max(0, (w - ESTIMATE_CROP) // 2)
        crop = x[top : top + ESTIMATE_CROP, left : left + ESTIMATE_CROP]
        scale, diameter, settled = max(FIRST_SCALE, self.config.min_scale), None, None
        finest = min(LOOK_FINER, self.config.max_scale)
        whole_look = None  # the centre look's outputs where that look was the whole crop: its full-size pass
        for made in range(1, MAX_ESTIMATE_PASSES + 1):
            outputs = whole_look if scale == 1.0 and whole_look is not None else self.probabilities(crop, scale)
            found = self.read_diameter(outputs, scale)
            if found is None:
                if diameter is None and scale < finest:  # nothing found yet: look again, finer
                    if settled is None or scale == 1.0:
                        settled = (scale, outputs)  # used if nothing is found at all
                    scale = min(2 * scale, finest)
                    continue
                if diameter is not None and settled[0] < scale == 1.0 < finest:
                    # the nuclei the half-size pass read would be plain at full size, and there are none: that
                    # reading was texture over nuclei too small to see at half size (as where the centre look
                    # finds none): look finer
                    scale, diameter, settled = finest, None, (scale, outputs)
                    continue
                break
            diameter, settled = found, (scale, outputs)
            implied = self.scale_for(diameter)
            if made == 1 and implied < scale:
                # nuclei read as larger than the training size at half size may be texture over nuclei too small
                # to see there: a look at the centre at full size (1/36 of a full-size pass) checks the reading
                cy, cx = (max(0, (side - CHECK_CROP) // 2) for side in crop.shape)
                centre = crop[cy : cy + CHECK_CROP, cx : cx + CHECK_CROP]
                closer_outputs = self.probabilities(centre, 1.0)
                closer = self.read_diameter(closer_outputs, 1.0)
                if centre.shape == crop.shape:
                    whole_look = closer_outputs
                if closer is None and whole_look is not None and finest > 1.0:
                    # the look was the whole crop at full size and found nothing: look finer
                    scale, diameter, settled = finest, None, (1.0, closer_outputs)
                    continue
                if closer is not None and 3 * closer < diameter:  # it disagrees: the whole crop at full size
                    scale, diameter, settled = 1.0, None, None
                    continue
                # real nuclei cover about as much of the centre at both scales (0.6-1x on the validation and
                # external images); three times as much at full size (and more than the least a reading needs
                # at half size) is nuclei too small to see at half size, read as large at full size too
                foreground = self.thresholds.foreground_threshold
                half_size_area = (outputs[0, cy : cy + CHECK_CROP, cx : cx + CHECK_CROP] > foreground).sum()
                full_size_area = (closer_outputs[0] > foreground).sum()
                least = self.least_foreground(scale)
                if closer is not None and full_size_area > 3 * max(half_size_area, least) and finest > 1.0:
                    scale, diameter, settled = finest, None, None
                    continue
            wanted = self.segmentation_scale(diameter)
            # the first pass only where it saw the nuclei at least at the training size: smaller, they are
            # outlined less well; a pass is never repeated at its own scale
            if abs(math.log(implied / scale)) < KEEP_WITHIN and (made > 1 or implied <= scale) or wanted == scale:
                break
            # nuclei that looked smaller than the training size at half size are looked at again at full size
            scale = max(wanted, 1.0) if made == 1 and implied > scale else wanted
        scale, outputs = settled or (1.0, None)  # None: nothing was found where the estimate looked last
        return diameter, scale, outputs if crop.shape == x.shape else None

    def least_foreground(self, scale: float) -> float:
        """The foreground (image pixels) a pass at ``scale`` must find to read a diameter: a quarter of a
        nucleus of the training size as the network saw it."""
        return np.pi * (self.target_diameter / scale / 2) ** 2 / 4

    def read_diameter(self, outputs: np.ndarray, scale: float) -> float | None:
        """Median nucleus diameter (image pixels) from the size output over the predicted foreground of a
        pass at ``scale``; None where it found less foreground than ``least_foreground``.

        Each pixel is weighted by 1 / (its nucleus' area), so that every nucleus counts once, as in the
        median over nuclei that the training targets use."""
        foreground = outputs[0] > self.thresholds.foreground_threshold
        if foreground.sum() < self.least_foreground(scale):
            return None
        # the size output grows with the diameter: sorting its float32 values orders the diameters
        diameters = decode_size(np.sort(outputs[2][foreground]), self.target_diameter) / scale
        weights = np.cumsum(1.0 / diameters**2)
        return float(diameters[np.searchsorted(weights, weights[-1] / 2)])

    def image_probabilities(
        self, x: np.ndarray, diameter: float | None = None
    ) -> tuple[np.ndarray, float | None, float]:
        """(H, W) normalised image -> (K, H, W) network outputs, the nucleus diameter (as given, estimated,
        or None if the estimate found no nucleus) and the scale factor the network saw the image at."""
        outputs = None
        if diameter is None:
            diameter, scale, outputs = self.estimate_diameter(x)
        else:
            scale = self.segmentation_scale(diameter)
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

        Returns
        -------
        Segmentation
            Labels on the image's grid, the diameter and scale used, and the time each stage took.
        """
        return self.label_nuclei(self.predict(image, diameter))

    def predict(self, image: np.ndarray, diameter: float | None = None) -> Prediction:
        """The network's part of ``segment``: the outputs over the whole image, with the diameter and scale."""
        # raises ImageReadError (a ValueError) that says what is wrong and how to fix it
        image = check_image(image, max_megapixels=np.inf)
        if diameter is not None:
            self.check_diameter(diameter)
        started = time.perf_counter()
        x, kind = network_input(image)
        probabilities, found, scale = self.image_probabilities(x, diameter)
        if found is None:
            log.info("no nucleus found while estimating the diameter; using %.0f px", self.target_diameter)
        return Prediction(probabilities, found or self.target_diameter, scale, diameter is None and found is not None,
                          kind == STAIN, image, timings={"predict": time.perf_counter() - started})

    def label_nuclei(self, prediction: Prediction) -> Segmentation:
        """The rest of ``segment``: the nuclei from the network's outputs, and the quality estimate."""
        started = time.perf_counter()
        probabilities = prediction.probabilities
        labels = instances(probabilities, self.config.thresholds_for(prediction.stained), prediction.diameter)
        result = Segmentation(labels, prediction.diameter, prediction.scale, prediction.diameter_estimated,
                              image=prediction.image, metadata=prediction.metadata)
        if len(probabilities) >= 3:  # a network with a size output (every model since the size output came)
            result.signals = quality_signals(probabilities, labels, self.target_diameter, prediction.scale,
                                             prediction.stained)
            if self.quality is not None:
                result.quality = round(self.quality.estimate(result.signals), 4)
                result.flagged = self.quality.flagged(result.quality)
        result.timings = prediction.timings | {"postprocess": time.perf_counter() - started}
        return result

    def segment_file(self, path: str | os.PathLike, diameter: float | None = None, channel: int | None = None
                     ) -> Segmentation:
        """Read and segment one image file; the result carries the image as read and its metadata.

        ``channel`` picks the nuclear channel of a multi-channel file (see ``io.read_image``). Raises
        ImageReadError, naming the file, for files that cannot be segmented and for blank images.
        """
        return self.label_nuclei(self.predict_file(path, diameter, channel))

    def predict_file(self, path: str | os.PathLike, diameter: float | None = None, channel: int | None = None
                     ) -> Prediction:
        """The network's part of ``segment_file``: read the file and predict (``predict``)."""
        return self.predict_read(*self.read_file(path, channel), diameter)

    def predict_read(self, image: np.ndarray, metadata: ImageMetadata, read_seconds: float,
                     diameter: float | None = None) -> Prediction:
        """``predict`` on what ``read_file`` returned: the prediction carries the file's metadata and the
        time it took to read."""
        prediction = self.predict(image, diameter)
        prediction.metadata, prediction.timings = metadata, {"read": read_seconds} | prediction.timings
        return prediction

    def read_file(self, path: str | os.PathLike, channel: int | None = None
                  ) -> tuple[np.ndarray, ImageMetadata, float]:
        """Read one image file to segment: its pixels, its metadata and the seconds it took. Raises
        ImageReadError, naming the file, for files that cannot be segmented and for blank images."""
        started = time.perf_counter()
        image = read_image(path, self.config.max_megapixels, channel)
        low, high = _range(image)
        if low == high:
            raise ImageReadError(f"{path}: image is blank (every pixel is {low:g})")
        return image, read_metadata(path), time.perf_counter() - started


def _range(image: np.ndarray) -> tuple[float, float]:
    """Lowest and highest gray value (what the network sees), computed without keeping a gray copy."""
    gray = to_gray(image)
    return float(gray.min()), float(gray.max())
