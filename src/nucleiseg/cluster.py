"""Segmenting many images on a Dask cluster: parts of the batch per task, one model per worker process.

Each task runs ``batch.segment_batch`` on a part of the inputs (``PART`` images: one task per image would
cost the scheduler minutes on 100,000 images), so every guarantee of a single-process batch holds:
outputs written atomically into the shared output folder, a record per finished image that a rerun
skips, a bad file listed while the rest go on. summary.csv and failures.csv are written here, once every
part has returned, in input order. A part whose worker died is run again by the scheduler on another
worker (Dask's ``distributed.scheduler.allowed-failures``), where the images it had finished are skipped;
a part that killed every worker it ran on is reported image by image in failures.csv.

Requires the ``dask`` extra: ``pip install "nucleiseg[dask]"``.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from distributed import Client, LocalCluster, WorkerPlugin, as_completed
from tqdm import tqdm

from nucleiseg.batch import (
    RECORD_SUFFIX,
    BatchResult,
    _finished,
    lock_folder,
    output_names,
    reuse_freed_memory,
    run_settings,
    segment_batch,
    settings_key,
    write_tables,
)
from nucleiseg.outputs import DEFAULT_OUTPUTS, OutputOptions, check_outputs
from nucleiseg.predict import set_threads
from nucleiseg.segment import Segmenter

log = logging.getLogger(__name__)

PART = 16  # images per task

_segmenters: dict[bytes, Segmenter] = {}
_segmenters_lock = threading.Lock()
_worker_threads: int | None = None  # network threads per task thread of this worker process (ThreadPinning)


def worker_segmenter(spec: bytes) -> Segmenter:
    """The Segmenter pickled as ``spec``, loaded once per process and reused by every later task."""
    with _segmenters_lock:
        if spec not in _segmenters:
            _segmenters.clear()  # one model in memory per worker
            _segmenters[spec] = pickle.loads(spec)
        return _segmenters[spec]


def segmenter_spec(segmenter: Segmenter) -> bytes:
    """What a task carries instead of the weights: the model folder and settings (``Segmenter.__reduce__``)."""
    return pickle.dumps(segmenter)


class ThreadPinning(WorkerPlugin):
    """Give each worker's network its share of its host's cores, so N workers on N cores do not run N x N
    threads. The nanny already starts workers with OMP/MKL/OPENBLAS_NUM_THREADS=1 (Dask's
    ``distributed.nanny.pre-spawn-environ``); a restarted worker runs ``setup`` again. It also undoes the
    nanny's MALLOC_TRIM_THRESHOLD_ (``batch.reuse_freed_memory``), which doubled the network's time.

    Parameters
    ----------
    threads : int, optional
        Network threads per worker thread; by default the cores this process may use divided by the
        worker threads on its host (``workers_per_host`` times the worker's ``nthreads``).
    workers_per_host : dict, optional
        Host name -> worker processes on it, as the scheduler listed them.
    """

    name = "nucleiseg-thread-pinning"

    def __init__(self, threads: int | None = None, workers_per_host: dict[str, int] | None = None):
        self.threads, self.workers_per_host = threads, workers_per_host or {}

    def setup(self, worker) -> None:
        threads = self.threads
        if threads is None:
            host_workers = self.workers_per_host.get(urlparse(worker.address).hostname, 1)
            threads = max(1, len(os.sched_getaffinity(0)) // (host_workers * worker.state.nthreads))
        global _worker_threads
        _worker_threads = threads
        set_threads(threads)
        reuse_freed_memory()


def pin_threads(client: Client, threads: int | None = None) -> None:
    """Register ``ThreadPinning`` on every worker of ``client``, present and future."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    per_host = Counter(urlparse(w["host"] if "://" in w["host"] else f"tcp://{w['host']}").hostname for w in workers)
    client.register_plugin(ThreadPinning(threads, dict(per_host)))


def connect(address: str) -> tuple[Client, LocalCluster | None]:
    """A client for ``address``: a scheduler address (``tcp://host:8786``) or ``local:N``, a local cluster of
    N worker processes with one task thread each (the caller closes both)."""
    if address.startswith("local:"):
        count = address.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--dask local:N takes a number of workers N >= 1, got {address!r}")
        cluster = LocalCluster(n_workers=int(count), threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster), cluster
    return Client(address), None


def _segment_part(spec: bytes, paths: list[Path], names: list[str], out_dir: Path, diameter: float | None,
                  outputs: tuple[str, ...], options: OutputOptions, overwrite: bool,
                  channel: int | None) -> BatchResult:
    if _worker_threads is not None:
        # OpenMP's thread count is per thread: a task thread starts with the nanny's OMP_NUM_THREADS=1
        set_threads(_worker_threads)
    return segment_batch(paths, out_dir, worker_segmenter(spec), diameter, outputs, options, overwrite,
                         progress=False, channel=channel, names=names, tables=False)


def segment_on_cluster(
    inputs: Sequence[Path],
    out_dir: str | os.PathLike,
    segmenter: Segmenter,
    client: Client,
    diameter: float | None = None,
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
    options: OutputOptions | None = None,
    overwrite: bool = False,
    part: int = PART,
    threads: int | None = None,
    progress: bool = True,
    channel: int | None = None,
) -> BatchResult:
    """``batch.segment_batch`` on the workers of ``client``: the same files, records, summary and failures.

    Parameters
    ----------
    inputs : sequence of Path
        Image files, readable by every worker under the same paths.
    out_dir : path
        Output folder on a file system every worker writes to.
    segmenter : Segmenter
        Made from a model folder or name; it travels as that folder and its settings, and each worker
        loads the model once (its ``device`` is chosen on the worker: "auto" uses a worker's GPU).
    client : distributed.Client
        The cluster to run on.
    diameter, outputs, options, overwrite, progress, channel
        As for ``batch.segment_batch``; the output folder is locked for the whole batch.
    part : int
        Images per task.
    threads : int, optional
        Torch threads per worker thread (``ThreadPinning``); by default the host's cores shared out.

    Returns
    -------
    BatchResult
        Rows in input order, as ``segment_batch`` returns them.
    """
    outputs, options = check_outputs(outputs), options or OutputOptions()
    if part < 1:
        raise ValueError(f"part must be at least one image, got {part}")
    out_dir = Path(out_dir).resolve()
    with lock_folder(out_dir):
        result = _run_parts(inputs, out_dir, segmenter, client, diameter, outputs, options, overwrite, part,
                            threads, progress, channel)
        write_tables(out_dir, result)
    return result


def _run_parts(inputs, out_dir, segmenter, client, diameter, outputs, options, overwrite, part, threads, progress,
               channel) -> BatchResult:
    inputs = [Path(p).resolve() for p in inputs]
    names = output_names(inputs)
    spec = segmenter_spec(segmenter)
    pin_threads(client, threads)
    starts = range(0, len(inputs), part)
    futures = {
        client.submit(_segment_part, spec, inputs[i : i + part], names[i : i + part], out_dir, diameter, outputs,
                      options, overwrite, channel, pure=False): i
        for i in starts
    }
    parts: dict[int, BatchResult] = {}
    key = settings_key(run_settings(segmenter, diameter, outputs, options, channel))
    with tqdm(total=len(inputs), desc="segmenting", unit="img", disable=not progress) as bar:
        for future in as_completed(futures):
            start = futures[future]
            try:
                parts[start] = future.result()
            except Exception as exc:  # KilledWorker: every worker that ran this part died (out of memory?)
                parts[start] = _lost_part(inputs[start : start + part], names[start : start + part], out_dir,
                                          key, exc)
            bar.update(len(inputs[start : start + part]))
            future.release()
    result = BatchResult()
    for start in starts:
        result.done += parts[start].done
        result.skipped += parts[start].skipped
        result.failed += parts[start].failed
    return result


def _lost_part(paths: list[Path], names: list[str], out_dir: Path, key: str, exc: Exception) -> BatchResult:
    """The images of a part that never returned: done where their record says so, else failed."""
    result = BatchResult()
    for path, name in zip(paths, names, strict=True):
        summary = _finished(out_dir / f"{name}{RECORD_SUFFIX}", path, key)
        if summary is not None:
            result.done.append(summary)
        else:
            message = f"{path}: not segmented, the worker running it died ({type(exc).__name__}: {exc})"
            result.failed.append((str(path), message))
            log.error("%s", message)
    return result
