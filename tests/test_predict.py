import numpy as np
import pytest
import torch

from nucleiseg.predict import pad_to_multiple, predict_tiled, tile_starts


def plus_one(batch: torch.Tensor) -> torch.Tensor:
    return torch.cat([batch + 1, batch * 2], dim=1)


@pytest.mark.parametrize("shape", [(37, 53), (256, 256), (300, 1000), (1023, 517)])
@pytest.mark.parametrize(("tile", "overlap"), [(64, 16), (128, 32), (512, 64)])
def test_pointwise_predictor_is_reproduced_exactly(shape, tile, overlap):
    rng = np.random.default_rng(0)
    image = rng.random((1,) + shape).astype(np.float32)
    out = predict_tiled(plus_one, image, 2, tile=tile, overlap=overlap)
    assert out.shape == (2,) + shape
    np.testing.assert_allclose(out[0], image[0] + 1, rtol=1e-5)
    np.testing.assert_allclose(out[1], image[0] * 2, rtol=1e-5)


def test_tiles_cover_and_overlap():
    for length, tile, overlap in [(1000, 256, 64), (257, 256, 64), (100, 256, 64)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == max(length, min(tile, length))
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))
    with pytest.raises(ValueError):
        tile_starts(1000, 64, 64)


def test_tiled_network_equals_untiled(real_samples):
    from nucleiseg.data import prepare_input
    from nucleiseg.model import UNet
    from nucleiseg.predict import predict_probabilities

    torch.manual_seed(0)
    network = UNet(base_channels=4, depth=3).eval()
    x = prepare_input(real_samples[0].image)
    whole = predict_probabilities(network, x, tile=512, overlap=0)
    tiled = predict_probabilities(network, x, tile=128, overlap=48)
    # tiles see less context at their borders; with an overlap wider than the border effect they agree
    assert np.abs(whole - tiled).max() < 0.02
    assert np.abs(whole - tiled).mean() < 1e-3


def test_pad_to_multiple():
    x, (h, w) = pad_to_multiple(np.ones((1, 5, 33), np.float32), 16)
    assert x.shape == (1, 16, 48) and (h, w) == (5, 33)
