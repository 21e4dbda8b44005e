"""Shared fixtures. Unit tests use the real images committed in tests/data; only the tests that take the
``train_root`` fixture need the Data Science Bowl data beside the repository (../shared), and skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
VALIDATION = REPO / "tests" / "data" / "validation"  # 5 real validation images with their masks
DSB = REPO.parent / "shared" / "data" / "dsb2018"
TRAIN = DSB / "stage1_train"
TEST = DSB / "stage1_test"

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # the napari tests: no window, before Qt starts


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Keep the decoded-sample cache of the tests apart from the user's."""
    monkeypatch.setenv("NUCLEISEG_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def train_root() -> Path:
    if not TRAIN.is_dir():
        pytest.skip(f"real training data not found at {TRAIN} (the DSB 2018 data, see the README)")
    return TRAIN


@pytest.fixture(scope="session")
def real_labels(tmp_path_factory, train_root) -> dict:
    """Ground-truth label images of the first three training images (sorted ids), by image id."""
    from nucleiseg.io import load_dataset, sample_ids

    with pytest.MonkeyPatch.context() as mp:  # keep the decoded-sample cache out of the user's home
        mp.setenv("NUCLEISEG_CACHE", str(tmp_path_factory.mktemp("cache")))
        samples = load_dataset(train_root, ids=sample_ids(train_root)[:3], progress=False)
    assert len(samples) == 3
    return {s.id: s.labels for s in samples}


@pytest.fixture(scope="session")
def validation_samples():
    """The committed images: fluorescence 256x256, histology, histology, large fluorescence, brightfield."""
    from nucleiseg.io import load_dataset

    return load_dataset(VALIDATION, progress=False, use_cache=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, validation_samples) -> Path:
    """A model folder with an untrained 2-level U-Net (4 base channels), saved with save_model.

    Its BatchNorm statistics are taken from one real image and its thresholds lowered, so that it finds
    "nuclei" (random ones) and the label images compared in tests are not all empty.
    """
    import torch

    from nucleiseg.config import ModelConfig, PostprocessConfig
    from nucleiseg.data import prepare_input
    from nucleiseg.model import ModelBundle, save_model
    from nucleiseg.network import UNet

    torch.manual_seed(0)
    network = UNet(base_channels=4, depth=2)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = plain average of what the network sees
    network.train()
    with torch.no_grad():
        x = prepare_input(validation_samples[0].image)
        network(torch.from_numpy(np.ascontiguousarray(x))[None, None])
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    network.eval()
    bundle = ModelBundle(network, ModelConfig(base_channels=4, depth=2), target_diameter=17.0,
                         thresholds=PostprocessConfig(foreground_threshold=0.5, marker_threshold=0.38))
    folder = tmp_path_factory.mktemp("tiny_model")
    save_model(folder, bundle)
    return folder


@pytest.fixture(scope="session")
def dense_tissue():
    """Real H&E images where nuclei cover a third to most of the pixels, so that the median pixel is a
    nucleus: a 40x TNBC training image and a dense stage1_train histology image (``../shared``)."""
    from nucleiseg.io import load_sample

    folders = [REPO.parent / "shared" / "data" / "tnbc" / "tnbc_04_8",
               TRAIN / "13f2bec0a24c70345372febb14c4352877b1b6c1b01896246048e83c345c0914"]
    if not all(f.is_dir() for f in folders):
        pytest.skip("dense-tissue images of ../shared/data not found")
    return [load_sample(f, overlap="warn") for f in folders]
