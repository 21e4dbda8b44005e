"""Robustness of batch segmentation: bad inputs, interrupted runs, and errors of the library API.

The command line runs in a subprocess, as a user runs it, with a tiny untrained network instead of the
shipped model so that every run takes seconds.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from nucleiseg.batch import segment_batch
from nucleiseg.config import TrainConfig, from_dict
from nucleiseg.io import read_image
from nucleiseg.model import load_model
from nucleiseg.network import UNet
from nucleiseg.segment import Segmenter

from .conftest import REPO

VALIDATION = REPO / "tests" / "data" / "validation"
GOOD = sorted(VALIDATION.glob("*/images/*.png"))
DONE = re.compile(r"(\d+) images segmented \((\d+) already done\), (\d+) failed")


def cli_env(tmp: Path) -> dict:
    return dict(os.environ, NUCLEISEG_CACHE=str(tmp / "cache"), PYTHONIOENCODING="utf-8")


def segment_cmd(inputs, out: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "nucleiseg.cli", "segment", *map(str, inputs), "--out", str(out),
            "--model", str(model), "--diameter", "17", "--threads", "1"]


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, encoding="utf-8", env=env, timeout=120)


def error_messages(stderr: str) -> list[str]:
    """The logged errors; a progress bar drawn with carriage returns may precede one on its line."""
    return re.findall(r"ERROR: ([^\r\n]*)", stderr)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def temporary_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def bad_corpus(folder: Path) -> list[Path]:
    """Files a user may well pass by mistake, each unusable in a different way."""
    folder.mkdir()
    real = GOOD[0].read_bytes()
    names = ("empty.png", "truncated.png", "text.png", "stack5d.tif", "nan_inf.tif", "zeros16.png",
             "one_pixel.png", "white.png", "alpha_only.png", "dir.png", "does_not_exist.png",
             "channels_first.tif", "channels_last.tif", "zstack.tif", "ome_channels.ome.tif", "animated.gif",
             "loop.png")
    bad = {name: folder / name for name in names}
    bad["empty.png"].write_bytes(b"")
    bad["truncated.png"].write_bytes(real[: len(real) // 2])
    bad["text.png"].write_text("nucleus,area\n1,200\n")
    tifffile.imwrite(bad["stack5d.tif"], np.zeros((2, 3, 4, 32, 32), np.uint8), photometric="minisblack")
    values = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    values[3, 3], values[5, 5] = np.nan, np.inf
    tifffile.imwrite(bad["nan_inf.tif"], values)
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(bad["zeros16.png"])
    assert Image.open(bad["zeros16.png"]).mode == "I;16"
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(bad["one_pixel.png"])
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(bad["white.png"])
    alpha = np.zeros((64, 64, 4), np.uint8)
    alpha[..., 3] = np.arange(64, dtype=np.uint8)[None] * 4
    Image.fromarray(alpha).save(bad["alpha_only.png"])
    bad["dir.png"].mkdir()
    # several planes that are not the colours of one image: which one holds the nuclei is the user's choice
    nuclei = read_image(GOOD[0])[..., 0]
    planes = np.stack([np.zeros_like(nuclei), nuclei, nuclei // 2])
    tifffile.imwrite(bad["channels_first.tif"], planes[:2])
    tifffile.imwrite(bad["channels_last.tif"], np.moveaxis(planes, 0, -1), photometric="minisblack")
    tifffile.imwrite(bad["zstack.tif"], planes, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(bad["ome_channels.ome.tif"], planes, ome=True, metadata={"axes": "CYX"})
    frames = [Image.fromarray(plane) for plane in planes]
    frames[0].save(bad["animated.gif"], save_all=True, append_images=frames[1:])
    bad["loop.png"].symlink_to("loop.png")
    return list(bad.values())


def test_bad_inputs_are_reported_once_and_good_images_are_segmented(tmp_path, tiny_model):
    bad = bad_corpus(tmp_path / "corpus")
    good = [tmp_path / "corpus" / p.name for p in GOOD[:3]] + [tmp_path / "corpus" / "noyau_é_核.png"]
    for source, target in zip(GOOD[:3] + GOOD[:1], good, strict=True):
        shutil.copy(source, target)
    out = tmp_path / "out"
    inputs = sorted(bad + good, key=lambda p: p.name)  # bad and good interleaved
    result = run(segment_cmd(inputs, out, tiny_model), cli_env(tmp_path))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = error_messages(result.stderr)
    assert len(errors) == len(bad), errors
    for path in bad:
        assert sum(str(path) in e for e in errors) == 1, (path, errors)
    assert DONE.search(result.stdout).groups() == (str(len(good)), "0", str(len(bad)))

    for path in good:
        for suffix in ("_labels.png", "_overlay.png", "_nuclei.csv", ".done.json"):
            assert (out / f"{path.stem}{suffix}").is_file(), f"{path.stem}{suffix}"
    assert sum(np.asarray(Image.open(out / f"{p.stem}_labels.png")).max() > 0 for p in good) >= 3
    failures = read_csv(out / "failures.csv")
    assert sorted(row["path"] for row in failures) == sorted(map(str, bad))
    assert all(row["reason"].startswith(row["path"]) for row in failures)
    summary = read_csv(out / "summary.csv")
    assert sorted(row["path"] for row in summary) == sorted(map(str, good))
    assert sorted(row["image"] for row in summary) == sorted(p.stem for p in good)
    made = {p.name for p in out.iterdir()}
    assert not [name for name in made if name.startswith(tuple(p.stem + "_" for p in bad))]
    assert not temporary_files(out)


AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# root reads a chmod 000 file anyway: as root, the command runs without the capabilities that allow it
WITHOUT_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if AS_ROOT else []


@pytest.mark.skipif(AS_ROOT and not shutil.which("setpriv"), reason="root without setpriv reads any file")
def test_unreadable_file_is_reported(tmp_path, tiny_model):
    locked, good = tmp_path / "locked.png", tmp_path / GOOD[1].name
    shutil.copy(GOOD[0], locked)
    shutil.copy(GOOD[1], good)
    locked.chmod(0)
    try:
        result = run(WITHOUT_OVERRIDE + segment_cmd([locked, good], tmp_path / "out", tiny_model), cli_env(tmp_path))
    finally:
        locked.chmod(0o644)
    assert result.returncode == 1
    errors = error_messages(result.stderr)
    assert len(errors) == 1 and str(locked) in errors[0] and "permission denied" in errors[0]
    assert [row["path"] for row in read_csv(tmp_path / "out" / "summary.csv")] == [str(good)]


# --- interruptions ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory) -> Path:
    """Eight real images of several kinds and sizes in one folder: the committed ones and three samples."""
    folder = tmp_path_factory.mktemp("eight")
    extra = sorted((REPO / "src" / "nucleiseg" / "samples").glob("*.png"))[:3]
    for source in GOOD + extra:
        shutil.copy(source, folder / source.name)
    assert len(list(folder.iterdir())) == 8
    return folder


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, eight_images, tiny_model) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = run(segment_cmd([eight_images], tmp / "out", tiny_model), cli_env(tmp))
    assert result.returncode == 0, result.stderr
    assert DONE.search(result.stdout).groups() == ("8", "0", "0")
    return tmp / "out"


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_run_resumes_to_identical_outputs(tmp_path, eight_images, uninterrupted, tiny_model, sig):
    out, env = tmp_path / "out", cli_env(tmp_path)
    cmd = segment_cmd([eight_images], out, tiny_model)
    first = sorted(eight_images.iterdir())[0].stem
    # a shell that started the tests in the background may have left SIGINT ignored; undo that for the child
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (out / f"{first}.done.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no image was finished"
        time.sleep(0.01)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert process.returncode == 130, stderr
        assert "interrupted; rerun the same command" in stderr
        assert not temporary_files(out)
    else:
        assert process.returncode == -signal.SIGKILL
    assert not (out / "summary.csv").exists()

    rerun = run(cmd, env)
    assert rerun.returncode == 0, rerun.stderr
    segmented, skipped, failed = map(int, DONE.search(rerun.stdout).groups())
    assert segmented == 8 and failed == 0
    assert 1 <= skipped < 8, "the first run was stopped after finishing some, but not all, images"
    expected, got = outputs(uninterrupted), outputs(out)
    assert sorted(got) == sorted(expected)
    assert len([n for n in got if n.endswith("_labels.png")]) == 8
    for name in expected:
        assert got[name] == expected[name], f"{name} differs from the uninterrupted run"
    # a temporary file a kill left behind is hidden and never read as an output: the summary above is equal
    leftovers = temporary_files(out)
    assert sig == signal.SIGKILL or not leftovers
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in leftovers)
    print(f"{sig.name}: rerun found {skipped} of 8 images done; {len(leftovers)} temporary files left")


# --- the library -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(tiny_model) -> Segmenter:
    return Segmenter(load_model(tiny_model))


def test_segment_rejects_bad_arrays_and_diameters(segmenter):
    image = read_image(GOOD[0])
    with pytest.raises(ValueError, match=r"image: has shape \(2, 64, 64, 3\); expected a 2-D image"):
        segmenter.segment(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="image: contains NaN or infinite values"):
        segmenter.segment(np.full((64, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match="image: has unsupported pixel type complex128"):
        segmenter.segment(np.zeros((64, 64), complex))
    for diameter in (-5.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="diameter must be a positive number of pixels"):
            segmenter.segment(image, diameter=diameter)


def test_unet_names_the_padded_size():
    network = UNet(base_channels=4, depth=2)
    with pytest.raises(ValueError, match=r"not a multiple of 4; pad it to \(32, 36\)"):
        network(torch.zeros(1, 1, 30, 33))


def test_config_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['epochz'\]; valid keys are .*'epochs'"):
        from_dict(TrainConfig, {"epochz": 3})
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['widht'\]; valid keys are .*'depth'"):
        from_dict(TrainConfig, {"model": {"widht": 3}})


def test_load_model_of_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_model(tmp_path)  # a folder, but without a model in it


def test_library_does_not_print(segmenter, tmp_path, capsys):
    image = read_image(GOOD[1])
    segmenter.segment(image)  # diameter estimated
    segmenter.segment(image, diameter=17)
    result = segment_batch([GOOD[1], tmp_path / "missing.png"], tmp_path / "out", segmenter, diameter=17,
                           progress=False)
    assert len(result.done) == 1 and len(result.failed) == 1
    assert capsys.readouterr().out == ""


def test_changed_settings_or_lost_outputs_are_redone(tmp_path, tiny_model):
    env = cli_env(tmp_path)
    out = tmp_path / "out"
    first = run(segment_cmd(GOOD[:2], out, tiny_model), env)
    assert first.returncode == 0, first.stderr
    again = run(segment_cmd(GOOD[:2], out, tiny_model), env)
    assert DONE.search(again.stdout).groups() == ("2", "2", "0")
    # another label format is another result: redone, and the TIFFs appear
    as_tif = run(segment_cmd(GOOD[:2], out, tiny_model) + ["--format", "tif"], env)
    assert DONE.search(as_tif.stdout).groups() == ("2", "0", "0")
    assert len(list(out.glob("*_labels.tif"))) == 2
    # a deleted output makes its image count as not done
    next(out.glob("*_nuclei.csv")).unlink()
    repaired = run(segment_cmd(GOOD[:2], out, tiny_model) + ["--format", "tif"], env)
    assert DONE.search(repaired.stdout).groups() == ("2", "1", "0")
    assert len(list(out.glob("*_nuclei.csv"))) == 2


def test_changed_threshold_or_version_makes_a_rerun_redo_the_image(tmp_path, tiny_model, monkeypatch):
    import nucleiseg

    def rerun(segmenter):
        result = segment_batch(GOOD[:1], tmp_path / "out", segmenter, diameter=17, progress=False)
        return len(result.done) - result.skipped  # images segmented anew

    assert rerun(Segmenter(tiny_model)) == 1
    assert rerun(Segmenter(tiny_model)) == 0
    assert rerun(Segmenter(tiny_model, marker_threshold=0.4)) == 1  # another threshold: redone
    assert rerun(Segmenter(tiny_model, marker_threshold=0.4)) == 0
    monkeypatch.setattr(nucleiseg, "__version__", "99.0")  # another version of the code: redone
    assert rerun(Segmenter(tiny_model, marker_threshold=0.4)) == 1
    assert rerun(Segmenter(tiny_model, marker_threshold=0.4)) == 0


def test_inference_settings_come_from_the_model_folder(tmp_path, tiny_model):
    import json

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    settings = json.loads((folder / "inference.json").read_text())
    assert settings["tile"] == 512 and "thresholds" not in settings  # thresholds stay in thresholds.json
    (folder / "inference.json").write_text(json.dumps(settings | {"tile": 256, "tta": True}))
    segmenter = Segmenter(folder)
    assert segmenter.config.tile == 256 and segmenter.config.tta
    assert segmenter.config.thresholds.marker_threshold == 0.38
    assert Segmenter(folder, tta=False).config.tta is False  # an option given overrides the folder's
    (folder / "inference.json").unlink()
    assert Segmenter(folder).config.tile == 512  # defaults when the file is absent
    (folder / "inference.json").write_text(json.dumps({"tiles": 256}))
    with pytest.raises(ValueError, match=r"unknown InferenceConfig keys \['tiles'\]"):
        Segmenter(folder)


def test_segmenter_pickles_as_model_folder_and_settings(tiny_model):
    import pickle

    segmenter = Segmenter(tiny_model, marker_threshold=0.4)
    data = pickle.dumps(segmenter)
    assert len(data) < 2000  # no weights: a worker rebuilds the network from the folder
    rebuilt = pickle.loads(data)
    assert rebuilt.config == segmenter.config
    image = read_image(GOOD[0])
    np.testing.assert_array_equal(rebuilt.segment(image, 17).labels, segmenter.segment(image, 17).labels)
    with pytest.raises(TypeError, match="model folder"):
        pickle.dumps(Segmenter(load_model(tiny_model)))


def test_outputs_are_chosen_by_name_and_show_the_image_as_read(tmp_path, tiny_model):
    from nucleiseg.viz import overlay

    rgb = GOOD[1]  # a colour (histology) image
    result = run(segment_cmd([rgb], tmp_path / "out", tiny_model) + ["--outputs", "overlay,csv"], cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    made = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))  # not the lock
    assert made == sorted([f"{rgb.stem}_overlay.png", f"{rgb.stem}_nuclei.csv", f"{rgb.stem}.done.json",
                           "summary.csv"])
    segmentation = Segmenter(tiny_model).segment_file(rgb, 17)
    image = read_image(rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{rgb.stem}_overlay.png")),
                                  overlay(image, segmentation.labels))  # in colour, not gray
    rows = read_csv(tmp_path / "out" / f"{rgb.stem}_nuclei.csv")
    assert {"mean_intensity_red", "mean_intensity_green", "max_intensity_blue"} <= set(rows[0])
    inside = image[segmentation.labels == int(rows[0]["label"])]
    assert float(rows[0]["mean_intensity_green"]) == pytest.approx(inside[:, 1].mean(), abs=1e-4)
    bad = run(segment_cmd([rgb], tmp_path / "out2", tiny_model) + ["--outputs", "labels,mesh"], cli_env(tmp_path))
    assert bad.returncode == 2 and "unknown outputs ['mesh']; choose among labels, overlay, csv" in bad.stderr


def test_gray_images_have_gray_intensity_columns_and_tiff_pixel_size(tmp_path, tiny_model):
    gray = (read_image(GOOD[0])[..., 0]).astype(np.uint16) * 100
    tifffile.imwrite(tmp_path / "gray.tif", gray, resolution=(2.0, 4.0), resolutionunit="MICROMETER")
    result = Segmenter(tiny_model).segment_file(tmp_path / "gray.tif", 17)
    assert result.metadata.pixel_size == pytest.approx((0.25, 0.5))  # (y, x) micrometres per pixel
    assert result.image.dtype == np.uint16 and set(result.timings) == {"read", "predict", "postprocess"}
    from nucleiseg.outputs import write_outputs

    write_outputs(result, tmp_path / "gray", ("csv",))
    columns = read_csv(tmp_path / "gray_nuclei.csv")[0]
    assert "mean_intensity_gray" in columns and "mean_intensity" not in columns
    ome = tmp_path / "ome.tif"
    tifffile.imwrite(ome, gray, ome=True, metadata={"PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65})
    from nucleiseg.io import read_metadata

    assert read_metadata(ome).pixel_size == pytest.approx((0.65, 0.65))
    assert read_metadata(GOOD[0]).pixel_size is None


# --- hostile inputs, second round (issue 15) ---------------------------------------------------------------


def test_channel_picks_the_nuclear_channel_of_a_multichannel_tiff(tmp_path, tiny_model):
    bad_corpus(tmp_path / "corpus")
    path = tmp_path / "corpus" / "channels_first.tif"  # channel 0 empty, channel 1 the real image
    result = run(segment_cmd([path], tmp_path / "out", tiny_model) + ["--channel", "1"], cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    expected = Segmenter(tiny_model).segment(read_image(GOOD[0])[..., 0], 17).labels
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "channels_first_labels.png")), expected)
    wrong = run(segment_cmd([path], tmp_path / "out2", tiny_model) + ["--channel", "2"], cli_env(tmp_path))
    assert wrong.returncode == 1
    assert error_messages(wrong.stderr) == [f"{path}: has 2 planes along axis Q (axes QYX, shape (2, 256, 256)); "
                                            "there is no channel 2 (available: 0-1)"]


def test_folder_with_competition_layout_loose_images_animations_and_link_loops(tmp_path, tiny_model):
    folder = tmp_path / "mixed"
    shutil.copytree(GOOD[0].parents[1], folder / GOOD[0].parents[1].name)  # <id>/images/<id>.png (+ masks)
    shutil.copy(GOOD[1], folder / "loose.png")
    Image.open(GOOD[2]).save(folder / "still.gif")
    Image.open(GOOD[2]).convert("RGB").save(folder / "still.webp", lossless=True)
    frames = [Image.open(p).convert("RGB").resize((64, 64)) for p in GOOD[:2]]
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:])
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "here").symlink_to(".")  # a folder link loop
    result = run(segment_cmd([folder], tmp_path / "out", tiny_model), cli_env(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = error_messages(result.stderr)
    assert sorted(errors) == [f"{folder / 'animated.webp'}: has 2 frames; which one holds the nuclei is not known: "
                              "pick it with --channel N (available: 0-1)",
                              f"{folder / 'loop.png'}: is a broken symbolic link or a symbolic link loop"]
    summary = read_csv(tmp_path / "out" / "summary.csv")
    assert sorted(row["image"] for row in summary) == sorted([GOOD[0].stem, "loose", "still_gif", "still_webp"])
    assert {row["path"] for row in summary} == {str(folder / "loose.png"), str(folder / "still.gif"),
                                                str(folder / "still.webp"), str(folder / GOOD[0].relative_to(
                                                    GOOD[0].parents[2]))}


def test_inputs_of_one_name_never_overwrite_each_other(tmp_path, segmenter):
    paths = [tmp_path / "d1" / "sub" / "x.png", tmp_path / "d2" / "sub" / "x.png", tmp_path / "sub_x_0.png"]
    for source, path in zip(GOOD, paths, strict=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, path)
    out = tmp_path / "out"
    result = segment_batch(paths, out, segmenter, diameter=17, progress=False)
    names = [row["image"] for row in result.done]
    assert names == ["d1_sub_x", "d2_sub_x", "sub_x_0"] and not result.failed
    for path, name in zip(paths, names, strict=True):
        record = json.loads((out / f"{name}.done.json").read_text())
        assert record["path"] == str(path) and record["summary"]["path"] == str(path)
        labels = np.asarray(Image.open(out / f"{name}_labels.png"))
        assert labels.max() == record["summary"]["nuclei"] == len(read_csv(out / f"{name}_nuclei.csv"))
    # across runs: another x.png into the same folder is refused, the first one's outputs are kept
    first = segment_batch([paths[0]], tmp_path / "out2", segmenter, diameter=17, progress=False)
    kept = (tmp_path / "out2" / "x_labels.png").read_bytes()
    other = segment_batch([paths[1]], tmp_path / "out2", segmenter, diameter=17, progress=False)
    assert not other.done and other.failed[0][1] == (
        f"{paths[1]}: its output name 'x' in {tmp_path / 'out2'} holds the results of {paths[0]}; use another "
        "--out, or --overwrite to replace them")
    assert (tmp_path / "out2" / "x_labels.png").read_bytes() == kept
    assert [row["path"] for row in read_csv(tmp_path / "out2" / "summary.csv")] == [str(paths[0])]
    assert len(first.done) == 1


def test_a_failed_redo_leaves_no_stale_record(tmp_path, segmenter, monkeypatch):
    import errno

    from nucleiseg import outputs

    out = tmp_path / "out"
    assert len(segment_batch(GOOD[:1], out, segmenter, diameter=15, progress=False).done) == 1

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:  # labels written, then the overlay hits a full disk
        patch.setitem(outputs.WRITERS, "overlay", disk_full)
        failed = segment_batch(GOOD[:1], out, segmenter, progress=False)
    assert not (out / f"{GOOD[0].stem}.done.json").exists(), "the first run's record survived the failed redo"
    assert failed.failed == [(str(GOOD[0]), f"{GOOD[0]}: its outputs could not be written to {out} "
                                            "(No space left on device)")]
    redo = segment_batch(GOOD[:1], out, segmenter, diameter=15, progress=False)
    assert redo.skipped == 0 and len(redo.done) == 1
    labels = np.asarray(Image.open(out / f"{GOOD[0].stem}_labels.png"))
    summary = read_csv(out / "summary.csv")
    assert len(summary) == 1 and int(summary[0]["nuclei"]) == labels.max() == redo.done[0]["nuclei"]
    assert len(read_csv(out / f"{GOOD[0].stem}_nuclei.csv")) == labels.max()


@pytest.mark.parametrize("side_by_side", [True, False], ids=["side by side", "alone"])
def test_a_write_failure_is_the_failure_of_its_own_image(tmp_path, segmenter, monkeypatch, side_by_side):
    """Images are segmented side by side (huge ones alone): a failed write is still reported with its image,
    in input order with the other failures and the images done before and after it, even where the first
    image finishes last."""
    import errno
    import threading

    from nucleiseg import batch, outputs

    monkeypatch.setattr(batch, "threads", lambda: 2)  # side by side even on a one-core machine
    if not side_by_side:
        monkeypatch.setattr(batch, "ALONE_FROM_PIXELS", 0)

    write_overlay = outputs.WRITERS["overlay"]
    second_failed = threading.Event()

    def full_for_the_second(result, base, options):
        if base.name == GOOD[1].stem:
            second_failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        if base.name == GOOD[0].stem and side_by_side:  # the first image finishes after the second
            assert second_failed.wait(timeout=60)
        return write_overlay(result, base, options)

    monkeypatch.setitem(outputs.WRITERS, "overlay", full_for_the_second)
    out, missing = tmp_path / "out", tmp_path / "missing.png"
    result = segment_batch([*GOOD[:2], missing, GOOD[2]], out, segmenter, diameter=15, progress=False)
    assert [row["path"] for row in result.done] == [str(GOOD[0]), str(GOOD[2])]
    assert [path for path, _ in result.failed] == [str(GOOD[1]), str(missing)]
    assert result.failed[0][1] == f"{GOOD[1]}: its outputs could not be written to {out} (No space left on device)"
    assert sorted(p.name for p in out.glob("*.done.json")) == sorted(f"{p.stem}.done.json" for p in (GOOD[0], GOOD[2]))
    assert [row["path"] for row in read_csv(out / "summary.csv")] == [str(GOOD[0]), str(GOOD[2])]


def test_summary_describes_the_folder_and_a_full_disk_at_the_end_is_reported(tmp_path, segmenter, monkeypatch):
    import errno

    from nucleiseg import batch

    out = tmp_path / "out"
    segment_batch(GOOD[:1], out, segmenter, diameter=17, progress=False)
    segment_batch(GOOD[1:2], out, segmenter, diameter=20, progress=False)
    rows = read_csv(out / "summary.csv")
    assert [(row["path"], row["diameter"]) for row in rows] == [(str(GOOD[0]), "17"), (str(GOOD[1]), "20")]

    def disk_full(path, table):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch, "write_table", disk_full)
    result = segment_batch(GOOD[2:3], out, segmenter, diameter=17, progress=False)
    assert len(result.done) == 1 and result.unwritten == [
        f"{out / 'summary.csv'}: could not be written (No space left on device)"]


def test_output_folder_is_locked_while_a_run_writes_to_it(tmp_path, tiny_model):
    from nucleiseg.batch import LOCK_NAME, lock_folder

    out = tmp_path / "out"
    with lock_folder(out):
        result = run(segment_cmd(GOOD[:1], out, tiny_model), cli_env(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_messages(result.stderr) == [
        f"{out / LOCK_NAME}: another nucleiseg run (pid {os.getpid()} on {socket.gethostname()}) is writing to this "
        "folder; wait for it to finish or choose another --out"]
    assert not list(out.glob("*.done.json"))
    again = run(segment_cmd(GOOD[:1], out, tiny_model), cli_env(tmp_path))  # released: the next run goes ahead
    assert again.returncode == 0, again.stderr


@pytest.mark.skipif(AS_ROOT and not shutil.which("setpriv"), reason="root without setpriv writes anywhere")
def test_read_only_output_folder_fails_before_any_work(tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = run(WITHOUT_OVERRIDE + segment_cmd(GOOD[:2], out, tiny_model), cli_env(tmp_path))
    finally:
        out.chmod(0o755)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert error_messages(result.stderr) == [f"{out}: the output folder is not writable (Permission denied)"]
    assert "segmenting" not in result.stderr and not list(out.iterdir())


def test_output_folder_holding_the_inputs_is_refused(tmp_path, tiny_model):
    shutil.copy(GOOD[0], tmp_path / "x.png")
    for given in (tmp_path, tmp_path / "x.png"):
        result = run(segment_cmd([given], tmp_path, tiny_model), cli_env(tmp_path))
        assert result.returncode == 2, result.stderr
        assert error_messages(result.stderr) == [
            f"--out {tmp_path} holds the input {given}: the outputs would mix with the images (and be taken for "
            "images on the next run); choose another output folder"]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--diameter", "0", "argument --diameter: 0 is out of range: must be more than 0"),
    ("--diameter", "-5", "argument --diameter: -5 is out of range: must be more than 0"),
    ("--diameter", "nan", "argument --diameter: nan is out of range: must be more than 0"),
    ("--diameter", "inf", "argument --diameter: inf is out of range: must be more than 0"),
    ("--threads", "-1", "argument --threads: -1 is out of range: must be at least 0"),
    ("--channel", "-1", "argument --channel: -1 is out of range: must be at least 0"),
    ("--overlap", "-8", "argument --overlap: -8 is out of range: must be at least 0"),
    ("--max-megapixels", "0", "argument --max-megapixels: 0 is out of range: must be more than 0"),
    ("--marker-threshold", "1.5", "argument --marker-threshold: 1.5 is out of range: must be at least 0 and at "
                                  "most 1"),
])
def test_absurd_options_stop_before_any_work(tmp_path, tiny_model, capsys, option, value, message):
    from nucleiseg.cli import main

    argv = ["segment", str(GOOD[0]), "--out", str(tmp_path / "out"), "--model", str(tiny_model), option, value]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


def test_diameter_the_model_cannot_segment_stops_before_any_work(tmp_path, tiny_model, caplog):
    from nucleiseg.cli import main

    argv = ["segment", str(GOOD[0]), "--out", str(tmp_path / "out"), "--model", str(tiny_model), "--diameter", "1e6"]
    assert main(argv) == 2
    assert [r.message for r in caplog.records] == [
        "diameter 1e+06 px is outside what this model segments (2.7-218 px: nuclei of 17 px rescaled by "
        "0.125-4x)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "wrong_shape"])
def test_damaged_weights_are_one_error_line(tmp_path, tiny_model, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    weights = folder / "weights.pt"
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        state = torch.load(weights, weights_only=True)
        name = next(iter(state))
        state[name] = torch.zeros(3, *state[name].shape[1:])
        torch.save(state, weights)
    result = run(segment_cmd(GOOD[:1], tmp_path / "out", folder), cli_env(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = error_messages(result.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"{weights}: "), errors
    expected = "does not match the network of model.json (size mismatch for" if damage == "wrong_shape" else \
        "not a readable weights file ("
    assert expected in errors[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_freed_memory_goes_back_to_the_os_only_when_there_is_much_of_it():
    """Trimming after every image made the next one fault its pages in again: the heap is trimmed only once
    more than KEEP_FREED_UP_TO of it is free and the process grew by as much since the last trim. Blocks of
    64 KiB stay in the heap (glibc maps blocks from 128 KiB up, by default)."""
    from nucleiseg import batch

    resident = batch._resident_bytes

    def free_in_heap(total: int) -> tuple[int, list]:
        blocks = [np.ones(64 << 10, np.uint8) for _ in range(2 * total // (64 << 10))]
        kept = blocks[1::2]  # every other block stays, so the freed ones are holes the heap cannot shrink past
        del blocks
        before = resident()
        batch.release_freed_memory()
        return before - resident(), kept

    free_in_heap(batch.KEEP_FREED_UP_TO * 3 // 2)  # whatever earlier tests left: a trim now, as a start
    released, kept = free_in_heap(batch.KEEP_FREED_UP_TO // 4)
    assert released < batch.KEEP_FREED_UP_TO // 8
    del kept
    released, kept = free_in_heap(batch.KEEP_FREED_UP_TO * 3 // 2)
    assert released > batch.KEEP_FREED_UP_TO // 2
