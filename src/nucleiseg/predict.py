"""Probability maps for images of any size: predictors, overlapping tiles with blending, rescaling, flip TTA.

A *predictor* runs a network: it maps a (B, C, h, w) float32 array, h and w multiples of its
``size_multiple``, to (B, K, h, w) probabilities. Everything else (tiling, blending, rescaling, padding,
test-time augmentation) is done here around any predictor, so that another engine (ONNX Runtime, CUDA, a
remote server) is one class or function plus one line in ``PREDICTORS``, and tests can use a pointwise
function with a known answer. Only the torch engine imports PyTorch.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from nucleiseg.config import InferenceConfig

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

    from nucleiseg.model import ModelBundle

TILE_BATCH = 4  # tiles per network call
ONE_TILE_UP_TO = 1.5  # an axis up to this many tiles long is not split (``_axis_tiles``)
GPU_TILE_BATCH = 16  # a GPU is mostly idle on 4 tiles of 512 x 512
ArrayFunction = Callable[[np.ndarray], np.ndarray]  # (B, C, h, w) float32 -> (B, K, h, w) float32
_threads: int | None = None  # the network's threads (``set_threads``); None: OMP_NUM_THREADS, else every core
_this_thread = threading.local()  # ``count``: the network's threads for calls from this thread (network_threads)


def set_threads(count: int) -> None:
    """Run the network on ``count`` threads: torch's now (OpenMP counts them per calling thread), and the
    onnxruntime sessions made from now on."""
    global _threads
    _threads = count
    if "torch" in sys.modules:  # not imported for it: the onnx engine runs without torch
        sys.modules["torch"].set_num_threads(count)


def threads() -> int:
    """The network's threads for a call from this thread: as ``network_threads`` or ``set_threads`` set
    them, else OMP_NUM_THREADS as for torch, else every core this process may run on."""
    count = getattr(_this_thread, "count", None) or _threads
    if not count:  # OpenMP's form is "4" or, nested, "4,2"
        first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        count = int(first) if first.isdigit() else 0
    if not count:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, count)


@contextmanager
def network_threads(count: int) -> Iterator[None]:
    """Run the network of the calls made from this thread, inside the block, on ``count`` threads (images
    segmented side by side, each on its share of the cores, keep them busier than one image on all)."""
    previous = getattr(_this_thread, "count", None)
    torch = sys.modules.get("torch")  # its thread count is per calling thread; setting it clears caches
    torch_count = torch.get_num_threads() if torch else None
    _this_thread.count = count
    if torch and torch_count != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        _this_thread.count = previous
        if torch and torch_count != count:
            torch.set_num_threads(torch_count)


class Predictor(Protocol):
    """Runs a network on a batch: (B, C, h, w) float32, h and w multiples of ``size_multiple``, ->
    (B, out_channels, h, w) float32 probabilities."""

    size_multiple: int
    out_channels: int

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class TorchPredictor:
    """Predictor for a torch network that outputs logits, on the device the network is on.

    Parameters
    ----------
    network : torch.nn.Module
        (B, C, h, w) -> (B, out_channels, h, w) logits.
    size_multiple, out_channels : int
        From the model bundle (``ModelBundle.size_multiple``, ``ModelBundle.out_channels``).
    bf16 : bool
        Run the network in bfloat16: faster on CPUs that compute it natively (``bf16_is_fast``),
        probabilities differ by about 0.01.

    ``batch_size`` (tiles per call) is larger on a GPU, which a few tiles leave mostly idle.
    """

    def __init__(self, network: torch.nn.Module, size_multiple: int, out_channels: int, bf16: bool = False):
        import torch

        if _threads:
            torch.set_num_threads(_threads)
        # channels-last convolutions are about 1.5x faster on the CPU (oneDNN) and GPUs
        self.network = network.eval().to(memory_format=torch.channels_last)
        self.size_multiple, self.out_channels, self.bf16 = size_multiple, out_channels, bf16

    @property
    def batch_size(self) -> int:
        import torch

        device = next(self.network.parameters(), torch.empty(0)).device
        return TILE_BATCH if device.type == "cpu" else GPU_TILE_BATCH

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        # the CPU, or a GPU the network was moved to
        device = next(self.network.parameters(), torch.empty(0)).device
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(device)
            logits = self.network(x.contiguous(memory_format=torch.channels_last))
            return np.ascontiguousarray(torch.sigmoid(logits.float()).cpu().numpy())


def torch_predictor(model: ModelBundle, config: InferenceConfig) -> Predictor:
    return TorchPredictor(model.network, model.size_multiple, model.out_channels, config.bf16)


class OnnxPredictor:
    """Predictor for an ONNX export of the network (``export.export_onnx``), run by onnxruntime on the CPU.

    Parameters
    ----------
    path : path
        The .onnx file: input ``input`` (B, C, h, w), output ``logits`` (B, K, h, w).
    size_multiple, out_channels : int
        From the model bundle, as for ``TorchPredictor``.
    """

    def __init__(self, path, size_multiple: int, out_channels: int):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ValueError("the onnx engine needs onnxruntime: pip install onnxruntime") from exc
        self.path, self.size_multiple, self.out_channels = path, size_multiple, out_channels
        # onnxruntime fixes a session's threads, and concurrent runs of one session share its thread pool:
        # each calling thread gets its own session per thread count
        self._sessions = threading.local()
        self.session = self.session_for(threads())  # reads the file now, so that a bad one fails here

    def session_for(self, count: int):
        """This thread's session that runs the network on ``count`` threads."""
        import onnxruntime

        sessions = self._sessions.__dict__.setdefault("by_count", {})
        if count not in sessions:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = count
            # idle threads sleep instead of spinning: the spin took cores from the other images and from
            # any other process, for no gain in the network's own time
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[count] = onnxruntime.InferenceSession(str(self.path), options,
                                                           providers=["CPUExecutionProvider"])
        return sessions[count]

    @property
    def weights(self) -> str | None:
        """``network.weights_digest`` of the weights it was exported from (``export.export_onnx`` records it)."""
        return self.session.get_modelmeta().custom_metadata_map.get(WEIGHTS_KEY)

    @property
    def weights_file(self) -> str | None:
        """``model.file_digest`` of the weights.pt it was exported from, where the export recorded it."""
        return self.session.get_modelmeta().custom_metadata_map.get(WEIGHTS_FILE_KEY)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self.session_for(threads()).run(["logits"], {"input": np.ascontiguousarray(batch, np.float32)})
        return sigmoid(logits)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-logits)), in place: NumPy's vectorised exp is twice as fast as scipy's expit; a large
    negative logit overflows exp to inf and gives 0, as it should."""
    with np.errstate(over="ignore"):
        np.exp(np.negative(logits, out=logits), out=logits)
    logits += 1
    return np.reciprocal(logits, out=logits)


ONNX_FILE = "model.onnx"  # where the onnx engine looks for the export in a model folder
# its 8-bit integer export (export.export_onnx_int8), which the onnx engine runs instead where
# InferenceConfig.int8 (the default): about 2x faster on a CPU with 8-bit dot-product instructions
ONNX_INT8_FILE = "model_int8.onnx"
WEIGHTS_KEY = "nucleiseg_weights"  # ONNX metadata: the weights_digest of the network it was exported from
WEIGHTS_FILE_KEY = "nucleiseg_weights_file"  # ONNX metadata: the file_digest of the weights.pt that holds it


def onnx_file(model: ModelBundle, config: InferenceConfig) -> Path | None:
    """The export the onnx engine runs: the model folder's 8-bit one where ``config.int8`` and it has one,
    else its float32 model.onnx; None where the folder has neither."""
    if model.folder is None:
        return None
    for name in (ONNX_INT8_FILE, ONNX_FILE) if config.int8 else (ONNX_FILE,):
        if (model.folder / name).is_file():
            return model.folder / name
    return None


def onnx_predictor(model: ModelBundle, config: InferenceConfig) -> Predictor:
    """onnxruntime on the model folder's export (``onnx_file``), which must be an export of the folder's
    weights: the export names the bytes of the weights.pt it was made from, so they are checked without
    PyTorch (an export without that name is checked against the weights read with PyTorch)."""
    from nucleiseg.model import WEIGHTS, file_digest

    path = onnx_file(model, config)
    if path is None:
        raise ValueError(f"the onnx engine runs {ONNX_FILE} of the model folder, and {model.folder} has none; make "
                         f"it with: nucleiseg export MODEL --format onnx --out MODEL_FOLDER/{ONNX_FILE}")
    if config.bf16:
        raise ValueError("--bf16 is for the torch engine; the onnx engine runs in float32 or int8")
    predictor = OnnxPredictor(path, model.size_multiple, model.out_channels)
    weights = model.folder / WEIGHTS
    # a network in memory may no longer be the file's: then, and for an export that does not name the file,
    # the weights themselves are compared
    if model.network_loaded or predictor.weights_file is None or not weights.is_file() \
            or predictor.weights_file != file_digest(weights):
        from nucleiseg.network import weights_digest

        if predictor.weights != weights_digest(model.network):
            raise ValueError(f"{path} was not exported from the weights of {weights}; export it again: "
                             f"nucleiseg export MODEL --format {'onnx-int8' if path.name == ONNX_INT8_FILE else 'onnx'}"
                             f" --out {path}")
    return predictor


def auto_predictor(model: ModelBundle, config: InferenceConfig) -> Predictor:
    """onnxruntime where it runs the same network faster (the CPU, not bf16, an up-to-date export in the
    model folder); torch otherwise (a GPU, bf16, no export)."""
    if model.on_cpu and not config.bf16 and onnx_file(model, config) is not None:
        try:
            return onnx_predictor(model, config)
        except ValueError as exc:
            log.warning("running the network with torch: %s", exc)
    return torch_predictor(model, config)


# InferenceConfig.engine -> function (model bundle, settings) -> Predictor
PREDICTORS: dict[str, Callable[[ModelBundle, InferenceConfig], Predictor]] = {"auto": auto_predictor,
                                                                              "torch": torch_predictor,
                                                                              "onnx": onnx_predictor}


def make_predictor(model: ModelBundle, config: InferenceConfig) -> Predictor:
    """The predictor of ``config.engine`` for ``model``."""
    if config.engine not in PREDICTORS:
        raise ValueError(f"unknown engine {config.engine!r}; known: {sorted(PREDICTORS)}")
    return PREDICTORS[config.engine](model, config)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared pixels."""
    if length <= tile:
        return [0]
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile size ({tile})")
    count = int(np.ceil((length - overlap) / (tile - overlap)))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def taper(tile: int, overlap: int) -> np.ndarray:
    """1-D blending weight: a linear ramp over the overlap at both ends, flat in the middle, never 0."""
    ramp = np.minimum(np.arange(1, tile + 1), np.arange(tile, 0, -1)) / (overlap + 1)
    return np.clip(ramp, 1e-3, 1).astype(np.float32)


def pad_to_multiple(batch: np.ndarray, multiple: int) -> np.ndarray:
    """Pad the last two axes of (B, C, H, W) at the bottom and right up to a multiple of ``multiple``
    (mirroring the image where it is large enough, else repeating its edge)."""
    h, w = batch.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return batch
    mode = "reflect" if min(h, w) > max(ph, pw) else "edge"
    return np.pad(batch, ((0, 0), (0, 0), (0, ph), (0, pw)), mode=mode)


def resize(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, C, h, w) float32 -> (B, C, *size), each plane resized bilinearly by Pillow: smoothed over the pixels
    each output pixel covers where it shrinks (as ``torch.nn.functional.interpolate`` with antialias does),
    interpolated where it grows."""
    out = np.empty(batch.shape[:2] + tuple(size), np.float32)
    for index in np.ndindex(batch.shape[:2]):
        plane = Image.fromarray(np.ascontiguousarray(batch[index], np.float32))
        out[index] = np.asarray(plane.resize(size[::-1], Image.Resampling.BILINEAR))
    return out


def predict_tiled(
    function: ArrayFunction,
    image: np.ndarray,
    out_channels: int,
    tile: int,
    overlap: int,
    batch_size: int = TILE_BATCH,
) -> np.ndarray:
    """Run ``function`` over (C, H, W) ``image`` in overlapping tiles of at most ``tile`` pixels and blend them
    (an axis up to ``ONE_TILE_UP_TO`` tiles long is not split).

    ``function`` maps a (B, C, h, w) float32 array to (B, out_channels, h, w). Returns (out_channels, H, W)
    float32; see ``predict_region``.
    """
    h, w = image.shape[-2:]
    return predict_region(function, lambda y0, y1, x0, x1: image[:, y0:y1, x0:x1], (h, w), (0, h, 0, w),
                          out_channels, tile, overlap, batch_size)


def _axis_tiles(
    length: int, tile: int, overlap: int, lo: int, hi: int
) -> tuple[list[int], int, np.ndarray, np.ndarray]:
    """Along one axis of ``length`` pixels: the starts of the tiles of the whole axis' grid that reach
    ``lo:hi``, the tile size, its 1-D blending weight and the sum of the weights of all tiles over ``lo:hi``.

    An axis up to ``ONE_TILE_UP_TO`` tiles long is one tile: split, its tiles would overlap and each be
    padded (a 520-pixel axis as two tiles of 292, padded to 320, is 1.2 times the pixels), and a microscope
    frame is often 520-700 pixels a side. A longer axis gets tiles of at most ``tile`` pixels, as few as can
    be and no larger than it takes for them to cover the axis with ``overlap``."""
    if length <= tile * ONE_TILE_UP_TO:
        count, size = 1, length
    else:
        count = math.ceil((length - overlap) / (tile - overlap))
        size = min(tile, math.ceil((length + (count - 1) * overlap) / count))
    starts = tile_starts(length, size, overlap)
    weight = taper(size, overlap) if len(starts) > 1 else np.ones(size, np.float32)
    norm = np.zeros(length, np.float32)
    for s in starts:
        norm[s : s + size] += weight
    return [s for s in starts if s < hi and s + size > lo], size, weight, norm[lo:hi]


def predict_region(
    function: ArrayFunction,
    read: Callable[[int, int, int, int], np.ndarray],
    shape: tuple[int, int],
    region: tuple[int, int, int, int],
    out_channels: int,
    tile: int,
    overlap: int,
    batch_size: int = TILE_BATCH,
) -> np.ndarray:
    """Blended tile predictions over ``region`` (y0, y1, x0, x1) of an image of ``shape`` (H, W).

    The tiles are those of the grid over the whole image that reach the region, with the whole image's
    weights, so any region gets what a prediction of the whole image gives there (up to float noise):
    this is what lets a huge image be segmented block by block (``bigimage``). The weights are separable
    (a product of two 1-D tapers) on a regular grid, so the sum of weights at each pixel is a product of
    two 1-D sums and no full-size weight image is kept in memory.

    ``read(y0, y1, x0, x1)`` returns the (C, y1 - y0, x1 - x0) float32 pixels there; it is called once,
    for the box the region's tiles cover. Returns (out_channels, y1 - y0, x1 - x0) float32.
    """
    (h, w), (y0, y1, x0, x1) = shape, region
    ys, th, wy, norm_y = _axis_tiles(h, tile, overlap, y0, y1)
    xs, tw, wx, norm_x = _axis_tiles(w, tile, overlap, x0, x1)
    top, left = ys[0], xs[0]
    pixels = read(top, ys[-1] + th, left, xs[-1] + tw)
    if len(ys) == len(xs) == 1 and (th, tw) == (y1 - y0, x1 - x0):  # one tile, the region: nothing to blend
        return np.asarray(function(pixels[None]), np.float32)[0]
    out = np.zeros((out_channels, y1 - y0, x1 - x0), np.float32)
    positions = [(y, x) for y in ys for x in xs]
    weight = wy[:, None] * wx[None, :]
    for i in range(0, len(positions), batch_size):
        chunk = positions[i : i + batch_size]
        batch = np.stack([pixels[:, y - top : y - top + th, x - left : x - left + tw] for y, x in chunk])
        result = np.asarray(function(batch), np.float32)
        for (y, x), r in zip(chunk, result, strict=True):
            # the part of this tile inside the region
            ry0, ry1, rx0, rx1 = max(y, y0), min(y + th, y1), max(x, x0), min(x + tw, x1)
            out[:, ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] += (
                r[:, ry0 - y : ry1 - y, rx0 - x : rx1 - x] * weight[ry0 - y : ry1 - y, rx0 - x : rx1 - x])
    out /= norm_y[None, :, None]
    out /= norm_x[None, None, :]
    return out


def bf16_is_fast() -> bool:
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def rescaled(predictor: Predictor, scale: float = 1.0, tta: bool = False) -> ArrayFunction:
    """Wrap a predictor for tiles of any size, seen at ``scale``.

    Each tile is resized by ``scale`` (so that its nuclei have the size the network was trained at),
    padded to the predictor's size multiple, predicted, and resized back. With ``tta`` the prediction is
    averaged over the four flips.
    """

    def forward(batch: np.ndarray) -> np.ndarray:
        h, w = batch.shape[-2:]
        if scale != 1.0:
            batch = resize(batch, (max(1, round(h * scale)), max(1, round(w * scale))))
        sh, sw = batch.shape[-2:]
        prob = predictor(pad_to_multiple(batch, predictor.size_multiple))[..., :sh, :sw]
        return resize(prob, (h, w)) if scale != 1.0 else prob

    def predict(batch: np.ndarray) -> np.ndarray:
        if not tta:
            return forward(batch)
        total = np.zeros((), np.float32)
        for axes in ((), (-1,), (-2,), (-2, -1)):
            total = total + np.flip(forward(np.flip(batch, axes)), axes)
        return total / 4

    return predict


def predict_probabilities(
    predictor: Predictor,
    x: np.ndarray,
    scale: float = 1.0,
    config: InferenceConfig | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """(H, W) normalised image -> (K, H, W) probabilities (foreground, centre distance, ...) on the same grid.

    The predictor sees the image resized by ``scale``, tile by tile: ``config.tile`` and ``config.overlap``
    are in the network's pixels, so memory stays bounded whatever the image size and scale.

    With ``region`` (y0, y1, x0, x1), only that part is predicted, as the whole image's prediction has it
    (``predict_region``); ``x`` may then be any lazy (H, W) array whose slices are normalised float pixels,
    read only around the region.
    """
    config = config or InferenceConfig()
    if len(x.shape) != 2:
        raise ValueError(f"expected a 2-D normalised image, got shape {x.shape}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    tile_here = max(16, round(config.tile / scale))
    overlap_here = min(math.ceil(config.overlap / scale), tile_here // 2)
    function = rescaled(predictor, scale, config.tta)
    batch_size = getattr(predictor, "batch_size", TILE_BATCH)  # optional in the Predictor protocol
    h, w = x.shape

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(x[y0:y1, x0:x1], np.float32)[None]

    return predict_region(function, read, (h, w), region or (0, h, 0, w), predictor.out_channels, tile_here,
                          overlap_here, batch_size)
