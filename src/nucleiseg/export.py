"""Exporting a model for other runtimes: ONNX (run by ``--engine onnx`` with onnxruntime, or any ONNX runtime),
and a bioimage.io model package (TorchScript and ONNX weights described for the bioimage.io model zoo's tools)."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import uuid
import warnings
from importlib import resources
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import tifffile
import torch
from PIL import Image

from nucleiseg.data import DARK_BACKGROUND, SIZE_RANGE, input_kind, normalise, prepare_input
from nucleiseg.io import atomic_path, read_image, to_gray
from nucleiseg.model import TRAIN_CONFIG, WEIGHTS, ModelBundle, file_digest
from nucleiseg.network import load_network, weights_digest, with_shuffle_upsampling
from nucleiseg.predict import ONE_TILE_UP_TO, WEIGHTS_FILE_KEY, WEIGHTS_KEY, torch_predictor

ONNX_OPSET = 17

# the bioimage.io package's test image: a bundled gray fluorescence sample (dark background, so the package's
# preprocessing is exactly prepare_input) whose nuclei, about 18 px wide, are at the network's scale
BIOIMAGEIO_SAMPLE = "fluorescence_dense.png"
BIOIMAGEIO_TEST_SIDE = 256
# prepare_input's percentiles, which the package's scale_range preprocessing repeats
_NORMALISE = inspect.signature(normalise).parameters
PERCENTILES = (_NORMALISE["low"].default, _NORMALISE["high"].default)
OUTPUT_CHANNELS = ("foreground", "centre", "size")
# training data folders (as a recipe names them) -> what the package's documentation and citations say of them
DATASETS = {
    "dsb2018": ("2018 Data Science Bowl stage1_train (BBBC038, Broad Institute): fluorescence, brightfield and "
                "H&E images; CC0",
                "Caicedo et al. (2019) Nucleus segmentation across imaging experiments: the 2018 Data Science "
                "Bowl. Nature Methods 16, 1247-1253.", "10.1038/s41592-019-0612-7"),
    "tnbc": ("TNBC nuclei (Institut Curie; H&E, breast cancer, 40x; Zenodo 10.5281/zenodo.1175282): reported as "
             "CC BY 4.0, which asks for the citation below",
             "Naylor et al. (2019) Segmentation of Nuclei in Histopathology Images by Deep Regression of the "
             "Distance Map. IEEE Transactions on Medical Imaging 38(2), 448-459.", "10.1109/TMI.2018.2865709"),
}
UNET_CITATION = ("Ronneberger, Fischer and Brox (2015) U-Net: Convolutional Networks for Biomedical Image "
                 "Segmentation. MICCAI 2015.", "10.1007/978-3-319-24574-4_28")


def export_onnx(model: ModelBundle, out: str | os.PathLike, network: torch.nn.Module | None = None) -> None:
    """Write the network as ONNX, atomically: input ``input`` (B, C, H, W) float32, output ``logits``
    (B, K, H, W), batch, height and width dynamic (H and W multiples of ``model.size_multiple``).
    ``network`` is another form of ``model.network`` to write (the same function), if given.

    The TorchScript-based exporter is used (``dynamo=False``): the dynamo one needs onnxscript, and the
    U-Net has no control flow that tracing would miss (its size check holds for every valid input).
    """
    try:
        import onnx
    except ImportError as exc:
        raise ValueError('the onnx export needs onnx: pip install "nucleiseg[onnx]"') from exc
    network = (model.network if network is None else network).eval().cpu()
    side = 4 * model.size_multiple
    example = torch.zeros(1, model.config.in_channels, side, side)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(out) as tmp:
        torch.onnx.export(network, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": dynamic, "logits": dynamic}, opset_version=ONNX_OPSET,
                          dynamo=False)
        exported = onnx.load(str(tmp))
        # the onnx engine checks these against the model folder's weights, so a stale export is never run
        onnx.helper.set_model_props(exported, export_names(model))
        onnx.save(exported, str(tmp))


def export_names(model: ModelBundle) -> dict[str, str]:
    """ONNX metadata naming the weights an export is made of: their ``weights_digest`` and, where they are
    those of the model folder's weights.pt, that file's ``file_digest``, which the onnx engine checks
    without PyTorch (``predict.onnx_predictor``)."""
    digest = weights_digest(model.network)
    names = {WEIGHTS_KEY: digest}
    weights = model.folder / WEIGHTS if model.folder is not None else None
    if weights is not None and weights.is_file():
        try:
            saved = weights_digest(load_network(weights, model.architecture, model.config))
        except ValueError:  # the file does not hold this network
            saved = None
        if saved == digest:
            names[WEIGHTS_FILE_KEY] = file_digest(weights)
    return names


def export_onnx_int8(model: ModelBundle, out: str | os.PathLike, samples: list | None = None,
                     per_type: int = 16) -> None:
    """Write the network as ONNX with 8-bit integer weights and activations (onnxruntime's static
    quantisation: per-channel weights, activation ranges calibrated on real inputs), atomically; inputs and
    outputs as ``export_onnx``, with its record of the weights.

    The first convolution (one input channel: little arithmetic) and the head stay in float32: the head's
    size output sets the diameter estimate. The upsampling layers are written as 1x1 convolutions and pixel
    shuffles (``network.ShuffleUpsample``), which run in 8 bits: the default's network 5-9% faster (fast's
    4%) than with transposed convolutions, which onnxruntime leaves in float32 (the float32 export keeps
    them: there they are faster). ``samples`` are the labelled images to calibrate on (default: the training
    split of the model folder's train_config.json), ``per_type`` of each image type, each seen at its nuclei's
    training size and as it is (as the diameter estimate sees it first).
    """
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ValueError('the onnx-int8 export needs onnx: pip install "nucleiseg[onnx]"') from exc
    if samples is None:
        samples = recipe_training_images(model)
    crops = calibration_inputs(samples, model.target_diameter, per_type)

    class Crops(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(crops)

        def get_next(self):
            crop = next(self.remaining, None)
            return None if crop is None else {"input": crop}

    with TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "float32.onnx", with_shuffle_upsampling(model.network))
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(Path(tmp) / "float32.onnx"), str(prepared), skip_symbolic_shape=True)
        convolutions = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
        with atomic_path(out) as target:
            quantize_static(str(prepared), str(target), Crops(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=[convolutions[0], convolutions[-1]])


def recipe_training_images(model: ModelBundle) -> list:
    """The training split of the recipe in the model folder's train_config.json."""
    from nucleiseg.config import TrainConfig, load_json
    from nucleiseg.data import load_split

    recipe = model.folder / TRAIN_CONFIG if model.folder is not None else None
    if recipe is None or not recipe.is_file():
        raise ValueError(f"the onnx-int8 export calibrates on the model's training images, and {recipe or 'the model'} "
                         f"does not name them ({TRAIN_CONFIG}); give labelled images with --images and --labels")
    recipe_config = load_json(TrainConfig, recipe)
    if not recipe_config.data.root:  # a fine-tune names no folder: its images were given on the command line
        raise ValueError(f"{recipe} names no training folder (a fine-tune's images are not recorded); give the "
                         "labelled images to calibrate on with --images and --labels")
    train, _ = load_split(recipe_config, progress=False)
    return train


def calibration_inputs(samples: list, target_diameter: float, per_type: int, side: int = 256,
                       seed: int = 0) -> list[np.ndarray]:
    """(1, 1, side, side) network inputs: up to ``per_type`` images of each image type (chosen at random),
    each rescaled to bring its nuclei to ``target_diameter`` and as it is, cropped at the centre (edge-padded
    where smaller)."""
    from nucleiseg.data import image_type, network_input, rescale, scale_factor
    from nucleiseg.targets import median_diameter

    by_type: dict[str, list] = {}
    for sample in samples:
        by_type.setdefault(image_type(sample.image), []).append(sample)
    rng = np.random.default_rng(seed)
    crops = []
    for kind in sorted(by_type):
        for i in rng.permutation(len(by_type[kind]))[:per_type]:
            sample = by_type[kind][i]
            x, _ = network_input(sample.image)
            for factor in (scale_factor(median_diameter(sample.labels), target_diameter), 1.0):
                y = rescale(x, factor, order=1)
                top, left = max(0, (y.shape[0] - side) // 2), max(0, (y.shape[1] - side) // 2)
                y = y[top:top + side, left:left + side]
                y = np.pad(y, ((0, side - y.shape[0]), (0, side - y.shape[1])), mode="edge")
                crops.append(np.ascontiguousarray(y[None, None], np.float32))
    return crops


def export_bioimageio(model: ModelBundle, out_dir: str | os.PathLike) -> Path:
    """Write a bioimage.io model package (the newest model format bioimageio.spec has) into the new folder
    ``out_dir``.

    The package holds ``rdf.yaml``, TorchScript weights (traced) and ONNX weights (``export_onnx``; their
    parent in the description), a test input and its expected output, ``README.md`` and a cover image.
    Its input is one gray channel (batch, channel, y, x) of raw intensities; its preprocessing (1st and
    99.8th percentiles to 0 and 1, clipped) is ``data.prepare_input`` for gray images with a dark
    background. The weights output logits and the postprocessing is a sigmoid, so the package gives
    nucleiseg's probabilities: foreground, centre, size. The test input is a crop of a bundled sample; the
    expected output is what nucleiseg's torch predictor gives on it.

    The folder is written next to ``out_dir`` and renamed into place once bioimageio.spec has validated
    it, so ``out_dir`` is either absent (or empty) or a complete, valid package. Returns ``out_dir``.

    Raises
    ------
    ValueError
        Without bioimageio.spec installed, or if the package does not validate.
    FileExistsError
        If ``out_dir`` exists and is not an empty folder.
    """
    try:
        from bioimageio.spec import __version__ as spec_version
        from bioimageio.spec import load_description, save_bioimageio_package_as_folder
    except ImportError as exc:
        raise ValueError('the bioimageio export needs bioimageio.spec: pip install "nucleiseg[bioimageio]"') from exc
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; choose another --out or remove it")
    image = _test_image(model.size_multiple)
    gray, x = to_gray(image), prepare_input(image)
    network = model.network.eval().cpu()
    expected = torch_predictor(model, model.inference.updated(bf16=False))(x[None, None])
    with TemporaryDirectory() as staging_name:
        staging = Path(staging_name)
        np.save(staging / "test_input.npy", gray[None, None])
        np.save(staging / "test_output.npy", expected)
        # the same as images, for people and the bioimage.io website (which do not read .npy)
        tifffile.imwrite(staging / "sample_input.tif", gray, photometric="minisblack")
        tifffile.imwrite(staging / "sample_output.tif", expected[0], photometric="minisblack")
        with torch.no_grad(), warnings.catch_warnings():
            # the network's size check reads the input's shape; it holds for every size the package allows
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.jit.trace(network, torch.from_numpy(x[None, None])).save(staging / "weights_torchscript.pt")
            export_onnx(model, staging / "weights.onnx")
        _cover(x, expected[0], staging / "cover.png")
        (staging / "README.md").write_text(_documentation(model, spec_version), encoding="utf-8")
        descr = _description(model, staging)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()  # with the usual permissions, unlike mkdtemp
        try:
            save_bioimageio_package_as_folder(descr, output_path=tmp)
            summary = load_description(tmp / "rdf.yaml").validation_summary
            if summary.status == "failed":  # "valid-format" without running the model (bioimageio.core's test)
                raise ValueError(f"the bioimage.io package does not validate: {summary.format()}")
            os.replace(tmp, out_dir)  # replaces an empty folder; a non-empty one raises
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def _test_image(size_multiple: int) -> np.ndarray:
    """The central square of the bundled sample, its side a multiple of ``size_multiple``."""
    image = read_image(Path(str(resources.files("nucleiseg") / "samples" / BIOIMAGEIO_SAMPLE)))
    side = -(-BIOIMAGEIO_TEST_SIDE // size_multiple) * size_multiple
    h, w = image.shape[:2]
    if side > min(h, w):
        raise ValueError(f"the network takes sizes in multiples of {size_multiple}, more than the {h} x {w} "
                         f"test sample {BIOIMAGEIO_SAMPLE} allows")
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
    # the package's preprocessing is prepare_input for this kind of image only
    if input_kind(crop) != DARK_BACKGROUND:
        raise ValueError(f"the test sample {BIOIMAGEIO_SAMPLE} must be a gray image with a dark background")
    return crop


def _cover(x: np.ndarray, probabilities: np.ndarray, path: Path) -> None:
    """2:1 PNG: the network input (left) beside the foreground (green) and centre (magenta) probabilities."""
    foreground, centre = probabilities[0], probabilities[1]
    right = np.stack([centre, foreground * (1 - centre), centre], axis=2)
    panels = np.concatenate([np.repeat(x[..., None], 3, axis=2), right], axis=1)
    Image.fromarray((np.clip(panels, 0, 1) * 255).round().astype(np.uint8)).save(path)


def _name(model: ModelBundle) -> str:
    """'nucleiseg <model folder name>', in the characters a bioimage.io name allows."""
    folder = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", model.folder.name) if model.folder is not None else "U-Net"
    return f"nucleiseg {folder}"[:64]


def _training_data(model: ModelBundle) -> tuple[list[str], list[str]]:
    """The training recipe's data folders (train_config.json of the model folder) and the keys of DATASETS
    among them; nothing when the model folder has no recipe."""
    recipe = model.folder / TRAIN_CONFIG if model.folder is not None else None
    if recipe is None or not recipe.is_file():
        return [], []
    data = json.loads(recipe.read_text()).get("data", {})
    folders = [data.get("root", "")] + list(data.get("extra_train", [])) + list(data.get("extra_val", []))
    folders = [f for f in folders if f]
    return folders, [key for key in DATASETS if any(key in f for f in folders)]


def _threshold_values(t) -> dict[str, float]:
    """The thresholds of PostprocessConfig ``t`` (without where they were tuned)."""
    return {"foreground_threshold": t.foreground_threshold, "marker_threshold": t.marker_threshold,
            "min_area_fraction": t.min_area_fraction}


def _threshold_call(t) -> str:
    """The PostprocessConfig(...) call that gives the thresholds of ``t``, for the package's README."""
    return "PostprocessConfig(" + ", ".join(f"{k}={v:g}" for k, v in _threshold_values(t).items()) + ")"


def _stained_snippet(t) -> str:
    """The README's line on the stained images' own thresholds (``thresholds_stained.json``), if any."""
    if t is None:
        return ""
    return (f"\nFor stained images (read through their haematoxylin channel) the model has thresholds of its own "
            f"(`thresholds_stained.json`): `{_threshold_call(t)}`.\n")


def _stained_config(t) -> dict:
    """The stained images' own thresholds for the package's config, if any."""
    return {} if t is None else {"stained_thresholds": _threshold_values(t)}


def _documentation(model: ModelBundle, spec_version: str) -> str:
    """The package's README.md: what the network does, its input, outputs, scale, training data, validation."""
    d, t = model.target_diameter, model.thresholds
    folders, known = _training_data(model)
    if folders:
        data = "The training recipe (`train_config.json` of the model folder) trained and validated on:\n\n"
        data += "".join(f"- `{f}`\n" for f in folders)
        data += "".join(f"- {DATASETS[k][0]}. Cite: {DATASETS[k][1]} doi:{DATASETS[k][2]}\n" for k in known)
    else:
        data = "The model folder holds no training recipe (`train_config.json`), so its training data are unknown.\n"
    inference = model.inference
    return f"""# {_name(model)}: nucleus foreground, centre and size maps

A 2D U-Net from nucleiseg, a nucleus-segmentation package for microscopy images (PyTorch, MIT licence). For
every pixel it gives three probabilities from which nucleiseg's post-processing makes one label per nucleus.

## Input

`input`: (batch, channel, y, x) float32, one channel, height and width multiples of {model.size_multiple}. The
preprocessing of this description maps each image's percentiles {PERCENTILES[0]:g} and {PERCENTILES[1]:g} to 0
and 1 and clips to [0, 1]: nucleiseg's `nucleiseg.data.prepare_input` for gray images with a dark
background (fluorescence). Other images need `prepare_input` first:

- colour H&E (and other stained brightfield) images: the network reads the haematoxylin channel of a colour
  deconvolution (`skimage.color.rgb2hed`), normalised as above;
- gray brightfield images (dark nuclei on a light background): the normalised image, inverted.

`prepare_input`'s output already has those percentiles at about 0 and 1, so the preprocessing changes it
little (by less than 0.001 on nucleiseg's bundled H&E samples).

**Scale.** The network was trained on nuclei rescaled to about {d:g} px in diameter. nucleiseg estimates each
image's nucleus size (from the size output) and rescales the image before predicting; this package runs at
the image's own scale, so rescale images whose nuclei are far from {d:g} px wide (or use nucleiseg).
nucleiseg predicts large images in tiles of {inference.tile} px overlapping by {inference.overlap} px (a side up to
{ONE_TILE_UP_TO:g} tiles long is not split).

## Outputs

`probabilities`: (batch, channel, y, x) float32 in [0, 1], the sigmoid (this description's postprocessing)
of the network's logits, three channels:

1. `foreground`: the pixel belongs to a nucleus;
2. `centre`: normalised distance to the nucleus border, 1 at each nucleus centre, falling towards 0 at the
   border (also where two nuclei touch);
3. `size`: the nucleus' equivalent diameter D in pixels, coded as (log2(D / {d:g}) + {SIZE_RANGE:g}) /
   {2 * SIZE_RANGE:g}, so D = {d:g} * 2 ** ({2 * SIZE_RANGE:g} * size - {SIZE_RANGE:g}); meaningful inside nuclei only.

## Instances

```python
from nucleiseg.config import PostprocessConfig
from nucleiseg.postprocess import instances

thresholds = {_threshold_call(t)}
labels = instances(probabilities[0], thresholds, diameter={d:g})  # (H, W) int32, 1..N
```
{_stained_snippet(model.inference.stained_thresholds)}
Markers where `centre` exceeds the marker threshold grow by watershed inside `foreground`. Or segment the
images with nucleiseg itself (`nucleiseg segment IMAGES --out RESULTS --model MODEL_FOLDER`), which also
prepares any modality and estimates the scale. The thresholds are the model's (`thresholds.json`{
f", tuned on the {t.tuned_on}" if t.tuned_on else ""}).

## Training data

{data}
## Validation

`weights_torchscript.pt` (traced) and `weights.onnx` (opset {ONNX_OPSET}) are the same network. The test
tensors (`test_input.npy`, `test_output.npy`; `sample_input.tif` and `sample_output.tif` hold the same) are
a {BIOIMAGEIO_TEST_SIDE} x {BIOIMAGEIO_TEST_SIDE} crop of `{BIOIMAGEIO_SAMPLE}`, a fluorescence image bundled
with nucleiseg, and the probabilities nucleiseg's PyTorch predictor gives on it. `nucleiseg export` validated
this description with bioimageio.spec {spec_version}; `bioimageio test rdf.yaml` (bioimageio.core) reproduces
the test outputs with both weights. The network's accuracy is in nucleiseg's README (Results). The cover shows
the network's input beside the foreground (green) and centre (magenta) probabilities.
"""


def _description(model: ModelBundle, staging: Path):
    """The bioimage.io model description of the files in ``staging``."""
    from bioimageio.spec.model import v0_5 as bio

    m, d = model.size_multiple, model.target_diameter
    space = {a: bio.SpaceInputAxis(id=bio.AxisId(a), size=bio.ParameterizedSize(min=m, step=m)) for a in "yx"}
    inputs = bio.InputTensorDescr(
        id=bio.TensorId("input"),
        description=f"gray image, nuclei bright on a dark background, nuclei about {d:g} px wide",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier("nuclear")]), *space.values()],
        test_tensor=bio.FileDescr(source=staging / "test_input.npy"),
        sample_tensor=bio.FileDescr(source=staging / "sample_input.tif"),
        data=bio.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(axes=[bio.AxisId("y"), bio.AxisId("x")],
                                                            min_percentile=PERCENTILES[0],
                                                            max_percentile=PERCENTILES[1])),
            bio.ClipDescr(kwargs=bio.ClipKwargs(min=0.0, max=1.0)),
        ],
    )
    same = {a: bio.SizeReference(tensor_id=bio.TensorId("input"), axis_id=bio.AxisId(a)) for a in "yx"}
    outputs = bio.OutputTensorDescr(
        id=bio.TensorId("probabilities"),
        description="foreground, centre (normalised distance to the border) and size-code probabilities",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in OUTPUT_CHANNELS]),
              *(bio.SpaceOutputAxis(id=bio.AxisId(a), size=s) for a, s in same.items())],
        test_tensor=bio.FileDescr(source=staging / "test_output.npy"),
        sample_tensor=bio.FileDescr(source=staging / "sample_output.tif"),
        data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=[bio.SigmoidDescr()],
    )
    pytorch_version = bio.Version(torch.__version__.split("+")[0])
    weights = bio.WeightsDescr(
        torchscript=bio.TorchscriptWeightsDescr(source=staging / "weights_torchscript.pt",
                                                pytorch_version=pytorch_version),
        onnx=bio.OnnxWeightsDescr(source=staging / "weights.onnx", opset_version=ONNX_OPSET, parent="torchscript"),
    )
    _, known = _training_data(model)
    cite = [bio.CiteEntry(text=DATASETS[k][1], doi=bio.Doi(DATASETS[k][2])) for k in known]
    cite.append(bio.CiteEntry(text=UNET_CITATION[0], doi=bio.Doi(UNET_CITATION[1])))
    t = model.thresholds
    return bio.ModelDescr(
        name=_name(model),
        description=f"Nucleus foreground, centre and size probabilities for 2D microscopy images with nuclei about "
                    f"{d:g} px wide (gray fluorescence as it is; H&E and brightfield after nucleiseg's "
                    "prepare_input); nucleiseg's watershed post-processing turns them into one label per nucleus.",
        authors=[bio.Author(name="nucleiseg developers")],
        cite=cite,
        license=bio.LicenseId("MIT"),
        tags=["nuclei", "instance-segmentation", "2d", "unet", "pytorch", "fluorescence-light-microscopy",
              "histology", "nucleiseg"],
        documentation=bio.FileDescr(source=staging / "README.md"),
        covers=[bio.FileDescr(source=staging / "cover.png")],
        inputs=[inputs],
        outputs=[outputs],
        weights=weights,
        config=bio.Config(bioimageio=bio.BioimageioConfig(
            architecture_type="2D U-Net", modality="fluorescence and H&E microscopy", target_structure=["nuclei"],
            task="instance segmentation"),
            nucleiseg={"target_diameter": d, **_threshold_values(t), "size_range": SIZE_RANGE}
            | _stained_config(model.inference.stained_thresholds)),
    )
