"""The local executor admits tasks by declared memory (the executors' one rule): running bytes never exceed the budget."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import raymerge.engine.local as executor
from raymerge.engine.merge import merge
from raymerge.engine.plan import build_plan
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, recipe_text


def test_running_tasks_stay_under_budget(family, tmp_path, monkeypatch):
    base, experts = family
    recipe = parse_recipe(recipe_text("ties", base, experts, {"density": 0.5}, [{"weight": 1}] * 3))
    plan = build_plan(recipe)
    sizes = sorted(t.est_host_bytes for t in plan.tasks)
    budget = sizes[-1] + sizes[-2] // 2  # the two largest tasks can never run together
    state = {"running": 0, "peak": 0, "max_concurrent": 0, "n": 0}
    lock = threading.Lock()
    real = executor.run_task

    def watched(task, staging_dir, device):
        with lock:
            state["running"] += task.est_host_bytes
            state["n"] += 1
            state["peak"] = max(state["peak"], state["running"])
            state["max_concurrent"] = max(state["max_concurrent"], state["n"])
        try:
            time.sleep(0.01)
            return real(task, staging_dir, device)
        finally:
            with lock:
                state["running"] -= task.est_host_bytes
                state["n"] -= 1

    monkeypatch.setattr(executor, "run_task", watched)
    merge(recipe, tmp_path / "out", progress=False, memory_budget=budget, workers=4)
    assert state["peak"] <= budget
    assert state["max_concurrent"] >= 2  # small tasks still run side by side
    monkeypatch.setattr(executor, "run_task", real)
    merge(recipe, tmp_path / "ref", progress=False, workers=1)
    a, b = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert all((a[k] == b[k]).all() for k in a)


def test_peak_rss_is_this_process_not_an_inherited_parent_peak():
    """ru_maxrss survives fork + exec on Linux; the figure raymerge reports must not."""
    import subprocess
    import sys

    code = (
        "from raymerge.engine.executor import peak_rss_bytes;"
        "import resource; print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    ballast = bytearray(600 << 20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page: the parent's peak is now > 600 MiB
    ours, inherited = map(
        int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    del ballast
    if sys.platform.startswith("linux"):
        assert inherited > 600 << 20  # the kernel behaviour this guards against
        assert ours < 400 << 20


def test_local_executor_gives_the_caller_its_torch_thread_count_back(family, tmp_path):
    import torch

    from raymerge.engine.merge import merge
    from raymerge.engine.recipe import parse_recipe

    from conftest import recipe_text

    base, experts = family
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # differs from the pool's cpu_count // workers on any multi-core box
        merge(
            parse_recipe(recipe_text("task_arithmetic", base, experts, {"weight": 0.5})),
            tmp_path / "o",
            progress=False,
            workers=1,
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("method", ["tsv_m", "regmean"])
def test_accelerator_row_chunk_transfers_write_the_same_bytes(method, family, tmp_path, monkeypatch):
    """On an accelerator, whole-tensor tasks (spectral methods, RegMean and its Gram matrices) read
    their inputs and write their result in row chunks through the host. Forced on CPU here, the
    bytes and CRCs are unchanged."""
    import json

    from safetensors.torch import save_file

    import raymerge.engine.task as task_mod

    from conftest import recipe_text

    base, experts = family
    per_model = None
    if method == "regmean":  # per-expert input Grams, one in x in matrix per linear layer
        per_model = []
        for i in range(len(experts)):
            g = torch.Generator().manual_seed(i)
            mats = {}
            for name, w in load_dir(base).items():
                if w.dim() == 2 and "embed" not in name and "lm_head" not in name:
                    x = torch.randn(3 * w.shape[1], w.shape[1], generator=g)
                    mats[name.removesuffix(".weight")] = x.T @ x / x.shape[0]
            save_file(mats, str(tmp_path / f"g{i}.safetensors"))
            per_model.append({"grams": str(tmp_path / f"g{i}.safetensors")})
    text = recipe_text(method, base, experts, per_model=per_model, extra="raymerge: {chunk_bytes: 4096}")
    merge(parse_recipe(text), tmp_path / "whole", progress=False, workers=1)
    calls = []
    real = task_mod.moves_by_chunks
    monkeypatch.setattr(task_mod, "moves_by_chunks", lambda dev: calls.append(dev) or True)
    merge(parse_recipe(text), tmp_path / "chunks", progress=False, workers=1)
    monkeypatch.setattr(task_mod, "moves_by_chunks", real)
    a, b = load_dir(tmp_path / "whole"), load_dir(tmp_path / "chunks")
    assert calls and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    crcs = [
        {
            r["id"]: (r["crc32"], r["nbytes"], r["read_bytes"])
            for r in json.loads((tmp_path / d / ".raymerge" / "receipts.json").read_text())
        }
        for d in ("whole", "chunks")
    ]
    assert crcs[0] == crcs[1]


def test_local_executor_starts_the_largest_tasks_first(family, tmp_path, monkeypatch):
    base, experts = family
    recipe = parse_recipe(recipe_text("ties", base, experts, {"density": 0.5}, [{"weight": 1}] * 3))
    started = []
    real = executor.run_task

    def watched(task, staging_dir, device):
        started.append(task.read_bytes + task.write_bytes)
        return real(task, staging_dir, device)

    monkeypatch.setattr(executor, "run_task", watched)
    merge(recipe, tmp_path / "out", progress=False, workers=1)
    assert len(started) > 2 and started == sorted(started, reverse=True)
    monkeypatch.setattr(executor, "run_task", real)
    merge(recipe, tmp_path / "ref", progress=False, workers=3)
    a, b = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_task_queued_behind_a_failure_starts(family, tmp_path, monkeypatch):
    """Each worker keeps a task queued; once a task fails, the queued ones are skipped, not run
    (one worker: the first task fails while the second waits in the queue behind it)."""
    from raymerge.engine.errors import TaskError

    base, experts = family
    recipe = parse_recipe(recipe_text("ties", base, experts, {"density": 0.5}, [{"weight": 1}] * 3))
    started = []

    def first_fails(task, staging_dir, device):
        started.append(task.id)
        raise TaskError("injected", tensor=task.tensor)

    monkeypatch.setattr(executor, "run_task", first_fails)
    with pytest.raises(TaskError, match="injected"):
        merge(recipe, tmp_path / "out", progress=False, workers=1)
    assert len(started) == 1
    assert not (tmp_path / "out").exists()
