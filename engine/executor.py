"""The executor interface: what any executor of a plan's tasks promises, and the two rules they share.

``merge()`` hands an ``Executor`` the tasks still to run and a callback per receipt; it never
knows whether they run on a thread pool in this process (``raymerge.engine.local``) or on a Ray
cluster (``raymerge.cluster``). Every executor admits work by the same rule (``Admission``:
declared peak bytes of what runs plus the newcomer stay under the budget, or the newcomer runs
alone) and places it by the same device rule (``wants_accelerator``), so the choice of executor
never changes what is computed where, only how many run at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import psutil
import torch

from raymerge.engine.methods import get_method
from raymerge.engine.plan import Placement, TensorTask

if TYPE_CHECKING:  # task.py imports the device rule from here
    from raymerge.engine.task import Receipt

OnDone = Callable[[TensorTask, "Receipt"], None]


@dataclass(frozen=True)
class ExecutionReport:
    """What an executor measured while running tasks: bytes its workers fetched from the inputs,
    and the peak of the accelerator memory its tasks allocated (None where it did not measure one)."""

    bytes_read: int
    peak_device_bytes: int | None = None


class Executor(Protocol):
    """Runs tensor tasks under a memory budget and reports each receipt as it arrives.

    ``name`` and ``workers`` (concurrent tasks per node) are recorded in the run's figures.
    ``run`` calls ``on_done(task, receipt)`` in the caller's thread once per finished task; the
    first task error is re-raised after the tasks already running have finished (their receipts
    still arrive), so the journal stays consistent for a resume. ``budget`` bounds the declared
    peak host bytes of running tasks per node, ``device_budget`` (when known) their declared
    device bytes per accelerator; ``device`` is ``auto``, ``cpu`` or ``cuda``.
    """

    name: str
    workers: int

    def run(
        self,
        tasks: Sequence[TensorTask],
        staging_dir: str,
        *,
        budget: int,
        device: str,
        on_done: OnDone,
        device_budget: int | None = None,
    ) -> ExecutionReport: ...


@dataclass
class Admission:
    """Declared bytes of the work running in one place (a process, a node) against its budget.

    The one admission rule of every executor: work fits while the bytes in use plus its own stay
    under the budget; work always fits when nothing is in use, so a task larger than the budget
    (which ``plan.check_budget`` refuses up front) can never wait forever.
    """

    budget: int
    in_use: int = 0

    def fits(self, nbytes: int) -> bool:
        return self.in_use == 0 or nbytes == 0 or self.in_use + nbytes <= self.budget

    def take(self, nbytes: int) -> None:
        self.in_use += nbytes

    def give(self, nbytes: int) -> None:
        self.in_use -= nbytes


def wants_accelerator(task: TensorTask, device: str) -> bool:
    """The one device rule (``MethodSpec.runs_on_accelerator``): whether ``task`` computes on an
    accelerator under the run's ``device``. Copies never do; a map-reduce's maps go where their merge would."""
    if task.action not in ("merge", "partial") or device == "cpu":
        return False
    return get_method(task.method).runs_on_accelerator(device)


def placement_for(device: str, device_memory: int | None = None) -> Placement:
    """Where a run on this machine computes, for planning: ``auto`` is ``cpu`` without CUDA here
    (unless ``device_memory`` says the plan is for a machine with an accelerator); the device
    memory defaults to the first CUDA device's."""
    if device == "cpu":
        return Placement("cpu")
    if device_memory is None and torch.cuda.is_available():
        device_memory = int(torch.cuda.get_device_properties(0).total_memory)
    if device == "auto" and device_memory is None:
        return Placement("cpu")
    return Placement(device, device_memory)


def task_device(task: TensorTask, device: str) -> torch.device:
    """The torch device ``task`` computes on in this process (``auto`` falls back to CPU without CUDA)."""
    if device != "auto":
        return torch.device(device)
    return torch.device("cuda" if wants_accelerator(task, device) and torch.cuda.is_available() else "cpu")


def default_memory_budget() -> int:
    """Half of the currently available RAM, at least 512 MiB: leaves room for the page cache."""
    return max(512 << 20, int(psutil.virtual_memory().available * 0.5))


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


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


__all__ = [
    "Admission",
    "ExecutionReport",
    "Executor",
    "OnDone",
    "default_memory_budget",
    "default_workers",
    "peak_rss_bytes",
    "placement_for",
    "task_device",
    "wants_accelerator",
]
