import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from nucleiseg.viz import comparison_figure, inner_boundaries, label_colours, overlay, plot_history


def test_overlay_outlines_each_nucleus_in_its_own_colour(validation_samples):
    sample = validation_samples[0]
    labels = sample.labels.astype(np.int32)
    out = overlay(sample.image, labels)
    edges = find_boundaries(labels, mode="inner")
    np.testing.assert_array_equal(out[~edges], sample.image[~edges])
    colours = label_colours(int(labels.max()))
    assert len({tuple(c) for c in colours[1:]}) == labels.max()
    for index in (1, labels.max()):
        assert (out[edges & (labels == index)] == colours[index]).all()


def test_inner_boundaries_are_skimages(validation_samples):
    for sample in validation_samples:  # touching nuclei, nuclei cut by the image's edge
        labels = sample.labels.astype(np.int32)
        np.testing.assert_array_equal(inner_boundaries(labels), find_boundaries(labels, mode="inner"))


def test_figures_are_written(validation_samples, tmp_path):
    rows = [(s.id[:8], s.image, s.labels, s.labels) for s in validation_samples[:2]]
    comparison_figure(rows, tmp_path / "show.png")
    assert Image.open(tmp_path / "show.png").size[0] > 600
    history = [{"epoch": i, "train_loss": 1 / i, "val_dsb": "" if i % 2 else 0.1 * i} for i in range(1, 6)]
    plot_history(history, tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size[1] > 200
