"""Declared peak memory of a task (host and accelerator), and the budget check that refuses what
cannot fit.

Each method's memory model lives with the method (``MethodSpec.footprint``: its own ``memory``
model, or the generic one built from ``work_buffers`` and ``extra_bytes``). Here the planner
decides where a task computes (``Placement``), asks the model for both figures, and gives up device
residency, then fp64 solves, then fp64 statistics where a task would not fit the accelerator
(``precision: auto`` only; ``task_footprint``).
Executors admit tasks by these figures (``executor.Admission``); ``check_budget`` refuses a plan
whose largest task cannot fit either budget, naming the tensor and both sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raymerge.engine.errors import PlanError
from raymerge.engine.methods import Footprint, MethodSpec, WorkShape
from raymerge.engine.plan.types import MergePlan


@dataclass(frozen=True)
class Placement:
    """Where the run computes: ``device`` is the run's setting (``cpu``, ``cuda`` or ``auto``,
    already resolved against the machine the plan is for: ``auto`` without an accelerator there
    is ``cpu``); ``device_memory`` is the memory of one accelerator in bytes, if known."""

    device: str = "cpu"
    device_memory: int | None = None

    def accelerated(self, spec: MethodSpec) -> bool:
        return self.device != "cpu" and spec.runs_on_accelerator(self.device)


def stats_item(shared: dict[str, Any]) -> int:
    """Bytes per element of the statistics/solve dtype a task will use (fp64 unless told fp32)."""
    return 4 if shared.get("precision") == "fp32" else 8


# What a task under ``precision: auto`` may give up, in this order, when its declared device bytes
# exceed one accelerator: holding its inputs on the device (they are then re-read), an fp64 eigh
# fallback of R S⁺ (an fp32 one; the certified Cholesky path stays fp64), fp64 statistics.
_DEVICE_FALLBACKS: tuple[dict[str, Any], ...] = (
    {"inputs_on_device": False},
    {"eigh_precision": "fp32"},
    {"inputs_on_device": False, "eigh_precision": "fp32"},
    {"precision": "fp32"},
    {"precision": "fp32", "inputs_on_device": False},
)


def task_footprint(spec: MethodSpec, shape: WorkShape, shared: dict[str, Any], where: Placement) -> Footprint:
    """The task's declared peaks; may change ``shared`` to fit the device (see below).

    An accelerator task under ``precision: auto`` whose figure exceeds ``device_memory`` takes the
    first of ``_DEVICE_FALLBACKS`` that its method offers (``inputs_on_device: true``,
    ``eigh_precision: same`` with ``solve: auto``) and that fits: fp64 statistics are kept where
    anything else will do, and fp32 ones cost accuracy (README "Scale" states it). The choice is
    recorded in the task, so it is part of the plan and of its fingerprint.
    """
    on_acc = where.accelerated(spec)
    fp = spec.footprint(shape, on_acc)
    if not (
        on_acc
        and where.device_memory is not None
        and fp.device > where.device_memory
        and shared.get("precision") == "auto"
        and shape.stats_item == 8
    ):
        return fp
    best, change = fp, None
    for option in _DEVICE_FALLBACKS:
        if not _offers(shared, option):
            continue
        item = 4 if option.get("precision") == "fp32" else shape.stats_item
        trial = spec.footprint(
            WorkShape(**{**shape.__dict__, "stats_item": item, "params": {**shape.params, **option}}), on_acc
        )
        if trial.device <= where.device_memory:
            best, change = trial, option
            break
        if trial.device < best.device:  # nothing fits: plan the smallest, which the budget check refuses
            best, change = trial, option
    if change is not None:
        shared.update(change)
    return best


def _offers(shared: dict[str, Any], option: dict[str, Any]) -> bool:
    """Whether a task with these parameters can take ``option`` (its method has those knobs, set to
    what the option gives up)."""
    resident = "inputs_on_device" not in option or shared.get("inputs_on_device") is True
    mixed = "eigh_precision" not in option or (shared.get("eigh_precision") == "same" and shared.get("solve") == "auto")
    return resident and mixed


def task_flops(spec: MethodSpec, s: WorkShape) -> int:
    """The method's FLOP model, or about ten operations per element and expert."""
    return spec.flops(s.chunk_shape, s.experts) if spec.flops else 10 * s.numel * max(1, s.experts)


def fmt_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it at or above 1 (``512.0 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_budget(plan: MergePlan, budget: int, device_budget: int | None = None) -> None:
    """Refuse a plan whose biggest task cannot fit the host budget or one accelerator's memory.

    The error names the tensor and both of its figures against both budgets.
    """
    for t in plan.tasks:
        host_over = t.est_host_bytes > budget
        dev_over = device_budget is not None and t.est_device_bytes > device_budget
        if host_over or dev_over:
            parts = [f"{fmt_bytes(t.est_host_bytes)} of host memory (memory budget {fmt_bytes(budget)})"]
            if t.est_device_bytes or dev_over:
                have = f" (one device has {fmt_bytes(device_budget)})" if device_budget is not None else ""
                parts.append(f"{fmt_bytes(t.est_device_bytes)} of device memory{have}")
            elsewhere = ", run it on an accelerator (--device cuda)" if plan.device == "cpu" else ""
            hint = (
                f"raise --memory-budget{elsewhere}, or choose a method that can be row-chunked"
                if host_over
                else "use a device with more memory, set precision: fp32, or run it on CPU (--device cpu)"
            )
            raise PlanError(f"task needs about {' and '.join(parts)}", tensor=t.tensor, hint=hint)


__all__ = ["Placement", "check_budget", "fmt_bytes", "stats_item", "task_flops", "task_footprint"]
