"""Where passes run: the ``StatsBackend`` protocol and ``LocalStatsBackend`` (this process).

The same pass function runs here or data-parallel on Ray actors (``raymerge.cluster.stats``); a
worker returns partial moments and Gram sums (``partial_pass``) that the driver combines exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from raymerge.engine.errors import StatsError
from raymerge.engine.stats.data import Batch, DataSpec, load_batches, shard_batches
from raymerge.engine.stats.grams import GramLayout
from raymerge.engine.stats.hooks import PassResult, PassSpec, run_pass
from raymerge.engine.stats.models import (
    LoadedModel,
    input_device,
    linear_layers,
    load_model,
    model_class,
    release_model,
)
from raymerge.engine.stats.points import PointInfo, expand_points, probe_points


class StatsBackend(Protocol):
    """Runs passes over one model and one task's data: in this process, or on Ray actors."""

    def probe(self, patterns: Sequence[str] | str) -> list[PointInfo]: ...

    def linear_dims(self, patterns: Sequence[str] | None) -> dict[str, int]: ...

    def gram_budget(self) -> int | None: ...

    def run_pass(self, spec: PassSpec, grams: GramLayout | None) -> PassResult:
        """Run ``spec`` over all the data; when ``grams`` is given, write XᵀX/N of
        ``spec.gram_layers`` into it (combined over workers)."""
        ...

    def close(self) -> None: ...


class LocalStatsBackend:
    """All data through one model in this process."""

    def __init__(
        self,
        model: nn.Module | str | Path,
        data: DataSpec | Sequence[Batch],
        *,
        device: str | None = "auto",
        memory_budget: int | None = None,
        offload: bool | None = None,
        offload_dir: str | None = None,
        progress: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        # Data first: a bad data file fails before a large model is loaded.
        if isinstance(data, DataSpec):
            if isinstance(model, nn.Module):
                main = str(getattr(model, "main_input_name", "input_ids"))
            else:
                main = str(getattr(model_class(str(model))[0], "main_input_name", "input_ids"))
            batches = load_batches(
                data.with_tokenizer(None if isinstance(model, nn.Module) else str(model)), main_input=main
            )
        else:
            batches = list(data)
        if isinstance(model, nn.Module):
            self.loaded = LoadedModel(model.eval(), None, False, 0, input_device(model))
        else:
            self.loaded = load_model(
                model, device=device, memory_budget=memory_budget, offload=offload, offload_dir=offload_dir
            )
        self.batches = shard_batches(batches, rank, world)
        if not self.batches:
            raise StatsError(
                f"worker {rank} of {world} has no data: {len(batches)} batch(es) in all",
                hint="use fewer workers or a smaller batch size",
            )
        self.dims = linear_layers(self.loaded.model)
        self.memory_budget = memory_budget
        self.progress = progress

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def probe(self, patterns: Sequence[str] | str) -> list[PointInfo]:
        names = expand_points(self.model, patterns)
        return probe_points(self.model, self.batches[0], names) if names else []

    def linear_dims(self, patterns: Sequence[str] | None) -> dict[str, int]:
        return linear_layers(self.model, patterns)

    def gram_budget(self) -> int | None:
        if self.loaded.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.loaded.device)[0]
            return int(free * 0.5)
        if self.memory_budget is None:
            return None
        left = self.memory_budget - self.loaded.host_weight_bytes
        if left <= 0:
            raise StatsError(
                f"the model's weights take {self.loaded.host_weight_bytes / 2**30:.2f} GiB of host memory, "
                f"the whole budget of {self.memory_budget / 2**30:.2f} GiB",
                file=self.loaded.source,
                hint="raise --memory-budget (weights beyond half of it are offloaded to disk)",
            )
        return left

    def run_pass(self, spec: PassSpec, grams: GramLayout | None) -> PassResult:
        def sink(name: str, total: torch.Tensor, rows: int) -> None:
            if grams is not None:
                grams.write(name, total / max(rows, 1))

        return run_pass(self.model, self.batches, spec, on_gram=sink if grams else None, progress=self.progress)

    def partial_pass(self, spec: PassSpec, partial_path: str | None) -> PassResult:
        """A worker's pass: Gram *sums* (fp64, unnormalised) into ``partial_path`` for the driver to combine."""
        layout: GramLayout | None = None
        if partial_path is not None and spec.gram_layers:
            layout = GramLayout.plan(partial_path, {n: self.dims[n] for n in spec.gram_layers}, torch.float64, {})

        def sink(name: str, total: torch.Tensor, rows: int) -> None:
            assert layout is not None
            layout.write(name, total)

        return run_pass(self.model, self.batches, spec, on_gram=sink if layout else None, progress=self.progress)

    def close(self) -> None:
        release_model(self.loaded)
