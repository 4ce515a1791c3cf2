"""The in-process executor: a thread pool that admits tasks by declared memory, not by count.

Torch kernels and mmap page faults release the GIL, so threads overlap I/O and compute. A task is
admitted only while the declared peak bytes of running tasks plus its own stay under the budget
(a task alone always runs: ``check_budget`` has already refused any task larger than the budget).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import psutil
import torch

from raymerge.engine.plan import TensorTask
from raymerge.engine.task import Receipt, run_task


def default_memory_budget() -> int:
    """Half of the currently available RAM, at least 512 MiB: leaves room for the page cache."""
    return max(512 << 20, int(psutil.virtual_memory().available * 0.5))


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class MemoryGate:
    """Counts declared bytes of running tasks; ``acquire`` blocks until a task fits the budget."""

    budget: int
    in_use: int = 0

    def __post_init__(self) -> None:
        self._cv = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cv:
            while self.in_use > 0 and self.in_use + nbytes > self.budget:
                self._cv.wait()
            self.in_use += nbytes

    def release(self, nbytes: int) -> None:
        with self._cv:
            self.in_use -= nbytes
            self._cv.notify_all()


def run_local(
    tasks: Sequence[TensorTask],
    staging_dir: str,
    *,
    budget: int,
    workers: int,
    device: str,
    on_done: Callable[[TensorTask, Receipt], None],
) -> None:
    """Run ``tasks`` on a thread pool under the memory budget; call ``on_done`` per receipt.

    The first failure cancels what has not started and is re-raised after running tasks finish,
    so the journal stays consistent for a resume.
    """
    gate = MemoryGate(budget)
    # Split the cores between workers so concurrent tasks do not oversubscribe the CPU. The thread
    # count is per thread in torch, so it is set in each pool thread (and it fixes reduction
    # order, which keeps BLAS-heavy methods bit-identical to the Ray executor's slots).
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    errors: list[BaseException] = []

    def job(task: TensorTask) -> tuple[TensorTask, Receipt]:
        try:
            return task, run_task(task, staging_dir, device)
        finally:
            gate.release(task.est_host_bytes)

    # Some torch builds apply set_num_threads process-wide: give a library caller its count back.
    prev_threads = torch.get_num_threads()
    with contextlib.ExitStack() as restore, ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="raymerge", initializer=torch.set_num_threads, initargs=(threads,)
    ) as pool:
        restore.callback(torch.set_num_threads, prev_threads)
        running: set[Future[tuple[TensorTask, Receipt]]] = set()

        def drain(block: bool) -> None:
            done, _ = wait(running, timeout=None if block else 0, return_when=FIRST_COMPLETED)
            for fut in done:
                running.discard(fut)
                try:
                    task, receipt = fut.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)
                    continue
                on_done(task, receipt)

        for task in tasks:
            if errors:
                break
            while len(running) >= workers:
                drain(block=True)
            # Wait for memory without holding a pool slot; poll completions meanwhile.
            while gate.in_use > 0 and gate.in_use + task.est_host_bytes > gate.budget:
                drain(block=True)
                if errors:
                    break
            if errors:
                break
            gate.acquire(task.est_host_bytes)
            running.add(pool.submit(job, task))
        while running:
            drain(block=True)
    if errors:
        raise errors[0]


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far, in bytes.

    Linux's ``ru_maxrss`` survives fork + exec, so a merge started from a large parent (a
    notebook, a benchmark harness) would report the parent's peak; ``VmHWM`` belongs to this
    process's own address space. ``ru_maxrss`` is the fallback where /proc is missing.
    """
    import re
    import resource

    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
