import numpy as np

from nucleiseg.targets import centre_distance, make_targets, median_diameter


def two_touching_squares():
    labels = np.zeros((12, 20), np.int32)
    labels[1:10, 1:10] = 1
    labels[1:10, 10:19] = 2  # touches nucleus 1 along a column
    return labels


def test_centre_distance_peaks_at_centres_and_dips_between_touching_nuclei():
    labels = two_touching_squares()
    dist = centre_distance(labels)
    assert dist[5, 5] == 1.0 and dist[5, 14] == 1.0
    assert dist[0].max() == 0 and dist[labels == 0].max() == 0
    # the pixels on either side of the contact line are border pixels of their nucleus
    assert dist[5, 9] < 0.3 and dist[5, 10] < 0.3
    assert dist.min() >= 0 and dist.max() <= 1


def test_centre_distance_is_scale_free():
    small = np.zeros((20, 20), np.int32)
    small[5:15, 5:15] = 1
    large = np.kron(small, np.ones((3, 3), np.int32))
    assert centre_distance(small).max() == centre_distance(large).max() == 1.0


def test_make_targets_and_diameter():
    labels = two_touching_squares()
    targets = make_targets(labels)
    assert targets.shape == (2, 12, 20) and targets.dtype == np.float32
    np.testing.assert_array_equal(targets[0], labels > 0)
    assert np.isclose(median_diameter(labels), np.sqrt(4 * 81 / np.pi))
    assert median_diameter(np.zeros((4, 4), np.int32)) == 0.0
