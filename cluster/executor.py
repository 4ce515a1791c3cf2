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
import uuid
from collections.abc import Sequence

from raymerge.cluster.connect import RayConnection
from raymerge.cluster.nodes import discover_nodes
from raymerge.cluster.progress import ClusterProgress
from raymerge.cluster.scheduler import UnitScheduler
from raymerge.cluster.units import group_tasks
from raymerge.engine.executor import ExecutionReport, OnDone, default_workers
from raymerge.engine.plan import TensorTask
from raymerge.engine.storage import is_local, local_path

log = logging.getLogger(__name__)

MIN_UNIT_BYTES = 64 << 20
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


class RayExecutor:
    """Runs tasks on a Ray cluster (see ``raymerge.engine.executor.Executor``).

    ``address`` is ``auto`` or ``HOST:PORT`` of a running cluster; without it an embedded Ray is
    started on this machine for the run and stopped afterwards. ``workers`` caps concurrent units
    per node; the budget given to ``run`` bounds the declared peak host memory of the units
    running on each node. Units whose worker or node dies are run again (safe: tasks write the
    same bytes at fixed offsets).
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None) -> None:
        self.workers = workers or default_workers()
        self.address = address

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
            return ExecutionReport(bytes_read=0)
        staging_dir = os.path.abspath(staging_dir)
        originals = {t.id: t for t in tasks}
        runnable = [absolute_inputs(t) for t in tasks]
        with RayConnection(self.address) as conn:
            if conn.dashboard_url:
                print(f"raymerge: Ray dashboard at {conn.dashboard_url}", file=sys.stderr, flush=True)
            files = {local_path(r.url) for t in runnable for r in t.inputs if is_local(r.url)}
            nodes = discover_nodes(staging_dir, files, self.workers, budget)
            slots = sum(n.slots for n in nodes)
            units = group_tasks(runnable, device, unit_bytes_target(sum(t.read_bytes for t in runnable), slots))
            log.info(
                "Ray: %d tasks in %d units on %d node(s), %d slot(s), budget %.2f GiB per node",
                len(runnable),
                len(units),
                len(nodes),
                slots,
                budget / 2**30,
            )
            progress = ClusterProgress(len(runnable), sum(t.read_bytes + t.write_bytes for t in runnable))
            scheduler = UnitScheduler(
                nodes,
                budget=budget,
                staging_dir=staging_dir,
                device=device,
                run_id=uuid.uuid4().hex,
                on_done=on_done,
                progress=progress,
                device_budget=device_budget,
                originals=originals,
            )
            try:
                scheduler.run(units)
            finally:
                progress.report(force=True)
                print(progress.table(), file=sys.stderr, flush=True)
        return ExecutionReport(bytes_read=scheduler.bytes_read)


__all__ = ["RayExecutor"]
