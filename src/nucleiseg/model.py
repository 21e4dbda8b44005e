"""The model folder: model.json, weights.pt, thresholds.json, inference.json (and thresholds_stained.json, the
stained images' own thresholds; model.onnx, an export).

Reading a folder does not import PyTorch: the network's weights are read on first use of
``ModelBundle.network`` (``network.load_network``), which an engine that runs the ONNX export never needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from nucleiseg.config import (
    TARGET_DIAMETER,
    InferenceConfig,
    ModelConfig,
    PostprocessConfig,
    from_dict,
    load_json,
    save_json,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
TRAIN_CONFIG = "train_config.json"  # the recipe a model folder was trained with
WEIGHTS = "weights.pt"
ARCHITECTURES = ("unet",)  # the architectures model.json may name (``network.load_network`` builds them)


class ModelBundle:
    """A trained network with what is needed to use it: its architecture, scale, thresholds and settings.

    Parameters
    ----------
    network : torch.nn.Module or None
        Maps (B, in_channels, H, W) to (B, out_channels, H, W) logits; H and W multiples of
        ``config.size_multiple``. None: read from ``folder``'s weights.pt when first used.
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

    def __init__(self, network: torch.nn.Module | None, config: ModelConfig, target_diameter: float = TARGET_DIAMETER,
                 thresholds: PostprocessConfig | None = None, architecture: str = "unet",
                 inference: InferenceConfig | None = None, folder: Path | None = None):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
        if network is None and folder is None:
            raise ValueError("a model without its network needs the folder to read the network from")
        self._network, self.config, self.architecture, self.folder = network, config, architecture, folder
        # the diameter and thresholds live in the inference settings only, so they cannot disagree
        self.inference = replace(inference or InferenceConfig(), target_diameter=target_diameter,
                                 thresholds=thresholds or PostprocessConfig())

    @property
    def network(self) -> torch.nn.Module:
        """The network, its weights read from the folder on first use."""
        if self._network is None:
            from nucleiseg.network import load_network

            self._network = load_network(self.folder / WEIGHTS, self.architecture, self.config)
        return self._network

    @property
    def network_loaded(self) -> bool:
        return self._network is not None

    @property
    def on_cpu(self) -> bool:
        """True where the network is on the CPU, or not read yet (it is read onto the CPU)."""
        weight = next(self._network.parameters(), None) if self._network is not None else None
        return weight is None or weight.device.type == "cpu"

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


# InferenceConfig fields kept in files of their own (model.json, thresholds.json, thresholds_stained.json), not
# in inference.json
_OWN_FILES = ("target_diameter", "thresholds", "stained_thresholds")
STAINED_THRESHOLDS = "thresholds_stained.json"


def save_model(folder: str | os.PathLike, bundle: ModelBundle, recipe=None) -> None:
    """Write a model folder: weights.pt, model.json, thresholds.json, inference.json and, when ``recipe``
    (the TrainConfig) is given, train_config.json: the data and validation split it was trained on."""
    from nucleiseg.io import atomic_path

    folder = Path(folder)
    import torch

    with atomic_path(folder / WEIGHTS) as tmp:
        # CPU tensors: a model trained on a GPU loads anywhere, whatever loads it
        torch.save({name: value.cpu() for name, value in bundle.network.state_dict().items()}, tmp)
    save_json(ModelInfo(bundle.architecture, bundle.config, bundle.target_diameter), folder / "model.json")
    save_json(bundle.thresholds, folder / "thresholds.json")
    if bundle.inference.stained_thresholds is not None:
        save_json(bundle.inference.stained_thresholds, folder / STAINED_THRESHOLDS)
    else:
        (folder / STAINED_THRESHOLDS).unlink(missing_ok=True)
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


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, lazy: bool = False) -> ModelBundle:
    """Load a model folder strictly: unknown config keys or mismatched weights raise.

    thresholds.json, thresholds_stained.json and inference.json are optional: their defaults apply where they
    are absent. With ``lazy`` the weights are read (and checked) on first use of ``ModelBundle.network``
    instead."""
    folder = model_folder(name_or_path)
    info = load_json(ModelInfo, folder / "model.json")
    if info.architecture not in ARCHITECTURES:
        raise ValueError(f"{folder}: unknown architecture {info.architecture!r}; known: {sorted(ARCHITECTURES)}")
    network = None
    if not lazy:
        from nucleiseg.network import load_network

        network = load_network(folder / WEIGHTS, info.architecture, info.model)
    thresholds_path, inference_path = folder / "thresholds.json", folder / "inference.json"
    thresholds = load_json(PostprocessConfig, thresholds_path) if thresholds_path.exists() else PostprocessConfig()
    inference = InferenceConfig()
    if inference_path.exists():
        values = json.loads(inference_path.read_text())
        if set(values) & set(_OWN_FILES):
            raise ValueError(f"{inference_path}: {sorted(set(values) & set(_OWN_FILES))} belong in model.json, "
                             f"thresholds.json and {STAINED_THRESHOLDS}; remove them from inference.json")
        inference = from_dict(InferenceConfig, values)
    if (folder / STAINED_THRESHOLDS).exists():
        inference = replace(inference, stained_thresholds=load_json(PostprocessConfig, folder / STAINED_THRESHOLDS))
    return ModelBundle(network, info.model, info.target_diameter, thresholds, info.architecture, inference, folder)


def file_digest(path: str | os.PathLike) -> str:
    """A short hash of a file's bytes: ties an ONNX export to the weights.pt it was made from without
    reading the weights with PyTorch."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def gpu_driver_present() -> bool:
    """False where PyTorch cannot see a GPU, known without importing it: no NVIDIA driver (libcuda), no
    ROCm device (/dev/kfd) and not a Mac (Apple's MPS). True means "ask PyTorch"."""
    import ctypes
    import sys

    if sys.platform == "darwin" or os.path.exists("/dev/kfd"):
        return True
    for library in ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so"):
        try:
            ctypes.CDLL(library)
            return True
        except OSError:
            continue
    return False
