"""The classic Data Science Bowl recipe: fixed-size arrays, a U-Net with binary cross-entropy, and
connected components of the thresholded prediction resized back to each image's size.

It is kept as the baseline the full-resolution method is measured against: it merges touching nuclei
and loses the detail of large images.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage import measure, transform
from tqdm import tqdm

from nucleiseg.config import ModelConfig, save_json
from nucleiseg.io import Sample, atomic_path, to_rgb_uint8
from nucleiseg.network import UNet, build_model

log = logging.getLogger(__name__)


@dataclass
class SeedConfig:
    """The recipe's settings; image dimensions are parameters, 128x128x3 by default."""

    height: int = 128
    width: int = 128
    channels: int = 3
    model: ModelConfig = field(default_factory=lambda: ModelConfig(in_channels=3, out_channels=1))
    batch_size: int = 16
    epochs: int = 30
    patience: int = 5  # early stopping: epochs without a lower validation loss
    lr: float = 1e-3
    seed: int = 0


@dataclass
class SeedArrays:
    """``X`` (N, H, W, C) uint8 images, ``Y`` (N, H, W, 1) bool merged masks (None for test images),
    ``sizes`` each image's original (height, width), ``ids`` the image ids."""

    X: np.ndarray
    Y: np.ndarray | None
    sizes: list[tuple[int, int]]
    ids: list[str]


def resize_images(samples: list[Sample], height: int = 128, width: int = 128, channels: int = 3) -> SeedArrays:
    """Resize images (and merged masks, where present) of ``samples`` to (height, width)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    X = np.zeros((len(samples), height, width, channels), np.uint8)
    has_masks = all(s.labels is not None for s in samples)
    Y = np.zeros((len(samples), height, width, 1), bool) if has_masks else None
    for i, s in enumerate(samples):
        rgb = to_rgb_uint8(s.image)[..., :channels]
        X[i] = transform.resize(rgb, (height, width), preserve_range=True, anti_aliasing=True).round()
        if Y is not None:
            Y[i, ..., 0] = transform.resize(s.labels > 0, (height, width), order=0, anti_aliasing=False)
    return SeedArrays(X, Y, [s.image.shape[:2] for s in samples], [s.id for s in samples])


def _tensor(X: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(X.transpose(0, 3, 1, 2))).float() / 255


def train_seed(
    train: SeedArrays, val: SeedArrays, cfg: SeedConfig, out_dir: str | os.PathLike, progress: bool = True
) -> tuple[UNet, list[dict]]:
    """Train the recipe's U-Net with binary cross-entropy and early stopping on the validation loss.

    Writes ``seed_weights.pt`` (best epoch) and ``seed_config.json`` to ``out_dir``; returns the network
    with the best weights and the history (epoch, minutes, train_loss, val_loss).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg, out_dir / "seed_config.json")
    network = build_model(cfg.model)
    optimizer = torch.optim.Adam(network.parameters(), lr=cfg.lr)
    x_val, y_val = _tensor(val.X), torch.from_numpy(val.Y.transpose(0, 3, 1, 2)).float()
    history, best, since_best, started = [], float("inf"), 0, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        network.train()
        order = rng.permutation(len(train.X))
        losses = []
        for start in tqdm(range(0, len(order), cfg.batch_size), desc=f"seed epoch {epoch}", disable=not progress,
                          leave=False):
            idx = np.sort(order[start : start + cfg.batch_size])
            x, y = _tensor(train.X[idx]), torch.from_numpy(train.Y[idx].transpose(0, 3, 1, 2)).float()
            loss = F.binary_cross_entropy_with_logits(network(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        network.eval()
        with torch.inference_mode():
            val_loss = float(F.binary_cross_entropy_with_logits(network(x_val), y_val))
        history.append({"epoch": epoch, "minutes": (time.perf_counter() - started) / 60,
                        "train_loss": float(np.mean(losses)), "val_loss": val_loss})
        log.info("seed epoch %d: train %.4f val %.4f", epoch, np.mean(losses), val_loss)
        if val_loss < best:
            best, since_best = val_loss, 0
            with atomic_path(out_dir / "seed_weights.pt") as tmp:
                torch.save(network.state_dict(), tmp)
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    return load_seed_network(out_dir, cfg), history


def load_seed_network(out_dir: str | os.PathLike, cfg: SeedConfig | None = None) -> UNet:
    """The seed U-Net with the best weights that ``train_seed`` kept in ``out_dir``, ready to predict."""
    network = build_model((cfg or SeedConfig()).model)
    network.load_state_dict(torch.load(Path(out_dir) / "seed_weights.pt", weights_only=True))
    return network.eval()


def predict_seed(network: UNet, arrays: SeedArrays, threshold: float = 0.5) -> list[np.ndarray]:
    """Predict each image at the fixed size, resize the probability back to the original size,
    threshold it, and label connected components: one label image per input."""
    network.eval()
    with torch.inference_mode():
        probs = torch.sigmoid(network(_tensor(arrays.X)))[:, 0].numpy()
    return [
        measure.label(transform.resize(p, size, order=1) > threshold).astype(np.int32)
        for p, size in zip(probs, arrays.sizes, strict=True)
    ]


def load_seed_arrays(
    train_root: str | os.PathLike,
    test_root: str | os.PathLike,
    height: int = 128,
    width: int = 128,
    channels: int = 3,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The recipe's arrays: ``X_train`` (N, height, width, channels) uint8, ``Y_train`` (N, height, width, 1)
    bool, ``X_test`` (M, height, width, channels) uint8 and the test images' original (height, width)."""
    from nucleiseg.io import load_dataset

    train = resize_images(load_dataset(train_root, progress=progress), height, width, channels)
    test = resize_images(load_dataset(test_root, progress=progress), height, width, channels)
    return train.X, train.Y, test.X, test.sizes
