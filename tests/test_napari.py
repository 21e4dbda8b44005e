"""The napari plugin without napari or Qt (too heavy to install for the tests): the npe2 manifest validates and
its commands import, the widget's function segments an image layer's data, and the reader opens what
``nucleiseg segment`` writes. The dock widget itself (magicgui + thread worker) needs ``nucleiseg[napari]``."""

from pathlib import Path

import numpy as np
import pytest

from nucleiseg._napari import get_reader, segment_layer
from nucleiseg.io import read_image
from nucleiseg.outputs import OutputOptions, write_outputs
from nucleiseg.segment import Segmenter

MANIFEST = Path(__file__).resolve().parents[1] / "src" / "nucleiseg" / "napari.yaml"
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "nucleiseg" / "samples" / "fluorescence_sparse.png"


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


@pytest.mark.parametrize("outputs", [("labels",), ("ome-tiff",)])
def test_reader_opens_label_outputs_with_their_pixel_size(tmp_path, validation_samples, outputs):
    from nucleiseg.io import ImageMetadata
    from nucleiseg.segment import Segmentation

    sample = validation_samples[0]
    result = Segmentation(sample.labels.astype(np.int32), 17.0, 1.0, False, image=sample.image,
                          metadata=ImageMetadata("x.png"))
    (name,) = write_outputs(result, tmp_path / "cells", outputs, OutputOptions(pixel_size=0.3))
    reader = get_reader(str(tmp_path / name))
    assert reader is not None
    ((data, kwargs, kind),) = reader(str(tmp_path / name))
    assert kind == "labels" and kwargs["name"] == "cells"
    assert np.array_equal(data, sample.labels)
    assert kwargs.get("scale") == (pytest.approx((0.3, 0.3)) if outputs == ("ome-tiff",) else None)
    assert get_reader(str(tmp_path / "cells_overlay.png")) is None
