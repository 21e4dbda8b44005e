"""Reading images and the Data Science Bowl layout, writing outputs atomically.

The competition layout is ``<root>/<id>/images/<id>.png`` plus, for training images,
``<root>/<id>/masks/*.png`` with one binary mask per nucleus.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

from nucleiseg.config import MAX_MEGAPIXELS

log = logging.getLogger(__name__)

LUMINANCE = np.array([0.299, 0.587, 0.114], np.float32)  # RGB -> gray weights (ITU-R BT.601)
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# Pillow modes read as they are; P/PA become RGBA, CMYK/YCbCr/LAB/HSV become RGB (read raw they are inverted
# or meaningless as red, green, blue)
PILLOW_MODES = {"1", "L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"}
# TIFF photometric interpretations whose samples are colours, not channels to choose from
COLOUR_PHOTOMETRIC = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
ALPHA = (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
MIN_SIDE = 8
# TIFF ResolutionUnit -> micrometres per unit
MICROMETRES = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}  # inch, centimetre, millimetre, micrometre
OME_UNITS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


@dataclass
class Sample:
    """One image of the competition layout: its id, pixels and instance labels (0 = background)."""

    id: str
    image: np.ndarray  # (H, W, 3) uint8 or (H, W) gray
    labels: np.ndarray | None  # (H, W) uint16 or int32, None for test images


@dataclass(frozen=True)
class ImageMetadata:
    """What an image file says about itself beyond its pixels."""

    path: str | None = None
    pixel_size: tuple[float, float] | None = None  # (y, x) micrometres per pixel, None when the file has none


def read_metadata(path: str | os.PathLike) -> ImageMetadata:
    """The metadata of an image file: its pixel size, from OME-XML or the TIFF resolution tags.

    Only the header is read. Files without a pixel size (PNG, JPEG, TIFFs without resolution tags or with
    the unit-less default) give ``pixel_size=None``.
    """
    path = Path(path)
    pixel_size = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tif:
                pixel_size = _ome_pixel_size(tif.ome_metadata) if tif.is_ome else None
                pixel_size = pixel_size or _tiff_pixel_size(tif.pages[0].tags)
        except Exception as exc:  # metadata are optional: an odd header must not fail an image that was read
            log.debug("%s: no pixel size (%s)", path, exc)
    return ImageMetadata(str(path), pixel_size)


def _tiff_pixel_size(tags) -> tuple[float, float] | None:
    unit = tags.get("ResolutionUnit")
    per_unit = MICROMETRES.get(int(unit.value)) if unit is not None else None
    x, y = tags.get("XResolution"), tags.get("YResolution")
    if per_unit is None or x is None or y is None:
        return None
    (xn, xd), (yn, yd) = x.value, y.value
    return (per_unit * yd / yn, per_unit * xd / xn) if xn and yn else None


def _ome_pixel_size(xml: str | None) -> tuple[float, float] | None:
    import xml.etree.ElementTree as ET

    for element in ET.fromstring(xml).iter() if xml else ():
        attrib = element.attrib
        if element.tag.endswith("Pixels") and "PhysicalSizeX" in attrib:
            sizes = []
            for axis in "YX":
                unit = attrib.get(f"PhysicalSize{axis}Unit", "µm")
                if unit not in OME_UNITS:
                    return None
                sizes.append(float(attrib.get(f"PhysicalSize{axis}", attrib["PhysicalSizeX"])) * OME_UNITS[unit])
            return (sizes[0], sizes[1])
    return None


def _too_large(path: Path, h: int, w: int, max_megapixels: float) -> None:
    """Refuse an image by its header, before decoding it."""
    if h * w > max_megapixels * 1e6:
        raise ImageReadError(
            f"{path}: is {w}x{h} ({h * w / 1e6:.0f} MP), above the limit of {max_megapixels:.0f} MP; "
            "split it into tiles or raise --max-megapixels"
        )


def _choose(path: Path, what: str, count: int, channel: int | None, names: Sequence[str] = ()) -> int | None:
    """The index ``channel`` picks among ``count`` planes; an error naming them where none or a wrong one is given."""
    if channel is not None and 0 <= channel < count:
        return channel
    listed = ", ".join(f"{i} {n}" for i, n in enumerate(names)) if names else f"0-{count - 1}"
    if channel is None:
        raise ImageReadError(f"{path}: {what}; which one holds the nuclei is not known: pick it with --channel N "
                             f"(available: {listed})")
    raise ImageReadError(f"{path}: {what}; there is no channel {channel} (available: {listed})")


def _ome_channel_names(xml: str | None) -> list[str]:
    import xml.etree.ElementTree as ET

    channels = [e for e in ET.fromstring(xml).iter() if e.tag.endswith("}Channel")] if xml else []
    return [c.attrib.get("Name", "") for c in channels] if all("Name" in c.attrib for c in channels) else []


def _read_tiff(path: Path, max_megapixels: float, channel: int | None) -> np.ndarray:
    """Read one 2-D image of a TIFF as its own description says: its series axes, photometric interpretation,
    extra samples and OME channels. Only the plane asked for is decoded."""
    import zarr

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        page = series.keyframe
        axes, shape = list(series.axes), list(series.shape)
        if len(shape) >= 3 and axes[-1] == "X" and shape[-1] <= 4 < shape[-2]:
            axes[-3:] = ["Y", "X", "C"]  # a channel-last array saved without a photometric interpretation
        extras = tuple(page.extrasamples)
        colour = page.photometric in COLOUR_PHOTOMETRIC or (
            page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
            and extras and all(e in ALPHA for e in extras))  # gray + alpha
        planes = [i for i, (a, n) in enumerate(zip(axes, shape, strict=True))
                  if n > 1 and a not in "YX" and (a != "S" or not colour)]
        described = f"axes {''.join(axes)}, shape {tuple(shape)}"
        if len(planes) > 1:
            raise ImageReadError(f"{path}: is a stack of {' x '.join(f'{shape[i]} {axes[i]}' for i in planes)} "
                                 f"planes ({described}); save the one 2-D image or channel to segment")
        index: list = [slice(None)] * len(shape)
        if planes:
            axis = planes[0]
            names = _ome_channel_names(tif.ome_metadata) if tif.is_ome and axes[axis] == "C" else []
            names = names if len(names) == shape[axis] else []
            index[axis] = _choose(path, f"has {shape[axis]} planes along axis {axes[axis]} ({described})",
                                  shape[axis], channel, names)
        elif channel is not None and "S" in axes:  # one colour sample, e.g. the blue of an RGB composite
            axis = axes.index("S")
            index[axis] = _choose(path, f"has {shape[axis]} samples ({described})", shape[axis], channel)
        elif channel is not None:
            _choose(path, f"has one channel ({described})", 1, channel)
        _too_large(path, shape[axes.index("Y")], shape[axes.index("X")], max_megapixels)
        pixels = np.asarray(zarr.open(tif.aszarr(level=0), mode="r")[tuple(index)])  # level 0: full resolution
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
            pixels = tifffile.apply_colormap(pixels, page.colormap, contig=True)
        elif page.photometric == tifffile.PHOTOMETRIC.MINISWHITE and pixels.dtype.kind in "ui":
            pixels = np.iinfo(pixels.dtype).max - pixels  # 0 is white in these files
        return pixels


def _read_pixels(path: Path, max_megapixels: float, channel: int | None = None) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        return _read_tiff(path, max_megapixels, channel)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        # our own size limit replaces Pillow's decompression-bomb check, for this call only
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd PNG chunks; real failures raise below
            with Image.open(path) as im:
                _too_large(path, im.height, im.width, max_megapixels)
                frames = getattr(im, "n_frames", 1)
                if frames > 1:  # an animation (GIF, WebP, APNG): a frame is a plane to choose, like a TIFF page
                    im.seek(_choose(path, f"has {frames} frames", frames, channel))
                    channel = None
                if im.mode not in PILLOW_MODES:
                    im = im.convert("RGBA" if im.mode in ("P", "PA") else "RGB")
                pixels = np.asarray(im)
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    if channel is not None:
        count = pixels.shape[2] if pixels.ndim == 3 else 1
        picked = _choose(path, f"has {count} channel{'s' * (count > 1)} (mode {im.mode})", count, channel)
        pixels = pixels[..., picked] if pixels.ndim == 3 else pixels
    return pixels


def read_image(path: str | os.PathLike, max_megapixels: float = MAX_MEGAPIXELS, channel: int | None = None
               ) -> np.ndarray:
    """Read an image file and return it as (H, W) or (H, W, C) with C in 1..4.

    Parameters
    ----------
    path : path
        PNG, TIFF / OME-TIFF, JPEG, BMP, GIF or WebP file.
    max_megapixels : float
        Larger images are refused from their header, before they are decoded.
    channel : int, optional
        The nuclear channel of a multi-channel image (or the plane of a stack, the frame of an animation),
        counted from 0; the image is then (H, W). Required where the file holds several planes that are not
        the colours of one image.

    Raises
    ------
    ImageReadError
        With the file name and the reason, for anything that cannot be segmented: missing, unreadable, not an
        image, too small or too large, NaN or infinite values, several planes and no (or a wrong) ``channel``.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ImageReadError(f"{path}: is a broken symbolic link or a symbolic link loop")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory, not an image file")
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    try:
        pixels = _read_pixels(path, max_megapixels, channel)
    except ImageReadError:
        raise
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied") from None
    except Exception as exc:  # Pillow and tifffile raise many types for corrupt files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(f"{path}: not a readable image ({reason})") from None
    return check_image(pixels, str(path), max_megapixels)


def check_image(pixels: np.ndarray, name: str = "image", max_megapixels: float = MAX_MEGAPIXELS) -> np.ndarray:
    """Validate an image array and bring it to (H, W) or (H, W, C), C <= 4; raise ImageReadError if unusable."""
    pixels = np.asarray(pixels)
    if pixels.ndim > 2:
        pixels = np.squeeze(pixels, axis=tuple(i for i in range(pixels.ndim - 2) if pixels.shape[i] == 1))
    if pixels.ndim == 3 and pixels.shape[0] <= 4 < pixels.shape[2]:
        pixels = np.moveaxis(pixels, 0, -1)  # TIFFs often store channels first
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and not 1 <= pixels.shape[2] <= 4):
        raise ImageReadError(
            f"{name}: has shape {pixels.shape}; expected a 2-D image (H, W) or (H, W, C) with at most 4 "
            "channels; save one plane of a stack or time series"
        )
    h, w = pixels.shape[:2]
    if h * w > max_megapixels * 1e6:
        raise ImageReadError(
            f"{name}: is {w}x{h} ({h * w / 1e6:.0f} MP), above the limit of {max_megapixels:.0f} MP; "
            "split it into tiles or raise --max-megapixels"
        )
    if min(h, w) < MIN_SIDE:
        raise ImageReadError(f"{name}: is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if pixels.dtype.kind not in "uifb":
        raise ImageReadError(f"{name}: has unsupported pixel type {pixels.dtype}")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise ImageReadError(f"{name}: contains NaN or infinite values")
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4):
        colour = pixels[..., :-1]
        if not colour.any() and np.ptp(pixels[..., -1]) > 0:
            raise ImageReadError(f"{name}: holds only an alpha channel (all colour values are 0)")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    return pixels


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) image of any dtype -> (H, W, 3) uint8; alpha is dropped, gray repeated, depth rescaled."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., :3] if image.shape[2] >= 3 else image[..., :1]
    else:
        image = image[..., None]
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        image = ((image - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else np.ascontiguousarray(image)


def to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) image -> (H, W) float32 intensity in the file's own units (alpha dropped)."""
    image = np.asarray(image)
    if image.ndim == 3:
        colour = image[..., :3] if image.shape[2] >= 3 else image[..., :1]
        if colour.shape[2] == 3:  # channel by channel: no float copy of the whole RGB image
            gray = colour[..., 0] * LUMINANCE[0]
            gray += colour[..., 1] * LUMINANCE[1]
            gray += colour[..., 2] * LUMINANCE[2]
            return gray.astype(np.float32, copy=False)
        return colour[..., 0].astype(np.float32)
    return image.astype(np.float32, copy=False)


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a list of image paths, each file once.

    A folder contributes the image files directly inside it and, where it is in the competition layout, its
    ``<id>/images/<id>.png``. Inputs that do not exist, and folders that contribute no image (such as a
    folder named ``x.png``), are returned as they are so that the caller reports them with the rest of the
    batch instead of dropping them silently.
    """
    found: dict[str, Path] = {}
    for item in map(Path, inputs):
        inside = [item]
        if item.is_dir():
            layout = sorted(item.glob("*/images/*.png")) if is_dsb_layout(item) else []
            loose = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            inside = layout + loose or [item]
        for path in inside:
            found.setdefault(os.path.realpath(path), path)  # a file given twice, or via a link, is one input
    return list(found.values())


def is_dsb_layout(root: Path) -> bool:
    return any((d / "images").is_dir() for d in root.iterdir() if d.is_dir())


def sample_ids(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected the competition layout <id>/images/<id>.png)")
    return sorted(d.name for d in root.iterdir() if (d / "images" / f"{d.name}.png").is_file())


def read_masks(
    mask_paths: Sequence[Path], shape: tuple[int, int], sample_id: str, overlap: str = "error"
) -> np.ndarray:
    """Stack per-nucleus binary mask files into one label image (see ``stack_masks``)."""

    def masks():
        for mask_path in mask_paths:
            mask = np.asarray(Image.open(mask_path))
            yield mask_path.name, mask[..., 0] if mask.ndim == 3 else mask

    return stack_masks(masks(), shape, sample_id, overlap)


def stack_masks(
    masks: Iterable[tuple[str, np.ndarray]], shape: tuple[int, int], sample_id: str, overlap: str = "error"
) -> np.ndarray:
    """Stack per-nucleus binary masks, given as (name, (H, W) array) pairs, into one label image.

    Two masks that share pixels raise ValueError with ``overlap="error"``; with ``overlap="warn"`` the
    shared pixels are logged and set to background, so that neither nucleus absorbs the other.
    """
    if overlap not in ("error", "warn"):
        raise ValueError(f"overlap must be 'error' or 'warn', not {overlap!r}")
    labels = np.zeros(shape, np.int32)
    contested = np.zeros(shape, bool)
    names = []  # masks are used one at a time: hundreds of them need not fit in memory together
    for index, (name, mask) in enumerate(masks, start=1):
        names.append(name)
        if mask.shape != shape:
            raise ValueError(f"{sample_id}: mask {name} is {mask.shape}, image is {shape}")
        mask = mask > 0
        clash = labels[mask]
        if clash.any():
            other = names[int(clash[clash > 0][0]) - 1]
            message = f"{sample_id}: masks {other} and {name} overlap ({int((clash > 0).sum())} px)"
            if overlap == "error":
                raise ValueError(message)
            log.warning("%s; shared pixels set to background", message)
            contested |= mask & (labels > 0)
        labels[mask] = index
    labels[contested] = 0
    return labels.astype(np.uint16) if len(names) < 65535 else labels


def read_sample_image(path: str | os.PathLike) -> np.ndarray:
    """An image as training and scoring use it: RGB uint8, or gray; an alpha channel is dropped."""
    image = read_image(path)
    if image.ndim == 3:
        image = to_rgb_uint8(image) if image.dtype == np.uint8 else image[..., :3]
    return image


def load_sample(sample_dir: str | os.PathLike, overlap: str = "error") -> Sample:
    """Load one ``<id>/`` folder: the image (RGB uint8 or gray) and, if masks exist, the label image.

    ``overlap`` says what to do when two masks share pixels (see read_masks)."""
    sample_dir = Path(sample_dir)
    image = read_sample_image(sample_dir / "images" / f"{sample_dir.name}.png")
    mask_paths = sorted((sample_dir / "masks").glob("*.png"))
    labels = read_masks(mask_paths, image.shape[:2], sample_dir.name, overlap) if mask_paths else None
    return Sample(sample_dir.name, image, labels)


def _fingerprint(sample_dir: Path) -> str:
    """Hash of the names, sizes and modification times of a sample's files: changes when any file changes."""
    digest = hashlib.sha1()
    for path in sorted(sample_dir.rglob("*.png")):
        stat = path.stat()
        digest.update(f"{path.relative_to(sample_dir)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where decoded samples are cached: $NUCLEISEG_CACHE, else ~/.cache/nucleiseg."""
    return Path(os.environ.get("NUCLEISEG_CACHE", Path.home() / ".cache" / "nucleiseg"))


def load_dataset(
    root: str | os.PathLike,
    ids: Sequence[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
    overlap: str = "warn",
) -> list[Sample]:
    """Load samples of a competition-layout folder, decoding each once and caching it as .npz.

    The cache key includes the file sizes and modification times, so edited masks or images are re-read,
    and the overlap mode, so a strict load never gets labels a lenient one cached.
    Overlapping masks are reported in the log and their shared pixels dropped (``overlap="warn"``), or
    raise (``overlap="error"``).
    """
    root = Path(root)
    ids = sample_ids(root) if ids is None else list(ids)
    store = cache_dir() / "samples"
    samples = []
    for sample_id in tqdm(ids, desc=f"loading {root.name}", unit="img", disable=not progress, leave=False):
        sample_dir = root / sample_id
        cached = store / f"{sample_id}-{_fingerprint(sample_dir)}-{overlap}.npz"
        if use_cache and cached.exists():
            with np.load(cached) as data:
                labels = data["labels"] if "labels" in data else None
                samples.append(Sample(sample_id, data["image"], labels))
            continue
        sample = load_sample(sample_dir, overlap)
        if use_cache:
            arrays = {"image": sample.image} | ({"labels": sample.labels} if sample.labels is not None else {})
            with atomic_path(cached) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
        samples.append(sample)
    return samples


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    A reader therefore sees either the old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; give the usual permissions
        with open(tmp, "rb+") as f:  # on disk before the rename, so a crash never leaves an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write a label image as 16-bit PNG (or 32-bit TIFF if there are more than 65535 labels), atomically."""
    path = Path(path)
    dtype = np.uint16 if labels.max(initial=0) < 65536 else np.uint32
    with atomic_path(path) as tmp:
        if path.suffix.lower() in (".tif", ".tiff"):
            tifffile.imwrite(tmp, labels.astype(dtype), compression="zlib")
        else:
            if dtype != np.uint16:
                raise ValueError(f"{path}: {labels.max()} labels do not fit a 16-bit PNG; write a .tif instead")
            # level 1: half the default level's time; label images compress well at any level
            Image.fromarray(labels.astype(np.uint16)).save(tmp, format="PNG", compress_level=1)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return tifffile.imread(path).astype(np.int32)
    return np.asarray(Image.open(path)).astype(np.int32)


def write_ome_labels(path: str | os.PathLike, labels: np.ndarray,
                     pixel_size: tuple[float, float] | None = None) -> None:
    """Write a label image as OME-TIFF (16-bit, 32-bit above 65535 labels), atomically.

    ``pixel_size`` ((y, x) micrometres per pixel) goes into the OME-XML ``PhysicalSizeX/Y`` (read by
    Bio-Formats, QuPath, napari) and the TIFF resolution tags (read by plain ImageJ); ``read_metadata``
    reads it back.
    """
    dtype = np.uint16 if labels.max(initial=0) < 65536 else np.uint32
    metadata: dict = {"axes": "YX"}
    resolution = None
    if pixel_size is not None:
        metadata |= {"PhysicalSizeY": pixel_size[0], "PhysicalSizeYUnit": "µm",
                     "PhysicalSizeX": pixel_size[1], "PhysicalSizeXUnit": "µm"}
        resolution = (MICROMETRES[3] / pixel_size[1], MICROMETRES[3] / pixel_size[0])  # pixels per centimetre
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), ome=True, photometric="minisblack", compression="zlib",
                         metadata=metadata, resolution=resolution,
                         resolutionunit="CENTIMETER" if resolution else None)
