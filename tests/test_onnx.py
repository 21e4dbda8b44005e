"""ONNX export and the onnx engine: the exported network gives the torch network's probabilities, and
segmenting through onnxruntime gives the same labels."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nucleiseg.data import prepare_input
from nucleiseg.io import read_image
from nucleiseg.model import gpu_driver_present, load_model
from nucleiseg.network import weights_digest
from nucleiseg.predict import make_predictor
from nucleiseg.segment import Segmenter

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "nucleiseg" / "samples"


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory, tiny_model) -> Path:
    """A copy of the tiny model folder with its ONNX export, made with the CLI."""
    folder = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(tiny_model, folder)
    done = subprocess.run([sys.executable, "-m", "nucleiseg.cli", "export", str(folder), "--format", "onnx",
                           "--out", str(folder / "model.onnx")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return folder


def test_onnx_probabilities_match_torch_at_any_size(onnx_model):
    bundle = load_model(onnx_model)
    onnx = make_predictor(bundle, bundle.inference.updated(engine="onnx"))
    torch_ = make_predictor(bundle, bundle.inference)
    batch = np.random.default_rng(0).standard_normal((2, 1, 48, 80)).astype(np.float32)  # not the export's size
    assert np.abs(onnx(batch) - torch_(batch)).max() < 1e-4


def test_onnx_engine_segments_like_torch(onnx_model):
    image = read_image(SAMPLES / "fluorescence_sparse.png")
    expected = Segmenter(onnx_model).segment(image).labels
    labels = Segmenter(onnx_model, engine="onnx").segment(image).labels
    assert expected.max() > 0 and np.array_equal(labels, expected)


def test_onnx_engine_without_an_export_is_one_error_line(tmp_path, tiny_model):
    done = subprocess.run([sys.executable, "-m", "nucleiseg.cli", "segment", str(SAMPLES / "fluorescence_sparse.png"),
                           "--out", str(tmp_path), "--model", str(tiny_model), "--engine", "onnx"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "nucleiseg export" in done.stderr


@pytest.mark.parametrize("model", ["default", "fast"])
def test_auto_engine_runs_the_shipped_float32_export_on_the_cpu_with_the_labels_of_torch(model):
    from nucleiseg.predict import OnnxPredictor, TorchPredictor

    image = read_image(SAMPLES / "fluorescence_dense.png")
    auto, torch_ = Segmenter(model, device="cpu", int8=False), Segmenter(model, device="cpu", engine="torch")
    assert isinstance(auto.predictor, OnnxPredictor) and isinstance(torch_.predictor, TorchPredictor)
    assert isinstance(Segmenter(device="cpu", bf16=True).predictor, TorchPredictor)
    assert np.array_equal(auto.segment(image).labels, torch_.segment(image).labels)


@pytest.mark.parametrize("model", ["default", "fast"])
def test_the_shipped_int8_export_runs_by_default_and_finds_the_nuclei_of_float32(model):
    """The 8-bit export of the shipped weights (its record checked against weights.pt) is what the CPU runs;
    over the bundled samples it finds the float32 network's nuclei: at least 95% of them matched at IoU 0.5
    (on the H&E samples, whose maps are least sure, single nuclei come and go)."""
    from nucleiseg.metrics import match

    int8, float32 = Segmenter(model, device="cpu"), Segmenter(model, device="cpu", int8=False)
    assert Path(int8.predictor.path).name == "model_int8.onnx" and Path(float32.predictor.path).name == "model.onnx"
    assert int8.settings()["predictor"] == "OnnxPredictor:model_int8.onnx"
    matched = found = 0
    for path in sorted(SAMPLES.glob("*.png")):
        image = read_image(path)
        expected, labels = float32.segment(image).labels, int8.segment(image).labels
        matched += match(expected, labels).counts(0.5)[0]
        found += max(expected.max(), labels.max())
    assert matched >= 0.95 * found, (matched, found)


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory, onnx_model, validation_samples) -> Path:
    """The tiny model folder with an 8-bit export calibrated on three real images."""
    from nucleiseg.export import export_onnx_int8

    folder = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(onnx_model, folder)
    export_onnx_int8(load_model(folder), folder / "model_int8.onnx", samples=validation_samples[:3])
    return folder


def test_an_int8_export_is_run_where_present_and_gives_the_float32_probabilities_closely(int8_model):
    bundle = load_model(int8_model)
    int8 = make_predictor(bundle, bundle.inference.updated(engine="onnx"))
    float32 = make_predictor(bundle, bundle.inference.updated(engine="onnx", int8=False))
    assert Path(int8.path).name == "model_int8.onnx" and Path(float32.path).name == "model.onnx"
    x = prepare_input(read_image(SAMPLES / "fluorescence_sparse.png"))[None, None, :256, :256]
    difference = np.abs(int8(x) - float32(x))
    assert 0 < difference.mean() < 0.02


@pytest.mark.parametrize("grid", [1, 2])
def test_the_shuffle_upsampling_computes_the_network_it_is_made_from(grid):
    """The 8-bit export's form of the U-Net (1x1 convolutions and pixel shuffles instead of transposed
    convolutions) gives the network's logits on a real image, at either grid."""
    import torch

    from nucleiseg.network import ShuffleUpsample, UNet, with_shuffle_upsampling

    torch.manual_seed(0)
    network = UNet(base_channels=8, depth=3, grid=grid).eval()
    x = torch.from_numpy(prepare_input(read_image(SAMPLES / "fluorescence_sparse.png"))[None, None, :128, :192])
    with torch.no_grad():
        expected, shuffled = network(x), with_shuffle_upsampling(network)(x)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in with_shuffle_upsampling(network).modules())
    assert torch.allclose(shuffled, expected, atol=1e-5), (shuffled - expected).abs().max()
    with pytest.raises(ValueError, match="plain 2x2"):  # a larger output than a pixel shuffle's
        ShuffleUpsample(torch.nn.ConvTranspose2d(4, 2, 2, stride=2, output_padding=1))


def _upsampling_in_8_bits(path: Path) -> bool:
    """True where every pixel shuffle of the ONNX file follows a convolution with 8-bit weights, and no
    transposed convolution is left."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    producer = {output: node for node in nodes for output in node.output}

    def upstream_conv(name: str):
        node = producer.get(name)
        while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node = producer.get(node.input[0])
        return node

    shuffles = [node for node in nodes if node.op_type == "DepthToSpace"]
    convolutions = [upstream_conv(node.input[0]) for node in shuffles]
    return (bool(shuffles) and not any(node.op_type == "ConvTranspose" for node in nodes)
            and all(conv is not None and conv.op_type == "Conv"
                    and getattr(producer.get(conv.input[1]), "op_type", None) == "DequantizeLinear"
                    for conv in convolutions))


def test_an_int8_export_upsamples_in_8_bits(int8_model):
    assert _upsampling_in_8_bits(int8_model / "model_int8.onnx")
    assert not _upsampling_in_8_bits(int8_model / "model.onnx")  # float32: transposed convolutions


@pytest.mark.parametrize("name", ["default", "fast"])
def test_the_shipped_int8_exports_upsample_in_8_bits(name):
    """The shipped 8-bit exports are made as the export makes them now."""
    assert _upsampling_in_8_bits(load_model(name).folder / "model_int8.onnx")


def test_the_int8_export_without_a_recipe_to_calibrate_on_is_one_error_line(tmp_path, onnx_model):
    done = subprocess.run([sys.executable, "-m", "nucleiseg.cli", "export", str(onnx_model), "--format", "onnx-int8",
                           "--out", str(tmp_path / "model_int8.onnx")], capture_output=True, text=True)
    assert done.returncode == 2 and not (tmp_path / "model_int8.onnx").exists()
    assert len(done.stderr.strip().splitlines()) == 1 and "train_config.json" in done.stderr


@pytest.mark.skipif(gpu_driver_present(), reason="with a GPU driver, PyTorch is asked whether it sees a GPU")
def test_an_up_to_date_export_segments_without_importing_pytorch(onnx_model):
    """PyTorch's import is most of a run's start-up: the export names the weights.pt it was made from, so
    the onnx engine checks it without reading the weights."""
    image = str(SAMPLES / "fluorescence_sparse.png")
    check = ("import sys; from nucleiseg.segment import Segmenter; from nucleiseg.io import read_image; "
             f"s = Segmenter({str(onnx_model)!r}); r = s.segment(read_image({image!r})); "
             "print(type(s.predictor).__name__, s.settings()['weights'], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OnnxPredictor", weights_digest(load_model(onnx_model).network), "False"]


def test_a_batch_on_the_onnx_engine_gives_the_labels_of_one_image_at_a_time(tmp_path, onnx_model, monkeypatch):
    """Images side by side, each with its own onnxruntime session of one thread: the labels of each image
    segmented alone."""
    from nucleiseg import batch
    from nucleiseg.io import read_labels

    monkeypatch.setattr(batch, "threads", lambda: 2)
    paths = sorted(SAMPLES.glob("*.png"))
    segmenter = Segmenter(onnx_model, engine="onnx")
    result = batch.segment_batch(paths, tmp_path, segmenter, progress=False)
    assert [row["path"] for row in result.done] == [str(p) for p in paths] and not result.failed
    for path in paths:
        expected = segmenter.segment_file(path).labels
        assert np.array_equal(read_labels(tmp_path / f"{path.stem}_labels.png"), expected), path.name


def test_a_stale_export_is_never_run(tmp_path, onnx_model, caplog):
    """model.onnx exported from other weights than weights.pt (the folder was retrained since): auto runs
    torch and says why; the onnx engine refuses."""
    import torch

    from nucleiseg.model import save_model
    from nucleiseg.predict import TorchPredictor

    folder = tmp_path / "model"
    shutil.copytree(onnx_model, folder)
    bundle = load_model(folder)
    with torch.no_grad():
        next(bundle.network.parameters()).add_(0.01)
    save_model(folder, bundle)
    with caplog.at_level("WARNING"):
        assert isinstance(Segmenter(folder).predictor, TorchPredictor)
    assert "not exported from the weights" in caplog.text
    with pytest.raises(ValueError, match="export it again"):
        Segmenter(folder, engine="onnx")
