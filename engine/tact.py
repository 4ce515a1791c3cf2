"""TACT: per-task activation correction of a merged model (Sharma, Roy & Dziugaite, "The Non-Local
Model Merging Problem: Permutation Symmetries and Variance Collapse", arXiv 2410.12766).

Merging experts — above all experts fine-tuned from different bases — shrinks activation
variance layer after layer ("variance collapse"). TACT is a per-task REPAIR: for task t, at each
correction point (a module's output, per channel on the last axis)

    y = σ_expert · (x − μ_merged) / sqrt(σ²_merged + eps) + μ_expert

where μ_expert, σ_expert are expert t's statistics on task t's data, and μ_merged, σ_merged the
merged model's on the same data *with the corrections of all earlier points applied*: points are
processed in network order, one pass each, and a pass stops as soon as its point's statistics
are taken. So the corrected model reproduces the expert's per-channel mean and std at every
point on that data (up to ``eps``).

A task's corrections are one small side file (``corrections/<task>.safetensors``: per point a
``scale`` and ``shift`` vector plus the four statistics; metadata: points in order, eps, task).
``apply_corrections`` installs them as forward hooks on a transformers model for the task the
user picks; ``fold_corrections`` writes an ordinary per-task model directory instead when every
point's output comes straight from an ``nn.Linear`` (rows of W and the bias are scaled/shifted;
a bias the architecture lacks is switched on through its config flag, e.g. Llama's
``attention_bias``/``mlp_bias``, with zeros elsewhere) or an ``nn.LayerNorm`` (γ, β).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymerge.engine.arch import BIAS_FLAGS
from raymerge.engine.errors import RaymergeError
from raymerge.engine.outpath import check_output_path
from raymerge.engine.publish import INDEX, ModelPublication
from raymerge.engine.safeio import parse_json, read_json, require_regular
from raymerge.engine.sidefiles import check_side_file
from raymerge.engine.stats import (
    Batch,
    DataSpec,
    LocalStatsBackend,
    Moments,
    PassSpec,
    PointAffine,
    StatsBackend,
    affine_hook,
    model_class,
    module_map,
)

log = logging.getLogger(__name__)

FORMAT = "raymerge-tact/1"
DEFAULT_EPS = 1e-6


class TactError(RaymergeError):
    """Corrections cannot be computed, applied or folded (unknown point, shape mismatch, unfoldable point)."""


@dataclass(frozen=True)
class PointCorrection:
    """One point's correction y = scale·x + shift and the statistics it came from (per channel)."""

    point: str
    scale: torch.Tensor  # fp32
    shift: torch.Tensor  # fp32
    expert_mean: torch.Tensor  # fp64
    expert_std: torch.Tensor
    merged_mean: torch.Tensor  # the merged model's, with the earlier points corrected
    merged_std: torch.Tensor
    producer: str | None = None  # nn.Linear / nn.LayerNorm whose output the point is (for folding)
    producer_kind: str | None = None


@dataclass(frozen=True)
class Corrections:
    """All of one task's corrections, in network order."""

    task: str
    points: tuple[PointCorrection, ...]
    eps: float
    tokens: int
    expert: str | None = None
    merged: str | None = None

    def affines(self) -> tuple[PointAffine, ...]:
        return tuple(PointAffine(p.point, p.scale, p.shift) for p in self.points)

    def collapse(self) -> dict[str, float]:
        """Variance collapse per point: mean over channels of σ_merged / σ_expert (before correcting it)."""
        out = {}
        for p in self.points:
            ok = p.expert_std > 0
            out[p.point] = float((p.merged_std[ok] / p.expert_std[ok]).mean()) if bool(ok.any()) else float("nan")
        return out

    def save(self, path: str | Path) -> Path:
        """Write the side file: ``<point>.scale``/``.shift`` (fp32) and the statistics (fp64)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for p in self.points:
            for key in ("scale", "shift", "expert_mean", "expert_std", "merged_mean", "merged_std"):
                tensors[f"{p.point}.{key}"] = getattr(p, key).contiguous()
        meta = {
            "format": "pt",
            "raymerge": FORMAT,
            "task": self.task,
            "eps": repr(self.eps),
            "tokens": str(self.tokens),
            "points": json.dumps([p.point for p in self.points]),
            "producers": json.dumps({p.point: [p.producer, p.producer_kind] for p in self.points}),
            "expert": self.expert or "",
            "merged": self.merged or "",
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path

    @staticmethod
    def load(path: str | Path) -> Corrections:
        from safetensors import SafetensorError, safe_open

        require_regular(path, error=TactError, what="corrections file")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("raymerge") != FORMAT:
                    raise TactError("not a raymerge TACT corrections file", file=str(path))
                producers = parse_json(
                    meta.get("producers", "{}"), file=str(path), error=TactError, what="corrections' producers"
                )
                points = parse_json(meta.get("points", ""), file=str(path), expect=list, error=TactError, what="points")
                pts = []
                for name in points:
                    prod, kind = producers.get(name, [None, None])
                    vals = {
                        k: f.get_tensor(f"{name}.{k}")
                        for k in ("scale", "shift", "expert_mean", "expert_std", "merged_mean", "merged_std")
                    }
                    pts.append(PointCorrection(name, producer=prod, producer_kind=kind, **vals))
        except (OSError, KeyError, TypeError, ValueError, SafetensorError) as exc:
            raise TactError(f"cannot read corrections: {exc}", file=str(path)) from None
        return Corrections(
            meta["task"],
            tuple(pts),
            float(meta["eps"]),
            int(meta.get("tokens", "0")),
            meta.get("expert") or None,
            meta.get("merged") or None,
        )


def correction(expert: Moments, merged: Moments, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) = (σ_e / sqrt(σ²_m + eps), μ_e − scale·μ_m), in fp64."""
    scale = expert.std / (merged.var + eps).sqrt()
    return scale, expert.mean - scale * merged.mean


BackendFactory = Callable[[Any, Any], StatsBackend]
"""Builds a backend for (model, data): e.g. Ray actors instead of this process."""


def compute_corrections(
    expert: nn.Module | str | Path,
    merged: nn.Module | str | Path,
    data: DataSpec | Sequence[Batch],
    points: Sequence[str] | str = "default",
    *,
    task: str = "task",
    eps: float = DEFAULT_EPS,
    device: str | None = "auto",
    memory_budget: int | None = None,
    backend: BackendFactory | None = None,
    require_foldable: bool = False,
    progress: bool = False,
) -> Corrections:
    """TACT corrections of ``merged`` towards ``expert`` on one task's ``data``.

    ``points``: module names, glob patterns or ``"default"`` (attention output, MLP hidden pre-
    activation and output of every block). One pass over the expert gives the targets (μ, σ per
    channel); then one pass over the merged model per point, in network order, with the
    corrections found so far applied, each stopped as soon as its point is reached. Text data is
    tokenized with the expert's tokenizer for both models. Only one model is loaded at a time;
    ``backend(model, data)`` builds where the passes run (default: this process, within
    ``memory_budget``). ``require_foldable`` refuses, before any pass, points that
    ``fold_corrections`` could not fold. ``eps`` (added to σ²_merged) is in squared activation units.
    """
    if isinstance(data, DataSpec) and isinstance(expert, (str, Path)):
        data = data.with_tokenizer(str(expert))

    def make(model: nn.Module | str | Path) -> StatsBackend:
        if backend is not None:
            return backend(model, data)
        return LocalStatsBackend(model, data, device=device, memory_budget=memory_budget, progress=progress)

    eb = make(expert)
    try:
        infos = eb.probe(points)
        if not infos:
            raise TactError("no correction points", hint="name modules with --points, or use 'default'")
        if require_foldable:
            check_foldable([(i.name, i.producer, i.producer_kind) for i in infos])
        target = eb.run_pass(PassSpec(points=tuple(i.name for i in infos)), None)
    finally:
        eb.close()
    done: list[PointCorrection] = []
    mb = make(merged)
    try:
        minfo = mb.probe([i.name for i in infos])
        if [i.name for i in minfo] != [i.name for i in infos]:
            raise TactError(
                "the merged model runs the correction points in another order than the expert",
                hint="expert and merged model must share one architecture",
            )
        for info in minfo:
            spec = PassSpec(
                points=(info.name,),
                corrections=tuple(PointAffine(c.point, c.scale, c.shift) for c in done),
                stop_after=info.name,
            )
            res = mb.run_pass(spec, None)
            if res.tokens != target.tokens:
                raise TactError(f"the merged model saw {res.tokens} tokens, the expert {target.tokens}")
            e, m = target.moments[info.name], res.moments[info.name]
            if e.mean.shape != m.mean.shape:
                raise TactError(
                    f"expert has {e.mean.numel()} channels here, the merged model {m.mean.numel()}", tensor=info.name
                )
            scale, shift = correction(e, m, eps)
            done.append(
                PointCorrection(
                    info.name,
                    scale.float(),
                    shift.float(),
                    e.mean,
                    e.std,
                    m.mean,
                    m.std,
                    info.producer,
                    info.producer_kind,
                )
            )
            log.info("TACT %s: σ_merged/σ_expert = %.3f", info.name, float((m.std / e.std.clamp_min(1e-30)).mean()))
    finally:
        mb.close()
    return Corrections(
        task,
        tuple(done),
        eps,
        target.tokens,
        None if isinstance(expert, nn.Module) else str(expert),
        None if isinstance(merged, nn.Module) else str(merged),
    )


class CorrectionHooks:
    """The forward hooks ``apply_corrections`` installed; ``remove()`` takes them off again."""

    def __init__(self, handles: list[Any], task: str) -> None:
        self.handles = handles
        self.task = task

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> CorrectionHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_corrections(model: nn.Module, corrections: Corrections | str | Path) -> CorrectionHooks:
    """Correct ``model``'s activations for one task: a forward hook per point, y = scale·x + shift.

    ``corrections`` is a ``Corrections`` or the path of its side file. Returns the hooks (also a
    context manager) so the caller can switch tasks: ``remove()`` one set, apply another.
    """
    corr = corrections if isinstance(corrections, Corrections) else Corrections.load(corrections)
    modules = module_map(model)
    handles = []
    for p in corr.points:
        mod = modules.get(p.point)
        if mod is None:
            raise TactError(
                "the model has no module for this correction point",
                tensor=p.point,
                hint="apply corrections to the merged model they were computed for",
            )
        handles.append(mod.register_forward_hook(affine_hook(p.scale, p.shift)))
    return CorrectionHooks(handles, corr.task)


# ------------------------------------------------------------------------------------------------ fold


def check_foldable(points: Sequence[tuple[str, str | None, str | None]]) -> None:
    """Refuse (point, producer, kind) triples whose output is not straight out of a Linear or LayerNorm."""
    bad = [p for p, prod, kind in points if prod is None or kind not in ("linear", "norm")]
    if bad:
        raise TactError(
            f"{len(bad)} correction point(s) cannot be folded into weights (their output is not a Linear's or "
            f"LayerNorm's): {', '.join(bad[:4])}{' …' if len(bad) > 4 else ''}",
            tensor=bad[0],
            hint="apply these with hooks (apply_corrections), or choose points such as *.mlp.gate_proj / *.attention.output",
        )


def _compose(corr: Corrections) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """Per producer module: its kind and the composed affine (A, S) of every point it feeds, in order."""
    check_foldable([(p.point, p.producer, p.producer_kind) for p in corr.points])
    out: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
    for p in corr.points:
        assert p.producer is not None and p.producer_kind is not None
        a, s = p.scale.double(), p.shift.double()
        if p.producer in out:
            kind, A, S = out[p.producer]
            out[p.producer] = (kind, a * A, a * S + s)
        else:
            out[p.producer] = (p.producer_kind, a, s)
    return out


def _bias_plan(
    model_dir: str, shapes: Mapping[str, tuple[int, ...]], need: set[str]
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """Config flags that give the modules in ``need`` a bias, and every tensor those flags add (shape)."""
    from accelerate import init_empty_weights

    cfg_path = Path(model_dir) / "config.json"
    cfg_json = read_json(cfg_path, error=TactError, what="config.json")
    if not need:
        return cfg_json, {}
    cls, config = model_class(model_dir)
    added: dict[str, tuple[int, ...]] = {}
    for flag in BIAS_FLAGS:
        if not need or getattr(config, flag, None) is not False:
            continue
        setattr(config, flag, True)
        with init_empty_weights():
            trial = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
        got = {k: tuple(v.shape) for k, v in trial.state_dict().items()}
        gained = {n for n in need if f"{n}.bias" in got}
        if gained:
            cfg_json[flag] = True
            added.update({k: s for k, s in got.items() if k not in shapes})
            need -= gained
        else:
            setattr(config, flag, False)
    if need:
        n = sorted(need)[0]
        raise TactError(
            "cannot fold a shift into this linear layer: it has no bias and no config flag adds one",
            file=str(cfg_path),
            tensor=n,
            hint="apply the corrections with hooks instead",
        )
    return cfg_json, added


def _weight_map(index_path: Path) -> dict[str, str]:
    index = read_json(index_path, error=TactError, what="index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise TactError("index has no non-empty weight_map object", file=str(index_path))
    for shard in set(weight_map.values()):  # shards are read from, and written into, one directory
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise TactError(f"index names shard {shard!r}, which is not a plain file name", file=str(index_path))
    return weight_map


def fold_corrections(
    merged_dir: str | Path, corrections: Corrections | str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> Path | str:
    """Write ``merged_dir`` with ``corrections`` folded into its weights as a new model directory.

    Exact (to rounding in the stored dtype) when every point comes straight out of an
    ``nn.Linear`` (W ← diag(a)·W, b ← a·b + s) or an ``nn.LayerNorm`` (γ ← a·γ, β ← a·β + s);
    otherwise refused, naming the points. Works one shard at a time, so memory is one shard.
    ``out_dir`` is a local path or a URL, published whole or not at all (``publish.ModelPublication``;
    with ``overwrite`` a local directory is replaced with never a moment without one). Returns the
    output directory (a ``Path``) or URL (a ``str``).
    """
    from safetensors.torch import load_file, save_file

    from raymerge.engine.stats import checkpoint_bytes

    corr = corrections if isinstance(corrections, Corrections) else Corrections.load(corrections)
    src = Path(merged_dir)
    check_output_path(str(out_dir))
    pub = ModelPublication(out_dir, overwrite=overwrite, error=TactError)
    pub.check([str(src)], role="merged model", hint="write the folded model to a new directory")
    folds = _compose(corr)
    _, shapes, _ = checkpoint_bytes(str(src))
    for prod, (_, A, _) in folds.items():
        w = shapes.get(f"{prod}.weight")
        if w is None or w[0] != A.numel():
            raise TactError(
                f"weight shape {list(w) if w else None} does not match {A.numel()} corrected channels",
                file=str(src),
                tensor=f"{prod}.weight",
            )
    # Side files (tokenizer, generation config) go along; each is checked before any work.
    skip = ("config.json", INDEX, "tact.json")
    side = sorted(f.name for f in src.iterdir() if not f.name.endswith(".safetensors") and f.name not in skip)
    copied = [n for n in side if not (src / n).is_dir() and check_side_file(str(src), n)]
    need = {p for p in folds if f"{p}.bias" not in shapes}
    cfg_json, added = _bias_plan(str(src), shapes, need)
    index_path = src / INDEX
    weight_map: dict[str, str] = (
        _weight_map(index_path) if index_path.exists() else dict.fromkeys(shapes, "model.safetensors")
    )
    extra_in: dict[str, list[str]] = {}
    for name in added:
        module = name.rsplit(".", 1)[0]
        extra_in.setdefault(weight_map.get(f"{module}.weight", sorted(set(weight_map.values()))[0]), []).append(name)
    with pub:
        staging = pub.start()
        for shard in sorted(set(weight_map.values())):
            tensors = load_file(str(src / shard))
            for name in extra_in.get(shard, []):
                module = name.rsplit(".", 1)[0]
                like = tensors.get(f"{module}.weight")
                tensors[name] = torch.zeros(added[name], dtype=like.dtype if like is not None else torch.float32)
                weight_map[name] = shard
            for prod, (kind, A, S) in folds.items():
                wn, bn = f"{prod}.weight", f"{prod}.bias"
                if wn in tensors:
                    w = tensors[wn]
                    tensors[wn] = (w.double() * (A[:, None] if kind == "linear" else A)).to(w.dtype)
                if bn in tensors:
                    b = tensors[bn]
                    tensors[bn] = (b.double() * A + S).to(b.dtype)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / shard), metadata={"format": "pt"})
            del tensors
        for name in copied:
            shutil.copy2(src / name, staging / name)
        (staging / "config.json").write_text(json.dumps(cfg_json, indent=2))
        if index_path.exists():
            index = read_json(index_path, error=TactError, what="index")
            index["weight_map"] = dict(sorted(weight_map.items()))
            (staging / index_path.name).write_text(json.dumps(index, indent=2))
        (staging / "tact.json").write_text(
            json.dumps(
                {
                    "task": corr.task,
                    "eps": corr.eps,
                    "points": [p.point for p in corr.points],
                    "folded_into": {p: k for p, (k, _, _) in folds.items()},
                    "biases_added": sorted(added),
                    "merged": str(src),
                    "expert": corr.expert,
                },
                indent=1,
            )
        )
        published = pub.publish()
    return published if pub.remote is not None else Path(published)


__all__ = [
    "CorrectionHooks",
    "Corrections",
    "PointCorrection",
    "TactError",
    "apply_corrections",
    "compute_corrections",
    "check_foldable",
    "correction",
    "fold_corrections",
]
