import numpy as np
import pytest

from nucleiseg.config import AugmentConfig
from nucleiseg.data import (
    STAIN,
    PatchSampler,
    has_bright_background,
    image_type,
    input_kind,
    prepare_input,
    prepare_training_image,
    scale_factor,
)
from nucleiseg.io import load_dataset, to_gray
from nucleiseg.targets import median_diameter

from .conftest import REPO

VALIDATION = REPO / "tests" / "data" / "validation"


@pytest.fixture(scope="module")
def validation_samples():
    return load_dataset(VALIDATION, progress=False)


def test_image_types_of_committed_images(validation_samples):
    kinds = {s.id[:8]: image_type(s.image) for s in validation_samples}
    assert kinds == {"05a8f65e": "fluorescence", "1ec74a26": "histology", "2abc40c1": "fluorescence",
                     "4ae4f936": "histology", "76a372bf": "brightfield"}


def test_nuclei_come_out_bright_whatever_the_modality(validation_samples):
    for s in validation_samples:
        x = prepare_input(s.image)
        assert x.dtype == np.float32 and x.shape == s.labels.shape
        inside, outside = np.median(x[s.labels > 0]), np.median(x[s.labels == 0])
        assert inside > outside + 0.2, s.id


def test_training_images_are_brought_to_the_target_diameter(validation_samples):
    for s in validation_samples:
        prepared = prepare_training_image(s, target_diameter=17.0)
        factor = scale_factor(median_diameter(s.labels), 17.0)
        assert abs(prepared.rgb.shape[0] - s.image.shape[0] * factor) <= 1
        assert prepared.targets.shape == (3,) + prepared.rgb.shape[:2]
        assert set(np.unique(prepared.targets[0])) <= {0, 255}
        # the size target: each nucleus pixel holds twice its nucleus' diameter, so that the pixel median
        # (which weighs large nuclei more) is near the 17 px the image was brought to
        sizes = prepared.targets[2][prepared.targets[0] > 0] / 2
        assert abs(np.log(np.median(sizes) / 17.0)) < np.log(1.5), s.id


def test_patches_are_valid_and_reproducible(validation_samples):
    images = [prepare_training_image(s, 17.0) for s in validation_samples]
    batches = [PatchSampler(images, 64, AugmentConfig(), seed=3).batch(6) for _ in range(2)]
    x, y = batches[0]
    assert x.shape == (6, 1, 64, 64) and y.shape == (6, 3, 64, 64)
    assert np.isfinite(x).all() and set(np.unique(y[:, 0])) <= {0.0, 1.0}
    assert 0 <= y[:, 1].min() and y[:, 1].max() <= 1
    # the size code is learnt inside nuclei only (in [0, 1]) and marked -1 elsewhere
    inside = y[:, 0] > 0
    code = y[:, 2][inside]
    assert (y[:, 2][~inside] == -1).all() and ((code == -1) | ((0 <= code) & (code <= 1))).all()
    assert (code >= 0).mean() > 0.95  # only rim pixels where the resized maps disagree are left out
    np.testing.assert_array_equal(batches[0][0], batches[1][0])


def test_balanced_sets_draw_an_extra_set_as_a_group_of_its_own(validation_samples, tmp_path):
    from nucleiseg.config import DataConfig, TrainConfig
    from nucleiseg.data import sampling_groups

    from .conftest import VALIDATION

    images = [prepare_training_image(s, 17.0) for s in validation_samples]
    # the first image in an extra folder, the others in the root; the extra set's pattern matches every id,
    # the root's too: membership is by folder, not by pattern alone
    (tmp_path / "root").mkdir()
    (tmp_path / "extra").mkdir()
    for i, im in enumerate(images):
        (tmp_path / ("extra" if i == 0 else "root") / im.id).symlink_to(VALIDATION / im.id)
    extra = str(tmp_path / "extra" / "*")
    cfg = TrainConfig(data=DataConfig(root=str(tmp_path / "root"), extra_train=(extra,), balance_sets=True))
    groups = sampling_groups(cfg, images)
    assert groups[0] == extra and groups[1:] == [im.kind for im in images[1:]]
    assert sampling_groups(TrainConfig(data=DataConfig(root=cfg.data.root, extra_train=(extra,))), images) is None
    weights = PatchSampler(images, 64, AugmentConfig(), seed=0, groups=groups).weights
    # each group as a whole is drawn in proportion to the square root of its size
    shares = {g: weights[[i for i, h in enumerate(groups) if h == g]].sum() for g in set(groups)}
    sizes = {g: groups.count(g) for g in set(groups)}
    for g in shares:
        assert shares[g] == pytest.approx(np.sqrt(sizes[g]) / sum(np.sqrt(list(sizes.values()))))


def test_scale_factor_is_limited():
    assert scale_factor(17.0, 17.0) == 1.0
    assert scale_factor(170.0, 17.0) == 0.125 and scale_factor(1.0, 17.0) == 4.0
    assert scale_factor(0.0, 17.0) == 1.0


def test_dense_tissue_gives_bright_nuclei_not_bright_gaps(dense_tissue):
    """In dense H&E tissue most pixels are nuclei: a rule on the median pixel calls the background dark and
    shows the gaps as nuclei. The haematoxylin channel has the nuclei bright whatever the density."""
    for s in dense_tissue:
        assert input_kind(s.image) == STAIN, s.id
        x = prepare_input(s.image)
        inside, outside = np.median(x[s.labels > 0]), np.median(x[s.labels == 0])
        assert inside > outside + 0.1, s.id
        assert not has_bright_background(to_gray(s.image)), "no longer a dense case for the median rule"
