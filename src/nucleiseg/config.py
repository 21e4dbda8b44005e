"""Configuration dataclasses, saved as JSON next to the weights. Unknown keys are rejected."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")

# the defaults of the settings below, each written once
TARGET_DIAMETER = 17.0  # pixels: nuclei are brought to this diameter for the network, in training and inference
MIN_SCALE, MAX_SCALE = 1 / 8, 4.0  # rescaling bounds: nuclei from ~4 px to ~140 px wide reach the training size
MAX_MEGAPIXELS = 150.0  # larger images are refused, before they are decoded


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build a (nested) config dataclass from a dict, refusing keys the dataclass does not have."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    # keys renamed since files were written: old files still load
    values = {getattr(cls, "RENAMED", {}).get(key, key): value for key, value in values.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        elif isinstance(value, list) and isinstance(known[name].default, tuple):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def save_json(obj: Any, path: str | os.PathLike) -> None:
    from nucleiseg.io import atomic_path

    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def load_json(cls: type[T], path: str | os.PathLike) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))


@dataclass
class ModelConfig:
    """U-Net shape. Input: the nuclear signal (see data.prepare_input); outputs: foreground, centre-distance
    and nucleus-size logits."""

    in_channels: int = 1
    out_channels: int = 3  # foreground, centre distance, nucleus size
    base_channels: int = 16
    depth: int = 4
    # the U-Net runs on a grid this many times coarser than the input (2: a quarter of the pixels, as
    # StarDist's grid); each grid cell sees its input pixels as channels, and the outputs are upsampled back
    grid: int = 1

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (one halving per level, times the grid)."""
        return 2**self.depth * self.grid


@dataclass
class DataConfig:
    """Where the training data are and how they are brought to the network's scale."""

    root: str = "../shared/data/dsb2018/stage1_train"
    val_fraction: float = 0.1
    split_seed: int = 0
    # more competition-layout folders, each "folder/pattern" (fnmatch on the image ids, e.g.
    # "../shared/data/tnbc/tnbc_0[1-7]_*"): extra_train are trained on, extra_val join the validation split
    extra_train: tuple[str, ...] = ()
    extra_val: tuple[str, ...] = ()
    # sample each extra_train set as a group of its own beside the root's image types, so that an extra set
    # (tnbc's 40x H&E) is not drowned in the competition's histology of another kind
    balance_sets: bool = False
    # every training image is rescaled so that its median nucleus diameter becomes this many pixels
    target_diameter: float = TARGET_DIAMETER
    patch_size: int = 192


@dataclass
class AugmentConfig:
    """Random transforms applied to every training patch (probabilities and ranges)."""

    scale_range: tuple[float, float] = (0.6, 1.6)
    wide_scale_prob: float = 0.3  # share of patches drawn from wide_scale_range (teaches the size output)
    wide_scale_range: tuple[float, float] = (0.3, 4.0)
    stain_jitter: float = 0.05  # std of the HED stain intensity change
    stain_mix: float = 0.15  # how much of the eosin channel may leak into the haematoxylin one
    gray_mix: float = 0.5  # how far the RGB->gray weights may move from luminance
    invert_prob: float = 0.1
    gamma_range: tuple[float, float] = (0.6, 1.6)
    contrast_range: tuple[float, float] = (0.7, 1.3)
    brightness: float = 0.1
    blur_prob: float = 0.3
    blur_sigma: float = 1.5
    noise_prob: float = 0.3
    noise_std: float = 0.08


@dataclass
class PostprocessConfig:
    """Thresholds that turn the probability maps into instances; tuned on the validation split
    (thresholds.json in the model folder)."""

    RENAMED: ClassVar[dict[str, str]] = {"seed_threshold": "marker_threshold"}

    foreground_threshold: float = 0.5
    marker_threshold: float = 0.5  # watershed markers: where the centre map exceeds this
    min_area_fraction: float = 0.1  # objects below this fraction of the mean nucleus area are dropped
    tuned_on: str = ""  # the images `nucleiseg tune` chose these on; "" = untuned defaults


@dataclass
class InferenceConfig:
    """Every setting that changes what segmentation gives, in one place.

    A model folder holds them: ``target_diameter`` in model.json (the diameter the network was trained at),
    ``thresholds`` in thresholds.json (tuned), the others in inference.json (defaults when it is absent).
    """

    target_diameter: float = TARGET_DIAMETER
    thresholds: PostprocessConfig = field(default_factory=PostprocessConfig)
    # thresholds for stained images (read through their haematoxylin channel), where the network's maps are
    # less sure than on the others; None: ``thresholds``
    stained_thresholds: PostprocessConfig | None = None
    min_scale: float = MIN_SCALE
    max_scale: float = MAX_SCALE
    # the network sees tiles of at most this side (after rescaling; a side up to 1.5x as long is not split),
    # so memory stays bounded
    tile: int = 512
    overlap: int = 64  # pixels shared by neighbouring tiles, blended
    max_megapixels: float = MAX_MEGAPIXELS
    tta: bool = False  # average the predictions of the four flips (4x slower, slightly better)
    bf16: bool = False  # run the network in bfloat16 (faster on CPUs with AVX512-BF16 or AMX)
    # the onnx engine runs the model folder's 8-bit integer export (predict.ONNX_INT8_FILE) where it has one
    int8: bool = True
    # predictor that runs the network (predict.PREDICTORS); "auto": onnx on the CPU where the model folder
    # has an ONNX export of its weights (about 2.5x faster there), else torch
    engine: str = "auto"

    def __post_init__(self):
        if self.tile % 16 or self.tile <= 2 * self.overlap:
            raise ValueError(f"tile ({self.tile}) must be a multiple of 16 and more than twice the overlap "
                             f"({self.overlap})")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= 1 <= max_scale, got {self.min_scale} and {self.max_scale}")

    def updated(self, **changes) -> InferenceConfig:
        """A copy with ``changes``; the names of PostprocessConfig fields change ``thresholds``. Thresholds
        given so apply to every image: the stained images' own are dropped unless given too.

        >>> InferenceConfig().updated(tile=256, marker_threshold=0.4).thresholds.marker_threshold
        0.4
        """
        names = {f.name for f in dataclasses.fields(PostprocessConfig)}
        given = {k: changes.pop(k) for k in list(changes) if k in names}
        if given or "thresholds" in changes:
            changes.setdefault("stained_thresholds", None)
        thresholds = dataclasses.replace(changes.pop("thresholds", self.thresholds), **given)
        return dataclasses.replace(self, thresholds=thresholds, **changes)

    def thresholds_for(self, stained: bool) -> PostprocessConfig:
        """The thresholds for an image read through its haematoxylin channel (``stained``) or not."""
        return self.stained_thresholds if stained and self.stained_thresholds is not None else self.thresholds


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as config.json in the run folder."""

    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 8
    steps_per_epoch: int = 100
    epochs: int = 300
    max_minutes: float = 0.0  # stop after this much wall-clock training time (0 = no limit)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    dice_weight: float = 1.0
    size_weight: float = 1.0
    eval_every: int = 5
    eval_images: int = 0  # validation images scored during training (0 = all)
    snapshot_minutes: tuple[float, ...] = (30.0, 60.0, 120.0)
    num_threads: int = 0  # torch threads (0 = torch's default)
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda" or "mps"
    workers: int = 0  # processes that draw training patches (0 = in the training process)
    # fine-tuning: start from this model's weights (a shipped model's name or a model folder, same network shape)
    init_from: str = ""
    freeze: tuple[str, ...] = ()  # parameters whose names start with one of these keep their values
    freeze_statistics: bool = False  # BatchNorm layers keep their running statistics
