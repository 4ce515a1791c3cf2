"""Running tasks in the driver while the embedded Ray starts.

An embedded Ray takes seconds to start (GCS, raylet, agents, workers importing torch). Until it
is ready, the driver runs tasks itself on a thread pool, by the local executor's rules: largest
first, as many at once as the node will have slots, with the torch thread count the Ray units
get (so Gram and spectral results are bit-identical whichever side ran a task), and admitted by
declared memory against the node's budget. When the cluster is ready the driver stops taking
tasks and hands the rest to Ray; the tasks it is still running hold their slot and declared
memory on the node in the Ray scheduler until they finish (``UnitScheduler``'s ``driver``), so
the budget holds for the sum of both.

Each task runs and is reported exactly once: a task the driver started is finished and reported
here, and is not among those handed over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch

from raymerge.cluster.progress import DRIVER_ROW, ClusterProgress
from raymerge.engine.executor import Admission, wants_accelerator
from raymerge.engine.local import StopOnFailure, longest_first, pool_depth
from raymerge.engine.plan import TensorTask
from raymerge.engine.task import Receipt, run_task

# How often the driver looks whether the cluster is ready while its tasks run.
POLL_S = 0.05


def runs_in_process(task: TensorTask, device: str) -> bool:
    """Whether the driver may run ``task`` while the cluster starts: anything that computes on
    the CPU here (the GPU belongs to the cluster's actors, whose device budget it would share)."""
    return not (device != "cpu" and torch.cuda.is_available() and wants_accelerator(task, device))


class DriverPool:
    """Tasks run on ``workers`` threads of the driver; ``on_done`` is called in the caller's
    thread (from ``poll``) once per finished task, and the first error is kept in ``error``."""

    def __init__(
        self,
        staging_dir: str,
        *,
        workers: int,
        threads: int,
        device: str,
        on_done: Callable[[TensorTask, Receipt], None],
        progress: ClusterProgress,
    ) -> None:
        self.staging_dir, self.workers, self.device = staging_dir, workers, device
        self.on_done, self.progress = on_done, progress
        self.running: dict[Future[Receipt | None], TensorTask] = {}
        self._stop = StopOnFailure()  # a task queued behind a failure is skipped, not started
        self.error: BaseException | None = None
        self._prev_threads = torch.get_num_threads()  # some torch builds set the count process-wide
        self._pool = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="raymerge-driver",
            initializer=torch.set_num_threads,
            initargs=(threads,),
        )

    @property
    def running_bytes(self) -> int:
        return sum(t.est_host_bytes for t in self.running.values())

    def submit(self, task: TensorTask) -> None:
        # run_task looked up here, at submit time (tests replace it in this module)
        self.running[self._pool.submit(self._stop.run, task, self.staging_dir, self.device, run_task)] = task

    def poll(self, timeout: float | None = 0) -> list[TensorTask]:
        """Report the tasks finished within ``timeout`` seconds (None: wait for one); return them."""
        if not self.running:
            return []
        done, _ = wait(self.running, timeout=timeout, return_when=FIRST_COMPLETED)
        finished = []
        for fut in done:
            task = self.running.pop(fut)
            finished.append(task)
            try:
                receipt = fut.result()
            except BaseException as exc:  # noqa: BLE001 - raised by the caller after the others finish
                self.error = self.error or exc
                continue
            if receipt is None:  # skipped after another task failed: not run, so not reported
                continue
            self.on_done(task, receipt)
            self.progress.unit_done(DRIVER_ROW, "driver", [receipt], task.read_bytes + task.write_bytes)
        return finished

    def close(self) -> None:
        """Wait for (and report) the running tasks, and give the driver its thread count back."""
        with contextlib.ExitStack() as stack:
            stack.callback(torch.set_num_threads, self._prev_threads)
            stack.callback(self._pool.shutdown)
            while self.running:
                self.poll(None)


def run_until_ready(
    pool: DriverPool, tasks: Sequence[TensorTask], *, ready: Callable[[], bool], budget: int
) -> list[TensorTask]:
    """Run ``tasks`` (largest first) on ``pool`` until ``ready()`` or an error; return those not
    started, in their given order. Tasks still running are left in ``pool.running``."""
    queue = [t for t in longest_first(tasks) if runs_in_process(t, pool.device)]
    started: set[str] = set()
    gate = Admission(budget)
    gate.take(pool.running_bytes)
    i = 0
    while i < len(queue) and pool.error is None and not ready():
        task = queue[i]
        # Queued beyond the running ones as the local executor does, so a worker never waits
        # for this thread to hand it its next task.
        if len(pool.running) < pool_depth(pool.workers) and gate.fits(task.est_host_bytes):
            gate.take(task.est_host_bytes)
            pool.submit(task)
            started.add(task.id)
            i += 1
            continue
        for t in pool.poll(POLL_S):
            gate.give(t.est_host_bytes)
        pool.progress.report()
    return [t for t in tasks if t.id not in started]
