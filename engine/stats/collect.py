"""``collect_stats``: input Grams of every linear layer and moments at chosen points, written to a directory.

Writes ``grams.safetensors`` (XᵀX / N per layer, keyed by module name: RegMean's ``grams``),
``moments.safetensors`` and a ``stats.json`` summary. The Gram file is planned before any pass;
layers are grouped to fit the memory budget, one pass per group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raymerge.engine.errors import RaymergeError, StatsError
from raymerge.engine.stats.backends import LocalStatsBackend, StatsBackend
from raymerge.engine.stats.data import Batch, DataSpec
from raymerge.engine.stats.grams import GRAMS_FILE, GramLayout, plan_gram_groups
from raymerge.engine.stats.hooks import PassResult, PassSpec
from raymerge.engine.stats.models import checkpoint_bytes
from raymerge.engine.stats.moments import MOMENTS_FILE, Moments, write_moments

log = logging.getLogger(__name__)

SUMMARY_FILE = "stats.json"


@dataclass(frozen=True)
class StatsResult:
    """What ``collect_stats`` produced.

    ``grams_path`` is the file to give the ``regmean`` method as ``grams`` (None without Grams);
    ``moments`` holds per-channel statistics at ``points`` (in network order); ``tokens`` counts
    non-padding tokens (or samples), ``passes`` the passes over the data the Gram budget needed.
    """

    out_dir: Path | None
    grams_path: Path | None
    gram_rows: dict[str, int]
    points: tuple[str, ...]
    moments: dict[str, Moments]
    batches: int
    tokens: int
    passes: int
    seconds: float


def collect_stats(
    model: nn.Module | str | Path,
    data: DataSpec | Sequence[Batch],
    out_dir: str | Path | None,
    *,
    points: Sequence[str] | str = (),
    grams: bool = True,
    gram_layers: Sequence[str] | None = None,
    gram_dtype: torch.dtype = torch.float32,
    device: str | None = "auto",
    memory_budget: int | None = None,
    offload: bool | None = None,
    backend: StatsBackend | None = None,
    progress: bool = False,
) -> StatsResult:
    """Collect input Grams of every linear layer and moments at ``points``; write them to ``out_dir``.

    ``model`` is an HF directory (loaded within ``memory_budget`` bytes, see ``load_model``) or a
    loaded module; ``data`` a ``DataSpec`` or ready batches (dicts of model inputs). ``points`` are
    module names, glob patterns or ``"default"``; ``gram_layers`` glob patterns (default: every
    ``nn.Linear``). Writes ``out_dir/grams.safetensors`` (XᵀX/N per layer in ``gram_dtype``, keyed by
    module name: RegMean's ``grams`` input), ``moments.safetensors`` (``<point>.mean``, ``.var``,
    ``.count``; fp64) and ``stats.json``. ``backend`` runs the passes elsewhere (Ray actors); by
    default they run in this process.
    """
    t0 = time.perf_counter()
    if grams and out_dir is None:
        raise StatsError("Grams are written to disk: give an output directory")
    own = backend is None
    be: StatsBackend = backend or LocalStatsBackend(
        model, data, device=device, memory_budget=memory_budget, offload=offload, progress=progress
    )
    try:
        infos = be.probe(points)
        names = tuple(i.name for i in infos)
        dims = be.linear_dims(gram_layers) if grams else {}
        if grams and not dims:
            raise StatsError("no nn.Linear layers to collect Grams for", hint="check --gram-layers")
        out = Path(out_dir) if out_dir is not None else None
        layout = None
        if out is not None and dims:
            layout = GramLayout.plan(out / GRAMS_FILE, dims, gram_dtype, {"raymerge": "grams/1"})
        groups = plan_gram_groups(dims, be.gram_budget(), 8) or [()]
        log.info("statistics: %d Gram layers in %d pass(es), %d points", len(dims), len(groups), len(names))
        gram_rows: dict[str, int] = {}
        moments: dict[str, Moments] = {}
        res: PassResult | None = None
        for i, group in enumerate(groups):
            spec = PassSpec(gram_layers=group, points=names if i == 0 else ())
            res = be.run_pass(spec, layout)
            gram_rows.update(res.gram_rows)
            if i == 0:
                moments = res.moments
        assert res is not None
        result = StatsResult(
            out,
            Path(layout.path) if layout else None,
            gram_rows,
            names,
            moments,
            res.batches,
            res.tokens,
            len(groups),
            time.perf_counter() - t0,
        )
        if out is not None:
            write_moments(out / MOMENTS_FILE, names, moments)
            summary = {
                "model": str(model) if not isinstance(model, nn.Module) else type(model).__name__,
                "data": list(data.files) if isinstance(data, DataSpec) else None,
                "grams": GRAMS_FILE if layout else None,
                "gram_dtype": str(gram_dtype).replace("torch.", ""),
                "accumulation": "float64 on CPU and full-FP64 GPUs, else float32",
                "gram_rows": gram_rows,
                "points": list(names),
                "batches": res.batches,
                "tokens": res.tokens,
                "passes": len(groups),
                "seconds": round(result.seconds, 3),
            }
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        if isinstance(model, (str, Path)) and gram_rows:
            _warn_unmatched(str(model), gram_rows)
        return result
    finally:
        if own:
            be.close()


def _warn_unmatched(model_dir: str, rows: Mapping[str, int]) -> None:
    with contextlib.suppress(RaymergeError):
        _, shapes, _ = checkpoint_bytes(model_dir)
        missing = [n for n in rows if f"{n}.weight" not in shapes]
        if missing:
            log.warning(
                "%d Gram layer(s) have no '<name>.weight' tensor in %s (e.g. %s); RegMean looks Grams up by "
                "the checkpoint's tensor names",
                len(missing),
                model_dir,
                missing[0],
            )
