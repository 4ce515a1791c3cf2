"""Declared peak memory of a task, and the budget check that refuses what cannot fit.

The method's own memory model (``MethodSpec.work_buffers`` full-size compute buffers and
``extra_bytes`` such as an in×in Gram) is combined here with what running any task holds besides:
the inputs resident at once, the output buffer, and the selection scratch of chunked methods.
Executors admit tasks by these figures (``executor.Admission``); ``check_budget`` refuses a plan
whose largest task cannot fit, naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from raymerge.engine.errors import PlanError
from raymerge.engine.methods import RESIDENT_SELECT_ELEMENTS, MethodSpec
from raymerge.engine.plan.types import MergePlan


@dataclass(frozen=True)
class TaskShape:
    """What a task's memory depends on: element counts and item sizes, all in elements or bytes.

    ``numel``: elements of the task's span; ``work_numel``: elements computed at once (one row
    chunk for chunked methods); ``chunk_shape``: the span's shape as the method sees it;
    ``inputs``: tensors read per element (base + experts); ``experts``: task vectors merged.
    """

    numel: int
    work_numel: int
    chunk_shape: tuple[int, ...]
    inputs: int
    experts: int
    in_item: int
    compute_item: int
    out_item: int


def host_bytes(spec: MethodSpec, s: TaskShape) -> int:
    """Peak host bytes of one merge task running ``spec`` on a span of shape ``s``."""
    resident_in = s.work_numel * s.in_item * (2 if spec.streams_experts else s.inputs)
    out = s.work_numel * s.out_item if spec.chunked else s.numel * s.out_item
    select = 4 * s.numel if spec.chunked and s.numel <= RESIDENT_SELECT_ELEMENTS else 0
    return (
        spec.work_buffers(s.experts) * s.work_numel * s.compute_item
        + spec.extra_bytes(s.chunk_shape, s.compute_item)
        + resident_in
        + out
        + select
    )


def task_flops(spec: MethodSpec, s: TaskShape) -> int:
    """The method's FLOP model, or about ten operations per element and expert."""
    return spec.flops(s.chunk_shape, s.experts) if spec.flops else 10 * s.numel * max(1, s.experts)


def fmt_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it at or above 1 (``512.0 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_budget(plan: MergePlan, budget: int) -> None:
    """Refuse a plan whose biggest task cannot fit the memory budget, naming the tensor."""
    for t in plan.tasks:
        if t.est_host_bytes > budget:
            raise PlanError(
                f"task needs about {fmt_bytes(t.est_host_bytes)} but the memory budget is {fmt_bytes(budget)}",
                tensor=t.tensor,
                hint="raise --memory-budget, or choose a method that can be row-chunked",
            )


__all__ = ["TaskShape", "check_budget", "fmt_bytes", "host_bytes", "task_flops"]
