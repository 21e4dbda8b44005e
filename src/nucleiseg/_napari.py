"""napari plugin (``pip install "nucleiseg[napari]"``; manifest ``napari.yaml``): a widget that segments the
selected image layer into a labels layer, and a reader for the label images nucleiseg writes.

Everything napari- and Qt-specific is imported inside ``segment_widget``, so that the reader and
``segment_layer`` (what the widget runs) work, and are tested, without napari.
"""

# no `from __future__ import annotations`: magicgui reads the widget's annotations as types
import functools
import os
from pathlib import Path

import numpy as np

from nucleiseg.io import read_labels, read_metadata
from nucleiseg.outputs import LABELS_SUFFIX
from nucleiseg.segment import Segmenter

LABEL_SUFFIXES = tuple(f"{LABELS_SUFFIX}{ext}" for ext in (".png", ".tif", ".ome.tif"))


@functools.lru_cache(maxsize=2)
def _segmenter(model: str) -> Segmenter:
    """One Segmenter per model, so that the model is loaded once, not on every click."""
    return Segmenter(model)


def segment_layer(data: np.ndarray, diameter: float = 0.0, model: str = "default",
                  scale=None, translate=None) -> tuple[np.ndarray, dict, str]:
    """Segment the pixels of an image layer into a napari layer data tuple of labels.

    Parameters
    ----------
    data : (H, W) or (H, W, C) ndarray
        The image layer's data (an RGB layer is (H, W, 3)).
    diameter : float
        Typical nucleus diameter in pixels; 0 estimates it from the image.
    model : str
        Shipped model name or model folder.
    scale, translate : sequence of float, optional
        The image layer's, given to the labels layer so that it lies on the image.

    Returns
    -------
    (labels, layer kwargs, "labels")
        (H, W) int32 labels, 0 = background.
    """
    result = _segmenter(model).segment(np.asarray(data), diameter or None)
    kwargs = {"name": "nuclei", "metadata": {"diameter": result.diameter, "nuclei": int(result.labels.max())}}
    kwargs |= {key: tuple(value)[-2:] for key, value in (("scale", scale), ("translate", translate))
               if value is not None}
    return result.labels, kwargs, "labels"


def segment_widget():
    """The dock widget: image layer, diameter (0 = estimate), model; segments in a thread worker, so that the
    viewer stays responsive, with a progress indicator, and adds the labels layer when done."""
    from magicgui import magicgui
    from napari.layers import Image
    from napari.qt.threading import FunctionWorker, thread_worker
    from napari.types import LayerDataTuple
    from qtpy.QtCore import QTimer

    @magicgui(call_button="Segment nuclei", diameter={"min": 0.0, "max": 1000.0, "label": "diameter (0 = estimate)"})
    def widget(image: Image, diameter: float = 0.0, model: str = "default") -> FunctionWorker[LayerDataTuple]:
        @thread_worker(progress={"desc": f"Segmenting {image.name}"})
        def run() -> LayerDataTuple:
            return segment_layer(image.data, diameter, model, image.scale, image.translate)

        # napari connects the worker's `returned` to adding the layer but does not start it; starting it from
        # the event loop, after that connection, cannot lose a result that comes back first
        worker = run()
        QTimer.singleShot(0, worker.start)
        return worker

    return widget


def get_reader(path: str | os.PathLike | list):
    """napari reader hook: a reader for a nucleiseg label image (``*_labels.png/.tif/.ome.tif``), else None."""
    if isinstance(path, list | tuple) or not str(path).endswith(LABEL_SUFFIXES):
        return None
    return read_label_layer


def read_label_layer(path: str | os.PathLike) -> list[tuple[np.ndarray, dict, str]]:
    """A label image as a napari labels layer, in micrometres when the file has a pixel size (OME-TIFF)."""
    path = Path(path)
    kwargs: dict = {"name": path.name.split(LABELS_SUFFIX)[0]}
    pixel_size = read_metadata(path).pixel_size
    if pixel_size is not None:
        kwargs["scale"] = pixel_size  # µm per pixel: lies on an image opened with its physical size
    return [(read_labels(path), kwargs, "labels")]
