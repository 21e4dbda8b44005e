"""Fine-tuning a trained model on a user's labelled images, on a CPU, in minutes.

Recipe (``finetune_config``), chosen for 5-50 images and 2 CPU cores: the shipped model's weights, its
network and nucleus scale; the first two encoder levels (``down.0``, ``down.1``: generic edge and blob
filters) and every BatchNorm statistic kept fixed, so the network adapts its deeper features to the new
images without drifting away from the image types it already segments; AdamW at lr 1e-4 (a thirtieth of
the first training run's peak: at 5e-4 the H&E fine-tune of benchmarks/finetune_he.py gained as much on
H&E but lost 0.050 DSB on fluorescence, at 1e-4 nothing), one warm-up epoch then cosine decay, 8 epochs of 25 batches of
4 patches of 192 px (200 steps, 1.5-2 minutes on 2 quiet cores), stopped after ``max_minutes`` = 15 in
any case.

Validation: a share (20%, at least one image per image type) of the user's images is held out, scored
during training (the best epoch is kept) and, when it holds at least ``MIN_TUNE_IMAGES`` images, used to
re-tune the post-processing thresholds; otherwise the base model's thresholds are kept. With fewer than
``MIN_IMAGES`` images every image is trained on and validated on, with a warning: the score then says how
well the model fits its training images, not how it does on new ones.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from nucleiseg.config import TrainConfig
from nucleiseg.data import validation_split
from nucleiseg.io import Sample
from nucleiseg.labelled import LabelledImage
from nucleiseg.model import ModelBundle, load_model, save_model
from nucleiseg.train import fit
from nucleiseg.tune import tune_thresholds

log = logging.getLogger(__name__)

MIN_IMAGES = 5  # fewer: no image is held out
MIN_TUNE_IMAGES = 5  # held-out images needed to re-tune the thresholds (fewer would overfit the grid)
VAL_FRACTION = 0.2


def finetune_config(base: str | os.PathLike = "default", **changes) -> TrainConfig:
    """The fine-tuning recipe of this module for the model ``base``, with ``changes`` (TrainConfig fields)."""
    model = load_model(base)
    cfg = TrainConfig(name="finetune", model=model.config, init_from=str(base), lr=1e-4, batch_size=4,
                      steps_per_epoch=25, epochs=8, warmup_epochs=1, max_minutes=15.0, eval_every=2,
                      snapshot_minutes=(), freeze=("down.0.", "down.1."), freeze_statistics=True)
    cfg.data = dataclasses.replace(cfg.data, root="", target_diameter=model.target_diameter, patch_size=192)
    return dataclasses.replace(cfg, **changes)


def split_user_images(samples: list[Sample], seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Training and validation images: a held-out share, or all of them twice when there are too few."""
    if len(samples) < MIN_IMAGES:
        log.warning("only %d labelled images: training and validating on all of them (give at least %d to hold "
                    "some out); the validation score will be optimistic", len(samples), MIN_IMAGES)
        return samples, samples
    return validation_split(samples, VAL_FRACTION, seed)


def finetune(pairs: list[LabelledImage], run_dir: str | os.PathLike, cfg: TrainConfig | None = None,
             progress: bool = True) -> Path:
    """Fine-tune ``cfg.init_from`` on labelled images; returns the model folder (``run_dir/model``).

    Parameters
    ----------
    pairs : list of LabelledImage
        The user's images and labels (``labelled.pair_labels``).
    run_dir : path
        Training run folder (as ``train.fit`` writes it); the fine-tuned model is its ``model`` folder.
    cfg : TrainConfig, optional
        The recipe; ``finetune_config()`` by default.
    progress : bool
        Show progress bars.

    The model folder keeps the base model's inference settings; its thresholds are re-tuned on the
    held-out images when there are at least ``MIN_TUNE_IMAGES`` (and then serve every image, stained ones
    too), else they are the base model's (its stained images' own included).
    """
    cfg = cfg or finetune_config()
    if not cfg.init_from:
        raise ValueError("a fine-tune needs the model to start from (init_from)")
    samples = [pair.read() for pair in pairs]
    train, val = split_user_images(samples, cfg.seed)
    log.info("fine-tuning %s on %d images, validating on %d", cfg.init_from, len(train), len(val))
    folder = fit(cfg, run_dir, progress=progress, samples=(train, val))
    base, tuned = load_model(cfg.init_from), load_model(folder)
    thresholds, inference = base.thresholds, base.inference
    held_out = [s for s in val if all(s is not t for t in train)]
    if len(held_out) >= MIN_TUNE_IMAGES:
        thresholds, report = tune_thresholds(tuned, held_out, progress)
        thresholds.tuned_on = f"{len(held_out)} held-out images of the fine-tune"
        inference = dataclasses.replace(inference, stained_thresholds=None)  # tuned for the base network
        log.info("thresholds re-tuned: DSB %.4f on %d held-out images", report.dsb_score, len(held_out))
    else:
        log.warning("%d held-out images: keeping the thresholds of %s (re-tuning needs %d)", len(held_out),
                    cfg.init_from, MIN_TUNE_IMAGES)
    save_model(folder, ModelBundle(tuned.network, tuned.config, tuned.target_diameter, thresholds,
                                   tuned.architecture, inference), cfg)
    return folder
