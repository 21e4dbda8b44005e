"""Network input: modality-independent normalisation, nucleus-scale rescaling, training patches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import color, transform

# images are rescaled by at most MIN_SCALE..MAX_SCALE (defined with the other inference defaults)
from nucleiseg.config import MAX_SCALE, MIN_SCALE, AugmentConfig
from nucleiseg.io import LUMINANCE, Sample, to_gray
from nucleiseg.targets import make_targets, median_diameter


def normalise(gray: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Map the ``low`` and ``high`` percentiles to 0 and 1 (values outside are kept, not clipped); float32."""
    lo, hi = (float(v) for v in np.percentile(gray, (low, high)))
    return ((gray - lo) / max(hi - lo, 1e-6)).astype(np.float32, copy=False)


def has_bright_background(gray: np.ndarray) -> bool:
    """True for brightfield and H&E images (dark nuclei on a light background).

    Most pixels of a nucleus image are background, so the median says which side it is on.
    """
    lo, median, hi = np.percentile(gray, (1.0, 50.0, 99.8))
    return bool(median - lo > 0.5 * (hi - lo))


def prepare_input(image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) image of any modality -> (H, W) float32 in [0, 1], nuclei bright on a dark background.

    Clipped to [0, 1] as the training patches are, so that rare very bright pixels (common in 16-bit
    images) do not reach the network at values it never saw."""
    gray = to_gray(image)
    x = normalise(gray)
    if has_bright_background(gray):
        np.subtract(1.0, x, out=x)
    return np.clip(x, 0.0, 1.0, out=x)


def image_type(image: np.ndarray) -> str:
    """'histology' for colour images (stained tissue), else 'brightfield' (light background) or
    'fluorescence' (dark background). The rule used for the per-type scores in the README."""
    if image.ndim == 3 and image.shape[2] >= 3:
        rgb = image[..., :3].astype(np.float32)
        spread = (rgb.max(axis=2) - rgb.min(axis=2)).mean() / max(float(rgb.max()), 1e-6)
        if spread > 0.04:
            return "histology"
    return "brightfield" if has_bright_background(to_gray(image)) else "fluorescence"


def rescale(array: np.ndarray, factor: float, order: int) -> np.ndarray:
    """Resize the first two axes by ``factor``; order 0 for labels, 1 for images."""
    if factor == 1.0:
        return array
    shape = tuple(max(1, round(s * factor)) for s in array.shape[:2]) + array.shape[2:]
    out = transform.resize(
        array, shape, order=order, preserve_range=True, anti_aliasing=order > 0 and factor < 1, mode="edge"
    )
    return (out.round() if array.dtype.kind in "iu" else out).astype(array.dtype)


@dataclass
class TrainingImage:
    """A training image at the network's scale, with its targets and what the augmentation needs."""

    id: str
    rgb: np.ndarray  # (H, W, 3) uint8
    targets: np.ndarray  # (2, H, W) uint8: foreground, centre distance x 255
    bright_background: bool
    colour: bool
    kind: str


def scale_factor(diameter: float, target_diameter: float) -> float:
    """Factor that brings nuclei of ``diameter`` to ``target_diameter``, limited to [1/8, 4]."""
    if diameter <= 0:
        return 1.0
    return float(np.clip(target_diameter / diameter, MIN_SCALE, MAX_SCALE))


def prepare_training_image(sample: Sample, target_diameter: float) -> TrainingImage:
    from nucleiseg.io import to_rgb_uint8

    factor = scale_factor(median_diameter(sample.labels), target_diameter)
    rgb = rescale(to_rgb_uint8(sample.image), factor, order=1)
    labels = rescale(sample.labels.astype(np.int32), factor, order=0)
    targets = (make_targets(labels) * 255).round().astype(np.uint8)
    kind = image_type(sample.image)
    return TrainingImage(
        sample.id, rgb, targets, has_bright_background(to_gray(rgb)), kind == "histology", kind
    )


class PatchSampler:
    """Draws augmented (input, target) patches from training images.

    Images are drawn with weights that give rare image types (histology, brightfield) more weight than
    their share of the data set: the user's images are more varied than the competition's.
    """

    def __init__(self, images: list[TrainingImage], patch_size: int, augment: AugmentConfig, seed: int):
        if not images:
            raise ValueError("no training images")
        self.images = images
        self.patch_size = patch_size
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        kinds = [im.kind for im in images]
        counts = {k: kinds.count(k) for k in set(kinds)}
        weights = np.array([1 / np.sqrt(counts[k]) for k in kinds])
        self.weights = weights / weights.sum()

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Return x (size, 1, P, P) float32 and y (size, 2, P, P) float32."""
        picks = self.rng.choice(len(self.images), size=size, p=self.weights)
        pairs = [self.patch(self.images[i]) for i in picks]
        return np.stack([p[0] for p in pairs])[:, None], np.stack([p[1] for p in pairs])

    def patch(self, image: TrainingImage) -> tuple[np.ndarray, np.ndarray]:
        rng, aug, size = self.rng, self.augment, self.patch_size
        scale = np.exp(rng.uniform(*np.log(aug.scale_range)))
        crop = max(8, round(size / scale))
        rgb, targets = image.rgb, np.moveaxis(image.targets, 0, -1)
        pad = [(0, max(0, crop - s)) for s in rgb.shape[:2]]
        if any(p[1] for p in pad):
            rgb = np.pad(rgb, pad + [(0, 0)], mode="reflect" if min(rgb.shape[:2]) > 1 else "edge")
            targets = np.pad(targets, pad + [(0, 0)], mode="reflect" if min(rgb.shape[:2]) > 1 else "edge")
        y0 = rng.integers(0, rgb.shape[0] - crop + 1)
        x0 = rng.integers(0, rgb.shape[1] - crop + 1)
        rgb = rgb[y0 : y0 + crop, x0 : x0 + crop].astype(np.float32) / 255
        targets = targets[y0 : y0 + crop, x0 : x0 + crop].astype(np.float32) / 255
        if crop != size:
            rgb = transform.resize(rgb, (size, size), order=1, anti_aliasing=crop > size)
            targets = transform.resize(targets, (size, size), order=1, anti_aliasing=False)
            targets[..., 0] = targets[..., 0] > 0.5
        x = self._intensity(rgb, image)
        k = rng.integers(4)
        flip = rng.random() < 0.5
        x, targets = np.rot90(x, k), np.rot90(targets, k)
        if flip:
            x, targets = x[:, ::-1], targets[:, ::-1]
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(np.moveaxis(targets, -1, 0), np.float32)

    def _intensity(self, rgb: np.ndarray, image: TrainingImage) -> np.ndarray:
        """Stain, colour-to-gray, polarity, gamma, contrast, blur and noise changes -> (P, P) float32."""
        rng, aug = self.rng, self.augment
        if image.colour and aug.stain_jitter > 0:
            hed = color.rgb2hed(rgb)
            hed = hed * rng.normal(1, aug.stain_jitter * 4, 3) + rng.normal(0, aug.stain_jitter, 3)
            rgb = np.clip(color.hed2rgb(hed), 0, 1)
        weights = np.clip(LUMINANCE + rng.uniform(-aug.gray_mix, aug.gray_mix, 3) * LUMINANCE.max(), 0.01, None)
        gray = rgb @ (weights / weights.sum()).astype(np.float32)
        x = normalise(gray, low=rng.uniform(0.5, 3), high=rng.uniform(99.0, 99.9))
        if image.bright_background:
            x = 1 - x
        if rng.random() < aug.invert_prob:
            x = 1 - x
        x = np.clip(x, 0, 1) ** np.exp(rng.uniform(*np.log(aug.gamma_range)))
        x = x * rng.uniform(*aug.contrast_range) + rng.uniform(-aug.brightness, aug.brightness)
        if rng.random() < aug.blur_prob:
            x = ndi.gaussian_filter(x, rng.uniform(0.3, aug.blur_sigma))
        if rng.random() < aug.noise_prob:
            x = x + rng.normal(0, rng.uniform(0, aug.noise_std), x.shape).astype(np.float32)
        return x.astype(np.float32)
