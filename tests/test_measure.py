"""The per-nucleus measurements equal scikit-image's regionprops on real images, gray and colour."""

import numpy as np
import pytest
from skimage.measure import regionprops_table

from nucleiseg.measure import measure_nuclei

PAIRS = {"label": "label", "area": "area", "centroid_y": "centroid-0", "centroid_x": "centroid-1",
         "bbox_min_y": "bbox-0", "bbox_min_x": "bbox-1", "bbox_max_y": "bbox-2", "bbox_max_x": "bbox-3",
         "equivalent_diameter": "equivalent_diameter_area", "eccentricity": "eccentricity", "solidity": "solidity"}


@pytest.mark.parametrize("index", range(5))
def test_measurements_equal_regionprops(validation_samples, index):
    sample = validation_samples[index]
    labels = sample.labels.astype(np.int32)
    labels[labels == labels.max() // 2] = 0  # a gap in the numbering is kept as it is
    image = sample.image
    intensity = image[..., :3] if image.ndim == 3 else image
    ours = measure_nuclei(labels, image)
    theirs = regionprops_table(labels, intensity_image=intensity,
                               properties=("label", "area", "centroid", "bbox", "equivalent_diameter_area",
                                           "eccentricity", "solidity", "intensity_mean", "intensity_max"))
    for name, key in PAIRS.items():
        np.testing.assert_allclose(ours[name], theirs[key], rtol=0, atol=1e-9, err_msg=name)
    channels = ("gray",) if image.ndim == 2 else ("red", "green", "blue")
    for i, channel in enumerate(channels):
        suffix = "" if image.ndim == 2 else f"-{i}"
        np.testing.assert_allclose(ours[f"mean_intensity_{channel}"], theirs[f"intensity_mean{suffix}"], atol=1e-9)
        assert ours[f"max_intensity_{channel}"].dtype == image.dtype
        np.testing.assert_array_equal(ours[f"max_intensity_{channel}"], theirs[f"intensity_max{suffix}"])


def test_the_solidity_of_thin_and_tiny_nuclei_equals_regionprops(validation_samples):
    """Lines, single pixels and diagonal strokes are where a convex hull is degenerate; cut from a real label
    image by keeping every 7th row, every 11th column and every 13th diagonal of each nucleus, and the first
    pixel only of every third one."""
    sample = validation_samples[3]
    labels = sample.labels.astype(np.int32)
    rows, cols = np.indices(labels.shape)
    thin = np.where((rows % 7 == 0) | (cols % 11 == 0) | ((rows - cols) % 13 == 0), labels, 0)
    present, first = np.unique(labels, return_index=True)
    thin[labels % 3 == 0] = 0
    thin.flat[first[present % 3 == 0]] = present[present % 3 == 0]
    assert np.sum(np.bincount(thin.ravel())[1:] == 1) >= 10
    ours = measure_nuclei(thin, sample.image)
    theirs = regionprops_table(thin, properties=("label", "solidity"))
    np.testing.assert_array_equal(ours["label"], theirs["label"])
    np.testing.assert_allclose(ours["solidity"], theirs["solidity"], rtol=0, atol=1e-9)


def test_an_image_without_nuclei_has_an_empty_table(validation_samples):
    columns = measure_nuclei(np.zeros(validation_samples[0].labels.shape, np.int32), validation_samples[0].image)
    assert all(len(values) == 0 for values in columns.values())
