"""The shipped model's label images of the bundled samples are pinned: a refactor must leave them equal.

The pins change only when a new model is shipped, in the same commit: ``python tests/make_sample_pins.py``.
"""

import json

import pytest

from .make_sample_pins import PINS, SAMPLES, pin


@pytest.mark.parametrize("name", sorted(json.loads(PINS.read_text())))
def test_bundled_sample_labels_are_unchanged(name):
    from nucleiseg import Segmenter, read_image

    expected = json.loads(PINS.read_text())[name]
    assert pin(Segmenter().segment(read_image(SAMPLES / name)).labels) == expected, (
        f"{name}: labels differ from the pinned ones; if a new model was shipped, run "
        "`python tests/make_sample_pins.py` and commit the pins with the model")
