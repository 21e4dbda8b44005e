"""Segmenting many images: outputs per image, a summary, a failures list, and resuming after a stop.

For an image ``<name>`` the output folder gets the outputs asked for (``outputs.WRITERS``; by default
``<name>_labels.png``, ``<name>_overlay.png``, ``<name>_nuclei.csv``) and, written last,
``<name>.done.json``. Every file is written atomically. An image's record is removed before its outputs are
rewritten and written after them, so an image counts as done only when its record matches the input file
(path, size and modification time) and the hash of the run's settings (package version, model weights,
every inference setting, diameter, channel, outputs and their options) and its outputs still exist; a rerun of
the same command skips it. One run at a time writes to a folder (``.nucleiseg.lock``). ``summary.csv``
(every image of the folder that has a record) and ``failures.csv`` (this run's) are rewritten at the end of
every run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import socket
import tempfile
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from nucleiseg.io import ImageMetadata, ImageReadError, atomic_path
from nucleiseg.measure import write_table
from nucleiseg.outputs import DEFAULT_OUTPUTS, OutputOptions, check_outputs, write_outputs
from nucleiseg.predict import network_threads, threads
from nucleiseg.segment import Segmentation, Segmenter

log = logging.getLogger(__name__)

SUMMARY_FIELDS = ["image", "nuclei", "median_area", "diameter", "diameter_estimated", "scale", "quality", "flagged",
                  "path"]
LOCK_NAME = ".nucleiseg.lock"
RECORD_SUFFIX = ".done.json"
# a larger image is segmented alone, the images before it finished first, so that a batch of huge images
# holds one at a time
ALONE_FROM_PIXELS = 16_000_000
MAX_IMAGES_AT_ONCE = 4  # side by side: more would hold more images in memory for little gain


class OutputFolderError(ValueError):
    """The output folder cannot be used: not writable, or another run is writing to it."""


class OutputNameTaken(ValueError):
    """An earlier run wrote the outputs of another input file under this image's output name."""


class OutputWriteError(OSError):
    """An image's outputs could not be written (disk full, permissions); the message names the image."""


@dataclass
class BatchResult:
    done: list[dict] = field(default_factory=list)  # summary rows of this run's inputs, in input order
    skipped: int = 0  # already done by an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unwritten: list[str] = field(default_factory=list)  # summary files that could not be written, with why


# glibc keeps the heap memory an image freed for the next images; it is handed back to the OS once this much
# is free and the process has grown by as much since it last handed memory back. Handing it back after every
# image made the next image fault its pages in anew (a batch of 300 images: 28 s instead of 23 s, peak 314 MB
# instead of 335 MB)
KEEP_FREED_UP_TO = 256 << 20
_resident_after_trim = 0  # bytes


class _MallocInfo(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h)
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        if hasattr(libc, "mallinfo2"):  # glibc 2.33 and later
            libc.mallinfo2.restype = _MallocInfo
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to trim
        return None


def _resident_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory() -> None:
    """Give the heap memory freed by the images so far back to the OS where more than ``KEEP_FREED_UP_TO`` is
    free and the resident memory grew by as much since the last time (on a glibc without ``mallinfo2``,
    always). glibc keeps it otherwise, and over thousands of images of varied sizes the resident memory of a
    batch keeps growing. Free memory already handed back still counts as free to glibc: hence the growth."""
    global _resident_after_trim
    libc = _glibc()
    if libc is None:
        return
    if hasattr(libc, "mallinfo2"):
        if libc.mallinfo2().fordblks < KEEP_FREED_UP_TO:  # free bytes, all threads' heaps together
            return
        resident = _resident_bytes()
        if resident is not None and resident - _resident_after_trim < KEEP_FREED_UP_TO:
            return
    libc.malloc_trim(0)
    _resident_after_trim = _resident_bytes() or 0


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def reuse_freed_memory() -> None:
    """Let glibc reuse freed memory for the next arrays, as it does in a plain process.

    Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also stops glibc from raising its
    mmap threshold: every array above 128 KiB is then mapped afresh and page-faulted in, which made the
    network twice as slow in a worker as in a plain process. Set the thresholds glibc's own rule reaches
    (32 MiB to map, 64 MiB to trim); ``release_freed_memory`` still trims between images.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


def output_names(paths: list[Path]) -> list[str]:
    """A distinct output name per input: the file stem (with its extension where a folder holds ``x.gif`` and
    ``x.png``), prefixed with as many parent folder names as it takes to tell apart stems that repeat
    (``d1/sub/x.png`` -> ``d1_sub_x``), numbered where even that does not."""
    paths = [Path(os.path.abspath(p)) for p in paths]
    in_folder = Counter((p.parent, p.stem) for p in paths)
    bases = [p.stem if in_folder[p.parent, p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}" for p in paths]
    parents = [p.parent.parts[:0:-1] for p in paths]  # nearest folder first, without the root
    depth = [0] * len(paths)
    names = list(bases)
    while True:
        counts = Counter(names)
        clashing = [i for i, n in enumerate(names) if counts[n] > 1 and depth[i] < len(parents[i])]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
            names[i] = "_".join([*reversed(parents[i][: depth[i]]), bases[i]])
    taken: set[str] = set()
    for i, name in enumerate(names):
        number = 1
        while names[i] in taken:
            names[i], number = f"{name}_{number}", number + 1
        taken.add(names[i])
    return names


@contextmanager
def lock_folder(out_dir: Path) -> Iterator[None]:
    """Hold the output folder for this run: check that it is writable, and refuse it while another run on
    this machine holds it. The lock is the operating system's (``flock``), so a killed run leaves none."""
    import fcntl

    lock_path = out_dir / LOCK_NAME
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".nucleiseg.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputFolderError(f"{out_dir}: the output folder is not writable ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "owner unknown"
            raise OutputFolderError(f"{lock_path}: another nucleiseg run ({owner}) is writing to this folder; "
                                    "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _input_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def settings_key(settings: dict) -> str:
    """Hash of the settings that determine an image's outputs, stored in its record."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def run_settings(segmenter: Segmenter, diameter: float | None, outputs: tuple[str, ...],
                 options: OutputOptions, channel: int | None = None) -> dict:
    """Everything that determines a batch's outputs: the segmenter's settings, the diameter, the channel
    and the outputs."""
    return segmenter.settings() | {"diameter": diameter, "channel": channel, "outputs": list(outputs),
                                   "options": asdict(options)}


def _finished(record_path: Path, path: Path, key: str) -> dict | None:
    """The summary row of an earlier run, if it finished this very input file with the same settings.

    Raises OutputNameTaken where the record is of another input file that still exists."""
    try:
        record = json.loads(record_path.read_text())
        recorded = record["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded != os.path.realpath(path) and os.path.exists(recorded):
        raise OutputNameTaken(f"{path}: its output name {record_path.name.removesuffix(RECORD_SUFFIX)!r} in "
                              f"{record_path.parent} holds the results of {recorded}; use another --out, or "
                              "--overwrite to replace them")
    try:
        same = record["input"] == _input_stamp(path) and record["key"] == key
        complete = all((record_path.parent / name).exists() for name in record["outputs"])
        return record["summary"] if same and complete else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def folder_summary(out_dir: Path) -> list[dict]:
    """The summary rows of every image of ``out_dir`` that has a record and all its outputs: the images
    flagged for checking first (lowest estimated quality first), then the others by name."""
    rows = []
    for record_path in sorted(out_dir.glob(f"*{RECORD_SUFFIX}")):
        try:
            record = json.loads(record_path.read_text())
            if all((out_dir / name).exists() for name in record["outputs"]):
                rows.append(record["summary"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a record of ours: it describes no output
    return sorted(rows, key=lambda row: (not row.get("flagged"), row.get("quality") if row.get("flagged") else 0))


def summary_row(name: str, path: Path, result: Segmentation) -> dict:
    """One row of summary.csv."""
    areas = np.bincount(result.labels.ravel())[1:]
    areas = areas[areas > 0]
    return {
        "image": name,
        "nuclei": int(len(areas)),
        "median_area": float(np.median(areas)) if len(areas) else 0.0,
        "diameter": round(result.diameter, 3),
        "diameter_estimated": result.diameter_estimated,
        "scale": round(result.scale, 4),
        "quality": result.quality,
        "flagged": result.flagged,
        "path": str(path),
    }


def segment_batch(
    inputs: list[Path],
    out_dir: str | os.PathLike,
    segmenter: Segmenter,
    diameter: float | None = None,
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
    options: OutputOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
    channel: int | None = None,
    names: list[str] | None = None,
    tables: bool = True,
) -> BatchResult:
    """Segment every path of ``inputs`` into ``out_dir``; a bad file is logged and listed, never fatal.

    Parameters
    ----------
    inputs : list of Path
        Image files.
    out_dir : path
        Output folder, created if needed.
    segmenter : Segmenter
        Its settings (``Segmenter.config``) include the largest image accepted.
    diameter : float, optional
        Nucleus diameter in pixels for every image; estimated per image when not given.
    outputs : tuple of str
        Names of ``outputs.WRITERS`` to write per image.
    options : OutputOptions, optional
        Label image format and other writer choices.
    overwrite : bool
        Redo images an earlier run finished, and replace the outputs of other input files of the same name.
    progress : bool
        Show a progress bar.
    channel : int, optional
        The nuclear channel of multi-channel images (``io.read_image``).
    names : list of str, optional
        Output name per input; by default ``output_names(inputs)``. A part of a larger batch (``cluster``)
        passes the names given in the whole batch.
    tables : bool
        Hold the output folder's lock and write summary.csv and failures.csv at the end; a part of a larger
        batch leaves both to the caller, which holds the lock for the whole batch.

    Raises
    ------
    OutputFolderError
        Before any image, where ``out_dir`` is not writable or another run is writing to it.
    """
    outputs, options = check_outputs(outputs), options or OutputOptions()
    out_dir = Path(out_dir)
    if diameter is not None:
        segmenter.check_diameter(diameter)
    result = BatchResult()
    names = output_names(inputs) if names is None else names
    settings = run_settings(segmenter, diameter, outputs, options, channel)
    key = settings_key(settings)
    # images are segmented side by side, each with its share of the cores: the network runs more work per
    # core on one thread than on several (it waits less), and the rest (reading, post-processing, writing)
    # runs on one core anyway. A network on a GPU, or run by a predictor of the caller's, takes one image
    # at a time (a GPU's memory holds one image's tiles; another predictor may not allow concurrent calls).
    # One image more than there are cores: while one holds Python's lock (post-processing, writing), the
    # others' networks run (3% faster end to end on 2 cores). One core (a Dask worker's share, say) keeps one
    # image at a time, in the calling thread.
    cores = threads()
    side_by_side = cores + 1 if cores > 1 else 1
    at_once = max(1, min(MAX_IMAGES_AT_ONCE, side_by_side, len(inputs))) if segmenter.network_on_cpu else 1
    threads_each = max(1, cores // at_once)
    # in input order: (path, its summary row or its failure, whether it was segmented in this run)
    pending: deque[tuple[Path, Future, bool]] = deque()

    def record_finished(running_at_most: int) -> None:
        """Wait until at most ``running_at_most`` images are running; record those finished, in input order."""
        while len(running := [f for _, f, _ in pending if not f.done()]) > running_at_most:
            wait(running, return_when=FIRST_COMPLETED)  # whichever finishes first frees its core
        freed = False
        while pending and pending[0][1].done():
            path, row, segmented = pending.popleft()
            try:
                result.done.append(row.result())
            except Exception as exc:
                _failed(result, path, exc)
            freed |= segmented
        if freed:
            release_freed_memory()

    def start(path: Path, name: str) -> tuple[Path, Future, bool]:
        """Skip the image if an earlier run finished it, else read it and start segmenting it (its pixels
        are held by the job alone: they are freed when it ends)."""
        record_path = out_dir / f"{name}{RECORD_SUFFIX}"
        previous = None if overwrite else _finished(record_path, path, key)
        if previous is not None:
            result.skipped += 1
            return path, _settled(previous), False
        record_path.unlink(missing_ok=True)  # the outputs are rewritten: none counts as done until all are
        image, metadata, seconds = segmenter.read_file(path, channel)
        record = {"path": os.path.realpath(path), "key": key, "settings": settings}
        job = functools.partial(_segment_image, segmenter, image, metadata, seconds, diameter, path,
                                out_dir / name, outputs, options, record)
        if image.shape[0] * image.shape[1] > ALONE_FROM_PIXELS:
            record_finished(running_at_most=0)  # a huge image is segmented alone, on every core
            return path, _settled_call(job, cores), True
        if at_once == 1:  # in this thread, whose network sessions last beyond this batch (a Dask task thread)
            return path, _settled_call(job, threads_each), True
        return path, pool.submit(job, threads_each), True

    with (lock_folder(out_dir) if tables else nullcontext(), logging_redirect_tqdm(),  # whole error lines
          ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="nucleiseg-image") as pool):
        for path, name in tqdm(list(zip(inputs, names, strict=True)), desc="segmenting", unit="img",
                               disable=not progress):
            # the next image is read while the others run: at most ``at_once`` images in memory
            record_finished(running_at_most=at_once - 1)
            try:
                pending.append(start(path, name))
            except Exception as exc:
                pending.append((path, _settled(exception=exc), True))
        record_finished(running_at_most=0)
    if tables:
        write_tables(out_dir, result)
    return result


def _segment_image(segmenter: Segmenter, image: np.ndarray, metadata: ImageMetadata, read_seconds: float,
                   diameter: float | None, path: Path, base: Path, outputs: tuple[str, ...], options: OutputOptions,
                   record: dict, thread_count: int) -> dict:
    """Segment the ``image`` read from ``path`` with the network on ``thread_count`` threads, write its
    outputs next to ``base`` (output folder / output name), then its ``record`` with the summary row and the
    names of the files written. Returns the summary row."""
    with network_threads(thread_count):
        prediction = segmenter.predict_read(image, metadata, read_seconds, diameter)
    segmentation = segmenter.label_nuclei(prediction)
    del prediction  # its probabilities: the largest arrays of an image, not needed to write the outputs
    record["summary"] = summary_row(base.name, path, segmentation)
    log.debug("%s: %s", path, ", ".join(f"{k} {v:.2f} s" for k, v in segmentation.timings.items()))
    try:
        record["outputs"] = write_outputs(segmentation, base, outputs, options)
        record["input"] = _input_stamp(path)
        with atomic_path(base.parent / f"{base.name}{RECORD_SUFFIX}") as tmp:
            tmp.write_text(json.dumps(record))
    except OSError as exc:
        raise OutputWriteError(f"{path}: its outputs could not be written to {base.parent} "
                               f"({exc.strerror or exc})") from None
    return record["summary"]


def _settled(row: dict | None = None, exception: Exception | None = None) -> Future:
    """A future that is already done: an image skipped (its row) or one that failed before segmenting."""
    future = Future()
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(row)
    return future


def _settled_call(job, *args) -> Future:
    """Run ``job(*args)`` here, now; its result or its failure as a done future."""
    try:
        return _settled(job(*args))
    except Exception as exc:
        return _settled(exception=exc)


def _failed(result: BatchResult, path: Path, exc: Exception) -> None:
    """List and log an image that failed: a clear error of ours as it is, any other failure with its kind (one
    image's failure must leave the rest of the batch running)."""
    if isinstance(exc, ImageReadError | OutputNameTaken | OutputWriteError):
        message = str(exc)
    else:
        message = f"{path}: segmentation failed ({type(exc).__name__}: {exc})"
    result.failed.append((str(path), message))
    log.error("%s", message)


def write_tables(out_dir: Path, result: BatchResult) -> None:
    """Write summary.csv (every image of the folder that has a record) and failures.csv (this run's
    failures; removed when nothing failed). A table that cannot be written is noted in ``result.unwritten``."""
    rows = folder_summary(out_dir)
    failures = {"path": [p for p, _ in result.failed], "reason": [r for _, r in result.failed]}
    tables = {"summary.csv": {k: [row.get(k) for row in rows] for k in SUMMARY_FIELDS},
              "failures.csv": failures if result.failed else None}
    for file, table in tables.items():
        try:
            if table is None:
                (out_dir / file).unlink(missing_ok=True)
            else:
                write_table(out_dir / file, table)
        except OSError as exc:
            result.unwritten.append(f"{out_dir / file}: could not be written ({exc.strerror or exc})")
            log.error("%s", result.unwritten[-1])

