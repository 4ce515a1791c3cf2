"""``RayExecutor``: the engine's ``Executor`` interface on a Ray cluster.

It runs the same ``run_task`` on the same plan, so the output is bit-identical to the local
executor's; tensors never pass through the driver or Ray's object store (workers read their
inputs and ``pwrite`` their outputs themselves), only task specs and receipts do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence

import ray

from raymerge.cluster.connect import EmbeddedHead, RayConnection
from raymerge.cluster.inprocess import DriverPool, run_until_ready
from raymerge.cluster.mapreduce import MODES, split_for_nodes
from raymerge.cluster.nodes import alive_nodes, discover_nodes
from raymerge.cluster.progress import DRIVER_ROW, ClusterProgress
from raymerge.cluster.scheduler import UnitScheduler
from raymerge.cluster.units import group_tasks, local_files
from raymerge.cluster.workers import warm_worker
from raymerge.engine.executor import ExecutionReport, OnDone, default_workers
from raymerge.engine.plan import TensorTask
from raymerge.engine.storage import READ_STATS, is_local
from raymerge.engine.task import Receipt

log = logging.getLogger(__name__)

MIN_UNIT_BYTES = 64 << 20
# The embedded cluster takes over from the driver only if the driver has more than this many
# seconds of work left (at the rate of its finished tasks) when the cluster is ready: on one
# node Ray's workers are no faster than the driver's threads (on the 2-core benchmark machine
# they were slower per GB), and the hand-over costs seconds of its own.
HANDOFF_MIN_S = 30.0
# What starting the embedded cluster takes before it takes drivers (4.2-5.4 s measured on this
# 2-core box): the driver starts it only with at least this much more work left than the hand-over.
HEAD_START_S = 5.0
MAX_UNIT_BYTES = 2 << 30


def absolute_inputs(task: TensorTask) -> TensorTask:
    """``task`` with relative local input paths made absolute (workers do not share the driver's cwd)."""
    if all(not is_local(r.url) or r.url.startswith("file://") or os.path.isabs(r.url) for r in task.inputs):
        return task
    inputs = tuple(
        dataclasses.replace(r, url=os.path.abspath(r.url))
        if is_local(r.url) and not r.url.startswith("file://") and not os.path.isabs(r.url)
        else r
        for r in task.inputs
    )
    return dataclasses.replace(task, inputs=inputs)


def unit_bytes_target(total_read: int, total_slots: int) -> int:
    """Bytes a unit may read: about four units per slot, within [64 MiB, 2 GiB].

    Small enough that a model with few blocks still keeps every slot busy, large enough that
    Ray's per-task overhead stays negligible.
    """
    return max(MIN_UNIT_BYTES, min(MAX_UNIT_BYTES, total_read // max(1, 4 * total_slots)))


def uniform_threads(resources: Sequence[dict[str, float]], workers: int) -> int:
    """One torch thread count for every unit: the fewest cores a slot gets on any node with a CPU."""
    counts = [max(1, int(r["CPU"]) // max(1, min(workers, int(r["CPU"])))) for r in resources if r.get("CPU", 0) >= 1]
    return min(counts, default=1)


class RayExecutor:
    """Runs tasks on a Ray cluster (see ``raymerge.engine.executor.Executor``).

    ``address`` is ``auto`` or ``HOST:PORT`` of a running cluster; without it an embedded Ray is
    started on this machine for the run and stopped afterwards. ``workers`` caps concurrent units
    per node; the budget given to ``run`` bounds the declared peak host memory of the units
    running on each node. Units whose worker or node dies are run again (safe: tasks write the
    same bytes at fixed offsets).

    Every unit computes with the same torch thread count on every node (``threads``, else
    ``task_threads()`` picks the fewest cores a slot gets on any alive node): reductions round by
    thread count, so a Gram or spectral result must not depend on which node ran it. The merge
    records the count in the staging area and a resume sets ``threads`` back to it, whatever the
    cluster looks like then (results are bit-identical across nodes of the same CPU type).
    """

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        threads: int | None = None,
        map_reduce: str = "auto",
        in_process: bool = True,
        eager: bool = False,
    ) -> None:
        if map_reduce not in MODES:
            raise ValueError(f"map_reduce must be one of {MODES}, got {map_reduce!r}")
        self.workers = workers or default_workers()
        self.address = address
        self.threads = threads
        self.map_reduce = map_reduce
        # Run tasks in the driver until the embedded cluster is up (inprocess.py).
        self.in_process = in_process
        self._conn: RayConnection | None = None
        # The embedded cluster runs in a helper process (started below or by ``_cluster_ready``);
        # none when this process is already connected to Ray (a notebook, a job), which is used.
        self.head_cpus = os.cpu_count() or 1
        self._head: EmbeddedHead | None = None
        self._warming: list[ray.ObjectRef] | None = None  # the warm-up tasks of the embedded workers
        # On its one node Ray runs no faster than the driver: hand over only work that outlasts
        # the hand-off (workers loading torch, per-unit scheduling).
        self.handoff_min_s = HANDOFF_MIN_S
        self._progress: ClusterProgress | None = None
        # Seconds from this executor's creation until the embedded head took drivers and until its
        # workers were warm (None: not, or not before the driver had run every task).
        self.created = time.monotonic()
        self.head_ready_s: float | None = None
        self.workers_warm_s: float | None = None
        # An embedded cluster (no address, no Ray session in this process) starts only once the
        # driver's own rate says it will outlast the cluster's start-up and the hand-over: on one
        # node a running cluster's CPU (~7 CPU-s over a 1B merge on 2 cores) came straight out of
        # merges the driver finished alone. ``eager`` starts it now instead, while raymerge plans.
        self.embedded = address is None and not ray.is_initialized()
        self.head_start_s = HEAD_START_S
        if self.embedded and (eager or not in_process):
            self._start_head()

    def _start_head(self) -> None:
        """Start the embedded cluster's helper process (once)."""
        if self._head is None:
            self._head = EmbeddedHead.start(self.head_cpus)

    def _connect(self) -> RayConnection:
        """The Ray session of this merge, opened on first use and kept until ``close``."""
        if self._conn is None:
            conn = RayConnection(self.address, self._head)
            conn.__enter__()
            self._conn = conn
            if conn.dashboard_url:
                print(f"raymerge: Ray dashboard at {conn.dashboard_url}", file=sys.stderr, flush=True)
        return self._conn

    def close(self) -> None:
        """Leave the Ray session and stop the embedded cluster; ``run`` does it when it returns."""
        conn, self._conn = self._conn, None
        head, self._head = self._head, None
        self._warming = None
        try:
            if conn is not None:
                conn.__exit__(None, None, None)
        finally:
            if head is not None:
                head.stop()

    def task_threads(self) -> int:
        """Torch threads per unit on every node: ``threads``, else the fewest any node's slot gets
        (the embedded cluster's one node is known without waiting for it to start)."""
        if self.threads is None:
            if self.embedded and self._conn is None:
                self.threads = uniform_threads([{"CPU": float(self.head_cpus)}], self.workers)
            else:
                self._connect()
                self.threads = uniform_threads([n.get("Resources", {}) for n in alive_nodes().values()], self.workers)
        return self.threads

    def _cluster_ready(self) -> bool:
        """Whether the driver should hand its remaining tasks to Ray now: once the embedded head
        takes drivers, the driver connects and starts one worker per slot (loading torch there
        takes seconds), and keeps running tasks itself until those workers are warm."""
        if not self.embedded:
            return True
        if self._head is None:
            left = self._driver_left_s()
            if left is None or left < self.handoff_min_s + self.head_start_s:
                return False  # no rate yet, or the driver is done before a cluster would pay
            self._start_head()
        assert self._head is not None
        if not self._head.ready():
            return False
        if self.head_ready_s is None:
            self.head_ready_s = time.monotonic() - self.created
        if self._warming is None:
            left = self._driver_left_s()
            if left is None or left < self.handoff_min_s:
                return False  # no rate yet, or the driver is done sooner than a hand-over would pay
            self._connect()  # raises if the head failed to start
            slots = max(1, min(self.workers, self.head_cpus))
            warm = ray.remote(warm_worker).options(num_cpus=self.head_cpus // slots, max_retries=0)
            self._warming = [warm.remote() for _ in range(slots)]
        ready, _ = ray.wait(self._warming, num_returns=len(self._warming), timeout=0)
        if len(ready) < len(self._warming):
            return False
        self.workers_warm_s = time.monotonic() - self.created
        return True

    def _driver_left_s(self) -> float | None:
        """Seconds the driver would need for the rest at the rate of its finished tasks (bytes per
        second of task time, times its slots); None before a task is done."""
        p = self._progress
        tally = p.nodes.get(DRIVER_ROW) if p is not None else None
        if p is None or tally is None or p.io_done <= 0:
            return None
        rate = p.io_done / max(1e-9, tally.busy_s) * max(1, min(self.workers, self.head_cpus))
        return (p.total_bytes - p.io_done) / rate

    def _startup_note(self) -> str:
        """How long the embedded cluster took to start, for the summary table ("" without one)."""
        if not self.embedded:
            return ""
        if self._head is None:
            return f"embedded Ray not used: under {self.handoff_min_s + self.head_start_s:.0f} s of the driver's work was left"
        if self.head_ready_s is None:
            return "embedded Ray not ready before the driver had run every task"
        warm = f", workers warm after {self.workers_warm_s:.1f} s" if self.workers_warm_s is not None else ""
        if self._warming is None:
            warm = f", not used: under {self.handoff_min_s:.0f} s of the driver's work was left"
        return f"embedded Ray ready after {self.head_ready_s:.1f} s{warm}"

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
        """Run ``tasks``; ``on_done(task, receipt)`` is called in this thread per finished task."""
        if not tasks:
            self.close()
            return ExecutionReport(bytes_read=0)
        staging_dir = os.path.abspath(staging_dir)
        originals = {t.id: t for t in tasks}
        runnable = [absolute_inputs(t) for t in tasks]
        threads = self.task_threads()
        progress = ClusterProgress(len(runnable), sum(t.read_bytes + t.write_bytes for t in runnable))
        self._progress = progress

        def report(task: TensorTask, receipt: Receipt) -> None:
            if task.action != "partial":  # a map's statistics are not output: its reduce reports
                on_done(originals.get(task.id, task), receipt)

        try:
            return self._run(runnable, staging_dir, threads, progress, report, budget, device, device_budget)
        finally:
            self.close()

    def _run(
        self,
        runnable: list[TensorTask],
        staging_dir: str,
        threads: int,
        progress: ClusterProgress,
        report: OnDone,
        budget: int,
        device: str,
        device_budget: int | None,
    ) -> ExecutionReport:
        bytes_read = 0
        driver: DriverPool | None = None
        read0 = READ_STATS.bytes_read  # what the driver's own tasks read
        try:
            if self.embedded and self.in_process and self.map_reduce != "always":
                slots = max(1, min(self.workers, self.head_cpus))
                driver = DriverPool(
                    staging_dir, workers=slots, threads=threads, device=device, on_done=report, progress=progress
                )
                runnable = run_until_ready(driver, runnable, ready=self._cluster_ready, budget=budget)
                if not runnable or driver.error is not None:
                    driver.close()
                    if driver.error is not None:
                        raise driver.error
                    return ExecutionReport(bytes_read=READ_STATS.bytes_read - read0)
            if self.embedded:
                self._start_head()  # not started yet when the driver pool was skipped
            self._connect()
            files = local_files(r for t in runnable for r in t.inputs)
            nodes = discover_nodes(staging_dir, files, self.workers, budget)
            slots = sum(n.slots for n in nodes)
            target = unit_bytes_target(sum(t.read_bytes for t in runnable), slots)
            cut = split_for_nodes(runnable, nodes, staging_dir, self.map_reduce)
            phases = [group_tasks(cut.whole, device, target)]
            for maps in cut.maps_by_group.values():  # a group's maps read the same experts
                phases[0] += group_tasks(maps, device, target)
            if cut.reduces:
                phases.append(group_tasks(cut.reduces, device, target))
                log.warning(
                    "Ray: %d tensor(s) merged as a map-reduce over experts (no node reads all of their experts%s)",
                    cut.cut,
                    "" if self.map_reduce == "auto" else ", or asked with --map-reduce always",
                )
            log.info(
                "Ray: %d tasks in %d units on %d node(s), %d slot(s) of %d thread(s), budget %.2f GiB per node",
                len(runnable),
                sum(len(u) for u in phases),
                len(nodes),
                slots,
                threads,
                budget / 2**30,
            )
            # Counted as run: a map-reduce's maps and reduces in place of the tasks they were cut from.
            progress.total_tasks += sum(len(u.tasks) for units in phases for u in units) - len(runnable)
            # Largest units first (as the local executor orders tasks), so the LM head does not run
            # alone at the end; a phase's units are independent, so the order changes no byte.
            phases = [sorted(units, key=lambda u: -(u.read_bytes + u.write_bytes)) for units in phases]
            for units in phases:
                scheduler = UnitScheduler(
                    nodes,
                    budget=budget,
                    staging_dir=staging_dir,
                    device=device,
                    run_id=uuid.uuid4().hex,
                    on_done=report,
                    progress=progress,
                    device_budget=device_budget,
                    originals={},  # ``report`` maps tasks back to the plan's
                    threads=threads,
                    driver=driver,
                )
                try:
                    scheduler.run(units)
                finally:
                    bytes_read += scheduler.bytes_read
        finally:
            if driver is not None:  # reports what the driver still runs if the Ray phase stopped early
                driver.close()
            progress.report(force=True)
            print(progress.table(self._startup_note()), file=sys.stderr, flush=True)
        return ExecutionReport(bytes_read=bytes_read + READ_STATS.bytes_read - read0)


__all__ = ["RayExecutor", "uniform_threads"]
