"""Fine-tuning the shipped model on a few labelled images (the committed validation images)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from nucleiseg.cli import main
from nucleiseg.config import ModelConfig, TrainConfig
from nucleiseg.io import load_dataset, read_image, write_labels
from nucleiseg.model import load_model
from nucleiseg.network import build_model
from nucleiseg.segment import Segmenter
from nucleiseg.train import start_from

from .conftest import VALIDATION


def test_finetune_on_two_images_changes_the_trained_weights_only(tmp_path, caplog):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for s in load_dataset(VALIDATION, progress=False, use_cache=False)[:2]:  # fluorescence and H&E
        shutil.copy(VALIDATION / s.id / "images" / f"{s.id}.png", images)
        write_labels(labels / f"{s.id}.png", s.labels)
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--from", "default", "--images", str(images), "--labels", str(labels), "--out",
                     str(tmp_path / "run"), "--set", "epochs=1", "steps_per_epoch=2", "batch_size=2",
                     "data.patch_size=64", "device=cpu"]) == 0
    assert "only 2 labelled images" in caplog.text
    base, tuned = load_model("default"), load_model(tmp_path / "run" / "model")
    before, after = base.network.state_dict(), tuned.network.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(name.startswith("up.") for name in changed) and "head.weight" in changed
    # the frozen first encoder levels and every BatchNorm statistic are the shipped model's
    assert not any(name.startswith(("down.0.", "down.1.")) or "running_" in name for name in changed)
    # too few images to re-tune: the shipped thresholds and settings are kept
    assert tuned.thresholds == base.thresholds and tuned.inference == base.inference
    # the README's export line gives it an 8-bit network, calibrated on the images it was tuned on, that runs
    folder = tmp_path / "run" / "model"
    export = ["export", str(folder), "--format", "onnx-int8", "--out", str(folder / "model_int8.onnx")]
    assert main(export) == 2  # a fine-tune's recipe does not record its images
    assert main(export + ["--images", str(images), "--labels", str(labels)]) == 0
    segmenter = Segmenter(folder, device="cpu")
    assert segmenter.settings()["predictor"] == "OnnxPredictor:model_int8.onnx"
    assert segmenter.segment(read_image(VALIDATION / s.id / "images" / f"{s.id}.png")).labels.max() > 0


def test_init_from_a_model_of_another_shape_is_refused():
    cfg = TrainConfig(model=ModelConfig(base_channels=4, depth=2), init_from="default")
    with pytest.raises(ValueError, match="differs"):
        start_from(build_model(cfg.model), cfg)


def test_a_grid_model_starts_from_the_full_resolution_one():
    cfg = TrainConfig(model=ModelConfig(grid=2), init_from="default")
    network = build_model(cfg.model)
    start_from(network, cfg)
    base, started = load_model("default").network.state_dict(), network.state_dict()
    assert all(torch.equal(base[name], started[name]) for name in base if name != "down.0.0.weight")
    # the first filters spread over a cell's 4 pixels: on a flat cell they act as the base's on one pixel
    first = started["down.0.0.weight"]
    assert first.shape[1] == 4 and torch.allclose(first.sum(dim=1, keepdim=True), base["down.0.0.weight"])
