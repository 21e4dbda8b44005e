"""GPU choice, Dask clusters and block-wise segmentation of large images (issue 13).

The cluster tests start a real ``distributed.LocalCluster`` of worker processes on loopback."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from nucleiseg.batch import segment_batch
from nucleiseg.cli import main
from nucleiseg.io import find_images, read_image, read_labels
from nucleiseg.metrics import match
from nucleiseg.network import select_device
from nucleiseg.segment import Segmenter
from tests.conftest import REPO, VALIDATION

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from nucleiseg.bigimage import check_overlap, segment_large  # noqa: E402
from nucleiseg.cluster import segment_on_cluster  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the choice on a machine without a GPU")
def test_auto_device_is_the_cpu_here_and_cuda_is_a_clear_error(caplog):
    assert select_device("auto").type == ("mps" if torch.backends.mps.is_available() else "cpu")
    with pytest.raises(ValueError, match="not available"):
        Segmenter(device="cuda")
    out = VALIDATION.parent / "never-written"
    assert main(["segment", str(VALIDATION), "--out", str(out), "--device", "cuda"]) == 2
    assert "'cuda' is not available" in caplog.text
    assert not out.exists()


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            distributed.Client(c) as cl:
        yield cl


@pytest.fixture
def images(tmp_path):
    """Four committed real images (the 1 MP one would triple the tests' time) and a corrupt file, which must
    fail alone."""
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return [p for p in find_images([VALIDATION]) if not p.name.startswith("76a372bfd3fa")] + [bad]


def _tables(folder):
    return (folder / "summary.csv").read_text().replace(str(folder), ""), (folder / "failures.csv").exists()


def test_cluster_gives_the_single_process_outputs_and_a_rerun_skips(tmp_path, images, client):
    segmenter = Segmenter()
    single = segment_batch(images, tmp_path / "a", segmenter, progress=False)
    spread = segment_on_cluster(images, tmp_path / "b", segmenter, client, part=2, progress=False)
    assert spread.done == single.done and len(spread.failed) == len(single.failed) == 1
    assert _tables(tmp_path / "a") == _tables(tmp_path / "b")
    for row in single.done:
        name = row["image"]
        a, b = read_labels(tmp_path / "a" / f"{name}_labels.png"), read_labels(tmp_path / "b" / f"{name}_labels.png")
        assert np.array_equal(a, b), name
    again = segment_on_cluster(images, tmp_path / "b", segmenter, client, part=2, progress=False)
    assert again.skipped == len(images) - 1 and again.done == single.done


def test_killed_worker_images_are_redone(tmp_path, images, client):
    out = tmp_path / "out"
    images = images[:-1]  # the real images only
    result = {}
    run = threading.Thread(target=lambda: result.update(r=segment_on_cluster(
        images, out, Segmenter(), client, part=1, progress=False)))
    run.start()
    deadline = time.time() + 120
    while not list(out.glob("*.done.json")) and time.time() < deadline:
        time.sleep(0.05)
    busy = [address for address, keys in client.processing().items() if keys]
    pids = client.run(os.getpid, workers=busy[:1])
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    run.join(300)
    assert pids, "no worker was busy when the first image finished"
    assert not result["r"].failed and len(result["r"].done) == len(images)
    assert len(list(out.glob("*.done.json"))) == len(images)


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    """A real dense fluorescence image tiled into a 512 x 768 zarr array: 2 x 3 blocks of 256."""
    image = read_image(REPO / "src" / "nucleiseg" / "samples" / "fluorescence_dense.png")
    pixels = np.tile(image, (1, 3, 1))[:512, :768]
    path = tmp_path_factory.mktemp("big") / "mosaic.zarr"
    zarr.create_array(path, data=pixels, chunks=(256, 256, pixels.shape[2]))
    return pixels, path


def test_blocks_give_the_nuclei_of_the_whole_image(tmp_path, mosaic):
    pixels, path = mosaic
    # small network tiles keep the test fast: each block predicts the image-wide tiles that reach it
    segmenter = Segmenter(tile=128, overlap=16)
    diameter = 18.0
    whole = segmenter.segment(pixels, diameter).labels
    result = segment_large(path, tmp_path / "labels.zarr", segmenter, diameter, block=256)
    labels = zarr.open_array(result.path, mode="r")[:]
    assert result.blocks == (2, 3) and labels.shape == whole.shape
    assert np.array_equal(np.unique(labels)[1:], np.arange(1, result.nuclei + 1))  # relabelled 1..N
    assert result.nuclei == whole.max()
    matched = match(whole, labels)
    assert len(matched.ious) == whole.max() and matched.ious.min() >= 0.99, np.sort(matched.ious)[:5]


def test_overlap_below_context_plus_nucleus_is_refused():
    segmenter = Segmenter()
    with pytest.raises(ValueError, match="use at least"):
        check_overlap(32, 512, segmenter, diameter=18.0, scale=1.0)
