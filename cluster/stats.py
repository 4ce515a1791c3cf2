"""Data-parallel activation statistics on Ray actors (``raymerge stats --executor ray``).

Each actor loads the model once (within its share of ``--memory-budget``, through accelerate
when it does not fit) and takes every ``world``-th batch of the task's data. Per pass it returns
its per-channel moments (count, mean, M2: small) and writes its Gram *sums* Σ xxᵀ in fp64 to its
own file under ``OUT/.partial/``; the driver merges the moments with Chan's exact update and adds
the partial sums layer by layer, dividing by the total row count, into the planned Gram file.
Only one layer's Grams are in driver memory at a time, and Gram matrices never go through Ray's
object store. ``OUT`` must be on storage every node sees (as for merges).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch

from raymerge.cluster.connect import RayConnection
from raymerge.engine.errors import RaymergeError
from raymerge.engine.stats import (
    DataSpec,
    GramLayout,
    LocalStatsBackend,
    PassResult,
    PassSpec,
    PointInfo,
    StatsError,
    merge_moments,
    read_matrix,
)

log = logging.getLogger(__name__)


class StatsWorker:
    """What a Ray actor holds: one model and this rank's share of the batches."""

    def __init__(
        self,
        model_dir: str,
        data: DataSpec,
        rank: int,
        world: int,
        device: str,
        memory_budget: int | None,
        offload: bool | None,
        threads: int,
    ) -> None:
        torch.set_num_threads(threads)
        self.rank = rank
        self.backend = LocalStatsBackend(
            model_dir, data, device=device, memory_budget=memory_budget, offload=offload, rank=rank, world=world
        )

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "batches": len(self.backend.batches), "budget": self.backend.gram_budget()}

    def probe(self, patterns: Sequence[str] | str) -> list[PointInfo]:
        return self.backend.probe(patterns)

    def linear_dims(self, patterns: Sequence[str] | None) -> dict[str, int]:
        return self.backend.linear_dims(patterns)

    def run_pass(self, spec: PassSpec, partial_path: str | None) -> PassResult:
        return self.backend.partial_pass(spec, partial_path)

    def close(self) -> None:
        self.backend.close()


def _get(refs: Any) -> Any:
    """``ray.get`` that re-raises an actor's RaymergeError as itself (one readable line)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if isinstance(cause, RaymergeError):
            raise cause from None
        raise
    except ray.exceptions.RayActorError as exc:
        raise StatsError(
            f"a statistics actor died: {exc}", hint="check the node's memory against --memory-budget"
        ) from None


class RayStatsBackend:
    """``StatsBackend`` over ``actors`` Ray actors, each with one shard of the data.

    ``address`` joins a running cluster (``auto`` or ``HOST:PORT``); without it an embedded Ray is
    started (or this process's existing connection reused). ``memory_budget`` is split evenly
    between actors. ``work_dir`` holds the per-actor partial Gram sums during a pass.
    """

    def __init__(
        self,
        model_dir: str | Path,
        data: DataSpec,
        *,
        work_dir: str | Path,
        actors: int = 2,
        device: str | None = "auto",
        memory_budget: int | None = None,
        offload: bool | None = None,
        address: str | None = None,
    ) -> None:
        if actors < 1:
            raise StatsError(f"need at least one actor, got {actors}")
        model_dir = os.path.abspath(model_dir)
        data = replace(
            data,
            files=tuple(os.path.abspath(f) for f in data.files),
            tokenizer=os.path.abspath(data.tokenizer) if data.tokenizer else model_dir,
        )
        self.work_dir = Path(os.path.abspath(work_dir)) / ".partial"
        self._conn = RayConnection(address)
        self._conn.__enter__()
        try:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            gpus = float(ray.cluster_resources().get("GPU", 0.0))
            use_gpu = device == "cuda" or (device in (None, "auto") and gpus >= 1)
            if use_gpu and gpus < actors:
                raise StatsError(
                    f"{actors} GPU actors asked for, the cluster has {gpus:g} GPU(s)",
                    hint="use --actors ≤ the number of GPUs, or --device cpu",
                )
            per_cpu = min(1.0, cpus / actors)
            threads = max(1, int(cpus // actors))
            share = None if memory_budget is None else memory_budget // actors
            cls: Any = ray.remote(StatsWorker)
            self.actors: list[Any] = [
                cls.options(
                    num_cpus=per_cpu, num_gpus=1 if use_gpu else 0, max_restarts=0, scheduling_strategy="SPREAD"
                ).remote(model_dir, data, rank, actors, "cuda" if use_gpu else "cpu", share, offload, threads)
                for rank in range(actors)
            ]
            infos = _get([a.info.remote() for a in self.actors])
            log.info("statistics on %d Ray actors: %s", actors, infos)
            budgets = [i["budget"] for i in infos]
            self._budget = None if any(b is None for b in budgets) else min(budgets)
        except BaseException:
            self.close()
            raise

    def probe(self, patterns: Sequence[str] | str) -> list[PointInfo]:
        return list(_get(self.actors[0].probe.remote(patterns)))

    def linear_dims(self, patterns: Sequence[str] | None) -> dict[str, int]:
        return dict(_get(self.actors[0].linear_dims.remote(patterns)))

    def gram_budget(self) -> int | None:
        return self._budget

    def run_pass(self, spec: PassSpec, grams: GramLayout | None) -> PassResult:
        """Run ``spec`` on every actor, merge moments exactly and sum partial Grams into ``grams``."""
        want = bool(grams is not None and spec.gram_layers)
        paths = [str(self.work_dir / f"rank{r:04d}.safetensors") if want else None for r in range(len(self.actors))]
        parts: list[PassResult] = _get([a.run_pass.remote(spec, p) for a, p in zip(self.actors, paths)])
        rows = {n: sum(p.gram_rows[n] for p in parts) for n in spec.gram_layers}
        if want:
            assert grams is not None
            for name in spec.gram_layers:
                total: torch.Tensor | None = None
                for path, part in zip(paths, parts):
                    if part.gram_rows[name] == 0:
                        continue
                    m = read_matrix(str(path), name)
                    total = m if total is None else total.add_(m)
                assert total is not None
                grams.write(name, total / max(rows[name], 1))
                del total
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return PassResult(
            merge_moments([p.moments for p in parts]), rows, sum(p.batches for p in parts), sum(p.tokens for p in parts)
        )

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                ray.get(a.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort: the actor may already be gone
                log.debug("could not close a statistics actor", exc_info=True)
            ray.kill(a)
        self.actors = []
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self._conn.__exit__(None, None, None)


__all__ = ["RayStatsBackend", "StatsWorker"]
