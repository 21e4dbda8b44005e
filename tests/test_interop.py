"""The outputs for other tools (Fiji ROIs, QuPath GeoJSON, OME-TIFF), read back with those tools' libraries and
checked against the label image they came from."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.draw import polygon2mask

from nucleiseg.io import ImageMetadata, read_labels, read_metadata
from nucleiseg.outputs import OutputOptions, write_outputs
from nucleiseg.segment import Segmentation
from nucleiseg.shapes import nucleus_outlines, polygons

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "src" / "nucleiseg" / "samples"


@pytest.fixture(scope="module")
def hard_labels(validation_samples) -> np.ndarray:
    """A real ground-truth label image (nuclei on all four borders) with the cases outlines get wrong added:
    a one-pixel nucleus in the corner, a one-pixel-wide line along the border, a nucleus with a hole and a
    nucleus in two pieces."""
    labels = validation_samples[0].labels.astype(np.int32)
    n = labels.max()
    labels[0, 0] = n + 1
    labels[10:30, -1] = n + 2
    labels[100:107, 100:107] = n + 3
    labels[103, 103] = 0
    labels[200:204, 5:9] = n + 4
    labels[210:213, 20:22] = n + 4
    return labels


def fill(rings, shape) -> np.ndarray:
    """Fill closed rings of pixel-corner (x, y) coordinates on the pixel grid (a pixel is in when its centre
    is; even-odd, so a ring inside another makes a hole)."""
    mask = np.zeros(shape, bool)
    for ring in rings:
        xy = np.asarray(ring, float)
        mask ^= polygon2mask(shape, xy[:, ::-1] - 0.5)  # (row, col) of pixel centres
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def segmentation(labels: np.ndarray, image: np.ndarray, pixel_size=None) -> Segmentation:
    return Segmentation(labels, 17.0, 1.0, False, image=image, metadata=ImageMetadata("x.png", pixel_size))


def test_outlines_fill_back_to_exactly_the_nucleus(hard_labels):
    outlines = nucleus_outlines(hard_labels)
    assert list(outlines) == list(np.unique(hard_labels)[1:])
    for label, outline in outlines.items():
        assert outline.is_valid
        rings = [r.coords for p in polygons(outline) for r in (p.exterior, *p.interiors)]
        assert np.array_equal(fill(rings, hard_labels.shape), hard_labels == label), label
    n = hard_labels.max()
    assert len(outlines[n - 1].interiors) == 1  # the hole
    assert len(polygons(outlines[n])) == 2  # two pieces, one entry


def test_imagej_rois_cover_their_nuclei(tmp_path, hard_labels, validation_samples):
    import roifile

    (name,) = write_outputs(segmentation(hard_labels, validation_samples[0].image), tmp_path / "img", ("rois",))
    rois = roifile.roiread(tmp_path / name)
    assert [int(roi.name) for roi in rois] == list(np.unique(hard_labels)[1:])  # none lost, named by label
    for roi in rois:
        label = int(roi.name)
        rings = roi.coordinates(multi=True)
        assert iou(fill(rings, hard_labels.shape), hard_labels == label) >= 0.9, label
        assert roi.composite == (label >= hard_labels.max() - 1)  # holes and pieces: one composite ROI


def test_geojson_is_valid_qupath_detections_with_the_csv_measurements(tmp_path, hard_labels, validation_samples):
    import geojson
    from shapely.geometry import shape

    result = segmentation(hard_labels, validation_samples[0].image, pixel_size=(0.5, 0.5))
    csv_name, name = write_outputs(result, tmp_path / "img", ("csv", "geojson"))
    with open(tmp_path / name) as f:
        collection = geojson.load(f)
    assert collection.is_valid and collection["type"] == "FeatureCollection"
    with open(tmp_path / csv_name) as f:
        table = list(csv.DictReader(f))
    features = collection["features"]
    assert len(features) == len(table) == len(np.unique(hard_labels)) - 1  # one feature per nucleus
    for feature, row in zip(features, table, strict=True):
        assert feature["type"] == "Feature" and feature["properties"]["objectType"] == "detection"
        measurements = feature["properties"]["measurements"]
        assert measurements.keys() == row.keys()
        assert all(measurements[k] == pytest.approx(float(v), abs=1e-4) for k, v in row.items())
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        rings = [r.coords for p in polygons(geometry) for r in (p.exterior, *p.interiors)]
        assert all(ring[0] == ring[-1] for ring in rings)
        assert np.array_equal(fill(rings, hard_labels.shape), hard_labels == int(row["label"]))


def test_ome_tiff_labels_carry_the_pixel_size(tmp_path, hard_labels, validation_samples):
    image = validation_samples[0].image
    (name,) = write_outputs(segmentation(hard_labels, image, (0.25, 0.5)), tmp_path / "a", ("ome-tiff",))
    with tifffile.TiffFile(tmp_path / name) as tif:
        assert tif.is_ome
        assert np.array_equal(tif.asarray(), hard_labels)
    assert read_metadata(tmp_path / name).pixel_size == pytest.approx((0.25, 0.5))
    # --pixel-size overrides the file's; without either there is none
    (name,) = write_outputs(segmentation(hard_labels, image, (0.25, 0.5)), tmp_path / "b", ("ome-tiff",),
                            OutputOptions(pixel_size=0.1))
    assert read_metadata(tmp_path / name).pixel_size == pytest.approx((0.1, 0.1))
    (name,) = write_outputs(segmentation(hard_labels, image), tmp_path / "c", ("ome-tiff",))
    assert read_metadata(tmp_path / name).pixel_size is None
    assert np.array_equal(read_labels(tmp_path / name), hard_labels)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nucleiseg.cli", *args], capture_output=True, text=True)


def test_every_output_for_every_sample_and_micrometres_from_the_input(tmp_path, tiny_model):
    """The issue's done-criterion, with the tiny model (the shipped one segments the same way, only slower);
    plus one sample as a TIFF with resolution tags: its pixel size reaches the CSV and the OME-TIFF."""
    from nucleiseg.io import read_image

    inputs = tmp_path / "in"
    inputs.mkdir()
    for sample in SAMPLES.glob("*.png"):
        (inputs / sample.name).symlink_to(sample)
    image = read_image(SAMPLES / "fluorescence_sparse.png")
    tifffile.imwrite(inputs / "tagged.tif", image, resolution=(1 / 0.65, 1 / 0.65), resolutionunit="MICROMETER")
    outputs = ("labels", "overlay", "csv", "rois", "geojson", "ome-tiff")
    done = run_cli("segment", str(inputs), "--out", str(tmp_path / "out"), "--model", str(tiny_model),
                   "--outputs", ",".join(outputs), "--diameter", "17")
    assert done.returncode == 0, done.stderr
    for name in [p.stem for p in SAMPLES.glob("*.png")] + ["tagged"]:
        record = json.loads((tmp_path / "out" / f"{name}.done.json").read_text())
        assert len(record["outputs"]) == len(outputs)
        assert all((tmp_path / "out" / file).stat().st_size > 0 for file in record["outputs"])
    with open(tmp_path / "out" / "tagged_nuclei.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows, "the tiny model finds nuclei in the sample"
    for row in rows:
        assert float(row["area_um2"]) == pytest.approx(float(row["area"]) * 0.65**2, abs=1e-4)
        assert float(row["equivalent_diameter_um"]) == pytest.approx(float(row["equivalent_diameter"]) * 0.65,
                                                                     abs=1e-3)
    assert read_metadata(tmp_path / "out" / "tagged_labels.ome.tif").pixel_size == pytest.approx((0.65, 0.65))
    with open(tmp_path / "out" / "fluorescence_sparse_nuclei.csv") as f:
        assert "area_um2" not in next(csv.reader(f))  # a PNG has no pixel size: no µm columns


def test_bad_pixel_size_is_one_error_line(tmp_path):
    done = run_cli("segment", str(SAMPLES / "fluorescence_sparse.png"), "--out", str(tmp_path), "--pixel-size", "0")
    assert done.returncode == 2
    assert done.stderr.strip().endswith("error: argument --pixel-size: 0 is out of range: must be more than 0")
    assert not any(tmp_path.iterdir())
