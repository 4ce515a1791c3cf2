"""``LocalExecutor``: a thread pool in this process that admits tasks by declared memory, not by count.

Torch kernels and mmap page faults release the GIL, so threads overlap I/O and compute. A task is
admitted by the executors' one rule (``executor.Admission``), applied twice: while the declared
peak host bytes of running tasks plus its own stay under the memory budget, and their declared
device bytes under the accelerator's memory.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch

from raymerge.engine.executor import Admission, ExecutionReport, OnDone, default_workers
from raymerge.engine.plan import TensorTask
from raymerge.engine.storage import READ_STATS
from raymerge.engine.task import Receipt, run_task

Runner = Callable[[TensorTask, str, str], Receipt]

# Tasks queued in the pool beyond those running, per worker. A worker that finishes a task takes
# the next from the pool's queue at once; with nothing queued it waits for the main thread to wake,
# take the GIL (up to the 5 ms switch interval while another worker runs Python) and submit: on
# 2 cores that was a quarter of the pool's time over a 1B task-arithmetic merge (863 short tasks).
# Queued tasks are admitted (their declared memory counted) when queued.
QUEUED_PER_WORKER = 1


def pool_depth(workers: int) -> int:
    """Tasks a pool of ``workers`` threads holds at once: running, and queued behind them."""
    return workers * (1 + QUEUED_PER_WORKER)


class StopOnFailure:
    """Runs tasks on pool threads until one fails; a task that a pool thread takes from the queue
    after that is skipped (``run`` returns None) rather than started. The failing thread itself
    says so, at once: a queued task must not start in the time the submitting thread takes to
    notice the failure, or queueing ahead would run work after an error that the executors
    promise not to start."""

    def __init__(self) -> None:
        self.failed = threading.Event()

    def run(self, task: TensorTask, staging_dir: str, device: str, runner: Runner) -> Receipt | None:
        """``runner(task, staging_dir, device)``, or None without running it after a failure."""
        if self.failed.is_set():
            return None
        try:
            return runner(task, staging_dir, device)
        except BaseException:
            self.failed.set()
            raise


def longest_first(tasks: Sequence[TensorTask]) -> list[TensorTask]:
    """``tasks`` by bytes moved, largest first (plan order among equals).

    Plan order puts the LM head, often the largest task, last: the other workers then idle while
    it runs alone. Starting the longest tasks first leaves short ones for the end, so the pool
    stays busy until the last task. Each task writes its own bytes at fixed offsets, so the order
    changes nothing in the output.
    """
    return sorted(tasks, key=lambda t: -(t.read_bytes + t.write_bytes))


class LocalExecutor:
    """Runs tasks on ``workers`` threads of this process (see ``executor.Executor``)."""

    name = "local"

    def __init__(self, workers: int | None = None, threads: int | None = None) -> None:
        self.workers = workers or default_workers()
        # Torch intra-op threads per task. Reductions split by thread count, so Gram and spectral
        # results depend on it: a resume runs with the count its run started with (``merge``).
        self.threads = threads

    def task_threads(self) -> int:
        """Torch threads each task computes with: ``threads``, else the cores split between workers."""
        return self.threads or max(1, (os.cpu_count() or 1) // max(1, self.workers))

    def run(
        self,
        tasks: Sequence[TensorTask],
        staging_dir: str,
        *,
        budget: int,
        device: str,
        on_done: OnDone,
        device_budget: int | None = None,
    ) -> ExecutionReport:
        """Run ``tasks`` on the pool under ``budget`` (host) and ``device_budget`` (this process's
        one accelerator); the first failure cancels what has not started."""
        read0 = READ_STATS.bytes_read
        workers = self.workers
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            device0 = torch.cuda.memory_allocated()
        gate = Admission(budget)
        # Without a known device budget every task fits it (a budget as large as any task's figure).
        device_gate = Admission(device_budget if device_budget is not None else 1 << 62)
        lock = threading.Lock()
        # Split the cores between workers so concurrent tasks do not oversubscribe the CPU. The thread
        # count is per thread in torch, so it is set in each pool thread (and it fixes reduction
        # order, which keeps BLAS-heavy methods bit-identical to the Ray executor's slots).
        threads = self.task_threads()
        errors: list[BaseException] = []
        stop = StopOnFailure()

        def job(task: TensorTask) -> tuple[TensorTask, Receipt | None]:
            try:
                return task, stop.run(task, staging_dir, device, run_task)  # looked up now: tests replace it
            finally:
                with lock:
                    gate.give(task.est_host_bytes)
                    device_gate.give(task.est_device_bytes)

        # Some torch builds apply set_num_threads process-wide: give a library caller its count back.
        prev_threads = torch.get_num_threads()
        with (
            contextlib.ExitStack() as restore,
            ThreadPoolExecutor(
                max_workers=workers,
                thread_name_prefix="raymerge",
                initializer=torch.set_num_threads,
                initargs=(threads,),
            ) as pool,
        ):
            restore.callback(torch.set_num_threads, prev_threads)
            running: set[Future[tuple[TensorTask, Receipt | None]]] = set()

            def drain() -> None:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    running.discard(fut)
                    try:
                        task, receipt = fut.result()
                    except BaseException as exc:  # noqa: BLE001 - re-raised below
                        errors.append(exc)
                        continue
                    if receipt is not None:  # None: skipped after another task failed
                        on_done(task, receipt)

            in_flight = pool_depth(workers)
            for task in longest_first(tasks):
                # Wait for room in the pool (running + queued) and for memory without holding a slot.
                while not errors and (
                    len(running) >= in_flight
                    or not gate.fits(task.est_host_bytes)
                    or not device_gate.fits(task.est_device_bytes)
                ):
                    drain()
                if errors:
                    break
                with lock:
                    gate.take(task.est_host_bytes)
                    device_gate.take(task.est_device_bytes)
                running.add(pool.submit(job, task))
            while running:
                drain()
        if errors:
            raise errors[0]
        # The caching allocator's high-water mark over the run: what tasks held at once on the device.
        peak = torch.cuda.max_memory_allocated() - device0 if cuda else None
        return ExecutionReport(bytes_read=READ_STATS.bytes_read - read0, peak_device_bytes=peak)


__all__ = ["LocalExecutor", "StopOnFailure", "longest_first", "pool_depth"]
