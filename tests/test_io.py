import numpy as np
import pytest
import tifffile
from PIL import Image

from nucleiseg.io import (
    ImageReadError,
    check_image,
    find_images,
    load_dataset,
    load_sample,
    read_image,
    read_labels,
    read_masks,
    to_gray,
    to_rgb_uint8,
    write_labels,
)


def test_load_sample_labels_match_masks(train_root):
    sample_dir = sorted(train_root.iterdir())[0]
    sample = load_sample(sample_dir)
    masks = sorted((sample_dir / "masks").glob("*.png"))
    assert sample.image.shape[2] == 3 and sample.image.dtype == np.uint8
    assert sample.labels.max() == len(masks)
    for index, path in enumerate(masks, start=1):
        np.testing.assert_array_equal(sample.labels == index, np.asarray(Image.open(path)) > 0)


def test_overlapping_masks_are_reported(train_root, caplog):
    # this image of the cleaned data set has two masks sharing 2 pixels
    sample_dir = train_root / "0a7d30b252359a10fd298b638b90cb9ada3acced4e0c0e5a3692013f432ee4e9"
    with pytest.raises(ValueError, match="overlap"):
        load_sample(sample_dir, overlap="error")
    sample = load_sample(sample_dir, overlap="warn")
    assert "overlap" in caplog.text
    assert sample.labels.max() == len(list((sample_dir / "masks").glob("*.png")))


def test_read_masks_rejects_wrong_mode(tmp_path):
    with pytest.raises(ValueError, match="overlap must be"):
        read_masks([], (4, 4), "x", overlap="merge")


def test_cache_is_reused_and_invalidated(train_root, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("NUCLEISEG_CACHE", str(tmp_path / "cache"))
    ids = sorted(p.name for p in train_root.iterdir())[:2]
    for i in ids:
        shutil.copytree(train_root / i, tmp_path / "data" / i)
    first = load_dataset(tmp_path / "data", progress=False)
    assert len(list((tmp_path / "cache" / "samples").glob("*.npz"))) == 2
    # delete one mask: the cached labels of that image must not be used any more
    mask = sorted((tmp_path / "data" / ids[0] / "masks").glob("*.png"))[0]
    mask.unlink()
    second = load_dataset(tmp_path / "data", progress=False)
    assert second[0].labels.max() == first[0].labels.max() - 1
    np.testing.assert_array_equal(second[1].labels, first[1].labels)
    assert len(list((tmp_path / "cache" / "samples").glob("*.npz"))) == 3


@pytest.mark.parametrize(
    ("array", "shape"),
    [
        (np.zeros((10, 12), np.uint16), (10, 12)),
        (np.zeros((10, 12, 1), np.uint8), (10, 12)),
        (np.zeros((3, 10, 12), np.float32), (10, 12, 3)),  # channels first
        (np.zeros((1, 1, 10, 12), np.uint8), (10, 12)),
        (np.zeros((10, 12, 4), np.uint8), (10, 12, 4)),
    ],
)
def test_check_image_shapes(array, shape):
    assert check_image(array).shape == shape


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 3, 10, 12), np.uint8), "at most 4 channels"),
        (np.zeros((1, 1), np.uint8), "at least"),
        (np.full((10, 10), np.nan, np.float32), "NaN"),
        (np.dstack([np.zeros((10, 10, 3), np.uint8), np.eye(10, dtype=np.uint8) * 255]), "alpha"),
    ],
)
def test_check_image_rejects(array, message):
    with pytest.raises(ImageReadError, match=message):
        check_image(array, "img.tif")


def test_read_image_formats(tmp_path, validation_samples):
    rgb = validation_samples[0].image
    tifffile.imwrite(tmp_path / "a.tif", (rgb[..., 0].astype(np.uint16) * 257))
    Image.fromarray(rgb).save(tmp_path / "b.png")
    (tmp_path / "c.png").write_text("not an image")
    assert read_image(tmp_path / "a.tif").dtype == np.uint16
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), rgb)
    with pytest.raises(ImageReadError, match="c.png: not a readable image"):
        read_image(tmp_path / "c.png")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_to_gray_and_rgb():
    gray16 = np.arange(100, dtype=np.uint16).reshape(10, 10) * 600
    rgb = to_rgb_uint8(gray16)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8 and rgb.max() == 255 and rgb.min() == 0
    assert to_gray(np.dstack([gray16] * 3)).dtype == np.float32
    np.testing.assert_allclose(to_gray(np.dstack([gray16] * 3)), gray16, rtol=1e-5)


def test_labels_round_trip(tmp_path, validation_samples):
    labels = validation_samples[1].labels.astype(np.int32)
    for name in ("l.png", "l.tif"):
        write_labels(tmp_path / name, labels)
        np.testing.assert_array_equal(read_labels(tmp_path / name), labels)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_find_images(train_root, tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "notes.txt").write_text("")
    assert find_images([tmp_path]) == [tmp_path / "x.png"]
    found = find_images([train_root])
    assert len(found) == 664 and all(p.parent.name == "images" for p in found)
