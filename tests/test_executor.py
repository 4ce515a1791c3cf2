"""The local executor admits tasks by declared memory: running bytes never exceed the budget."""

from __future__ import annotations

import threading
import time

import raymerge.engine.executor as executor
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
