"""nucleiseg: find every nucleus in fluorescence, brightfield and H&E microscopy images.

>>> from nucleiseg import Segmenter, read_image
>>> labels = Segmenter().segment(read_image("cells.png")).labels  # doctest: +SKIP
"""

from nucleiseg.batch import segment_batch
from nucleiseg.config import InferenceConfig, PostprocessConfig
from nucleiseg.io import ImageMetadata, ImageReadError, load_dataset, read_image, read_metadata, write_labels
from nucleiseg.metrics import evaluate, match
from nucleiseg.model import ModelBundle, load_model, save_model
from nucleiseg.outputs import WRITERS, OutputOptions, write_outputs
from nucleiseg.predict import PREDICTORS, Predictor, TorchPredictor
from nucleiseg.segment import Segmentation, Segmenter

# the package's version (pyproject.toml reads it from here): a literal, as importlib.metadata costs a tenth
# of the command's start-up
__version__ = "0.1.0"

__all__ = [
    "PREDICTORS",
    "WRITERS",
    "ImageMetadata",
    "ImageReadError",
    "InferenceConfig",
    "ModelBundle",
    "OutputOptions",
    "PostprocessConfig",
    "Predictor",
    "Segmentation",
    "Segmenter",
    "TorchPredictor",
    "evaluate",
    "load_dataset",
    "load_model",
    "match",
    "read_image",
    "read_metadata",
    "save_model",
    "segment_batch",
    "write_labels",
    "write_outputs",
]
