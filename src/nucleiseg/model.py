"""U-Net and the model folder: model.json, weights.pt, thresholds.json, inference.json."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from nucleiseg.config import (
    TARGET_DIAMETER,
    InferenceConfig,
    ModelConfig,
    PostprocessConfig,
    from_dict,
    load_json,
    save_json,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
TRAIN_CONFIG = "train_config.json"  # the recipe a model folder was trained with


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` 2x down-samplings and skip connections.

    Parameters
    ----------
    in_channels, out_channels : int
    base_channels : int
        Channels of the first level; each level down doubles them.
    depth : int
        Number of down-samplings. Input height and width must be multiples of ``grid * 2**depth``.
    grid : int
        The U-Net runs on a grid ``grid`` times coarser than the input: each grid cell's ``grid x grid``
        input pixels become its channels (no information is thrown away), and the logits are upsampled
        bilinearly to the input's size. 2 costs a quarter of the arithmetic of 1.

    Input (B, in_channels, H, W) float; output (B, out_channels, H, W) logits.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 3, base_channels: int = 16, depth: int = 4,
                 grid: int = 1):
        super().__init__()
        if depth < 1 or base_channels < 1 or grid < 1:
            raise ValueError(f"depth, base_channels and grid must be positive, got {depth}, {base_channels}, {grid}")
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.depth, self.grid = depth, grid
        self.down = nn.ModuleList([_conv_block(in_channels * grid**2, widths[0])])
        self.down.extend(_conv_block(widths[i], widths[i + 1]) for i in range(depth))
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth))
        self.up = nn.ModuleList(_conv_block(2 * widths[i], widths[i]) for i in range(depth))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.depth * self.grid
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} is not a multiple of {multiple}; pad it to "
                f"{tuple(-(-s // multiple) * multiple for s in x.shape[-2:])}"
            )
        if self.grid > 1:
            x = nn.functional.pixel_unshuffle(x, self.grid)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(self.depth)):
            x = self.up[i](torch.cat([skips.pop(), self.upsample[i](x)], dim=1))
        x = self.head(x)
        if self.grid > 1:
            x = nn.functional.interpolate(x, scale_factor=self.grid, mode="bilinear", align_corners=False)
        return x


def select_device(name: str = "auto") -> torch.device:
    """"auto" -> CUDA if PyTorch sees a GPU, else Apple's MPS if present, else the CPU; a named device
    that is not there is an error that says so."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    if not available[name]:
        raise ValueError(f"device {name!r} is not available here (PyTorch sees no such device); use auto or cpu")
    return torch.device(name)


def build_model(cfg: ModelConfig) -> UNet:
    return UNet(cfg.in_channels, cfg.out_channels, cfg.base_channels, cfg.depth, cfg.grid)


def weights_digest(network: nn.Module) -> str:
    """A short hash of a network's weights: names what a record or an ONNX export was made with."""
    digest = hashlib.sha1()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# architecture name (model.json) -> builder of the network from its config
ARCHITECTURES = {"unet": build_model}


class ModelBundle:
    """A trained network with what is needed to use it: its architecture, scale, thresholds and settings.

    Parameters
    ----------
    network : torch.nn.Module
        Maps (B, in_channels, H, W) to (B, out_channels, H, W) logits; H and W multiples of
        ``config.size_multiple``.
    config : ModelConfig
        The network's shape.
    target_diameter : float
        Nucleus diameter, in pixels, the network was trained at.
    thresholds : PostprocessConfig, optional
        Post-processing thresholds (tuned ones are in thresholds.json).
    architecture : str
        Name of the network's architecture, a key of ``ARCHITECTURES``.
    inference : InferenceConfig, optional
        The other settings of segmentation (inference.json); its diameter and thresholds are the two above.
    folder : Path, optional
        The model folder it was loaded from, where an engine finds other files (e.g. an ONNX export).
    """

    def __init__(self, network: nn.Module, config: ModelConfig, target_diameter: float = TARGET_DIAMETER,
                 thresholds: PostprocessConfig | None = None, architecture: str = "unet",
                 inference: InferenceConfig | None = None, folder: Path | None = None):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
        self.network, self.config, self.architecture, self.folder = network, config, architecture, folder
        # the diameter and thresholds live in the inference settings only, so they cannot disagree
        self.inference = replace(inference or InferenceConfig(), target_diameter=target_diameter,
                                 thresholds=thresholds or PostprocessConfig())

    @property
    def target_diameter(self) -> float:
        return self.inference.target_diameter

    @property
    def thresholds(self) -> PostprocessConfig:
        return self.inference.thresholds

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return self.config.size_multiple

    @property
    def out_channels(self) -> int:
        return self.config.out_channels


@dataclass
class ModelInfo:
    """Contents of model.json: the architecture, the network shape and the nucleus diameter it was trained at."""

    architecture: str = "unet"
    model: ModelConfig = field(default_factory=ModelConfig)
    target_diameter: float = TARGET_DIAMETER


# InferenceConfig fields kept in files of their own (model.json, thresholds.json), not in inference.json
_OWN_FILES = ("target_diameter", "thresholds")


def save_model(folder: str | os.PathLike, bundle: ModelBundle, recipe=None) -> None:
    """Write a model folder: weights.pt, model.json, thresholds.json, inference.json and, when ``recipe``
    (the TrainConfig) is given, train_config.json: the data and validation split it was trained on."""
    from nucleiseg.io import atomic_path

    folder = Path(folder)
    with atomic_path(folder / "weights.pt") as tmp:
        torch.save(bundle.network.state_dict(), tmp)
    save_json(ModelInfo(bundle.architecture, bundle.config, bundle.target_diameter), folder / "model.json")
    save_json(bundle.thresholds, folder / "thresholds.json")
    settings = {k: v for k, v in asdict(bundle.inference).items() if k not in _OWN_FILES}
    save_json(settings, folder / "inference.json")
    if recipe is not None:
        save_json(recipe, folder / TRAIN_CONFIG)


def model_folder(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """A folder path, or the name of a model shipped in the package (nucleiseg/models/<name>)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    shipped = Path(str(resources.files("nucleiseg") / "models" / str(name_or_path)))
    if shipped.is_dir():
        return shipped
    raise FileNotFoundError(f"no model folder {name_or_path!r}: give a folder with model.json and weights.pt")


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> ModelBundle:
    """Load a model folder strictly: unknown config keys or mismatched weights raise.

    thresholds.json and inference.json are optional: their defaults apply where they are absent."""
    folder = model_folder(name_or_path)
    info = load_json(ModelInfo, folder / "model.json")
    if info.architecture not in ARCHITECTURES:
        raise ValueError(f"{folder}: unknown architecture {info.architecture!r}; known: {sorted(ARCHITECTURES)}")
    network = ARCHITECTURES[info.architecture](info.model)
    weights = folder / "weights.pt"
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, empty, truncated or not a PyTorch file: torch raises many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{weights}: not a readable weights file ({reason})") from None
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:  # a torch error lists every mismatch on its own line
        details = "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
        raise ValueError(f"{weights}: does not match the network of model.json ({details or exc})") from None
    network.eval()
    thresholds_path, inference_path = folder / "thresholds.json", folder / "inference.json"
    thresholds = load_json(PostprocessConfig, thresholds_path) if thresholds_path.exists() else PostprocessConfig()
    inference = InferenceConfig()
    if inference_path.exists():
        values = json.loads(inference_path.read_text())
        if set(values) & set(_OWN_FILES):
            raise ValueError(f"{inference_path}: {sorted(set(values) & set(_OWN_FILES))} belong in model.json "
                             "and thresholds.json; remove them from inference.json")
        inference = from_dict(InferenceConfig, values)
    return ModelBundle(network, info.model, info.target_diameter, thresholds, info.architecture, inference, folder)
