"""nucleiseg: find every nucleus in fluorescence, brightfield and H&E microscopy images.

>>> from nucleiseg import Segmenter, read_image
>>> labels = Segmenter().segment(read_image("cells.png")).labels  # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

from nucleiseg.io import ImageReadError, load_dataset, read_image, write_labels
from nucleiseg.metrics import evaluate, match
from nucleiseg.model import load_model
from nucleiseg.segment import Segmentation, Segmenter

try:
    __version__ = version("nucleiseg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "ImageReadError",
    "Segmentation",
    "Segmenter",
    "evaluate",
    "load_dataset",
    "load_model",
    "match",
    "read_image",
    "write_labels",
]
