"""Probability maps for images of any size: padding, overlapping tiles with blending, flip TTA.

Tiling is kept apart from the network: ``predict_tiled`` takes any callable that maps a (B, C, h, w)
tensor to (B, K, h, w), so tests can use a pointwise function with a known answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Predictor = Callable[[torch.Tensor], torch.Tensor]


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


def pad_to_multiple(batch: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last two axes of (B, C, H, W) at the bottom and right up to a multiple of ``multiple``
    (mirroring the image where it is large enough, else repeating its edge)."""
    h, w = batch.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return batch
    mode = "reflect" if min(h, w) > max(ph, pw) else "replicate"
    return torch.nn.functional.pad(batch, (0, pw, 0, ph), mode=mode)


def predict_tiled(
    predictor: Predictor,
    image: np.ndarray,
    out_channels: int,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
) -> np.ndarray:
    """Run ``predictor`` over (C, H, W) ``image`` in overlapping tiles of at most ``tile`` pixels and blend them.

    The tile weights are separable (a product of two 1-D tapers) on a regular grid, so the sum of weights
    at each pixel is a product of two 1-D sums and no full-size weight image is kept in memory.

    Returns (out_channels, H, W) float32.
    """
    h, w = image.shape[-2:]
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    wy = taper(th, overlap) if len(ys) > 1 else np.ones(th, np.float32)
    wx = taper(tw, overlap) if len(xs) > 1 else np.ones(tw, np.float32)
    out = np.zeros((out_channels, h, w), np.float32)
    norm_y, norm_x = np.zeros(h, np.float32), np.zeros(w, np.float32)
    for y in ys:
        norm_y[y : y + th] += wy
    for x in xs:
        norm_x[x : x + tw] += wx
    positions = [(y, x) for y in ys for x in xs]
    weight = wy[:, None] * wx[None, :]
    for i in range(0, len(positions), batch_size):
        chunk = positions[i : i + batch_size]
        batch = np.stack([image[:, y : y + th, x : x + tw] for y, x in chunk])
        with torch.inference_mode():
            result = predictor(torch.from_numpy(batch)).float().numpy()
        for (y, x), r in zip(chunk, result, strict=True):
            out[:, y : y + th, x : x + tw] += r * weight
    out /= norm_y[None, :, None]
    out /= norm_x[None, None, :]
    return out


def bf16_is_fast() -> bool:
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def network_predictor(network: torch.nn.Module, scale: float = 1.0, tta: bool = False, bf16: bool = False) -> Predictor:
    """Wrap a network that outputs logits into a predictor of probabilities for tiles of any size.

    Each tile is resized by ``scale`` (so that its nuclei have the size the network was trained at),
    padded to the network's size multiple, predicted, and resized back. Optionally the prediction is
    averaged over the four flips (test-time augmentation) or computed in bfloat16 (probabilities change
    by about 0.01).
    """
    multiple = 2 ** getattr(network, "depth", 4)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        h, w = batch.shape[-2:]
        if scale != 1.0:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            batch = F.interpolate(batch, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)
        sh, sw = batch.shape[-2:]
        device = next(network.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = network(pad_to_multiple(batch, multiple).to(device))
        prob = torch.sigmoid(logits.float()).cpu()[..., :sh, :sw]
        if scale != 1.0:
            prob = F.interpolate(prob, size=(h, w), mode="bilinear", antialias=scale > 1, align_corners=False)
        return prob

    def predict(batch: torch.Tensor) -> torch.Tensor:
        if not tta:
            return forward(batch)
        total = torch.zeros(())
        for dims in ((), (-1,), (-2,), (-2, -1)):
            prob = forward(torch.flip(batch, dims) if dims else batch)
            total = total + (torch.flip(prob, dims) if dims else prob)
        return total / 4

    return predict


def predict_probabilities(
    network: torch.nn.Module,
    x: np.ndarray,
    scale: float = 1.0,
    tile: int = 512,
    overlap: int = 64,
    tta: bool = False,
    bf16: bool = False,
) -> np.ndarray:
    """(H, W) normalised image -> (K, H, W) network outputs (foreground, centre distance, size code) on the
    same grid.

    The network sees the image resized by ``scale``, tile by tile: ``tile`` and ``overlap`` are in the
    network's pixels, so memory stays bounded whatever the image size and scale.
    """
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D normalised image, got shape {x.shape}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    tile_here = max(16, round(tile / scale))
    overlap_here = min(math.ceil(overlap / scale), tile_here // 2)
    predictor = network_predictor(network, scale, tta, bf16)
    out_channels = network.head.out_channels
    return predict_tiled(predictor, x[None].astype(np.float32, copy=False), out_channels, tile_here, overlap_here)
