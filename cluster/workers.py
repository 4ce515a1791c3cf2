"""What runs on the Ray workers: a unit of tensor tasks, as a plain task or on an accelerator actor.

Both call the engine's ``run_task`` for each task of the unit, which reads the task's inputs
itself and ``pwrite``s its bytes into the staging shard; only the small receipts come back.
Workers are long-lived processes that may serve several merges, so cached shard readers are
dropped whenever a unit of a different merge arrives (a rewritten input file must not be read
through an old mapping).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from raymerge.engine import task as engine_task
from raymerge.engine.plan import TensorTask
from raymerge.engine.storage import clear_shard_cache, is_local, local_path, row_span

_run_lock = threading.Lock()
_current_run: str | None = None
_PREFETCH_CHUNK = 8 << 20


@dataclass(frozen=True)
class UnitResult:
    """What a unit sends back: one receipt per task, and the node it ran on."""

    receipts: tuple[engine_task.Receipt, ...]
    node_id: str
    pid: int


def _enter_run(run_id: str, threads: int) -> None:
    global _current_run
    with _run_lock:
        if _current_run != run_id:
            clear_shard_cache()
            _current_run = run_id
    torch.set_num_threads(threads)


def _node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def warm_worker() -> int:
    """Nothing: running it loads this module (torch and the engine) into a fresh worker process,
    so the units that follow find it warm. Returns the worker's pid."""
    return os.getpid()


def run_unit(tasks: tuple[TensorTask, ...], staging_dir: str, device: str, threads: int, run_id: str) -> UnitResult:
    """Run a unit's tasks one after another in this worker; return their receipts."""
    _enter_run(run_id, threads)
    receipts = tuple(engine_task.run_task(t, staging_dir, device) for t in tasks)
    return UnitResult(receipts, _node_id(), os.getpid())


def prefetch_inputs(task: TensorTask) -> int:
    """Pull a task's local input byte ranges into the page cache; returns the bytes touched.

    The engine's ``run_task`` maps its inputs itself, so warming the page cache is what an
    executor can do ahead of time: the next task's mapped reads then hit memory instead of disk.
    Remote (HTTP/S3) inputs are range-read by ``run_task`` and are not prefetched here.
    """
    buf = bytearray(min(_PREFETCH_CHUNK, max(1, task.read_bytes)))
    view = memoryview(buf)
    touched = 0
    for ref in task.inputs:
        if not is_local(ref.url):
            continue
        lo, hi = row_span(ref.entry(task.tensor), task.row_start, task.row_end)
        try:
            fd = os.open(local_path(ref.url), os.O_RDONLY)
        except OSError:
            continue  # run_task reports the missing file with its own error
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
            pos = lo
            while pos < hi:
                n = os.preadv(fd, [view[: min(len(buf), hi - pos)]], pos)
                if n <= 0:
                    break
                pos += n
            touched += pos - lo
        finally:
            os.close(fd)
    return touched


class AcceleratorWorker:
    """A Ray actor for dense linear-algebra tasks (Gram, spectral methods): one per GPU, or one per
    CPU slot on nodes without one.

    Runs with ``max_concurrency=2``: while one unit computes, the next unit's call already warms
    its first task's inputs on its own thread, then waits for the compute lock. Within a unit,
    task ``i + 1`` is prefetched on a side thread while task ``i`` computes.
    """

    def __init__(self, staging_dir: str, device: str, threads: int, run_id: str) -> None:
        self.staging_dir = staging_dir
        self.device = device
        self.threads = threads
        self.run_id = run_id
        self._compute = threading.Lock()
        self._prefetch = ThreadPoolExecutor(max_workers=2, thread_name_prefix="raymerge-prefetch")

    def run(self, tasks: tuple[TensorTask, ...]) -> UnitResult:
        _enter_run(self.run_id, self.threads)
        receipts: list[engine_task.Receipt] = []
        upcoming: Future[int] = self._prefetch.submit(prefetch_inputs, tasks[0])
        for i, task in enumerate(tasks):
            current = upcoming
            current.result()
            with self._compute:
                if i + 1 < len(tasks):
                    upcoming = self._prefetch.submit(prefetch_inputs, tasks[i + 1])
                receipts.append(engine_task.run_task(task, self.staging_dir, self.device))
        return UnitResult(tuple(receipts), _node_id(), os.getpid())
