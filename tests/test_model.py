import json

import pytest
import torch

from nucleiseg.config import ModelConfig, TrainConfig, from_dict, load_json, save_json
from nucleiseg.model import ModelBundle, load_model, save_model
from nucleiseg.network import UNet, build_model


@pytest.mark.parametrize(("depth", "base", "size"), [(1, 2, (16, 16)), (3, 4, (64, 48)), (4, 8, (32, 80))])
def test_unet_shapes_and_backward(depth, base, size):
    network = UNet(in_channels=3, out_channels=2, base_channels=base, depth=depth)
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = network(x)
    assert out.shape == (2, 2, *size)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_grid_unet_runs_on_a_coarser_grid_and_answers_at_full_size():
    network = UNet(in_channels=1, out_channels=3, base_channels=4, depth=2, grid=2)
    assert ModelConfig(base_channels=4, depth=2, grid=2).size_multiple == 8
    x = torch.randn(1, 1, 24, 40, requires_grad=True)
    out = network(x)
    assert out.shape == (1, 3, 24, 40)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # the first convolution sees each 2x2 cell's pixels as 4 channels
    assert network.down[0][0].weight.shape[1] == 4
    with pytest.raises(ValueError, match=r"\(24, 24\)"):
        network(torch.zeros(1, 1, 20, 20))


def test_unet_odd_size_error_names_the_padded_size():
    with pytest.raises(ValueError, match=r"\(48, 64\)"):
        UNet(depth=4)(torch.zeros(1, 1, 40, 50))


def test_model_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(base_channels=4, depth=2)
    bundle = ModelBundle(build_model(cfg).eval(), cfg, target_diameter=21.0)
    save_model(tmp_path, bundle)
    loaded = load_model(tmp_path)
    assert loaded.config == cfg and loaded.target_diameter == 21.0
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), bundle.network(x))


def test_stained_images_own_thresholds_round_trip_and_yield_to_thresholds_given(tmp_path):
    from dataclasses import replace

    from nucleiseg.config import InferenceConfig, PostprocessConfig

    cfg = ModelConfig(base_channels=4, depth=2)
    stained = PostprocessConfig(0.6, 0.45, 0.3, tuned_on="stained images")
    inference = replace(InferenceConfig(), stained_thresholds=stained)
    save_model(tmp_path, ModelBundle(build_model(cfg).eval(), cfg, thresholds=PostprocessConfig(0.5, 0.4, 0.1),
                                     inference=inference))
    assert "stained_thresholds" not in (tmp_path / "inference.json").read_text()
    config = load_model(tmp_path).inference
    assert config.thresholds_for(stained=True) == stained
    assert config.thresholds_for(stained=False) == PostprocessConfig(0.5, 0.4, 0.1)
    assert config.updated(tile=256).stained_thresholds == stained
    given = config.updated(marker_threshold=0.3)  # a threshold given applies to every image
    assert given.thresholds_for(stained=True) == given.thresholds_for(stained=False) == PostprocessConfig(0.5, 0.3, 0.1)
    save_model(tmp_path, ModelBundle(build_model(cfg).eval(), cfg))  # none: the file goes
    assert load_model(tmp_path).inference.stained_thresholds is None


def test_loading_is_strict(tmp_path):
    cfg = ModelConfig(base_channels=4, depth=2)
    save_model(tmp_path, ModelBundle(build_model(cfg), cfg, 17.0))
    info = json.loads((tmp_path / "model.json").read_text())
    info["model"]["base_channels"] = 8  # weights no longer fit the network
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"weights.pt: does not match the network of model.json \(size mismatch"):
        load_model(tmp_path)
    info["model"]["base_channels"] = 4
    info["model"]["dropout"] = 0.1
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        load_model(tmp_path)


def test_config_round_trip_and_unknown_keys(tmp_path):
    cfg = TrainConfig(epochs=3)
    cfg.data.patch_size = 96
    save_json(cfg, tmp_path / "c.json")
    assert load_json(TrainConfig, tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="epochz"):
        from_dict(TrainConfig, {"epochz": 3})
    with pytest.raises(ValueError, match="patchsize"):
        from_dict(TrainConfig, {"data": {"patchsize": 3}})
