"""Map-reduce over experts (engine.reduce) against the single-task merge: each reducible task cut
into map tasks over groups of experts and a reduce that adds their statistics, run in this process
by an executor that does nothing else; the Ray side is tests/cluster/test_ray.py."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from raymerge.engine.executor import ExecutionReport
from raymerge.engine.merge import merge
from raymerge.engine.plan import TensorTask
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.reduce import plan_map_reduce, reducible
from raymerge.engine.task import run_task

from conftest import map_reduce_errors, recipe_text


class MapReduceExecutor:
    """Runs every reducible task as maps over ``groups`` of experts, then its reduce, one at a time."""

    name = "map-reduce"
    workers = 1

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        self.groups = groups
        self.cut = 0

    def task_threads(self) -> int:
        return torch.get_num_threads()

    def run(self, tasks: Sequence[TensorTask], staging_dir: str, *, budget, device, on_done, device_budget=None):
        for task in tasks:
            if reducible(task):
                maps, reduce = plan_map_reduce(task, self.groups, staging_dir)
                for m in maps:
                    receipt = run_task(m, staging_dir, device)
                    assert receipt.nbytes == 0 and receipt.read_bytes > 0
                on_done(task, run_task(reduce, staging_dir, device))
                self.cut += 1
            else:
                on_done(task, run_task(task, staging_dir, device))
        return ExecutionReport(bytes_read=0)


CASES = {
    "actmat": {},
    "actmat-trim": {"trim": 0.5},
    "wudi-spectral": {"solver": "spectral"},
    "wudi-adam": {"solver": "adam", "steps": 20, "lr": 1e-3},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_map_reduce_equals_one_task(case, family, tmp_path):
    base, experts = family
    recipe = parse_recipe(recipe_text(case.split("-")[0], base, experts, params=CASES[case]))
    want = tmp_path / "whole"
    merge(recipe, want, progress=False, out_shard_bytes=150_000, workers=1)
    worst = 0.0
    for groups in ([[0, 1], [2]], [[1], [0, 2]]):  # consecutive experts, and interleaved
        runner = MapReduceExecutor(groups)
        out = tmp_path / "-".join("".join(map(str, g)) for g in groups)
        merge(recipe, out, executor=runner, progress=False, out_shard_bytes=150_000)
        assert runner.cut > 10  # the linear weights and the mean-merged norms and embeddings
        for name, err in map_reduce_errors(out, want, base).items():
            assert err <= 1e-6, (groups, name, err)
            worst = max(worst, err)
        assert not (out / ".raymerge" / "partials").exists()
    assert worst > 0 or case == "wudi-adam"  # fp32 Adam may round the difference away


def test_groups_must_cover_every_expert_once(family, tmp_path):
    base, experts = family
    from raymerge.engine.plan import build_plan

    plan = build_plan(parse_recipe(recipe_text("actmat", base, experts)))
    task = next(t for t in plan.tasks if reducible(t))
    for bad in ([[0, 1]], [[0, 1], [1, 2]], [[0, 1, 2], []]):
        with pytest.raises(ValueError, match="do not cover"):
            plan_map_reduce(task, bad, str(tmp_path))
    maps, reduce = plan_map_reduce(task, [[0], [1, 2]], str(tmp_path))
    assert [len(m.inputs) for m in maps] == [2, 3] and len(reduce.inputs) == 1
    assert reduce.est_host_bytes > task.est_host_bytes and reduce.partials == tuple(m.partials[0] for m in maps)
