"""Probability maps for images of any size: padding, overlapping tiles with blending, flip TTA.

Tiling is kept apart from the network: ``predict_tiled`` takes any callable that maps a (B, C, h, w)
tensor to (B, K, h, w), so tests can use a pointwise function with a known answer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

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


def pad_to_multiple(x: np.ndarray, multiple: int, min_size: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad the last two axes of (..., H, W) up to a multiple of ``multiple`` (at least ``min_size``)."""
    h, w = x.shape[-2:]
    ph = -(-max(h, min_size) // multiple) * multiple - h
    pw = -(-max(w, min_size) // multiple) * multiple - w
    if ph or pw:
        mode = "reflect" if min(h, w) > max(ph, pw) else "symmetric"
        x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)], mode=mode)
    return x, (h, w)


def predict_tiled(
    predictor: Predictor,
    image: np.ndarray,
    out_channels: int,
    tile: int = 512,
    overlap: int = 64,
    multiple: int = 16,
    batch_size: int = 4,
) -> np.ndarray:
    """Run ``predictor`` over (C, H, W) ``image`` in overlapping tiles and blend them.

    The tile weights are separable (a product of two 1-D tapers) on a regular grid, so the sum of weights
    at each pixel is a product of two 1-D sums and no full-size weight image is kept in memory.

    Returns (out_channels, H, W) float32.
    """
    if tile % multiple:
        raise ValueError(f"tile ({tile}) must be a multiple of {multiple}")
    padded, (h, w) = pad_to_multiple(image, multiple)
    ph, pw = padded.shape[-2:]
    th, tw = min(tile, ph), min(tile, pw)
    ys, xs = tile_starts(ph, th, overlap), tile_starts(pw, tw, overlap)
    wy, wx = taper(th, overlap) if len(ys) > 1 else np.ones(th, np.float32), (
        taper(tw, overlap) if len(xs) > 1 else np.ones(tw, np.float32)
    )
    out = np.zeros((out_channels, ph, pw), np.float32)
    norm_y, norm_x = np.zeros(ph, np.float32), np.zeros(pw, np.float32)
    for y in ys:
        norm_y[y : y + th] += wy
    for x in xs:
        norm_x[x : x + tw] += wx
    positions = [(y, x) for y in ys for x in xs]
    weight = wy[:, None] * wx[None, :]
    for i in range(0, len(positions), batch_size):
        chunk = positions[i : i + batch_size]
        batch = np.stack([padded[:, y : y + th, x : x + tw] for y, x in chunk])
        with torch.inference_mode():
            result = predictor(torch.from_numpy(batch)).float().numpy()
        for (y, x), r in zip(chunk, result, strict=True):
            out[:, y : y + th, x : x + tw] += r * weight
    out /= norm_y[None, :, None]
    out /= norm_x[None, None, :]
    return out[:, :h, :w]


def bf16_is_fast() -> bool:
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX), so autocast speeds inference up."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def network_predictor(network: torch.nn.Module, tta: bool = False, bf16: bool = False) -> Predictor:
    """Wrap a network that outputs logits into a predictor of probabilities, optionally averaged over the
    four flips (test-time augmentation) and computed in bfloat16 (probabilities change by about 0.01)."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return torch.sigmoid(network(batch).float())

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
    network: torch.nn.Module, x: np.ndarray, tile: int = 512, overlap: int = 64, tta: bool = False,
    bf16: bool = False,
) -> np.ndarray:
    """(H, W) normalised image -> (2, H, W) probabilities: foreground, centre distance."""
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D normalised image, got shape {x.shape}")
    multiple = 2 ** getattr(network, "depth", 4)
    predictor = network_predictor(network, tta, bf16)
    return predict_tiled(predictor, x[None].astype(np.float32), 2, tile, overlap, multiple)
