"""Work units: the plan's tensor tasks grouped into the pieces the Ray scheduler places on nodes.

A unit is one transformer block's tasks (or a byte-bounded part of one), or a single task for
tensors outside the blocks (embeddings, final norm, LM head). Grouping by block keeps the number
of Ray tasks and driver round trips small and keeps the reads of one unit inside the same input
shards. A unit runs its tasks one after another in one worker, so its peak memory is that of its
largest task, not their sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from raymerge.engine.arch import layer_index
from raymerge.engine.executor import wants_accelerator
from raymerge.engine.plan import TensorRef, TensorTask
from raymerge.engine.storage import is_local, local_path


def local_files(refs: Iterable[TensorRef]) -> frozenset[str]:
    """The local file paths among ``refs`` (the files a node must see; URLs every node reads)."""
    return frozenset(local_path(r.url) for r in refs if is_local(r.url))


@dataclass(frozen=True)
class WorkUnit:
    """Tasks run back to back by one worker; sizes in bytes.

    ``est_host_bytes`` / ``est_device_bytes`` are the declared peak host and device memory (the
    largest task's, since tasks run one at a time); ``input_files`` are the local input shard paths, which a node must see to run it.
    """

    id: str
    tasks: tuple[TensorTask, ...]
    accelerator: bool
    est_host_bytes: int
    est_device_bytes: int
    read_bytes: int
    write_bytes: int
    input_files: frozenset[str]

    @classmethod
    def of(cls, tasks: Sequence[TensorTask], accelerator: bool) -> WorkUnit:
        first, last = tasks[0].id, tasks[-1].id
        return cls(
            id=first if len(tasks) == 1 else f"{first}..{last} ({len(tasks)} tasks)",
            tasks=tuple(tasks),
            accelerator=accelerator,
            est_host_bytes=max(t.est_host_bytes for t in tasks),
            est_device_bytes=max(t.est_device_bytes for t in tasks),
            read_bytes=sum(t.read_bytes for t in tasks),
            write_bytes=sum(t.write_bytes for t in tasks),
            input_files=local_files(r for t in tasks for r in t.inputs),
        )


def group_tasks(tasks: Sequence[TensorTask], device: str, max_unit_bytes: int) -> list[WorkUnit]:
    """Group ``tasks`` (in plan order) into work units.

    Tasks of one transformer block that go to the same pool (CPU or accelerator) share a unit
    until the unit would read more than ``max_unit_bytes``; tasks outside the blocks are units
    of their own. Units keep the plan's order of their first task.
    """
    # ``order`` holds finished units and, for blocks still being filled, the index of their slot.
    order: list[WorkUnit | None] = []
    open_units: dict[tuple[int, bool], tuple[int, list[TensorTask]]] = {}

    def close(key: tuple[int, bool]) -> None:
        slot, group = open_units.pop(key)
        order[slot] = WorkUnit.of(group, key[1])

    for task in tasks:
        accel = wants_accelerator(task, device)
        block = layer_index(task.tensor)
        if block is None:
            order.append(WorkUnit.of([task], accel))
            continue
        key = (block, accel)
        if key in open_units and sum(t.read_bytes for t in open_units[key][1]) + task.read_bytes > max_unit_bytes:
            close(key)
        if key not in open_units:
            open_units[key] = (len(order), [])
            order.append(None)
        open_units[key][1].append(task)
    for key in list(open_units):
        close(key)
    return [u for u in order if u is not None]
