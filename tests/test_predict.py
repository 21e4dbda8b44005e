import numpy as np
import pytest
import torch

from nucleiseg.config import InferenceConfig
from nucleiseg.data import prepare_input
from nucleiseg.io import read_image
from nucleiseg.predict import TorchPredictor, pad_to_multiple, predict_region, predict_tiled, tile_starts
from tests.conftest import REPO


def plus_one(batch: np.ndarray) -> np.ndarray:
    return np.concatenate([batch + 1, batch * 2], axis=1)


def predictor(network) -> TorchPredictor:
    return TorchPredictor(network, 2**network.depth, out_channels=network.head.out_channels)


@pytest.mark.parametrize("shape", [(37, 53), (256, 256), (300, 1000), (1023, 517)])
@pytest.mark.parametrize(("tile", "overlap"), [(64, 16), (128, 32), (512, 64)])
def test_pointwise_predictor_is_reproduced_exactly(shape, tile, overlap):
    rng = np.random.default_rng(0)
    image = rng.random((1,) + shape).astype(np.float32)
    out = predict_tiled(plus_one, image, 2, tile=tile, overlap=overlap)
    assert out.shape == (2,) + shape
    np.testing.assert_allclose(out[0], image[0] + 1, rtol=1e-5)
    np.testing.assert_allclose(out[1], image[0] * 2, rtol=1e-5)


def test_a_frame_up_to_one_and_a_half_tiles_is_one_tile_and_a_longer_one_is_split():
    seen = []

    def record(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape)
        return plus_one(batch)

    predict_tiled(record, np.zeros((1, 520, 696), np.float32), 2, tile=512, overlap=64)
    assert seen == [(1, 1, 520, 696)]  # split, it would be four padded tiles of 292 x 380
    seen.clear()
    predict_tiled(record, np.zeros((1, 520, 1000), np.float32), 2, tile=512, overlap=64)
    assert seen == [(3, 1, 520, 376)]  # three tiles of at most 512 along the long side, in one batch


def tile_mean(batch: np.ndarray) -> np.ndarray:
    """Each tile's mean everywhere on it: the output depends on where the tiles are."""
    return np.broadcast_to(batch.mean(axis=(2, 3), keepdims=True), batch.shape).copy()


def test_a_region_is_predicted_with_the_whole_image_tiles():
    image = prepare_input(read_image(REPO / "src" / "nucleiseg" / "samples" / "fluorescence_dense.png"))[None]
    whole = predict_tiled(tile_mean, image, 1, tile=128, overlap=32)
    y0, y1, x0, x1 = 100, 230, 50, 300

    def read(a, b, c, d):
        return image[:, a:b, c:d]

    part = predict_region(tile_mean, read, image.shape[1:], (y0, y1, x0, x1), 1, tile=128, overlap=32)
    np.testing.assert_allclose(part, whole[:, y0:y1, x0:x1], rtol=1e-6)
    # the region tiled on its own would differ
    alone = predict_tiled(tile_mean, image[:, y0:y1, x0:x1], 1, tile=128, overlap=32)
    assert not np.allclose(alone, whole[:, y0:y1, x0:x1], rtol=1e-3)


def test_tiles_cover_and_overlap():
    for length, tile, overlap in [(1000, 256, 64), (257, 256, 64), (100, 256, 64)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == max(length, min(tile, length))
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))
    with pytest.raises(ValueError):
        tile_starts(1000, 64, 64)


def test_tiled_network_equals_untiled(validation_samples):
    from nucleiseg.data import prepare_input
    from nucleiseg.network import UNet
    from nucleiseg.predict import predict_probabilities

    torch.manual_seed(0)
    network = UNet(base_channels=4, depth=3).eval()
    x = prepare_input(validation_samples[0].image)
    whole = predict_probabilities(predictor(network), x, config=InferenceConfig(tile=512, overlap=0))
    tiled = predict_probabilities(predictor(network), x, config=InferenceConfig(tile=128, overlap=48))
    # tiles see less context at their borders; with an overlap wider than the border effect they agree
    assert np.abs(whole - tiled).max() < 0.02
    assert np.abs(whole - tiled).mean() < 1e-3


def test_pad_to_multiple():
    assert pad_to_multiple(np.ones((1, 1, 5, 33)), 16).shape == (1, 1, 16, 48)
    padded = pad_to_multiple(np.broadcast_to(np.arange(40.0).reshape(1, 1, 40, 1), (1, 1, 40, 40)), 16)
    assert padded.shape == (1, 1, 48, 48) and padded[0, 0, 40, 0] == 38  # mirrored, not zero


@pytest.mark.parametrize("scale", [0.37, 0.5, 0.8, 1.7, 2.0, 3.3])
def test_resize_is_torchs_bilinear_with_antialias_where_it_shrinks(validation_samples, scale):
    """Pillow resizes without PyTorch, as torch.nn.functional.interpolate does (its antialias follows
    Pillow's), up to float rounding."""
    from nucleiseg.data import prepare_input
    from nucleiseg.predict import resize

    x = prepare_input(validation_samples[1].image)[None, None]
    size = (round(x.shape[2] * scale), round(x.shape[3] * scale))
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear", antialias=scale < 1,
                                               align_corners=False).numpy()
    np.testing.assert_allclose(resize(x, size), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_tiles_at_another_scale_equal_the_whole_image(validation_samples, scale):
    from nucleiseg.data import prepare_input
    from nucleiseg.network import UNet
    from nucleiseg.predict import predict_probabilities

    torch.manual_seed(0)
    network = UNet(base_channels=4, depth=3).eval()
    x = prepare_input(validation_samples[0].image)
    whole = predict_probabilities(predictor(network), x, scale, InferenceConfig(tile=1024, overlap=0))
    tiled = predict_probabilities(predictor(network), x, scale, InferenceConfig(tile=128, overlap=48))
    assert whole.shape == tiled.shape == (3,) + x.shape
    assert np.abs(whole - tiled).mean() < 2e-3


class NoNuclei(torch.nn.Module):
    """A network that never sees a nucleus; records the input sizes it was given."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return torch.full((x.shape[0], 3, *x.shape[-2:]), -10.0)


def test_image_without_nuclei_is_searched_up_to_2x_then_segmented_at_1x(validation_samples):
    from nucleiseg.config import ModelConfig
    from nucleiseg.model import ModelBundle
    from nucleiseg.segment import Segmenter

    network = NoNuclei()
    image = validation_samples[0].image  # 256 x 256
    result = Segmenter(ModelBundle(network, ModelConfig(), 17.0)).segment(image)
    assert result.labels.max() == 0 and result.scale == 1 and not result.diameter_estimated
    assert max(network.sizes) == (512, 512)  # looked at 2x, never at 4x


class Doubling:
    """A predictor that is not a torch network: the engine is what the segmenter is given."""

    size_multiple, out_channels = 8, 3

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.shape[-1] % 8 == 0 and batch.shape[-2] % 8 == 0, "padded to the size multiple"
        return np.concatenate([batch, batch, np.zeros_like(batch)], axis=1)


def test_segmenter_runs_any_predictor_with_any_number_of_outputs(validation_samples):
    from nucleiseg.config import ModelConfig
    from nucleiseg.model import ModelBundle
    from nucleiseg.segment import Segmenter

    segmenter = Segmenter(ModelBundle(NoNuclei(), ModelConfig(), 17.0), predictor=Doubling())
    result = segmenter.segment(validation_samples[0].image, diameter=17.0)
    assert result.labels.shape == validation_samples[0].image.shape[:2] and result.labels.max() > 0
    assert segmenter.probabilities(np.zeros((37, 53), np.float32), 1.0).shape == (3, 37, 53)


def test_tta_and_bf16_are_settings_of_the_config():
    torch.manual_seed(0)
    from nucleiseg.network import UNet
    from nucleiseg.predict import predict_probabilities

    network = UNet(base_channels=4, depth=2).eval()
    x = np.random.default_rng(0).random((40, 56)).astype(np.float32)
    plain = predict_probabilities(predictor(network), x)
    flipped = predict_probabilities(predictor(network), x, config=InferenceConfig(tta=True))
    assert plain.shape == flipped.shape == (3, 40, 56) and np.abs(plain - flipped).max() > 0
