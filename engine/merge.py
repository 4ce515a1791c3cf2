"""One merge end to end: plan → staging → execute → commit, with progress and figures."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from raymerge.engine import __version__
from raymerge.engine.errors import PlanError
from raymerge.engine.executor import Executor, default_memory_budget, peak_rss_bytes, placement_for
from raymerge.engine.local import LocalExecutor
from raymerge.engine.outpath import check_output_path
from raymerge.engine.plan import DEFAULT_SHARD_BYTES, MergePlan, Placement, TensorTask, build_plan, check_budget
from raymerge.engine.publish import TOKENIZER_FILES
from raymerge.engine.recipe import Recipe
from raymerge.engine.reduce import PARTIALS_DIR
from raymerge.engine.sidefiles import check_side_files
from raymerge.engine.storage import READ_STATS
from raymerge.engine.task import Receipt
from raymerge.engine.urls import redact
from raymerge.engine.writer import Staging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFigures:
    """Figures of one run, recorded in the model card and printed by the CLI."""

    method: str
    models: int
    tensors: int
    tasks: int
    tasks_resumed: int
    bytes_read: int
    bytes_written: int
    wall_seconds: float
    read_gbps: float
    peak_rss_bytes: int
    memory_budget: int
    workers: int
    executor: str
    device: str
    peak_device_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def model_card(plan: MergePlan, figures: RunFigures) -> str:
    """A Hugging Face README recording the recipe, the inputs and the run's figures."""
    recipe = plan.recipe
    inputs = [
        redact(u)
        for u in ([recipe.base_model] if recipe.base_model else [])
        + [u for u in recipe.expert_urls() if u != recipe.base_model]
    ]
    lines = [
        "---",
        "base_model:",
        *(f"- {json.dumps(u)}" for u in inputs),  # a JSON string is a YAML string, quoted safely
        "base_model_relation: merge",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- raymerge",
        f"- {recipe.merge_method}",
        "---",
        f"# {recipe.name or Path(redact(plan.recipe.base_model or plan.models[0])).name + '-' + recipe.merge_method}",
        "",
        f"Merged with [raymerge](https://github.com/raymerge/raymerge) {__version__} using "
        f"**{recipe.merge_method}** ({recipe.method.reference}) on {_dt.date.today().isoformat()}.",
        "",
        "## Inputs",
        "",
    ]
    if recipe.base_model:
        lines.append(f"- base: `{redact(recipe.base_model)}`")
    lines += [f"- `{redact(u)}`" for u in recipe.expert_urls()]
    fused = "split into blocks (q/k/v, gate/up)" if recipe.raymerge.split_fused else "merged as stored"
    lines += ["", f"Packed projections (qkv_proj, gate_up_proj): {fused}."]
    lines += ["", "## Recipe", "", "```yaml", (recipe.source or "").rstrip(), "```", "", "## Run", ""]
    lines += ["| figure | value |", "|---|---|"]
    for k, v in figures.to_json().items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "Per-task CRC32 checksums are in `.raymerge/receipts.json`.", ""]
    return "\n".join(lines)


def merge(
    recipe: Recipe,
    out: str | Path,
    *,
    executor: Executor | None = None,
    memory_budget: int | None = None,
    workers: int | None = None,
    out_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    device_memory: int | None = None,
    copy_tokenizer: bool = True,
) -> RunFigures:
    """Merge ``recipe`` into the model directory ``out``; resumes a staged run of the same plan.

    ``out`` may be a remote URL (``s3://…``): the merge is staged locally (see
    ``publish.default_staging_root``) and uploaded at commit, the loader's entry points last.

    ``executor`` runs the tasks (``executor.Executor``): by default a ``LocalExecutor`` of
    ``workers`` threads in this process; ``raymerge.cluster.RayExecutor`` runs them on a Ray
    cluster. Every executor runs the same ``run_task`` on the same plan, so outputs are
    bit-identical. ``memory_budget`` (bytes, per node) bounds the declared peak host memory of
    running tasks; default: half the available RAM. ``device_memory`` (bytes, one accelerator)
    bounds their declared device memory; default: the first CUDA device's total memory.
    ``copy_tokenizer=False`` leaves the tokenizer files out of the output (mergekit's
    ``--no-copy-tokenizer``).
    """
    t0 = time.perf_counter()
    check_output_path(str(out))
    read0 = READ_STATS.bytes_read  # headers, read while planning
    if memory_budget is not None and memory_budget <= 0:
        raise PlanError(f"memory budget must be more than 0 bytes, got {memory_budget}")
    if workers is not None and workers < 1:
        raise PlanError(f"workers must be at least 1, got {workers}")
    budget = memory_budget or default_memory_budget()
    runner = executor or LocalExecutor(workers)
    # ``auto`` is resolved per task: dense linear algebra goes to CUDA, elementwise work stays on CPU.
    dev = device or recipe.raymerge.device
    where = placement_for(dev, device_memory)
    plan = build_plan(recipe, out_shard_bytes=out_shard_bytes, placement=where)
    if not copy_tokenizer:
        plan = dataclasses.replace(plan, tokenizer_from=None)
    check_budget(plan, budget, where.device_memory)
    if plan.tokenizer_from:  # refuse an unsafe tokenizer file now, not after the compute
        check_side_files(plan.tokenizer_from, TOKENIZER_FILES)
    staging = Staging(out, plan, overwrite=overwrite, progress=progress)
    try:
        receipts = staging.prepare(threads=_task_threads(runner))
        _pin_threads(runner, staging.threads)
        try:
            figures = _run(
                plan,
                staging,
                receipts,
                runner,
                budget=budget,
                dev=dev,
                where=where,
                t0=t0,
                read0=read0,
                progress=progress,
            )
        finally:
            staging.release()  # the journal is closed and the output's lock released on every way out
    finally:
        close = getattr(runner, "close", None)
        if callable(close):  # an executor that holds a session (a Ray connection) leaves it
            close()
    return figures


def _task_threads(runner: Executor) -> int | None:
    """The torch threads per task of an executor that has one count for all tasks (local and Ray)."""
    count = getattr(runner, "task_threads", None)
    return int(count()) if callable(count) else None


def _pin_threads(runner: Executor, staged: int | None) -> None:
    """Resume with the torch thread count the staged run started with.

    Reductions in matmuls and sums split their work by thread count, so Gram and spectral methods
    (ACTMat, WUDI, TSV-M, …) round differently with another count; the staged tasks were computed
    with ``staged`` threads, and the rest must be too for the output to be bit-identical to an
    undisturbed run. Changing ``--workers`` on a resume changes how many tasks run at once, not this.
    """
    now = _task_threads(runner)
    if staged is None or now is None or now == staged:
        return
    log.warning("resuming with %d torch threads per task, as the staged run started (not %d)", staged, now)
    runner.threads = staged  # type: ignore[attr-defined]


def _run(
    plan: MergePlan,
    staging: Staging,
    receipts: dict[str, Receipt],
    runner: Executor,
    *,
    budget: int,
    dev: str,
    where: Placement,
    t0: float,
    read0: int,
    progress: bool,
) -> RunFigures:
    """Run the tasks not yet done into a prepared (locked) staging area and publish it."""
    recipe = plan.recipe
    resumed = len(receipts)
    todo: list[TensorTask] = [t for t in plan.tasks if t.id not in receipts]
    total_io = sum(t.read_bytes + t.write_bytes for t in todo)
    bar = tqdm(
        total=total_io,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"merge {recipe.merge_method}",
        disable=not progress,
        file=sys.stderr,
        smoothing=0.1,
        dynamic_ncols=True,
    )

    def on_done(task: TensorTask, receipt: Receipt) -> None:
        staging.record(receipt)
        receipts[task.id] = receipt
        bar.update(task.read_bytes + task.write_bytes)

    planning_read = READ_STATS.bytes_read - read0
    try:
        report = runner.run(
            todo, str(staging.dir), budget=budget, device=dev, on_done=on_done, device_budget=where.device_memory
        )
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    read = planning_read + report.bytes_read
    figures = RunFigures(
        method=recipe.merge_method,
        models=len(plan.models),
        tensors=len({t.tensor for t in plan.tasks}),
        tasks=len(plan.tasks),
        tasks_resumed=resumed,
        bytes_read=read,
        bytes_written=sum(t.write_bytes for t in todo),
        wall_seconds=round(wall, 3),
        read_gbps=round(read / wall / 1e9, 3) if wall > 0 else 0.0,
        peak_rss_bytes=peak_rss_bytes(),
        memory_budget=budget,
        workers=runner.workers,
        executor=runner.name,
        device=dev,
        peak_device_bytes=report.peak_device_bytes,
    )
    # Statistics a map-reduce left behind (a reduce that failed after its maps) are not the model's.
    shutil.rmtree(staging.dir / PARTIALS_DIR, ignore_errors=True)
    staging.commit(receipts, model_card(plan, figures))
    return figures


def format_figures(f: RunFigures) -> str:
    gib = 2**30
    return (
        f"{f.method}: {f.tensors} tensors / {f.tasks} tasks ({f.tasks_resumed} resumed) from {f.models} models; "
        f"read {f.bytes_read / gib:.2f} GiB, wrote {f.bytes_written / gib:.2f} GiB in {f.wall_seconds:.1f} s "
        f"({f.read_gbps:.2f} GB/s); peak RSS {f.peak_rss_bytes / gib:.2f} GiB (budget {f.memory_budget / gib:.1f} GiB)"
        + (f"; peak device {f.peak_device_bytes / gib:.2f} GiB" if f.peak_device_bytes is not None else "")
    )


__all__ = ["RunFigures", "format_figures", "merge", "model_card"]
