"""Command-line interface: a thin layer over the library. Heavy modules are imported after parsing."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger("nucleiseg")

DEFAULT_TRAIN = "../shared/data/dsb2018/stage1_train"
DEFAULT_TEST = "../shared/data/dsb2018/stage1_test"


def number(kind: type, low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite ``kind`` within [low, high] ((low, high] with ``low_open``), so that an absurd
    option stops the command before any work with one line saying what is allowed."""
    allowed = f"{'more than' if low_open else 'at least'} {low:g}"
    allowed += f" and at most {high:g}" if high < math.inf else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {allowed}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# segment options that set an InferenceConfig field (or a threshold) of the same name
INFERENCE_OPTIONS = [
    ("--tile", number(int, 32), "tile size for large images (multiple of 16; a side up to 1.5x as long is one tile)"),
    ("--overlap", number(int, 0), "pixels shared by neighbouring tiles"),
    ("--max-megapixels", number(float, 0, low_open=True), "refuse larger images"),
    ("--tta", bool, "average over flips (4x slower, slightly better)"),
    ("--bf16", bool, "run the network in bfloat16: faster on CPUs with AVX512-BF16/AMX, labels differ slightly"),
    ("--int8", bool, "on the CPU, run the model folder's 8-bit integer export where it has one (a network about "
                     "2x faster, labels differ slightly); --no-int8: its float32 export"),
    ("--foreground-threshold", number(float, 0, 1), "foreground probability threshold"),
    ("--marker-threshold", number(float, 0, 1), "centre probability threshold of the watershed markers"),
    ("--engine", str, "what runs the network: auto (onnx on the CPU where the model folder has an export of its "
                      "weights, else torch), torch, or onnx (onnxruntime, the model folder's model.onnx)"),
]


def get_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="nucleiseg", description="Find every nucleus in microscopy images.",
                                     formatter_class=formatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("segment", help="segment images or folders of images", formatter_class=formatter)
    p.add_argument("inputs", nargs="+", help="image files, folders of images, or competition-layout folders")
    _add_segment_options(p)
    p.add_argument("--channel", type=number(int, 0), default=None,
                   help="the nuclear channel (from 0) of multi-channel images, or the plane of a stack; "
                        "required where a file holds several channels that are not the colours of one image "
                        "(default: colour and gray images are used as they are)")
    p.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="run on a Dask cluster: a scheduler address, or local:N for N local worker processes")
    p.add_argument("--large", action="store_true",
                   help="each input is one large image (zarr, OME-Zarr or TIFF) segmented block by block into "
                        "OUT/<name>_labels.zarr")
    p.add_argument("--block", type=number(int, 64), default=2048,
                   help="with --large: side of the block each task owns")

    p = sub.add_parser("benchmark", help="segment labelled images as `segment` does and score them",
                       formatter_class=formatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGES [LABELS]",
                   help="a folder of images (or one image) and the folder of their labels (label images, ImageJ "
                        "ROI zips or folders of per-nucleus masks; pairing rules: see the README), or one "
                        "competition-layout folder")
    p.add_argument("--worst", type=number(int, 0), default=4, help="images in worst.png, the lowest-scoring ones")
    _add_segment_options(p)

    p = sub.add_parser("train", help="train a model", formatter_class=formatter)
    p.add_argument("--config", help="JSON training config (see configs/default.json)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (with --set epochs=N: train longer)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. epochs=10 data.patch_size=128")
    g = p.add_argument_group("fine-tuning on your labelled images (instead of --config)")
    g.add_argument("--from", dest="init_from", metavar="MODEL",
                   help="start from this model (shipped name or folder), e.g. default; the recipe is in the README")
    g.add_argument("--images", help="folder of images, or a competition-layout folder with masks")
    g.add_argument("--labels", help="folder of their labels (label images, ImageJ ROI zips or per-nucleus mask "
                                    "folders)")

    p = sub.add_parser("tune", help="tune post-processing thresholds on the validation split",
                       formatter_class=formatter)
    p.add_argument("--model", required=True, help="model folder; thresholds.json (and, tuned on the stained "
                                                  "images, thresholds_stained.json) is written into it")
    p.add_argument("--config", help="training config whose validation split to tune on (default: the model "
                                    "folder's train_config.json, the split the model was trained with)")

    p = sub.add_parser("evaluate", help="score predictions against ground truth", formatter_class=formatter)
    p.add_argument("predictions", help="folder of label images (<id>.png, <id>_labels.png/.tif) or a "
                                       "submission CSV")
    p.add_argument("--truth", required=True, help="folder in the competition layout with masks")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("show", help="figure of image / ground truth / prediction", formatter_class=formatter)
    p.add_argument("--data", default=DEFAULT_TRAIN, help="folder in the competition layout")
    p.add_argument("--ids", nargs="*", help="image ids (default: random ones)")
    p.add_argument("--n", type=int, default=4, help="number of random images")
    p.add_argument("--random-seed", type=int, default=0, help="random seed for the choice of images")
    p.add_argument("--model", default="default", help="shipped model name or model folder")
    p.add_argument("--out", default="show.png", help="PNG file to write")

    p = sub.add_parser("export", help="export a model for another runtime", formatter_class=formatter)
    p.add_argument("model", help="shipped model name or model folder")
    p.add_argument("--format", choices=["onnx", "onnx-int8", "bioimageio"], default="onnx",
                   help="export format: onnx (one file), onnx-int8 (the same with 8-bit integer weights and "
                        "activations, calibrated on labelled images: --images/--labels, else the model's training "
                        "images) or bioimageio (a bioimage.io model package folder)")
    p.add_argument("--out", required=True, help="onnx: file to write (model.onnx in a model folder: --engine onnx; "
                                                "onnx-int8: model_int8.onnx); bioimageio: new folder to write the "
                                                "package into")
    p.add_argument("--images", help="onnx-int8: labelled images to calibrate on, paired with --labels as by `train "
                                    "--images`; None: the training images of the model's train_config.json")
    p.add_argument("--labels", help="onnx-int8: the folder of their labels")

    p = sub.add_parser("seed", help="run the classic 128x128 U-Net recipe end to end", formatter_class=formatter)
    p.add_argument("--train", default=DEFAULT_TRAIN, help="training folder (competition layout)")
    p.add_argument("--test", default=DEFAULT_TEST, help="test folder (competition layout)")
    p.add_argument("--out", default="runs/seed", help="output folder")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    return parser


def _add_segment_options(p: argparse.ArgumentParser) -> None:
    """Options of ``segment``, shared by the commands that segment as it does."""
    from nucleiseg.config import InferenceConfig
    from nucleiseg.outputs import DEFAULT_OUTPUTS, LABEL_FORMATS, WRITERS, OutputOptions

    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="default", help="shipped model name or model folder")
    p.add_argument("--diameter", type=number(float, 0, low_open=True), default=None,
                   help="typical nucleus diameter in pixels (default: estimated per image)")
    p.add_argument("--outputs", default=",".join(DEFAULT_OUTPUTS),
                   help=f"comma-separated outputs per image, among {', '.join(WRITERS)}")
    p.add_argument("--format", choices=LABEL_FORMATS, default=OutputOptions.label_format, help="label image format")
    p.add_argument("--pixel-size", type=number(float, 0, low_open=True), default=None, metavar="MICRONS",
                   help="micrometres per pixel of every image (default: from the TIFF/OME-TIFF metadata, where "
                        "they have it); gives the CSV's µm columns and the OME-TIFF's physical size")
    p.add_argument("--overwrite", action="store_true", help="redo images that an earlier run finished")
    p.add_argument("--threads", type=number(int, 0), default=0, help="CPU threads (0 = all)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the network runs (auto: a GPU when PyTorch sees one)")
    # inference settings: unset ones come from the model folder (inference.json), else these defaults
    g = p.add_argument_group("inference settings (default: the model folder's, else the value shown)")
    defaults = InferenceConfig()
    for flag, kind, text in INFERENCE_OPTIONS:
        key = flag.lstrip("-").replace("-", "_")
        default = getattr(defaults.thresholds if key.endswith("_threshold") else defaults, key)
        options = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        g.add_argument(flag, default=argparse.SUPPRESS, help=f"{text} (default: {default})", **options)


def inference_settings(args) -> dict:
    """The inference settings given on the command line (``InferenceConfig.updated`` names)."""
    keys = (flag.lstrip("-").replace("-", "_") for flag, _, _ in INFERENCE_OPTIONS)
    return {key: getattr(args, key) for key in keys if hasattr(args, key)}


def _segment_setup(args):
    """What ``segment`` and ``benchmark`` share: the threads, the segmenter, the outputs and their options."""
    from nucleiseg.outputs import OutputOptions
    from nucleiseg.predict import set_threads
    from nucleiseg.segment import Segmenter

    if args.threads:
        set_threads(args.threads)
    segmenter = Segmenter(args.model, device=args.device, **inference_settings(args))
    outputs = tuple(o.strip() for o in args.outputs.split(",") if o.strip())
    return segmenter, outputs, OutputOptions(args.format, args.pixel_size)


def _segment(args) -> int:
    from nucleiseg.batch import segment_batch
    from nucleiseg.io import find_images

    out = os.path.realpath(args.out)
    for item in args.inputs:
        folder = item if os.path.isdir(item) else os.path.dirname(item) or "."
        if os.path.realpath(folder) == out:
            raise ValueError(f"--out {args.out} holds the input {item}: the outputs would mix with the images "
                             "(and be taken for images on the next run); choose another output folder")
    if args.dask or args.large:
        return _segment_scaled(args)
    segmenter, outputs, options = _segment_setup(args)
    result = segment_batch(find_images(args.inputs), args.out, segmenter, args.diameter, outputs, options,
                           args.overwrite, channel=args.channel)
    return _report(result, args.out)


def _segment_scaled(args) -> int:
    """``segment`` with --dask and/or --large (the ``dask`` extra)."""
    from contextlib import ExitStack

    from nucleiseg.io import find_images

    segmenter, outputs, options = _segment_setup(args)
    with ExitStack() as stack:
        client = None
        if args.dask:
            from nucleiseg.cluster import connect

            client, cluster = connect(args.dask)
            stack.enter_context(client)
            if cluster is not None:
                stack.enter_context(cluster)
        if args.large:
            from nucleiseg.bigimage import segment_large

            for source in args.inputs:
                name = Path(source).name.split(".")[0]
                result = segment_large(source, Path(args.out) / f"{name}_labels.zarr", segmenter, args.diameter,
                                       args.block, client=client)
                print(f"{source}: {result.nuclei} nuclei in {result.blocks[0]} x {result.blocks[1]} blocks; "
                      f"labels in {result.path}")
            return 0
        from nucleiseg.cluster import segment_on_cluster

        result = segment_on_cluster(find_images(args.inputs), args.out, segmenter, client, args.diameter, outputs,
                                    options, args.overwrite, channel=args.channel)
    return _report(result, args.out)


def _report(result, out: str) -> int:
    """Print the batch's outcome; exit status 1 when an image failed or a table could not be written."""
    total = sum(row["nuclei"] for row in result.done)
    print(f"{len(result.done)} images segmented ({result.skipped} already done), {len(result.failed)} failed, "
          f"{total} nuclei; results in {out}")
    flagged = sorted((row for row in result.done if row.get("flagged")), key=lambda row: row["quality"])
    if flagged:
        names = ", ".join(f"{row['image']} ({row['quality']:.2f})" for row in flagged[:10])
        more = f" and {len(flagged) - 10} more" if len(flagged) > 10 else ""
        print(f"{len(flagged)} images to check (estimated score low, listed first in summary.csv): {names}{more}")
    if result.failed:
        print(f"failures listed in {Path(out) / 'failures.csv'}", file=sys.stderr)
    return 1 if result.failed or result.unwritten else 0


def _benchmark(args) -> int:
    from nucleiseg.benchmark import benchmark
    from nucleiseg.labelled import pair_labels

    if len(args.inputs) > 2:
        raise ValueError(f"benchmark takes IMAGES LABELS or one competition-layout folder, got {len(args.inputs)} "
                         "paths")
    pairs = pair_labels(*args.inputs)
    segmenter, outputs, options = _segment_setup(args)
    result = benchmark(pairs, args.out, segmenter, args.diameter, outputs, options, args.overwrite, args.worst)
    report = result.report
    print(f"DSB score {report.dsb_score:.4f} (AP@0.5 {report.ap50:.4f}, F1@0.5 {report.f1_50:.4f}) on "
          f"{report.n_images} images, {report.n_pred} nuclei found of {report.n_true}; per image in "
          f"{Path(args.out) / 'benchmark.csv'}, worst images in {Path(args.out) / 'worst.png'}")
    if result.batch.failed:
        print(f"{len(result.batch.failed)} images failed and are not scored; listed in "
              f"{Path(args.out) / 'failures.csv'}", file=sys.stderr)
    return 1 if result.batch.failed else 0


def parse_overrides(pairs: list[str]) -> dict:
    """``--set`` KEY=VALUE pairs -> a dict (dotted keys nest; values read as JSON, else kept as strings)."""
    overrides: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        target = overrides
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        try:
            target[leaf] = json.loads(value)
        except json.JSONDecodeError:  # a plain string such as a path or a name
            target[leaf] = value
    return overrides


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _train(args) -> int:
    from dataclasses import asdict

    from nucleiseg.config import TrainConfig, from_dict
    from nucleiseg.train import fit

    if args.init_from or args.images or args.labels:
        return _finetune(args)
    if args.resume:
        if args.config:
            raise ValueError("--resume takes the config saved in the run folder; drop --config")
        # --set on resume changes the saved config, e.g. epochs=120 to train longer
        saved = Path(args.out) / "config.json"
        values = json.loads(saved.read_text()) if args.set and saved.exists() else None
    else:
        values = json.loads(Path(args.config).read_text()) if args.config else {}
    cfg = None
    if values is not None:
        cfg = from_dict(TrainConfig, _merge(asdict(from_dict(TrainConfig, values)), parse_overrides(args.set)))
    model_dir = fit(cfg, args.out, resume=args.resume)
    print(f"best model in {model_dir}")
    return 0


def _finetune(args) -> int:
    from dataclasses import asdict

    from nucleiseg.config import TrainConfig, from_dict
    from nucleiseg.finetune import finetune, finetune_config
    from nucleiseg.labelled import pair_labels

    if not (args.init_from and args.images):
        raise ValueError("fine-tuning takes --from MODEL and --images (with --labels unless the images folder "
                         "has the competition layout)")
    if args.config or args.resume:
        raise ValueError("--from starts a new fine-tune with its own recipe (change it with --set); drop --config "
                         "and --resume")
    cfg = finetune_config(args.init_from)
    cfg = from_dict(TrainConfig, _merge(asdict(cfg), parse_overrides(args.set)))
    folder = finetune(pair_labels(args.images, args.labels), args.out, cfg)
    print(f"fine-tuned model in {folder}; use it with --model {folder}")
    return 0


def _tune(args) -> int:
    from nucleiseg.config import TrainConfig, load_json, save_json
    from nucleiseg.data import STAIN, input_kind, load_split
    from nucleiseg.model import STAINED_THRESHOLDS, TRAIN_CONFIG, load_model, model_folder
    from nucleiseg.tune import tune_thresholds

    folder = model_folder(args.model)
    config = Path(args.config) if args.config else folder / TRAIN_CONFIG
    if not config.exists():
        raise ValueError(f"{config}: no training config; give the one the model was trained with (--config)")
    _, val = load_split(load_json(TrainConfig, config))
    model = load_model(folder)
    # stained images get thresholds of their own (the network's maps are less sure on them), so the general
    # ones are tuned on the images they will serve: the others, or all when every image is stained
    stained, unstained = [], []
    for s in val:
        (stained if input_kind(s.image) == STAIN else unstained).append(s)
    others = unstained or val
    best, report = tune_thresholds(model, others)
    kind = "" if others is val else "unstained images of the "
    best.tuned_on = f"{kind}validation split of {config.name} ({report.n_images} images)"
    save_json(best, folder / "thresholds.json")
    print(f"thresholds {best} give DSB score {report.dsb_score:.4f} on the {best.tuned_on}")
    if stained:
        best, report = tune_thresholds(model, stained)
        best.tuned_on = f"stained images of the validation split of {config.name} ({report.n_images} images)"
        save_json(best, folder / STAINED_THRESHOLDS)
        print(f"stained images: thresholds {best} give DSB score {report.dsb_score:.4f} on {report.n_images} "
              "of them")
    else:  # none to tune them on: the general thresholds serve them too
        (folder / STAINED_THRESHOLDS).unlink(missing_ok=True)
    return 0


def _evaluate(args) -> int:
    from nucleiseg.io import load_dataset, read_labels
    from nucleiseg.metrics import evaluate
    from nucleiseg.outputs import find_labels
    from nucleiseg.rle import read_submission

    truth = {s.id: s.labels for s in load_dataset(args.truth) if s.labels is not None}
    if not truth:
        raise ValueError(f"{args.truth}: no images with masks to compare against")
    predictions = Path(args.predictions)
    if predictions.is_file():
        predicted = read_submission(predictions, {k: v.shape for k, v in truth.items()})
    elif predictions.is_dir():
        found = {image_id: find_labels(predictions, image_id) for image_id in truth}
        predicted = {image_id: read_labels(path) for image_id, path in found.items() if path is not None}
    else:
        raise FileNotFoundError(f"{predictions}: no such file or folder")
    missing = sorted(set(truth) - set(predicted))
    if missing:
        log.warning("%d images have no prediction and score 0, e.g. %s", len(missing), missing[0])
    for image_id in missing:
        predicted[image_id] = truth[image_id] * 0
    report = evaluate((k, truth[k], predicted[k]) for k in sorted(truth))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    return 0


def _show(args) -> int:
    import numpy as np

    from nucleiseg.io import load_dataset, sample_ids
    from nucleiseg.segment import Segmenter
    from nucleiseg.viz import comparison_figure

    rng = np.random.default_rng(args.random_seed)
    ids = args.ids or sorted(rng.choice(sample_ids(args.data), args.n, replace=False))
    segmenter = Segmenter(args.model)
    rows = [(s.id[:16], s.image, s.labels, segmenter.segment(s.image).labels) for s in load_dataset(args.data, ids)]
    comparison_figure(rows, args.out)
    print(f"wrote {args.out}")
    return 0


def _seed(args) -> int:
    from nucleiseg.config import TrainConfig
    from nucleiseg.data import validation_split
    from nucleiseg.io import load_dataset
    from nucleiseg.metrics import evaluate
    from nucleiseg.rle import write_submission
    from nucleiseg.seed import SeedConfig, predict_seed, resize_images, train_seed
    from nucleiseg.viz import comparison_figure, plot_history

    cfg = SeedConfig(height=args.height, width=args.width, channels=args.channels, epochs=args.epochs)
    cfg.model.in_channels = args.channels
    split = TrainConfig().data
    train_samples, val_samples = validation_split(load_dataset(args.train), split.val_fraction, split.split_seed)
    size = (cfg.height, cfg.width, cfg.channels)
    train, val = resize_images(train_samples, *size), resize_images(val_samples, *size)
    print(f"X_train {train.X.shape} {train.X.dtype}, Y_train {train.Y.shape} {train.Y.dtype}, "
          f"validation {val.X.shape}")
    network, history = train_seed(train, val, cfg, args.out)
    predicted = predict_seed(network, val)
    report = evaluate((s.id, s.labels, p) for s, p in zip(val_samples, predicted, strict=True))
    print(report.table())
    out = Path(args.out)
    (out / "validation.json").write_text(json.dumps(report.as_dict(), indent=2))
    plot_history(history, out / "curve.png")
    shown = list(zip(val_samples, predicted, strict=True))[:4]
    comparison_figure([(s.id[:16], s.image, s.labels, p) for s, p in shown], out / "show.png")
    test_samples = load_dataset(args.test)
    test = resize_images(test_samples, *size)
    write_submission(out / "submission.csv", zip(test.ids, predict_seed(network, test), strict=True))
    print(f"X_test {test.X.shape}; wrote {out / 'submission.csv'}, {out / 'show.png'}, {out / 'curve.png'}")
    return 0


def _export(args) -> int:
    from nucleiseg.export import export_bioimageio, export_onnx, export_onnx_int8
    from nucleiseg.model import load_model

    model = load_model(args.model)
    if args.format == "onnx-int8":
        from nucleiseg.labelled import pair_labels

        samples = [pair.read() for pair in pair_labels(args.images, args.labels)] if args.images else None
        export_onnx_int8(model, args.out, samples)
    else:
        {"onnx": export_onnx, "bioimageio": export_bioimageio}[args.format](model, args.out)
    print(f"wrote {args.out}")
    return 0


COMMANDS = {"segment": _segment, "benchmark": _benchmark, "train": _train, "tune": _tune, "evaluate": _evaluate,
            "show": _show, "seed": _seed, "export": _export}


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    if args.version:
        from nucleiseg import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to continue where it stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
