import numpy as np

from nucleiseg.config import ModelConfig
from nucleiseg.io import load_dataset
from nucleiseg.seed import SeedConfig, load_seed_arrays, predict_seed, resize_images, train_seed

from .conftest import REPO

VALIDATION = REPO / "tests" / "data" / "validation"


def test_seed_arrays_have_the_recipe_shapes():
    X_train, Y_train, X_test, sizes = load_seed_arrays(VALIDATION, VALIDATION, progress=False)
    assert X_train.shape == (5, 128, 128, 3) and X_train.dtype == np.uint8
    assert Y_train.shape == (5, 128, 128, 1) and Y_train.dtype == bool
    assert X_test.shape == (5, 128, 128, 3) and (256, 256) in sizes and (1024, 1024) in sizes
    assert 0.02 < Y_train.mean() < 0.6  # masks survived the resize
    X, Y, _, _ = load_seed_arrays(VALIDATION, VALIDATION, height=64, width=96, channels=1, progress=False)
    assert X.shape == (5, 64, 96, 1) and Y.shape == (5, 64, 96, 1)


def test_seed_recipe_trains_and_predicts_at_original_size(tmp_path):
    samples = load_dataset(VALIDATION, progress=False)
    arrays = resize_images(samples, 32, 32)
    cfg = SeedConfig(height=32, width=32, epochs=2, batch_size=2,
                     model=ModelConfig(in_channels=3, out_channels=1, base_channels=4, depth=2))
    network, history = train_seed(arrays, arrays, cfg, tmp_path, progress=False)
    assert len(history) == 2 and (tmp_path / "seed_weights.pt").exists()
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 1.5
    labels = predict_seed(network, arrays)
    assert [lab.shape for lab in labels] == [s.image.shape[:2] for s in samples]
