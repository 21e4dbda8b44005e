"""The napari plugin. Without napari: the npe2 manifest validates and its commands import, the widget's function
segments an image layer's data, and the reader opens what ``nucleiseg segment`` writes. With napari (the
``test`` extra): a real ``napari.Viewer`` (hidden, Qt offscreen) runs the dock widget and opens label files
through the plugin; its canvas needs OpenGL, which Qt offscreen gets only from an X server (Xvfb, started by
pytest-xvfb), so these tests skip where napari or an OpenGL context is missing."""

from pathlib import Path

import numpy as np
import pytest

from nucleiseg._napari import get_reader, segment_layer
from nucleiseg.io import read_image
from nucleiseg.outputs import OutputOptions, write_outputs
from nucleiseg.segment import Segmenter

MANIFEST = Path(__file__).resolve().parents[1] / "src" / "nucleiseg" / "napari.yaml"
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "nucleiseg" / "samples" / "fluorescence_sparse.png"


@pytest.fixture
def viewer(request):
    """A hidden napari viewer from napari's ``make_napari_viewer`` fixture, which closes it after the test."""
    pytest.importorskip("napari")
    request.getfixturevalue("qapp")
    from qtpy.QtGui import QOpenGLContext

    if not QOpenGLContext().create():
        pytest.skip("no OpenGL context for napari's canvas: Qt offscreen needs an X server (apt-get install xvfb)")
    return request.getfixturevalue("make_napari_viewer")()


def test_manifest_is_valid_and_its_commands_import():
    import npe2

    manifest = npe2.PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()  # raises when a python_name does not resolve
    assert {w.command for w in manifest.contributions.widgets} == {"nucleiseg.segment_widget"}
    (reader,) = manifest.contributions.readers
    assert "*_labels.ome.tif" in reader.filename_patterns


def test_widget_function_segments_the_layer_like_the_segmenter(tiny_model):
    image = read_image(SAMPLE)
    labels, kwargs, kind = segment_layer(image, 17.0, str(tiny_model), scale=(0.5, 0.5), translate=(10, 20))
    assert kind == "labels" and kwargs["scale"] == (0.5, 0.5) and kwargs["translate"] == (10, 20)
    expected = Segmenter(tiny_model).segment(image, 17.0).labels
    assert labels.max() > 0 and np.array_equal(labels, expected)


def _write_label_output(folder: Path, sample, outputs: tuple[str, ...]) -> Path:
    """A real validation mask written by the output writers as ``cells_labels.*``, with a 0.3 µm pixel size."""
    from nucleiseg.io import ImageMetadata
    from nucleiseg.segment import Segmentation

    result = Segmentation(sample.labels.astype(np.int32), 17.0, 1.0, False, image=sample.image,
                          metadata=ImageMetadata("x.png"))
    (name,) = write_outputs(result, folder / "cells", outputs, OutputOptions(pixel_size=0.3))
    return folder / name


@pytest.mark.parametrize("outputs", [("labels",), ("ome-tiff",)])
def test_reader_opens_label_outputs_with_their_pixel_size(tmp_path, validation_samples, outputs):
    sample = validation_samples[0]
    path = str(_write_label_output(tmp_path, sample, outputs))
    reader = get_reader(path)
    assert reader is not None
    ((data, kwargs, kind),) = reader(path)
    assert kind == "labels" and kwargs["name"] == "cells"
    assert np.array_equal(data, sample.labels)
    assert kwargs.get("scale") == (pytest.approx((0.3, 0.3)) if outputs == ("ome-tiff",) else None)
    assert get_reader(str(tmp_path / "cells_overlay.png")) is None


def test_dock_widget_in_a_viewer_adds_the_segmenter_labels_on_the_image(viewer, qtbot, tiny_model):
    (image,) = viewer.open(SAMPLE, plugin="napari")  # as a user opens it: napari's own reader
    image.scale, image.translate = (0.5, 0.5), (10.0, 20.0)
    _, widget = viewer.window.add_plugin_dock_widget("nucleiseg", "Segment nuclei")
    widget.image.value, widget.diameter.value, widget.model.value = image, 17.0, str(tiny_model)
    widget.call_button.clicked()
    qtbot.waitUntil(lambda: "nuclei" in viewer.layers, timeout=60_000)
    from napari.layers import Labels

    labels = viewer.layers["nuclei"]
    expected = Segmenter(tiny_model).segment(image.data, 17.0).labels
    assert isinstance(labels, Labels) and expected.max() > 0 and np.array_equal(labels.data, expected)
    assert tuple(labels.scale) == (0.5, 0.5) and tuple(labels.translate) == (10.0, 20.0)
    assert labels.metadata["nuclei"] == expected.max()


@pytest.mark.parametrize("outputs", [("labels",), ("ome-tiff",)])
def test_viewer_opens_label_outputs_through_the_plugin(viewer, tmp_path, validation_samples, outputs):
    from napari.layers import Labels

    sample = validation_samples[0]
    (layer,) = viewer.open(_write_label_output(tmp_path, sample, outputs), plugin="nucleiseg")
    assert isinstance(layer, Labels) and layer.name == "cells"
    assert np.array_equal(layer.data, sample.labels)
    assert tuple(layer.scale) == (pytest.approx((0.3, 0.3)) if outputs == ("ome-tiff",) else (1.0, 1.0))
