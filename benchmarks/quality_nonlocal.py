"""Merge quality, non-local: experts fine-tuned from two differently seeded bases, aligned or not,
merged through ``merge()``, then corrected per task with TACT.

The non-local setting of Sharma, Roy & Dziugaite (arXiv 2410.12766, their non-local notebook):
half of the experts come from one foundation model, half from another pretrained from a different
seed. What one run does (deterministic given the seeds and the thread count):

1. **Bases.** Base A is the local suite's pretrained body (``benchmarks.quality``: same config,
   data and cache; its experts for the first half of the tasks are reused). Base B is pretrained by
   the same routine (``pretrain_mlm``, same corpus and schedule) from seed ``--seed-b``, then probed
   and fully fine-tuned (LP-FT, the suite's recipe) on the second half of the tasks. Every expert
   keeps its own head; base B and its experts are cached under ``<cache-dir>/nonlocal/<key>``.
2. **Alignment** of B's side to A, three ways: *none*; *weight matching* with raymerge's
   ``align_checkpoints`` (per block: MLP units and attention heads, the engine's spec); and
   *weight matching + residual*, that spec plus one residual-stream permutation shared by the
   embeddings, every LayerNorm and every block (built here from the engine's ``PermutationSpec``,
   solved by ``match_weights``, applied by ``apply_permutation``; B's heads get it on their
   inputs). Every permuted B expert is checked to give the same logits (≤ 1e-4).
3. **Merges** per alignment, each through a mergekit-schema recipe and ``merge()``: Average, TA,
   TIES (task vectors relative to the midpoint of the two bases, as in the paper) and RegMean;
   then **TACT** on the best data-free merge of that alignment (per task: the expert's statistics
   on its calibration data, the merged model's point by point, applied with hooks at evaluation).
4. **Variance collapse**: σ_merged/σ_expert per TACT correction point (mean over channels, then
   over tasks) on each task's calibration inputs for every merge, and before/after TACT on
   calibration and held-out inputs.
5. ``<results-dir>/quality_nonlocal.json`` + ``.png``; ``markdown_table`` renders the README table.

    python -m benchmarks.quality_nonlocal            # full (about 17 minutes on 2 cores, base B untrained)
    python -m benchmarks.quality_nonlocal --smoke --results-dir /tmp/q   # 2 + 2 tasks, tiny, < 90 s
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertModel

from benchmarks.quality import (
    CACHE,
    EMBEDDINGS,
    FULL,
    METHOD_ROWS,
    RESULTS,
    SuiteConfig,
    TaskData,
    _quiet_transformers,
    calibration_batches,
    make_data,
    recipe_yaml,
    run_merge,
    summarize,
    train_all,
    train_cached,
    write_results,
)
from benchmarks.quality_model import (
    Classifier,
    EncoderSize,
    TrainSpec,
    accuracy,
    load_body,
    save_body,
)
from benchmarks.quality_tasks import SAMPLERS

# Bump when a change here changes base B or its experts (the cache key of side B).
NONLOCAL_VERSION = 1
SEED_B_OFFSET = 1000  # base B's seed is the suite seed + this unless --seed-b says otherwise
FUNCTION_TOL = 1e-4  # max |logit difference| allowed between a B expert and its permuted copy
DATA_FREE = ("Average", "TA", "TIES")  # the suite's rows (same hyperparameters) merged here
REGMEAN_ALPHA = 0.95
# The suite trains (and caches) base A and its experts with 2 torch threads. This benchmark runs
# the rest with 1 by default: these models are small, and on a shared 2-core machine a second
# OpenMP thread mostly waits at barriers (measured here: MLM pretraining 0.14 s/step with one
# thread, 0.29 s/step in the suite's 2-thread run; small forward passes 20x slower under load).
SUITE_THREADS = 2

SMOKE = SuiteConfig(
    tasks=("marker_position", "token_order", "first_group", "bracket_balance"),
    size=EncoderSize(hidden=32, layers=2, heads=2, intermediate=64),
    pretrain=TrainSpec(steps=60, batch=64, lr=3e-3),
    probe=TrainSpec(steps=100, batch=256, lr=1e-2),
    finetune=TrainSpec(steps=200, batch=64, lr=3e-3),
    pretrain_examples=512,
    train_examples=2048,
    test_examples=512,
    calib_examples=64,
    calib_batch=32,
)

ALIGNMENTS = {
    "none": "no alignment",
    "wm": "weight matching (MLP units + heads)",
    "wm_res": "weight matching + residual stream",
    "am_res": "activation matching + residual stream",
}
MATCH_SEQUENCES_PER_TASK = 64  # unlabelled pretraining-corpus sequences per task for activation matching
ANCHOR_NOTE = (
    "TA and TIES need a base. Base A is not a meaningful one here: a B expert's task vector "
    "θ_t − θ_A contains the whole base difference θ_B − θ_A, so TA with λ = 0.3 over 4 + 4 experts "
    "lands at θ_A + 1.2·(θ_B − θ_A) + 0.3·Σδ_t (beyond base B), and TIES trims and elects signs on "
    "entries dominated by θ_B − θ_A (measured below: anchor_check). Following the paper "
    "(non-local notebook, cell 12) the base is the midpoint of the two (aligned) bases, itself "
    "merged by raymerge (method linear, equal weights): with as many experts from A as from B the ±(θ_A − θ_B)/2 "
    "parts cancel in TA, which becomes midpoint + λ·Σδ_t. Average needs no base."
)

log = logging.getLogger("benchmarks.quality_nonlocal")


# ------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class Side:
    """One base and the experts fine-tuned from it (paths), with their probe and expert heads."""

    base: Path
    experts: dict[str, Path]
    probe_heads: dict[str, nn.Linear]
    expert_heads: dict[str, nn.Linear]
    info: dict[str, Any]


def split_tasks(cfg: SuiteConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """First half of the suite's tasks from base A, second half from base B (the notebook's split)."""
    half = len(cfg.tasks) // 2
    return cfg.tasks[:half], cfg.tasks[half:]


def side_a(cfg: SuiteConfig, data: list[TaskData], tasks: Sequence[str], cache: Path, rebuild: bool) -> Side:
    """The local suite's base and its experts for ``tasks`` (from its cache, trained if missing)."""
    trained = train_all(cfg, data, cache, rebuild)
    return Side(
        trained.base,
        {n: trained.experts[n] for n in tasks},
        {n: trained.probe_heads[n] for n in tasks},
        {n: trained.expert_heads[n] for n in tasks},
        dict(trained.info),
    )


def side_b_keys(cfg: SuiteConfig, tasks: Sequence[str], seed_b: int) -> tuple[str, str]:
    """Cache keys of base B (the suite's base key + seed B) and of its probes and experts."""

    def digest(**parts: Any) -> str:
        blob = json.dumps({"v": NONLOCAL_VERSION, "seed_b": seed_b, **parts}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    return digest(base=cfg.base_key()), digest(experts=cfg.experts_key(), tasks=list(tasks))


def side_b(
    cfg: SuiteConfig, data: list[TaskData], tasks: Sequence[str], seed_b: int, cache: Path, rebuild: bool
) -> Side:
    """Base B pretrained from ``seed_b`` on the suite's corpus, probes and experts for ``tasks``
    (LP-FT, the suite's recipe and step counts; probe/fine-tune seeds ``seed_b + 10 + i`` /
    ``seed_b + 20 + i`` for task index i) — or what is complete of it in
    ``cache/nonlocal/base-<key>/`` (base) and its ``experts-<key>/`` (probes, experts, heads)."""
    base_key, experts_key = side_b_keys(cfg, tasks, seed_b)
    base_root = cache / "nonlocal" / f"base-{base_key}"
    # base A's corpus (train_all's: all of ``data``, in the same order), seeds from seed_b
    t = train_cached(
        cfg,
        data,
        tasks,
        seed_b,
        base_root,
        base_root / f"experts-{experts_key}",
        rebuild,
        label=" B",
        info={"seed_b": seed_b},
    )
    return Side(t.base, t.experts, t.probe_heads, t.expert_heads, t.info)


# ------------------------------------------------------------------------------------------ alignment


@dataclass(frozen=True)
class Aligned:
    """Side B in one alignment: its base and experts (paths) and the heads that go with them."""

    key: str
    base_b: Path
    experts_b: dict[str, Path]
    heads_b: dict[str, nn.Linear]
    info: dict[str, Any]


_READS_RESIDUAL = re.compile(r".*(attention\.self\.(query|key|value)|intermediate\.dense)\.weight")
_WRITES_RESIDUAL = re.compile(r".*(attention\.output\.dense|[0-9]\.output\.dense)\.(weight|bias)")
_RESIDUAL_VECTORS = re.compile(r".*LayerNorm\.(weight|bias)")
_EMBEDDING_TABLES = re.compile(r"embeddings\.\w+_embeddings\.weight")


def residual_permutation(shapes: dict[str, tuple[int, ...]], hidden: int) -> Any:
    """One permutation of the residual stream (hidden channels) of a post-LN BERT body: columns of
    the embedding tables, LayerNorm γ/β, input columns of q/k/v and the FFN's first layer, output
    rows (and bias) of the attention-output and FFN-output projections. An exact symmetry: every
    LayerNorm normalises over all channels, and the pooled output comes out permuted (a head
    reading it takes the same permutation on its input columns)."""
    from raymerge.engine.align import Permutation, PermutedAxis

    axes = []
    for name in shapes:
        if _EMBEDDING_TABLES.fullmatch(name) or _READS_RESIDUAL.fullmatch(name):
            axes.append(PermutedAxis(name, 1))
        elif _WRITES_RESIDUAL.fullmatch(name) or _RESIDUAL_VECTORS.fullmatch(name):
            axes.append(PermutedAxis(name, 0))
    return Permutation("residual", hidden, tuple(axes))


@torch.no_grad()
def _activations(body: BertModel, x: torch.Tensor, names: Sequence[str], chunk: int = 128) -> dict[str, torch.Tensor]:
    """Outputs of modules ``names`` on inputs ``x``, as fp64 rows [tokens, channels]."""
    modules = dict(body.named_modules())
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        modules[n].register_forward_hook(lambda _m, _a, out, n=n: got[n].append(out.reshape(-1, out.shape[-1])))
        for n in names
    ]
    try:
        body.eval()
        for i in range(0, len(x), chunk):
            body(input_ids=x[i : i + chunk])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v).double() for n, v in got.items()}


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [channels_a, channels_b] between the columns of rows ``a`` and ``b``."""
    a = (a - a.mean(0)) / (a.std(0) + 1e-8)
    b = (b - b.mean(0)) / (b.std(0) + 1e-8)
    return a.T @ b / (len(a) - 1)


def _assign(similarity: torch.Tensor) -> torch.Tensor:
    """perm[i] = the unit of B that goes to position i (maximum total similarity)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(similarity.numpy(), maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.int64)


@dataclass(frozen=True)
class Correlations:
    """Pearson correlations [A channel, B channel] between the two *unaligned* bases' activations on
    unlabelled inputs: at every LayerNorm output (the residual stream of a post-LN BERT) and at each
    block's MLP units (GELU outputs, keyed by the engine's permutation name ``<block>.intermediate``)."""

    residual: dict[str, torch.Tensor]
    mlp: dict[str, torch.Tensor]

    @staticmethod
    def of(body_a: BertModel, body_b: BertModel, x: torch.Tensor) -> Correlations:
        norms = [n for n, m in body_a.named_modules() if isinstance(m, nn.LayerNorm)]
        mlps = [n for n, m in body_a.named_modules() if re.fullmatch(r".*layer\.\d+\.intermediate", n)]
        fa, fb = _activations(body_a, x, norms + mlps), _activations(body_b, x, norms + mlps)
        return Correlations(
            {n: _correlation(fa[n], fb[n]) for n in norms}, {n: _correlation(fa[n], fb[n]) for n in mlps}
        )

    def matched(self, perm: torch.Tensor | None) -> dict[str, float]:
        """Mean correlation of residual channel i of A with channel perm[i] of B, per LayerNorm
        output (identity without ``perm``): how alike the two residual streams are once matched."""
        out = {}
        for n, c in self.residual.items():
            p = torch.arange(len(c)) if perm is None else perm
            out[n] = float(c[torch.arange(len(c)), p].mean())
        return out


def activation_matching(
    corr: Correlations, sd_a: dict[str, torch.Tensor], sd_b: dict[str, torch.Tensor], spec: Any, seed: int
) -> dict[str, torch.Tensor]:
    """Permutations of B's units from activations (Git Re-Basin's activation matching): the
    residual stream by A/B channel correlations summed over every LayerNorm output, each block's
    MLP units by the correlation of their GELU outputs; then, with those fixed, each block's
    attention heads by the engine's weight matching (a head has no single activation to correlate).
    ``spec`` holds all these permutations."""
    from raymerge.engine.align import PermutationSpec, apply_permutation, match_weights

    perms = {"residual": _assign(sum(corr.residual.values()))}
    for name, c in corr.mlp.items():
        perms[name] = _assign(c)
    heads = [p for p in spec.perms if p.name not in perms]
    partial = {**perms, **{p.name: torch.arange(p.size) for p in heads}}
    head_match = match_weights(sd_a, apply_permutation(sd_b, spec, partial), PermutationSpec(tuple(heads)), seed=seed)
    return {**perms, **head_match.perms}


def body_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖A − B‖ (Frobenius, fp64) over every body tensor: how far apart the two weight points are."""
    return float(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)) ** 0.5


def _permuted_head(head: nn.Linear, perm: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(head.in_features, head.out_features)
    state = head.state_dict()
    if perm is not None:
        state = {"weight": state["weight"].index_select(1, perm), "bias": state["bias"]}
    out.load_state_dict(state)
    return out


@torch.no_grad()
def function_gap(expert: Path, head: nn.Linear, aligned: Path, aligned_head: nn.Linear, x: torch.Tensor) -> float:
    """Max |logit difference| between an expert and its permuted copy on inputs ``x``."""
    before = Classifier(load_body(expert), head).eval()(x)
    after = Classifier(load_body(aligned), aligned_head).eval()(x)
    return float((before - after).abs().max())


def align_side_b(
    key: str, base_a: Path, side: Side, work: Path, check_x: dict[str, torch.Tensor], corr: Correlations, seed: int
) -> Aligned:
    """B's base and experts in alignment ``key`` (see ``ALIGNMENTS``); each expert's function checked."""
    from safetensors.torch import load_file

    from raymerge.engine.align import (
        PermutationSpec,
        align_checkpoints,
        apply_permutation,
        match_weights,
        permutation_spec_for,
        permute_tensor,
        shapes_of,
    )

    sd_a = load_file(str(base_a / "model.safetensors"))
    sd_b = load_file(str(side.base / "model.safetensors"))
    info: dict[str, Any] = {"label": ALIGNMENTS[key], "distance_before": body_distance(sd_a, sd_b)}
    if key == "none":
        info["residual_correlation"] = corr.matched(None)
        return Aligned(key, side.base, dict(side.experts), dict(side.expert_heads), info)
    out = work / f"aligned_{key}"
    t0 = time.perf_counter()
    perm_res = None
    experts_out = {n: out / "experts" / n for n in side.experts}
    if key == "wm":
        report = align_checkpoints(
            str(base_a),
            str(side.base),
            out / "base_b",
            also=[(str(p), experts_out[n]) for n, p in side.experts.items()],
            seed=seed,
        )
        info.update(
            permutations=report.permutations,
            units=report.units,
            moved_units=report.moved_units,
            spec_distance_before=report.distance_before,
            spec_distance_after=report.distance_after,
            max_passes=report.max_passes,
        )
    elif key in ("wm_res", "am_res"):
        config = json.loads((side.base / "config.json").read_text())
        engine = permutation_spec_for(config, shapes_of(sd_b))
        spec = PermutationSpec((*engine.perms, residual_permutation(shapes_of(sd_b), config["hidden_size"])))
        if key == "wm_res":
            match = match_weights(sd_a, sd_b, spec, seed=seed)
            perms = match.perms
            info.update(
                passes=match.passes,
                converged=match.converged,
                objective_before=match.objective[0],
                objective_after=match.objective[-1],
            )
        else:
            perms = activation_matching(corr, sd_a, sd_b, spec, seed)
            info["matching_inputs"] = (
                f"{MATCH_SEQUENCES_PER_TASK} unlabelled sequences per task from the bases' pretraining corpus"
            )
        perm_res = perms["residual"]
        for src, dst in [(side.base, out / "base_b"), *[(side.experts[n], experts_out[n]) for n in side.experts]]:
            body = load_body(src)
            body.load_state_dict(apply_permutation(body.state_dict(), spec, perms))
            save_body(body, dst)
        info.update(
            permutations=len(spec.perms),
            units=sum(p.size for p in spec.perms),
            moved_units=sum(int((perms[p.name] != torch.arange(p.size)).sum()) for p in spec.perms),
            residual_moved=int((perm_res != torch.arange(len(perm_res))).sum()),
            objective_weights_after=sum(
                float((sd_a[t].double() * permute_tensor(t, sd_b[t], spec, perms).double()).sum()) for t in spec.tensors
            ),
        )
    else:
        raise ValueError(f"unknown alignment {key!r}")
    info["seconds"] = round(time.perf_counter() - t0, 3)
    info["residual_correlation"] = corr.matched(perm_res)
    heads = {n: _permuted_head(h, perm_res) for n, h in side.expert_heads.items()}
    info["distance_after"] = body_distance(sd_a, load_file(str(out / "base_b" / "model.safetensors")))
    gaps = {
        n: function_gap(side.experts[n], side.expert_heads[n], experts_out[n], heads[n], check_x[n])
        for n in side.experts
    }
    info["function_check"] = {
        "inputs_per_expert": int(next(iter(check_x.values())).shape[0]),
        "max_abs_logit_diff": gaps,
        "tolerance": FUNCTION_TOL,
    }
    bad = {n: g for n, g in gaps.items() if not g <= FUNCTION_TOL}
    if bad:
        raise AssertionError(f"alignment {key} changed the function of B experts: max |Δlogit| {bad}")
    return Aligned(key, out / "base_b", experts_out, heads, info)


# ------------------------------------------------------------------------------------------ statistics


def _calib(d: TaskData, batch: int) -> list[dict[str, torch.Tensor]]:
    return calibration_batches(d, batch)


def _heldout(d: TaskData, n: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """Unlabelled test inputs (first ``n``) as batches: TACT's statistics out of sample."""
    x = d.x_test[:n]
    return [
        {"input_ids": x[i : i + batch], "attention_mask": torch.ones_like(x[i : i + batch])}
        for i in range(0, len(x), batch)
    ]


def point_moments(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Per-channel moments at TACT's default points (network order) of ``model`` on ``batches``."""
    from raymerge.engine.stats import collect_stats

    return collect_stats(model, batches, None, points="default", grams=False, device="cpu").moments


def std_ratio(merged: dict[str, Any], expert: dict[str, Any]) -> dict[str, float]:
    """σ_merged/σ_expert per point, mean over channels where the expert's σ > 0 (``Corrections.collapse``)."""
    out = {}
    for p, e in expert.items():
        ok = e.std > 0
        out[p] = float((merged[p].std[ok] / e.std[ok]).mean())
    return out


def rms_ratio(merged: dict[str, Any], expert: dict[str, Any]) -> dict[str, float]:
    """sqrt(Σ_c σ²_merged / Σ_c σ²_expert) per point: the ratio of total activation scale, which
    channels of tiny expert σ cannot dominate (they can dominate the mean of per-channel ratios)."""
    return {p: float((merged[p].var.sum() / e.var.sum()).sqrt()) for p, e in expert.items()}


def mean_ratio(per_task: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per point mean over tasks, overall mean over points, and the same per task."""
    tasks = list(per_task)
    points = list(per_task[tasks[0]])
    per_point = {p: sum(per_task[t][p] for t in tasks) / len(tasks) for p in points}
    out: dict[str, Any] = {"per_point": per_point, "overall": sum(per_point.values()) / len(points)}
    for kind in ("attention_output", "mlp_preactivation", "block_output"):
        sel = [v for p, v in per_point.items() if point_kind(p) == kind]
        out[kind] = sum(sel) / len(sel) if sel else float("nan")
    out["per_task"] = {t: sum(r.values()) / len(r) for t, r in per_task.items()}
    return out


def wide_points(layers: int) -> list[str]:
    """TACT points beyond the default: the embeddings' LayerNorm and, per block, q/k/v, the
    attention-output projection and its LayerNorm, the MLP's two projections and the block output."""
    per_block = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output",
        "intermediate.dense",
        "output.dense",
        "",
    ]
    return ["embeddings.LayerNorm"] + [f"encoder.layer.{i}.{p}".rstrip(".") for i in range(layers) for p in per_block]


def point_kind(point: str) -> str:
    """Which of TACT's default BERT points this is: attention output (the LayerNorm after the
    attention residual), MLP pre-activation (intermediate.dense) or block output (the block's
    final LayerNorm)."""
    if point.endswith("attention.output"):
        return "attention_output"
    if point.endswith("intermediate.dense"):
        return "mlp_preactivation"
    return "block_output" if re.fullmatch(r".*layer\.\d+", point) else "other"


# ------------------------------------------------------------------------------------------ rows


@dataclass
class Run:
    """Everything the rows of one run share."""

    cfg: SuiteConfig
    data: list[TaskData]
    side_a: Side
    side_b: Side
    work: Path
    expert_acc: dict[str, float]
    expert_moments: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (path, split) → moments
    grams: dict[str, str] = field(default_factory=dict)  # expert path → grams file

    @property
    def names(self) -> list[str]:
        return [d.task.name for d in self.data]

    def moments_of_expert(self, path: Path, d: TaskData, split: str) -> dict[str, Any]:
        key = (str(path), split)
        if key not in self.expert_moments:
            batches = _calib(d, self.cfg.calib_batch) if split == "calib" else _heldout(d, 256, self.cfg.calib_batch)
            self.expert_moments[key] = point_moments(load_body(path), batches)
        return self.expert_moments[key]


def experts_of(run: Run, al: Aligned) -> dict[str, Path]:
    return {n: run.side_a.experts[n] if n in run.side_a.experts else al.experts_b[n] for n in run.names}


def heads_of(run: Run, al: Aligned) -> dict[str, nn.Linear]:
    return {n: run.side_a.expert_heads[n] if n in run.side_a.expert_heads else al.heads_b[n] for n in run.names}


def evaluate_body(run: Run, body: nn.Module, heads: dict[str, nn.Linear]) -> dict[str, float]:
    return {d.task.name: accuracy(body, heads[d.task.name], d.x_test, d.y_test) for d in run.data}


def collapse_of(run: Run, al: Aligned, body: nn.Module, split: str = "calib") -> dict[str, Any]:
    """σ_merged/σ_expert of ``body`` (with whatever hooks it carries) against each task's expert."""
    experts = experts_of(run, al)
    per_task, per_task_rms = {}, {}
    for d in run.data:
        batches = _calib(d, run.cfg.calib_batch) if split == "calib" else _heldout(d, 256, run.cfg.calib_batch)
        merged = point_moments(body, batches)
        expert = run.moments_of_expert(experts[d.task.name], d, split)
        per_task[d.task.name], per_task_rms[d.task.name] = std_ratio(merged, expert), rms_ratio(merged, expert)
    return {**mean_ratio(per_task), "rms": mean_ratio(per_task_rms)}


def _merge(run: Run, name: str, text: str) -> tuple[BertModel, Path, float]:
    out = run.work / "merges" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = run_merge(text, out)
    return load_body(out), out, figures["wall_seconds"]


def data_free_rows(run: Run, al: Aligned) -> tuple[list[dict[str, Any]], dict[str, Path], dict[str, Any]]:
    """Average, TA and TIES (the suite's hyperparameters) of this alignment's experts; anchor
    check: TA and TIES with base A as the base."""
    experts = experts_of(run, al)
    paths = [experts[n] for n in run.names]
    anchor_text = recipe_yaml(
        "linear",
        None,
        [run.side_a.base, al.base_b],
        {"normalize": True},
        [{"weight": 1.0}, {"weight": 1.0}],
        [],
        run.cfg.seed,
    )
    _, anchor, _ = _merge(run, f"{al.key}_anchor", anchor_text)
    rows, dirs = [], {}
    by_label = {r.label: r for r in METHOD_ROWS}
    heads = heads_of(run, al)
    for label in DATA_FREE:
        spec = by_label[label]
        text = recipe_yaml(
            spec.method, anchor, paths, spec.shared, [spec.per_model] * len(paths), spec.exclude, run.cfg.seed
        )
        body, out, secs = _merge(run, f"{al.key}_{label}", text)
        dirs[label] = out
        acc = evaluate_body(run, body, heads)
        rows.append(
            {
                "label": label,
                "alignment": al.key,
                "kind": "data-free",
                "method": spec.method,
                "params": {**spec.shared, **spec.per_model},
                "exclude": spec.exclude,
                "base": None if spec.method == "mean" else "midpoint of base A and (aligned) base B",
                "note": spec.note,
                "merge_seconds": secs,
                "sigma_ratio": collapse_of(run, al, body),
                **summarize(acc, run.expert_acc),
            }
        )
        log.info(
            "%-8s %-6s mean normalized %.3f  σ ratio %.3f",
            al.key,
            label,
            rows[-1]["mean_normalized"],
            rows[-1]["sigma_ratio"]["overall"],
        )
    check = {}
    for label in ("TA", "TIES"):
        spec = by_label[label]
        text = recipe_yaml(
            spec.method, run.side_a.base, paths, spec.shared, [spec.per_model] * len(paths), spec.exclude, run.cfg.seed
        )
        body, _, _ = _merge(run, f"{al.key}_{label}_baseA", text)
        s = summarize(evaluate_body(run, body, heads), run.expert_acc)
        check[label] = {
            "mean_normalized_base_a": s["mean_normalized"],
            "mean_normalized_midpoint": next(r for r in rows if r["label"] == label)["mean_normalized"],
        }
    return rows, dirs, check


def regmean_row(run: Run, al: Aligned) -> dict[str, Any]:
    """RegMean from each (aligned) expert's input Grams on its own task's calibration data."""
    from raymerge.engine.stats import collect_stats

    experts = experts_of(run, al)
    t0 = time.perf_counter()
    grams = []
    for d in run.data:
        path = experts[d.task.name]
        if str(path) not in run.grams:
            out = run.work / "grams" / f"{al.key}_{d.task.name}"
            res = collect_stats(load_body(path), _calib(d, run.cfg.calib_batch), out, device="cpu")
            run.grams[str(path)] = str(res.grams_path)
        grams.append({"grams": run.grams[str(path)]})
    stats_s = time.perf_counter() - t0
    text = recipe_yaml(
        "regmean", None, [experts[n] for n in run.names], {"alpha": REGMEAN_ALPHA}, grams, EMBEDDINGS, run.cfg.seed
    )
    body, _, secs = _merge(run, f"{al.key}_regmean", text)
    acc = evaluate_body(run, body, heads_of(run, al))
    row = {
        "label": "RegMean",
        "alignment": al.key,
        "kind": "data-based",
        "method": "regmean",
        "params": {"alpha": REGMEAN_ALPHA},
        "exclude": EMBEDDINGS,
        "calibration_examples_per_task": run.cfg.calib_examples,
        "stats_seconds": round(stats_s, 2),
        "merge_seconds": secs,
        "sigma_ratio": collapse_of(run, al, body),
        **summarize(acc, run.expert_acc),
    }
    log.info("%-8s RegMean mean normalized %.3f", al.key, row["mean_normalized"])
    return row


def tact_row(
    run: Run, al: Aligned, free: list[dict[str, Any]], dirs: dict[str, Path], points: Sequence[str] | str = "default"
) -> dict[str, Any]:
    """TACT on the best data-free merge of this alignment: per task, corrections from that task's
    (aligned) expert on its calibration inputs at ``points``, applied with forward hooks while that
    task is evaluated; σ ratios before and after on calibration and held-out inputs (at TACT's
    default points, whatever ``points`` are)."""
    from raymerge.engine.tact import apply_corrections, compute_corrections

    best = max(free, key=lambda r: r["mean_normalized"])
    body = load_body(dirs[best["label"]])
    experts = experts_of(run, al)
    heads = heads_of(run, al)
    t0 = time.perf_counter()
    corrections = {
        d.task.name: compute_corrections(
            load_body(experts[d.task.name]),
            body,
            _calib(d, run.cfg.calib_batch),
            points,
            task=d.task.name,
            device="cpu",
        )
        for d in run.data
    }
    stats_s = time.perf_counter() - t0
    acc, after_calib, after_held, before_held = {}, {}, {}, {}
    for d in run.data:
        name = d.task.name
        e_cal = run.moments_of_expert(experts[name], d, "calib")
        e_held = run.moments_of_expert(experts[name], d, "heldout")
        before_held[name] = std_ratio(point_moments(body, _heldout(d, 256, run.cfg.calib_batch)), e_held)
        with apply_corrections(body, corrections[name]):
            acc[name] = accuracy(body, heads[name], d.x_test, d.y_test)
            after_calib[name] = std_ratio(point_moments(body, _calib(d, run.cfg.calib_batch)), e_cal)
            after_held[name] = std_ratio(point_moments(body, _heldout(d, 256, run.cfg.calib_batch)), e_held)
    n_points = len(corrections[run.names[0]].points)
    default = points == "default"
    row = {
        "label": f"TACT on {best['label']}" if default else f"TACT ({n_points} points) on {best['label']}",
        "alignment": al.key,
        "kind": "data-based",
        "method": "tact" if default else "tact_wide",
        "on": best["label"],
        "params": {
            "points": "default (attention output, MLP pre-activation, block output)" if default else list(points),
            "points_per_task": n_points,
            "eps": corrections[run.names[0]].eps,
        },
        "calibration_examples_per_task": run.cfg.calib_examples,
        "note": "per-task activation correction (needs the task id at inference)",
        "stats_seconds": round(stats_s, 2),
        "sigma_ratio": mean_ratio(after_calib),
        "sigma_ratio_before": best["sigma_ratio"],
        "sigma_ratio_heldout": mean_ratio(after_held),
        "sigma_ratio_heldout_before": mean_ratio(before_held),
        "sequential_collapse": {n: c.collapse() for n, c in corrections.items()},
        **summarize(acc, run.expert_acc),
    }
    log.info(
        "%-8s %s mean normalized %.3f  σ ratio %.3f → %.3f",
        al.key,
        row["label"],
        row["mean_normalized"],
        best["sigma_ratio"]["overall"],
        row["sigma_ratio"]["overall"],
    )
    return row


def interpolation_path(
    run: Run, al: Aligned, alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
) -> list[dict[str, Any]]:
    """Accuracy along (1 − α)·mean(A's experts) + α·mean(B's experts, this alignment), every task
    with its own head: α = 0 is the local average of A's half, α = 1 of B's. A permutation-aligned
    pair of bases keeps both halves above chance in between; a barrier drops them."""
    from safetensors.torch import load_file

    def mean_of(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
        sds = [load_file(str(p / "model.safetensors")) for p in paths]
        return {k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}

    mean_a = mean_of([run.side_a.experts[n] for n in run.side_a.experts])
    mean_b = mean_of([al.experts_b[n] for n in al.experts_b])
    body = load_body(run.side_a.base)
    heads = heads_of(run, al)
    path = []
    for alpha in alphas:
        body.load_state_dict({k: (1 - alpha) * mean_a[k] + alpha * mean_b[k] for k in mean_a})
        s = summarize(evaluate_body(run, body, heads), run.expert_acc)
        half = {
            side: sum(s["normalized"][n] for n in names) / len(names)
            for side, names in (("A", run.side_a.experts), ("B", al.experts_b))
        }
        path.append(
            {
                "alpha": alpha,
                "mean_normalized": s["mean_normalized"],
                "tasks_a_normalized": half["A"],
                "tasks_b_normalized": half["B"],
            }
        )
    return path


# ------------------------------------------------------------------------------------------ run


def run(
    cfg: SuiteConfig,
    seed_b: int,
    cache: Path,
    rebuild_a: bool,
    rebuild_b: bool,
    threads: int,
    alignments: Sequence[str],
) -> dict[str, Any]:
    """Load side A (trained with the suite's thread count if not cached), train or load side B,
    then align, merge, correct and evaluate, all with ``threads`` torch threads."""
    t0 = time.perf_counter()
    _quiet_transformers()
    torch.manual_seed(cfg.seed)
    data = make_data(cfg)
    tasks_a, tasks_b = split_tasks(cfg)
    torch.set_num_threads(SUITE_THREADS)  # what the suite trains its cached base A with
    sa = side_a(cfg, data, tasks_a, cache, rebuild_a)
    t_a = time.perf_counter() - t0
    torch.set_num_threads(threads)
    sb = side_b(cfg, data, tasks_b, seed_b, cache, rebuild_b)
    t_train = time.perf_counter() - t0
    heads = {**sa.expert_heads, **sb.expert_heads}
    experts = {**sa.experts, **sb.experts}
    expert_acc = {
        d.task.name: accuracy(load_body(experts[d.task.name]), heads[d.task.name], d.x_test, d.y_test) for d in data
    }
    base_a, base_b = load_body(sa.base), load_body(sb.base)
    probe_acc = {
        d.task.name: accuracy(
            base_a if d.task.name in tasks_a else base_b,
            {**sa.probe_heads, **sb.probe_heads}[d.task.name],
            d.x_test,
            d.y_test,
        )
        for d in data
    }
    rows: list[dict[str, Any]] = [
        {
            "label": "Bases (linear probe)",
            "alignment": "-",
            "kind": "reference",
            "note": "head trained on the frozen base the task's expert came from",
            **summarize(probe_acc, expert_acc),
        },
        {
            "label": "Experts (individual)",
            "alignment": "-",
            "kind": "reference",
            "note": "each task on its own fine-tuned expert",
            **summarize(expert_acc, expert_acc),
        },
    ]
    alignment_info, anchor_check, collapse, paths, merges = {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="raymerge-nonlocal-") as tmp:
        r = Run(cfg, data, sa, sb, Path(tmp), expert_acc)
        check_x = {d.task.name: d.x_test[:64] for d in data if d.task.name in tasks_b}
        match_x = torch.cat([d.x_pretrain[:MATCH_SEQUENCES_PER_TASK] for d in data])
        corr = Correlations.of(base_a, base_b, match_x)
        for key in alignments:
            al = align_side_b(key, sa.base, sb, r.work, check_x, corr, cfg.seed)
            alignment_info[key] = al.info
            log.info(
                "alignment %s: distance %.3f → %.3f, residual correlation %.3f",
                key,
                al.info["distance_before"],
                al.info.get("distance_after", al.info["distance_before"]),
                sum(al.info["residual_correlation"].values()) / len(al.info["residual_correlation"]),
            )
            paths[key] = interpolation_path(r, al)
            free, dirs, anchor_check[key] = data_free_rows(r, al)
            rows += free
            rows.append(regmean_row(r, al))
            tact = tact_row(r, al, free, dirs)
            rows.append(tact)
            merges[key] = (al, free, dirs, tact["mean_normalized"])
            collapse[key] = {
                "merge": tact["on"],
                "points": list(tact["sigma_ratio"]["per_point"]),
                "before": tact["sigma_ratio_before"]["per_point"],
                "after": tact["sigma_ratio"]["per_point"],
                "before_overall": tact["sigma_ratio_before"]["overall"],
                "after_overall": tact["sigma_ratio"]["overall"],
                "heldout_before_overall": tact["sigma_ratio_heldout_before"]["overall"],
                "heldout_after_overall": tact["sigma_ratio_heldout"]["overall"],
                "heldout_before": tact["sigma_ratio_heldout_before"]["per_point"],
                "heldout_after": tact["sigma_ratio_heldout"]["per_point"],
                "max_abs_after_minus_1": max(abs(v - 1) for v in tact["sigma_ratio"]["per_point"].values()),
            }
        # TACT at every Linear/LayerNorm output of each block, on the alignment where TACT did best.
        best_key = max(merges, key=lambda k: merges[k][3])
        al, free, dirs, _ = merges[best_key]
        rows.append(tact_row(r, al, free, dirs, wide_points(cfg.size.layers)))
    import transformers

    from raymerge.engine import __version__

    return {
        "benchmark": "quality_nonlocal",
        "tasks": {
            d.task.name: {
                "classes": d.task.classes,
                "base": "A" if d.task.name in tasks_a else "B",
                "doc": (SAMPLERS[d.task.name][0].__doc__ or "").strip(),
            }
            for d in data
        },
        "config": {
            **dataclasses.asdict(cfg),
            "base_a_key": cfg.base_key(),
            "experts_a_key": cfg.experts_key(),
            "base_b_key": side_b_keys(cfg, tasks_b, seed_b)[0],
            "experts_b_key": side_b_keys(cfg, tasks_b, seed_b)[1],
            "nonlocal_version": NONLOCAL_VERSION,
        },
        "seeds": {
            "suite_and_base_a": cfg.seed,
            "base_b": seed_b,
            "experts_a": "suite seed + 20 + task index (probe: + 10)",
            "experts_b": "seed_b + 20 + task index (probe: + 10)",
            "weight_matching": cfg.seed,
            "merge": cfg.seed,
        },
        "tasks_a": list(tasks_a),
        "tasks_b": list(tasks_b),
        "alignments": alignment_info,
        "anchor": ANCHOR_NOTE,
        "anchor_check": anchor_check,
        "variance_collapse": collapse,
        "interpolation": paths,
        "rows": rows,
        "training": {"side_a": sa.info, "side_b": sb.info},
        "wall_seconds": {
            "total": round(time.perf_counter() - t0, 2),
            "side_a_train_or_cache": round(t_a, 2),
            "side_b_train_or_cache": round(t_train - t_a, 2),
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": threads,
            "side_a_threads": SUITE_THREADS,
            "load_average_at_end": list(os.getloadavg()),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "raymerge": __version__,
        },
    }


# ------------------------------------------------------------------------------------------ reporting


def markdown_table(result: dict[str, Any]) -> str:
    """The README tables: normalized accuracy (%) per task, means and σ ratio per row; then the
    variance collapse before/after TACT per alignment."""
    tasks = list(result["tasks"])
    cols = [f"{t.replace('_', ' ')} ({result['tasks'][t]['base']})" for t in tasks]
    lines = [
        "| alignment | method | " + " | ".join(cols) + " | **mean norm.** | mean acc. | σ ratio |",
        "|---" * (len(tasks) + 5) + "|",
    ]
    for r in result["rows"]:
        cells = [f"{100 * r['normalized'][t]:.1f}" for t in tasks]
        sigma = f"{r['sigma_ratio']['overall']:.2f}" if "sigma_ratio" in r else ""
        align = ALIGNMENTS.get(r["alignment"], r["alignment"]) if r["kind"] != "reference" else "–"
        lines.append(
            f"| {align} | {r['label']} | "
            + " | ".join(cells)
            + f" | **{100 * r['mean_normalized']:.1f}** | {100 * r['mean_accuracy']:.1f} | {sigma} |"
        )
    expert = next(r for r in result["rows"] if r["label"].startswith("Experts"))
    lines.append(
        "| | *expert accuracy* | "
        + " | ".join(f"*{100 * expert['accuracy'][t]:.1f}*" for t in tasks)
        + f" | | *{100 * expert['mean_accuracy']:.1f}* | |"
    )
    lines += [
        "",
        "| alignment | ‖A − B‖ before → after | residual-channel correlation | midpoint of the expert "
        "averages: A / B tasks | TACT on | σ ratio before TACT: all / attention / MLP pre-act. / block | after "
        "(calibration) | before → after (held-out) |",
        "|---" * 8 + "|",
    ]
    for key, c in result["variance_collapse"].items():
        tact = next(r for r in result["rows"] if r["alignment"] == key and r.get("method") == "tact")
        b = tact["sigma_ratio_before"]
        info = result["alignments"][key]
        corr = sum(info["residual_correlation"].values()) / len(info["residual_correlation"])
        mid = next(p for p in result["interpolation"][key] if p["alpha"] == 0.5)
        lines.append(
            f"| {ALIGNMENTS[key]} | {info['distance_before']:.1f} → {info.get('distance_after', info['distance_before']):.1f}"
            f" | {corr:.2f} | {100 * mid['tasks_a_normalized']:.0f} / {100 * mid['tasks_b_normalized']:.0f} | {c['merge']}"
            f" | {b['overall']:.2f} / {b['attention_output']:.2f} / {b['mlp_preactivation']:.2f} / {b['block_output']:.2f}"
            f" | {c['after_overall']:.4f} | {c['heldout_before_overall']:.2f} → {c['heldout_after_overall']:.3f} |"
        )
    return "\n".join(lines)


def _short_point(p: str) -> str:
    m = re.fullmatch(r".*layer\.(\d+)(?:\.(.*))?", p)
    if not m:
        return p
    what = {None: "out", "attention.output": "attn", "intermediate.dense": "mlp"}.get(m.group(2), m.group(2))
    return f"L{m.group(1)} {what}"


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: mean normalized accuracy per row (dots: tasks). Right: σ ratio per correction point
    before (solid) and after (dashed) TACT, one colour per alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"-": "#999999", "none": "#d62728", "wm": "#ff7f0e", "wm_res": "#1f77b4", "am_res": "#2ca02c"}
    rows = result["rows"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 0.32 * len(rows) + 2.5), gridspec_kw={"width_ratios": [1.1, 1]})
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows, strict=True):
        ax.barh(
            y,
            100 * r["mean_normalized"],
            color=colors[r["alignment"]],
            hatch="//" if str(r.get("method", "")).startswith("tact") else None,
            edgecolor="white",
        )
        ax.scatter(
            [100 * v for v in r["normalized"].values()], [y] * len(r["normalized"]), s=8, color="black", zorder=3
        )
    ax.set_yticks(ys, [f"{r['label']} · {ALIGNMENTS.get(r['alignment'], 'reference')}" for r in rows], fontsize=7)
    ax.axvline(100, color="black", lw=0.8, ls="--")
    ax.set_xlabel("normalized accuracy (% of own expert); bar = mean, dots = tasks")
    ax.set_xlim(0, 115)
    points = None
    for key, c in result["variance_collapse"].items():
        points = c["points"]
        xs = range(len(points))
        bx.plot(
            xs,
            [c["heldout_before"][p] for p in points],
            "-o",
            ms=3,
            color=colors[key],
            label=f"{ALIGNMENTS[key]}: {c['merge']}, before TACT",
        )
        bx.plot(
            xs,
            [c["heldout_after"][p] for p in points],
            "--",
            color=colors[key],
            label=f"{ALIGNMENTS[key]}: after TACT (held-out inputs)",
        )
    if points:
        bx.set_xticks(range(len(points)), [_short_point(p) for p in points], rotation=60, fontsize=7)
    bx.axhline(1, color="black", lw=0.8)
    bx.set_ylabel("σ_merged / σ_expert on held-out inputs (mean over channels, tasks)")
    bx.set_ylim(0, max(1.3, bx.get_ylim()[1]))
    bx.legend(fontsize=7, loc="lower left")
    cfg = result["config"]
    fig.suptitle(
        f"Non-local merge of {len(result['tasks'])} experts ({len(result['tasks_a'])} from base A, "
        f"{len(result['tasks_b'])} from base B) of a {cfg['size']['layers']}-block, hidden-"
        f"{cfg['size']['hidden']} BERT (raymerge merge())",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality_nonlocal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 + 2 tasks (< 90 s)")
    p.add_argument("--seed", type=int, default=0, help="the suite's seed: data, base A and its experts (default 0)")
    p.add_argument(
        "--seed-b", type=int, default=None, help=f"pretraining seed of base B (default: --seed + {SEED_B_OFFSET})"
    )
    p.add_argument(
        "--alignments",
        nargs="*",
        default=list(ALIGNMENTS),
        choices=list(ALIGNMENTS),
        help="which alignments of B's side to merge (default: all)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for base B, its experts and everything after training (default 1; "
        "results depend on it). Side A, if not cached, trains with the suite's 2",
    )
    p.add_argument("--cache-dir", type=Path, default=CACHE, help=f"trained models cache (default {CACHE})")
    p.add_argument("--rebuild", action="store_true", help="retrain base B and its experts even when cached")
    p.add_argument("--rebuild-a", action="store_true", help="also retrain the suite's base A and experts")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON and PNG go")
    p.add_argument("--stem", default=None, help="results file stem (default quality_nonlocal[_smoke])")
    p.add_argument(
        "--table",
        type=Path,
        default=None,
        metavar="JSON",
        help="only print the markdown table of an existing results JSON (what the README shows)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log training and merge progress")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    if args.verbose:
        logging.getLogger("benchmarks.quality").setLevel(logging.INFO)
    cfg = dataclasses.replace(SMOKE if args.smoke else FULL, seed=args.seed)
    seed_b = args.seed + SEED_B_OFFSET if args.seed_b is None else args.seed_b
    if seed_b == cfg.seed:
        print("--seed-b must differ from --seed: the two bases are pretrained from different seeds", file=sys.stderr)
        return 2
    result = run(
        cfg, seed_b, args.cache_dir, args.rebuild_a, args.rebuild or args.rebuild_a, args.threads, args.alignments
    )
    result["config"]["smoke"] = args.smoke
    result["command"] = "python -m benchmarks.quality_nonlocal " + " ".join(sys.argv[1:] if argv is None else argv)
    stem = args.stem or ("quality_nonlocal_smoke" if args.smoke else "quality_nonlocal")
    write_results(result, args.results_dir, stem, plot, markdown_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
