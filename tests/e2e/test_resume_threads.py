"""A resume with another ``--workers`` (so another torch thread count per task) is bit-identical
to the undisturbed run: the staged run's thread count is recorded and the resume uses it."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

import raymerge.engine.local as local_executor
from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe

from conftest import recipe_text


def _digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


@pytest.mark.parametrize("method", ["actmat", "tsv_m"])
def test_resume_with_other_workers_is_bit_identical(family, tmp_path, monkeypatch, method):
    base, experts = family
    recipe = parse_recipe(recipe_text(method, base, experts))
    merge(recipe, tmp_path / "clean", progress=False, out_shard_bytes=100_000, workers=1)

    real = local_executor.run_task
    calls = {"n": 0}
    threads = []

    def flaky(task, staging_dir, device):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("simulated crash")
        return real(task, staging_dir, device)

    def recording(task, staging_dir, device):
        import torch

        threads.append(torch.get_num_threads())
        return real(task, staging_dir, device)

    out = tmp_path / "out"
    monkeypatch.setattr(local_executor, "run_task", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge(recipe, out, progress=False, out_shard_bytes=100_000, workers=1)
    staged = json.loads((tmp_path / "out.raymerge-staging" / ".raymerge" / "plan.json").read_text())
    cores = os.cpu_count() or 1
    assert staged["threads"] == cores
    monkeypatch.setattr(local_executor, "run_task", recording)
    figures = merge(recipe, out, progress=False, out_shard_bytes=100_000, workers=2)
    assert figures.tasks_resumed == 5 and figures.workers == 2
    assert _digest(out) == _digest(tmp_path / "clean")
    assert set(threads) == {cores}, "the resume computes with the staged run's thread count"
