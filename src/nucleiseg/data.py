"""Network input: modality-independent normalisation, nucleus-scale rescaling, training patches.

The network sees one channel, the nuclear signal, always bright on dark:
- stained colour images (H&E and other brightfield stains): the haematoxylin channel of a colour
  deconvolution (``skimage.color.rgb2hed``), which is high on nuclei however dense the tissue is;
- gray images: the normalised intensity, inverted when the background is bright (brightfield).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fnmatch import fnmatch

import numpy as np
from scipy import ndimage as ndi
from skimage import color, transform

# images are rescaled by at most MIN_SCALE..MAX_SCALE (defined with the other inference defaults)
from nucleiseg.config import MAX_SCALE, MIN_SCALE, AugmentConfig, TrainConfig
from nucleiseg.io import LUMINANCE, Sample, load_dataset, sample_ids, to_gray, to_rgb_uint8
from nucleiseg.targets import make_targets, median_diameter, nucleus_diameters

# the size output codes log2(nucleus diameter / target diameter) in [-SIZE_RANGE, SIZE_RANGE] as [0, 1]
SIZE_RANGE = 3.0
# the input of the network: the haematoxylin stain, dark nuclei on a light gray background, or bright on dark
STAIN, BRIGHT_BACKGROUND, DARK_BACKGROUND = "stain", "bright background", "dark background"


def normalise(gray: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Map the ``low`` and ``high`` percentiles to 0 and 1 (values outside are kept, not clipped); float32."""
    return _stretch(gray, *np.percentile(gray, (low, high)))


def _stretch(gray: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return ((gray - float(lo)) / max(float(hi - lo), 1e-6)).astype(np.float32, copy=False)


# the percentiles of a gray image that the network's input is made from: the normalisation's range, and the
# median that says on which side the background is
GRAY_LEVELS = (1.0, 50.0, 99.8)


def has_bright_background(gray: np.ndarray) -> bool:
    """True for gray brightfield images (dark nuclei on a light background)."""
    return _bright_background(*np.percentile(gray, GRAY_LEVELS))


def _bright_background(lo: float, median: float, hi: float) -> bool:
    # most pixels of a nucleus image are background, so the median says which side it is on
    return bool(median - lo > 0.5 * (hi - lo))


def is_colour(image: np.ndarray) -> bool:
    """True when the channels of an RGB(A) image differ (mean channel spread above 4% of the maximum)."""
    if image.ndim != 3 or image.shape[2] < 3:
        return False
    # channel by channel: numpy reduces along a last axis of 3 several times slower
    r, g, b = (image[..., i].astype(np.float32) for i in range(3))
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return bool(spread.mean() / max(float(max(r.max(), g.max(), b.max())), 1e-6) > 0.04)


def input_kind(image: np.ndarray) -> str:
    """How the network reads ``image``: STAIN, BRIGHT_BACKGROUND or DARK_BACKGROUND.

    A colour image is a stained brightfield image unless it is mostly dark (a colour fluorescence
    composite): light passes through stained tissue, so even dense H&E tissue has a median well above
    a quarter of the full range, where a fluorescence background sits near zero. Relative rules (the
    median against the image's own range) fail there: dense tissue is mostly nuclei.
    """
    if is_colour(image):
        return _colour_kind(image)
    return BRIGHT_BACKGROUND if has_bright_background(to_gray(image)) else DARK_BACKGROUND


def _colour_kind(image: np.ndarray) -> str:
    """``input_kind`` of an image that ``is_colour``: STAIN or DARK_BACKGROUND."""
    gray = to_gray(image)
    full = 255.0 if image.dtype == np.uint8 else max(float(gray.max()), 1e-6)
    return STAIN if np.median(gray) > 0.25 * full else DARK_BACKGROUND


# the haematoxylin channel of ``skimage.color.rgb2hed`` for each 8-bit value of each of R, G and B:
# log(max(value / 255, 1e-6)) / log(1e-6) times that channel's weight in its stain matrix
HAEMATOXYLIN_TABLES = (np.log(np.maximum(np.arange(256) / 255, 1e-6)) / np.log(1e-6))[None] * color.hed_from_rgb[:, :1]


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) float32 haematoxylin optical density (high on nuclei): the first channel of
    ``skimage.color.rgb2hed``, looked up per channel value instead of computing all three stains in float64."""
    red, green, blue = HAEMATOXYLIN_TABLES
    density = red[rgb[..., 0]]
    density += green[rgb[..., 1]]
    density += blue[rgb[..., 2]]
    return np.maximum(density, 0, out=density).astype(np.float32)


def prepare_input(image: np.ndarray, kind: str | None = None) -> np.ndarray:
    """(H, W[, C]) image of any modality -> (H, W) float32 in [0, 1], nuclei bright on a dark background.

    ``kind`` is ``input_kind(image)``, computed here when not given. Clipped to [0, 1] as the training
    patches are, so that rare very bright pixels (common in 16-bit images) do not reach the network at
    values it never saw."""
    kind = kind or input_kind(image)
    if kind == STAIN:
        return _clipped(normalise(haematoxylin(to_rgb_uint8(image))))
    return _gray_input(to_gray(image), kind)


def network_input(image: np.ndarray) -> tuple[np.ndarray, str]:
    """``prepare_input(image)`` and ``input_kind(image)``; a gray image and its percentiles are computed once
    for both."""
    kind = _colour_kind(image) if is_colour(image) else None
    if kind == STAIN:
        return prepare_input(image, kind), kind
    gray = to_gray(image)
    levels = np.percentile(gray, GRAY_LEVELS)
    kind = kind or (BRIGHT_BACKGROUND if _bright_background(*levels) else DARK_BACKGROUND)
    return _gray_input(gray, kind, levels), kind


def _gray_input(gray: np.ndarray, kind: str, levels: np.ndarray | None = None) -> np.ndarray:
    """``prepare_input`` of a gray image (the colour fluorescence composites too); ``levels`` are its
    ``GRAY_LEVELS`` where already computed."""
    x = normalise(gray) if levels is None else _stretch(gray, levels[0], levels[-1])
    if kind == BRIGHT_BACKGROUND:
        np.subtract(1.0, x, out=x)
    return _clipped(x)


def _clipped(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0, out=x)


def image_type(image: np.ndarray) -> str:
    """'histology' for colour images (stained tissue), else 'brightfield' (light background) or
    'fluorescence' (dark background). The rule used for the per-type scores in the README."""
    if is_colour(image):
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
    targets: np.ndarray  # (3, H, W) uint8 (training_targets)
    input_kind: str  # STAIN, BRIGHT_BACKGROUND or DARK_BACKGROUND, decided on the image as it was read
    kind: str  # image type (image_type), for sampling


def scale_factor(diameter: float, target_diameter: float, min_scale: float = MIN_SCALE,
                 max_scale: float = MAX_SCALE) -> float:
    """Factor that brings nuclei of ``diameter`` to ``target_diameter``, limited to [min_scale, max_scale]."""
    if diameter <= 0:
        return 1.0
    return float(np.clip(target_diameter / diameter, min_scale, max_scale))


def encode_size(diameter: np.ndarray, target_diameter: float) -> np.ndarray:
    """Nucleus diameters (pixels as the network sees them) -> the size output's value in [0, 1]."""
    ratio = np.log2(np.maximum(diameter, 1e-3) / target_diameter)
    return np.clip((ratio + SIZE_RANGE) / (2 * SIZE_RANGE), 0.0, 1.0)


def decode_size(value: np.ndarray, target_diameter: float) -> np.ndarray:
    """Inverse of ``encode_size``."""
    return target_diameter * 2.0 ** (np.asarray(value) * 2 * SIZE_RANGE - SIZE_RANGE)


def prepare_training_image(sample: Sample, target_diameter: float) -> TrainingImage:
    factor = scale_factor(median_diameter(sample.labels), target_diameter)
    rgb = rescale(to_rgb_uint8(sample.image), factor, order=1)
    labels = rescale(sample.labels.astype(np.int32), factor, order=0)
    return TrainingImage(sample.id, rgb, training_targets(labels), input_kind(sample.image), image_type(sample.image))


def training_targets(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels at the network's scale -> (3, H, W) uint8 targets as TrainingImage stores them."""
    return np.concatenate([
        (make_targets(labels) * 255).round().astype(np.uint8),
        np.clip(nucleus_diameters(labels) * 2, 0, 255).round().astype(np.uint8)[None],
    ])


class PatchSampler:
    """Draws augmented (input, target) patches from training images.

    Images are drawn with weights that give rare groups more weight than their share of the data set:
    each group (the image type, or ``groups`` when given) as a whole is drawn in proportion to the square
    root of its size, since the user's images are more varied than the competition's. Patches are
    drawn at nucleus scales from ``scale_range`` and, for a share ``wide_scale_prob`` of them, from the
    wider ``wide_scale_range``, so that the size output learns to tell nuclei of any size.
    """

    def __init__(self, images: list[TrainingImage], patch_size: int, augment: AugmentConfig, seed: int,
                 target_diameter: float = 17.0, groups: list[str] | None = None):
        if not images:
            raise ValueError("no training images")
        self.images = images
        self.patch_size = patch_size
        self.augment = augment
        self.target_diameter = target_diameter
        self.rng = np.random.default_rng(seed)
        groups = groups or [im.kind for im in images]
        if len(groups) != len(images):
            raise ValueError(f"{len(groups)} sampling groups for {len(images)} images")
        counts = {g: groups.count(g) for g in set(groups)}
        weights = np.array([1 / np.sqrt(counts[g]) for g in groups])
        self.weights = weights / weights.sum()

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Return x (size, 1, P, P) float32 and y (size, 3, P, P) float32: foreground, centre, size code
        (the size code is -1 outside nuclei, where it is not learnt)."""
        picks = self.rng.choice(len(self.images), size=size, p=self.weights)
        pairs = [self.patch(self.images[i]) for i in picks]
        return np.stack([p[0] for p in pairs])[:, None], np.stack([p[1] for p in pairs])

    def patch(self, image: TrainingImage) -> tuple[np.ndarray, np.ndarray]:
        rng, aug, size = self.rng, self.augment, self.patch_size
        scales = aug.wide_scale_range if rng.random() < aug.wide_scale_prob else aug.scale_range
        scale = np.exp(rng.uniform(*np.log(scales)))
        crop = max(8, round(size / scale))
        rgb, targets = image.rgb, np.moveaxis(image.targets, 0, -1)
        pad = [(0, max(0, crop - s)) for s in rgb.shape[:2]]
        if any(p[1] for p in pad):
            mode = "reflect" if min(rgb.shape[:2]) > 1 else "edge"
            rgb = np.pad(rgb, pad + [(0, 0)], mode=mode)
            targets = np.pad(targets, pad + [(0, 0)], mode=mode)
        y0 = rng.integers(0, rgb.shape[0] - crop + 1)
        x0 = rng.integers(0, rgb.shape[1] - crop + 1)
        rgb = rgb[y0 : y0 + crop, x0 : x0 + crop].astype(np.float32) / 255
        maps = targets[y0 : y0 + crop, x0 : x0 + crop, :2].astype(np.float32) / 255
        diameters = targets[y0 : y0 + crop, x0 : x0 + crop, 2].astype(np.float32) / 2
        if crop != size:
            rgb = transform.resize(rgb, (size, size), order=1, anti_aliasing=crop > size)
            maps = transform.resize(maps, (size, size), order=1, anti_aliasing=False)
            maps[..., 0] = maps[..., 0] > 0.5
            diameters = transform.resize(diameters, (size, size), order=0, anti_aliasing=False)
        code = np.where((maps[..., 0] > 0) & (diameters > 0),
                        encode_size(diameters * size / crop, self.target_diameter), -1.0)
        targets = np.concatenate([maps, code[..., None]], axis=-1)
        x = self._intensity(rgb, image)
        k = rng.integers(4)
        flip = rng.random() < 0.5
        x, targets = np.rot90(x, k), np.rot90(targets, k)
        if flip:
            x, targets = x[:, ::-1], targets[:, ::-1]
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(np.moveaxis(targets, -1, 0), np.float32)

    def _intensity(self, rgb: np.ndarray, image: TrainingImage) -> np.ndarray:
        """Stain, channel, polarity, gamma, contrast, blur and noise changes -> (P, P) float32, read as
        ``prepare_input`` reads the whole image."""
        rng, aug = self.rng, self.augment
        if image.input_kind == STAIN:
            # stain jitter in the deconvolved space: other labs' stain strengths and hues
            hed = color.rgb2hed(rgb)
            hed = hed * rng.normal(1, aug.stain_jitter * 4, 3) + rng.normal(0, aug.stain_jitter, 3)
            # a little of the eosin channel leaks into the haematoxylin one when the stain vectors differ
            signal = hed[..., 0] + rng.uniform(-aug.stain_mix, aug.stain_mix) * hed[..., 1]
            x = normalise(signal.astype(np.float32), low=rng.uniform(0.5, 3), high=rng.uniform(99.0, 99.9))
        else:
            weights = np.clip(LUMINANCE + rng.uniform(-aug.gray_mix, aug.gray_mix, 3) * LUMINANCE.max(), 0.01, None)
            gray = rgb @ (weights / weights.sum()).astype(np.float32)
            x = normalise(gray, low=rng.uniform(0.5, 3), high=rng.uniform(99.0, 99.9))
            if image.input_kind == BRIGHT_BACKGROUND:
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


def validation_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split by image with a fixed seed, stratified by image type so that rare types appear in both parts."""
    rng = np.random.default_rng(seed)
    kinds = [image_type(s.image) for s in samples]
    val_ids = set()
    for kind in sorted(set(kinds)):
        members = sorted(s.id for s, k in zip(samples, kinds, strict=True) if k == kind)
        count = max(1, round(fraction * len(members))) if fraction > 0 else 0
        val_ids.update(rng.permutation(members)[:count].tolist())
    return [s for s in samples if s.id not in val_ids], [s for s in samples if s.id in val_ids]


def matching_ids(spec: str) -> list[str]:
    """The ids of a competition-layout folder that match a pattern, ``"folder/pattern"``; none where the
    folder is not there."""
    folder, pattern = os.path.split(spec)
    return [i for i in sample_ids(folder) if fnmatch(i, pattern)] if os.path.isdir(folder) else []


def select_samples(spec: str, progress: bool = True) -> list[Sample]:
    """Samples of a competition-layout folder whose ids match a pattern: ``"folder/pattern"``."""
    folder, pattern = os.path.split(spec)
    ids = matching_ids(spec)
    if not ids:
        raise ValueError(f"{spec}: no image folder of {folder!r} matches {pattern!r}")
    return load_dataset(folder, ids, progress=progress)


def sampling_groups(cfg: TrainConfig, images: list[TrainingImage]) -> list[str] | None:
    """Each training image's group for ``PatchSampler`` where ``cfg.data.balance_sets`` asks for groups:
    the extra_train set (folder and pattern) it is in, or its image type for an image of ``cfg.data.root`` (or
    of no extra set)."""
    if not cfg.data.balance_sets:
        return None
    # a folder that is not there holds none (a fine-tune's own images)
    root = set(matching_ids(os.path.join(cfg.data.root, "*")))
    members = {spec: set(matching_ids(spec)) for spec in cfg.data.extra_train}
    return [im.kind if im.id in root else next((s for s, ids in members.items() if im.id in ids), im.kind)
            for im in images]


def load_split(cfg: TrainConfig, progress: bool = True) -> tuple[list[Sample], list[Sample]]:
    """Training and validation samples: the split of ``cfg.data.root`` plus the extra folders."""
    samples = load_dataset(cfg.data.root, progress=progress)
    train, val = validation_split(samples, cfg.data.val_fraction, cfg.data.split_seed)
    for spec in cfg.data.extra_train:
        train += select_samples(spec, progress)
    for spec in cfg.data.extra_val:
        val += select_samples(spec, progress)
    return train, val
