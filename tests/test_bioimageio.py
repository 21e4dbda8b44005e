"""bioimage.io export: the package validates with bioimageio.spec, its test tensors are nucleiseg's
probabilities on a bundled sample, its TorchScript and ONNX weights reproduce them, bioimageio.core's test
passes (where it is installed), and a failed export leaves nothing behind."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nucleiseg.data import prepare_input
from nucleiseg.export import BIOIMAGEIO_SAMPLE, PERCENTILES, export_bioimageio
from nucleiseg.io import read_image, to_gray
from nucleiseg.model import load_model
from nucleiseg.predict import make_predictor

spec = pytest.importorskip("bioimageio.spec")
SAMPLES = Path(__file__).resolve().parents[1] / "src" / "nucleiseg" / "samples"


@pytest.fixture(scope="module")
def package(tmp_path_factory, tiny_model) -> Path:
    """The tiny model's bioimage.io package, made with the CLI."""
    out = tmp_path_factory.mktemp("bioimageio") / "package"
    done = subprocess.run([sys.executable, "-m", "nucleiseg.cli", "export", str(tiny_model), "--format", "bioimageio",
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def test_package_validates_in_the_newest_format(package):
    from bioimageio.spec.model.v0_5 import ModelDescr

    descr = spec.load_description(package / "rdf.yaml")
    summary = descr.validation_summary
    assert summary.status == "valid-format", summary.format()  # "passed" needs the model run (bioimageio.core)
    assert descr.format_version == ModelDescr.implemented_format_version
    warnings = [w.msg for detail in summary.details for w in detail.warnings]
    assert len(warnings) == 1 and "github_user" in warnings[0]  # naming a GitHub account is the uploader's call
    assert descr.weights.onnx.parent == "torchscript" and descr.weights.torchscript.parent is None
    names = {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy", "sample_input.tif",
             "sample_output.tif", "weights_torchscript.pt", "weights.onnx"}
    assert {p.name for p in package.iterdir()} == names


def test_test_tensors_are_nucleiseg_probabilities_on_a_sample(package, tiny_model):
    test_input, expected = np.load(package / "test_input.npy"), np.load(package / "test_output.npy")
    # a real image: the central crop of the bundled sample, raw intensities
    gray = to_gray(read_image(SAMPLES / BIOIMAGEIO_SAMPLE))
    (h, w), side = gray.shape, test_input.shape[-1]
    top, left = (h - side) // 2, (w - side) // 2
    assert test_input.shape == (1, 1, side, side) and side % load_model(tiny_model).size_multiple == 0
    assert np.array_equal(test_input[0, 0], gray[top : top + side, left : left + side])
    bundle = load_model(tiny_model)
    probabilities = make_predictor(bundle, bundle.inference)(prepare_input(test_input[0, 0])[None, None])
    assert expected.shape == (1, 3, side, side) and 0 < expected.min() and expected.max() < 1
    # equal up to float rounding: the network's sums run in another order on another number of threads (an
    # earlier test may have changed torch's)
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-6)


def scale_range_and_clip(x: np.ndarray) -> np.ndarray:
    """The package's preprocessing as the bioimage.io spec defines it (scale_range over y and x, eps 1e-6)."""
    low, high = np.percentile(x, PERCENTILES, axis=(-2, -1), keepdims=True)
    return np.clip((x - low) / (high - low + 1e-6), 0, 1).astype(np.float32)


def test_both_weights_reproduce_the_test_output(package):
    import onnxruntime

    test_input, expected = np.load(package / "test_input.npy"), np.load(package / "test_output.npy")
    x = scale_range_and_clip(test_input)
    assert np.abs(x[0, 0] - prepare_input(test_input[0, 0])).max() < 1e-5  # the preprocessing is prepare_input's
    traced = torch.jit.load(package / "weights_torchscript.pt")
    onnx = onnxruntime.InferenceSession(str(package / "weights.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(torch.sigmoid(traced(torch.from_numpy(x))).numpy() - expected).max() < 1e-5
        assert np.abs(torch.sigmoid(torch.from_numpy(onnx.run(None, {"input": x})[0])).numpy() - expected).max() < 1e-5
        other = np.ascontiguousarray(np.concatenate([x, x[..., ::-1, :]])[..., :48, :80])  # not the traced size
        assert np.abs(traced(torch.from_numpy(other)).numpy() - onnx.run(None, {"input": other})[0]).max() < 1e-4


def test_prepared_images_pass_the_preprocessing_almost_unchanged():
    """What the package's README says of H&E images given through prepare_input."""
    for name in ("histology_he.png", "histology_tissue.png"):
        x = prepare_input(read_image(SAMPLES / name))
        assert np.abs(scale_range_and_clip(x) - x).max() < 1e-3


def test_bioimageio_core_test_passes(package):
    core = pytest.importorskip("bioimageio.core")
    summary = core.test_model(package / "rdf.yaml")
    assert summary.status == "passed", summary.format()
    tested = {d.name for d in summary.details if d.name.startswith("Reproduce test outputs")}
    assert tested == {"Reproduce test outputs from test inputs (onnx)",
                      "Reproduce test outputs from test inputs (torchscript)"}


def test_failed_export_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_bioimageio(load_model(tiny_model), tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]

    class Failed:
        class validation_summary:
            status = "failed"

            @staticmethod
            def format():
                return "invented failure"

    monkeypatch.setattr(spec, "load_description", lambda source: Failed)
    with pytest.raises(ValueError, match="invented failure"):
        export_bioimageio(load_model(tiny_model), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
