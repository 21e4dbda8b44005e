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


# --- hostile inputs (issue 15): each file is read as its own description says, or refused with one line -----


def test_multichannel_tiffs_need_a_channel_and_it_picks_the_plane(tmp_path, validation_samples):
    nuclei = validation_samples[0].image[..., 0]  # a real fluorescence image
    planes = np.stack([np.zeros_like(nuclei), nuclei])  # the first channel empty: once refused as "alpha only"
    files = {
        "first.tif": (planes, {}),  # channel-first, no axes: tifffile's shaped series QYX
        "last.tif": (np.moveaxis(planes, 0, -1), {"photometric": "minisblack"}),  # channel-last, no colour
        "ome.tif": (planes, {"ome": True, "metadata": {"axes": "CYX", "Channel": {"Name": ["actin", "DAPI"]}}}),
        "zstack.tif": (np.stack([nuclei] * 3), {"imagej": True, "metadata": {"axes": "ZYX"}}),
    }
    for name, (data, kwargs) in files.items():
        tifffile.imwrite(tmp_path / name, data, **kwargs)
        with pytest.raises(ImageReadError, match=rf"{name}: has \d planes along axis [QCZ] \(axes [QCZYX]+, "
                                                 r"shape .*pick it with --channel N"):
            read_image(tmp_path / name)
    with pytest.raises(ImageReadError, match=r"available: 0 actin, 1 DAPI"):
        read_image(tmp_path / "ome.tif")
    for name in ("first.tif", "last.tif", "ome.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name, channel=1), nuclei)
    with pytest.raises(ImageReadError, match=r"ome.tif: .*there is no channel 2 \(available: 0 actin, 1 DAPI\)"):
        read_image(tmp_path / "ome.tif", channel=2)
    # colour stays colour; --channel picks one colour of it
    rgb = validation_samples[1].image
    tifffile.imwrite(tmp_path / "rgb.tif", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif", channel=2), rgb[..., 2])
    # a 2-D stack of several planes of two kinds cannot be told apart
    tifffile.imwrite(tmp_path / "tc.tif", np.stack([planes] * 2), imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(ImageReadError, match=r"tc.tif: is a stack of 2 T x 2 C planes \(axes TCYX"):
        read_image(tmp_path / "tc.tif", channel=1)


def test_many_page_tiff_is_refused_from_its_header(tmp_path):
    import tracemalloc

    page = np.zeros((1024, 1024), np.uint8)
    path = tmp_path / "pages500.tif"  # 0.6 MB on disk, 0.5 GB decoded
    tifffile.imwrite(path, (page for _ in range(500)), shape=(500, *page.shape), dtype=page.dtype,
                     compression="zlib")
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError, match=r"pages500.tif: has 500 planes .*available: 0-499"):
            read_image(path)
        assert read_image(path, channel=3, max_megapixels=2).shape == page.shape  # only the page asked for
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6, f"{peak / 1e6:.0f} MB allocated"


def test_cmyk_jpeg_and_animations(tmp_path, validation_samples):
    rgb = validation_samples[1].image
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    read = read_image(tmp_path / "cmyk.jpg")
    assert read.shape == rgb.shape and np.abs(read.astype(int) - rgb).mean() < 3  # not inverted, no 4th channel
    for suffix in ("gif", "webp"):
        path = tmp_path / f"animated.{suffix}"
        Image.fromarray(rgb).save(path, save_all=True, append_images=[Image.fromarray(255 - rgb)])
        with pytest.raises(ImageReadError, match=rf"animated.{suffix}: has 2 frames; .*--channel N"):
            read_image(path)
        assert np.abs(read_image(path, channel=1)[..., :3].astype(int) - (255 - rgb)).mean() < 40
    assert find_images([tmp_path]) == [tmp_path / n for n in ("animated.gif", "animated.webp", "cmyk.jpg")]


def test_find_images_takes_loose_images_beside_the_competition_layout_and_survives_link_loops(tmp_path):
    (tmp_path / "a" / "images").mkdir(parents=True)
    for path in (tmp_path / "a" / "images" / "a.png", tmp_path / "loose.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "here").symlink_to(".")
    found = find_images([tmp_path, tmp_path / "loose.png"])  # a file given twice is one input
    assert found == [tmp_path / "a" / "images" / "a.png", tmp_path / "loop.png", tmp_path / "loose.png"]
    with pytest.raises(ImageReadError, match="loop.png: is a broken symbolic link or a symbolic link loop"):
        read_image(tmp_path / "loop.png")
