"""Merge quality: a small pretrained encoder, fine-tuned experts, every method through ``merge()``.

What one run does (deterministic given ``--seed`` and the thread count):

1. **Pretrain** a small ``transformers`` ``BertModel`` (hidden 96, 4 blocks, no pooler) with
   masked-token prediction on unlabelled sequences from every task's domain
   (``benchmarks.quality_tasks``: seeded Markov fillers with planted tokens).
2. Per task, a **linear probe** (head only, frozen base) and an **expert**: the probe's head plus
   *every* body parameter fine-tuned on that task (LP-FT). Each task keeps its own head; only the
   shared body is merged. Base and experts are saved as Hugging Face directories (``config.json``
   + ``model.safetensors``) in a cache keyed by the training settings, so reruns skip step 1–2.
3. For each method: a mergekit-schema recipe (YAML text) → ``raymerge.engine.merge.merge`` → the
   merged directory loaded back with ``BertModel.from_pretrained`` → every task evaluated with its
   own expert head. Data-based rows (RegMean from ``raymerge.engine.stats`` input Grams, TACT
   from ``raymerge.engine.tact`` corrections) use a few unlabelled calibration batches per task
   (``calibration_batches``); they are reported as ``pending`` when those modules are missing.
4. Accuracy and normalized accuracy (merged / expert) per task and mean →
   ``<results-dir>/quality.json`` and ``quality.png``; ``markdown_table`` renders the README table
   from the JSON.

    python -m benchmarks.quality                 # full suite: 13 minutes from scratch on 2 shared cores
    python -m benchmarks.quality --smoke --results-dir /tmp/q   # 2 tasks, 3 methods + RegMean, < 60 s
    python -m benchmarks.quality --table benchmarks/results/quality.json   # the README block only

TACT corrects the data-free merge with the best mean in this run's table (chosen on the same
held-out data it is scored on); the row's label names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.quality_model import (
    EncoderSize,
    TrainSpec,
    accuracy,
    finetune,
    load_body,
    load_heads,
    pretrain_mlm,
    save_body,
    save_heads,
    train_probe,
)
from benchmarks.quality_tasks import SAMPLERS, VOCAB, Task, make_tasks

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "raymerge-bench" / "quality"
# Bump when a change to the task generators or the training code changes the trained weights.
TRAINING_VERSION = 2

log = logging.getLogger("benchmarks.quality")


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class SuiteConfig:
    """Everything that determines the trained base, probes and experts (the cache key)."""

    tasks: tuple[str, ...]
    size: EncoderSize
    pretrain: TrainSpec
    probe: TrainSpec
    finetune: TrainSpec
    pretrain_examples: int  # unlabelled sequences per task in the pretraining corpus
    train_examples: int  # labelled training examples per task
    test_examples: int  # held-out examples per task
    calib_examples: int  # unlabelled examples per task for data-based methods (RegMean, TACT)
    calib_batch: int
    seed: int = 0
    threads: int = 1  # torch threads: floating-point results (so the cache) depend on it

    def base_key(self) -> str:
        """Cache key of the pretrained base: what its corpus and training depend on."""
        return _digest(self.tasks, self.size, self.pretrain, self.pretrain_examples, self.seed, self.threads)

    def experts_key(self) -> str:
        """Cache key of probes and experts, relative to the base."""
        return _digest(self.tasks, self.probe, self.finetune, self.train_examples, self.seed, self.threads)


def _digest(*parts: Any) -> str:
    plain = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]  # type: ignore[arg-type]
    blob = json.dumps({"v": TRAINING_VERSION, "parts": plain}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


FULL = SuiteConfig(
    tasks=(
        "marker_position",
        "token_order",
        "triple_order",
        "bracket_balance",
        "presence_xor",
        "marker_gap",
        "first_group",
        "markov_source",
    ),
    size=EncoderSize(hidden=96, layers=4, heads=4, intermediate=384),
    pretrain=TrainSpec(steps=3000, batch=64, lr=2e-3, weight_decay=0.01),
    probe=TrainSpec(steps=400, batch=256, lr=1e-2),
    finetune=TrainSpec(steps=300, batch=64, lr=2e-4),
    pretrain_examples=4096,
    train_examples=8192,
    test_examples=1024,
    calib_examples=256,
    calib_batch=64,
)
SMOKE = SuiteConfig(
    tasks=("marker_position", "token_order"),
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

# Linear-only methods (Gram, spectral, RegMean) send the position / token-type embedding matrices
# to their fallback: they are lookup tables, not linear maps of layer inputs (no Gram exists).
EMBEDDINGS = [r"embeddings\."]


@dataclass(frozen=True)
class MethodRow:
    """One data-free table row: a registry method and the parameters its recipe sets."""

    label: str
    method: str
    shared: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, Any] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    note: str = ""


# Reference hyperparameters (../shared/references): FusionBench's / the papers' defaults, untuned.
METHOD_ROWS = (
    MethodRow("Average", "mean", note="mean of the experts (= TA with λ = 1/T)"),
    MethodRow("TA", "task_arithmetic", {"lambda": 0.3}, {"weight": 1.0}, note="FusionBench default λ = 0.3"),
    MethodRow(
        "TIES",
        "ties",
        {"lambda": 1.0, "normalize": True},
        {"weight": 1.0, "density": 0.2},
        note="top-20 % per tensor, elected sign, disjoint mean (paper), λ = 1",
    ),
    MethodRow(
        "DARE-TIES",
        "dare_ties",
        {"lambda": 1.0, "normalize": True},
        {"weight": 1.0, "density": 0.5},
        note="TIES with DARE's random drop (keep 0.5, L1 rescale) in place of the top-20 % trim; disjoint mean, λ = 1",
    ),
    MethodRow(
        "Consensus (TALL)",
        "consensus",
        {"k": 2, "tall_lambda": 0.6, "lambda": 0.3},
        {"weight": 1.0},
        note="TALL λ = 0.6, k = 2, applied to TA with TA's λ = 0.3",
    ),
    MethodRow(
        "Breadcrumbs",
        "breadcrumbs",
        {"lambda": 0.3},
        {"weight": 1.0, "density": 0.9, "gamma": 0.01},
        note="drop the top 1 % and bottom 10 % of |Δ| per tensor, then TA with λ = 0.3",
    ),
    MethodRow("Model Stock", "model_stock", {}, note="per-tensor interpolation ratio from the experts' angle"),
    MethodRow("TSV-M", "tsv_m", {"alpha": 1.0}, exclude=EMBEDDINGS, note="α = 1"),
    MethodRow("Iso-C", "iso_c", {"alpha": 1.0}, exclude=EMBEDDINGS, note="α = 1 (FusionBench config)"),
    MethodRow(
        "Iso-CTS",
        "iso_cts",
        {"alpha": 1.0, "common_space_fraction": 0.8},
        exclude=EMBEDDINGS,
        note="α = 1, common space 0.8",
    ),
    MethodRow("ACTMat", "actmat", {}, exclude=EMBEDDINGS, note="C_t = Δ_tᵀΔ_t, scale 1, no hyperparameters"),
    MethodRow(
        "WUDI (Adam)",
        "wudi",
        {"solver": "adam", "steps": 300, "lr": 1e-5},
        exclude=EMBEDDINGS,
        note="300 Adam steps at lr 1e-5 from ΣΔ_t (paper)",
    ),
    MethodRow(
        "WUDI (spectral)",
        "wudi",
        {"solver": "spectral", "t": 300.0},
        exclude=EMBEDDINGS,
        note="gradient-flow filter 1 − e^(−λt), t = 300",
    ),
)
SMOKE_ROWS = ("TA", "TIES", "ACTMat")

# Not in the main table: the settings that explain rows far from their papers' ranking (WUDI-Adam
# is early-stopped near its start ΣΔ_t = TA at λ = 1; Iso-C's paper α for 8 tasks; DARE-TIES with
# FusionBench's summed merge, which also trims to the top 20 % first — raymerge's does not).
SENSITIVITY_ROWS = (
    MethodRow("TA, λ = 1 (WUDI's start ΣΔ_t)", "task_arithmetic", {"lambda": 1.0}, {"weight": 1.0}),
    MethodRow("WUDI (Adam), lr 1e-4", "wudi", {"solver": "adam", "steps": 300, "lr": 1e-4}, exclude=EMBEDDINGS),
    MethodRow("WUDI (closed form R S⁺)", "wudi", {"solver": "closed_form"}, exclude=EMBEDDINGS),
    MethodRow("Iso-C, α = 1.5 (paper, 8 tasks)", "iso_c", {"alpha": 1.5}, exclude=EMBEDDINGS),
    MethodRow("DARE-TIES, sum, λ = 0.5", "dare_ties", {"lambda": 0.5}, {"weight": 1.0, "density": 0.5}),
)


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class TaskData:
    """One task's splits (token ids and labels); regenerated from seeds, never stored."""

    task: Task
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_calib: torch.Tensor  # unlabelled, for data-based merging
    x_pretrain: torch.Tensor  # unlabelled, the task's share of the pretraining corpus


def make_data(cfg: SuiteConfig) -> list[TaskData]:
    """Every task's splits, each split from its own seeded generator."""
    out = []
    for i, task in enumerate(make_tasks(cfg.tasks)):

        def gen(split: int, _i: int = i) -> torch.Generator:
            return torch.Generator().manual_seed(cfg.seed * 100_003 + _i * 101 + split)

        x_tr, y_tr = task.sample(cfg.train_examples, gen(0))
        x_te, y_te = task.sample(cfg.test_examples, gen(1))
        out.append(
            TaskData(
                task,
                x_tr,
                y_tr,
                x_te,
                y_te,
                task.inputs(cfg.calib_examples, gen(2)),
                task.inputs(cfg.pretrain_examples, gen(3)),
            )
        )
    return out


def calibration_batches(data: TaskData, batch: int) -> list[dict[str, torch.Tensor]]:
    """A task's unlabelled calibration data as model-input batches (``input_ids`` and an
    all-ones ``attention_mask``): the ``data`` argument of ``raymerge.engine.stats`` /
    ``raymerge.engine.tact``. Data-based rows get their per-task inputs only from here."""
    x = data.x_calib
    return [
        {"input_ids": x[i : i + batch], "attention_mask": torch.ones_like(x[i : i + batch])}
        for i in range(0, len(x), batch)
    ]


# ------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class Trained:
    """Paths of the cached checkpoints and the heads, plus what training measured."""

    root: Path
    base: Path
    experts: dict[str, Path]
    probe_heads: dict[str, nn.Linear]
    expert_heads: dict[str, nn.Linear]
    info: dict[str, Any]


def train_all(cfg: SuiteConfig, data: list[TaskData], cache: Path, rebuild: bool = False) -> Trained:
    """Pretrain, probe and fine-tune — or load from the cache what is already complete there.

    Layout: ``cache/base-<base_key>/base`` and, inside it, ``experts-<experts_key>/`` with the
    expert directories and ``heads.safetensors`` (probe and expert heads). A ``complete.json``
    written last marks each level as usable, so a run killed mid-training starts that level over.
    """
    base_root = cache / f"base-{cfg.base_key()}"
    return train_cached(
        cfg, data, [d.task.name for d in data], cfg.seed, base_root, base_root / f"experts-{cfg.experts_key()}", rebuild
    )


def train_cached(
    cfg: SuiteConfig,
    data: list[TaskData],
    names: Sequence[str],
    seed: int,
    base_root: Path,
    root: Path,
    rebuild: bool,
    label: str = "",
    info: dict[str, Any] | None = None,
) -> Trained:
    """A base pretrained from ``seed`` on the corpus of all of ``data`` (cached in ``base_root``),
    then probes and experts for the tasks ``names`` (cached in ``root``), LP-FT with seeds
    ``seed + 10 + i`` / ``seed + 20 + i`` for task index i of ``data``; ``label`` names the base in
    log lines, ``info`` starts the returned info dict."""
    info = {"cache_dir": str(root), **(info or {})}
    t0 = time.perf_counter()
    if (base_root / "complete.json").exists() and not rebuild:
        log.info("reusing the cached base%s in %s", label, base_root)
        info["pretrain"] = {**json.loads((base_root / "complete.json").read_text()), "cached": True}
        base = load_body(base_root / "base")
    else:
        if base_root.exists():
            shutil.rmtree(base_root)
        base_root.mkdir(parents=True)
        corpus = torch.cat([d.x_pretrain for d in data])
        base = pretrain_mlm(cfg.size, corpus, cfg.pretrain, seed, log.info)
        save_body(base, base_root / "base")
        info["pretrain"] = {"seconds": round(time.perf_counter() - t0, 2), "corpus_sequences": len(corpus)}
        (base_root / "complete.json").write_text(json.dumps(info["pretrain"], indent=1))
        info["pretrain"]["cached"] = False
    experts = {n: root / "experts" / n for n in names}
    if (root / "complete.json").exists() and not rebuild:
        log.info("reusing cached probes and experts%s in %s", label and f" of base{label}", root)
        info["finetune"] = {**json.loads((root / "complete.json").read_text()), "cached": True}
    else:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        heads: dict[str, nn.Linear] = {}
        seconds = {}
        for i, d in enumerate(data):
            if d.task.name not in experts:
                continue
            t1 = time.perf_counter()
            probe = train_probe(base, d.task, d.x_train, d.y_train, cfg.probe, seed + 10 + i)
            body, head = finetune(base, probe, d.task, d.x_train, d.y_train, cfg.finetune, seed + 20 + i, log.info)
            save_body(body, experts[d.task.name])
            heads[f"probe.{d.task.name}"], heads[f"expert.{d.task.name}"] = probe, head
            seconds[d.task.name] = round(time.perf_counter() - t1, 2)
        save_heads(heads, root / "heads.safetensors")
        info["finetune"] = {"seconds": seconds}
        (root / "complete.json").write_text(json.dumps(info["finetune"], indent=1))
        info["finetune"]["cached"] = False
    info["cached"] = info["pretrain"]["cached"] and info["finetune"]["cached"]
    heads = load_heads(root / "heads.safetensors")
    return Trained(
        root,
        base_root / "base",
        experts,
        {n: heads[f"probe.{n}"] for n in names},
        {n: heads[f"expert.{n}"] for n in names},
        info,
    )


# ------------------------------------------------------------------------------------------ merging


def recipe_yaml(
    method: str,
    base: Path | None,
    experts: Sequence[Path],
    shared: dict[str, Any],
    per_model: Sequence[dict[str, Any]],
    exclude: Sequence[str],
    seed: int,
) -> str:
    """A mergekit-schema recipe with a ``raymerge:`` section (JSON flow values are valid YAML)."""
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {json.dumps(str(base))}")
    lines.append("models:")
    for path, params in zip(experts, per_model, strict=True):
        lines.append(f"  - model: {json.dumps(str(path))}")
        if params:
            lines.append(f"    parameters: {json.dumps(params)}")
    if shared:
        lines.append(f"parameters: {json.dumps(shared)}")
    lines += [
        "dtype: float32",
        "out_dtype: float32",
        "raymerge:",
        f"  seed: {seed}",
        "  device: cpu",
        f"  exclude: {json.dumps(list(exclude))}",
        "",
    ]
    return "\n".join(lines)


def run_merge(text: str, out: Path) -> dict[str, Any]:
    """Parse ``text`` and merge it into ``out`` through raymerge's ``merge()``; return its figures."""
    from raymerge.engine.merge import merge
    from raymerge.engine.recipe import parse_recipe

    # raymerge gives each task cpu_count // workers torch threads; ask for as many workers as keep
    # that at this process's thread count (one by default: on a busy 2-core machine a 2-thread
    # OpenMP team can run ten times slower), and restore the count the merge's pool changed.
    threads = torch.get_num_threads()
    workers = max(1, (os.cpu_count() or 1) // threads)
    try:
        figures = merge(parse_recipe(text, "quality-recipe"), out, overwrite=True, progress=False, workers=workers)
    finally:
        torch.set_num_threads(threads)
    return figures.to_json()


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(
    body_for: Callable[[str], nn.Module], heads: dict[str, nn.Linear], data: list[TaskData]
) -> dict[str, float]:
    """Test accuracy per task of ``body_for(task)`` with that task's head."""
    return {d.task.name: accuracy(body_for(d.task.name), heads[d.task.name], d.x_test, d.y_test) for d in data}


def summarize(acc: dict[str, float], expert: dict[str, float]) -> dict[str, Any]:
    norm = {k: acc[k] / expert[k] for k in acc}
    return {
        "accuracy": acc,
        "normalized": norm,
        "mean_accuracy": sum(acc.values()) / len(acc),
        "mean_normalized": sum(norm.values()) / len(norm),
    }


@dataclass
class Context:
    """What every row needs: config, data, trained models, and a scratch directory for merges."""

    cfg: SuiteConfig
    data: list[TaskData]
    trained: Trained
    work: Path
    expert_acc: dict[str, float]
    merged_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [d.task.name for d in self.data]


def data_free_row(ctx: Context, row: MethodRow) -> dict[str, Any]:
    """Merge with one registry method, load the result and evaluate every task on it."""
    experts = [ctx.trained.experts[n] for n in ctx.task_names]
    text = recipe_yaml(
        row.method, ctx.trained.base, experts, row.shared, [row.per_model] * len(experts), row.exclude, ctx.cfg.seed
    )
    out = ctx.work / "".join(c if c.isalnum() else "_" for c in row.label)
    figures = run_merge(text, out)
    ctx.merged_dirs[row.label] = out
    body = load_body(out)
    acc = evaluate(lambda _t: body, ctx.trained.expert_heads, ctx.data)
    return {
        "label": row.label,
        "kind": "data-free",
        "method": row.method,
        "params": {**row.shared, **row.per_model},
        "exclude": row.exclude,
        "note": row.note,
        "merge_seconds": figures["wall_seconds"],
        **summarize(acc, ctx.expert_acc),
    }


# --- data-based rows -------------------------------------------------------------------------------
# A data-based row is a function (ctx, rows so far) -> row dict. It gets each task's unlabelled
# inputs from ``calibration_batches`` and must not touch labels or test data. ``DATA_ROWS`` lists
# them; a row whose engine module is missing is reported as ``pending`` with the reason.


def _pending(label: str, method: str, reason: str) -> dict[str, Any]:
    return {"label": label, "kind": "data-based", "method": method, "status": "pending", "reason": reason}


def regmean_row(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """RegMean: each expert's per-linear-layer input Grams on its own task's calibration data
    (``raymerge.engine.stats.collect_stats``), then the ``regmean`` recipe."""
    try:
        from raymerge.engine.stats import collect_stats
    except ImportError as exc:
        return _pending("RegMean", "regmean", f"raymerge.engine.stats not available ({exc})")
    alpha = 0.95
    t0 = time.perf_counter()
    grams = []
    for d in ctx.data:
        out = ctx.work / "grams" / d.task.name
        expert = load_body(ctx.trained.experts[d.task.name])
        res = collect_stats(expert, calibration_batches(d, ctx.cfg.calib_batch), out, device="cpu")
        grams.append({"grams": str(res.grams_path)})
    stats_s = time.perf_counter() - t0
    experts = [ctx.trained.experts[n] for n in ctx.task_names]
    text = recipe_yaml("regmean", None, experts, {"alpha": alpha}, grams, EMBEDDINGS, ctx.cfg.seed)
    out = ctx.work / "regmean"
    figures = run_merge(text, out)
    ctx.merged_dirs["RegMean"] = out
    body = load_body(out)
    acc = evaluate(lambda _t: body, ctx.trained.expert_heads, ctx.data)
    return {
        "label": "RegMean",
        "kind": "data-based",
        "method": "regmean",
        "params": {"alpha": alpha},
        "exclude": EMBEDDINGS,
        "calibration_examples_per_task": ctx.cfg.calib_examples,
        "note": "input Grams XᵀX/N of every nn.Linear from each expert on its task's unlabelled calibration data",
        "stats_seconds": round(stats_s, 2),
        "merge_seconds": figures["wall_seconds"],
        **summarize(acc, ctx.expert_acc),
    }


def tact_row(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """TACT on the best data-free merge so far: per task, expert-vs-merged activation moments on
    that task's calibration data (``raymerge.engine.tact.compute_corrections``), applied as
    forward hooks while that task is evaluated."""
    try:
        from raymerge.engine.tact import apply_corrections, compute_corrections
    except ImportError as exc:
        return _pending("TACT", "tact", f"raymerge.engine.tact not available ({exc})")
    free = [r for r in rows if r.get("kind") == "data-free" and r["label"] in ctx.merged_dirs]
    if not free:
        return _pending("TACT", "tact", "no data-free merge to correct")
    best = max(free, key=lambda r: r["mean_normalized"])
    merged_dir = ctx.merged_dirs[best["label"]]
    body = load_body(merged_dir)
    t0 = time.perf_counter()
    corrections = {}
    for d in ctx.data:
        corrections[d.task.name] = compute_corrections(
            load_body(ctx.trained.experts[d.task.name]),
            load_body(merged_dir),
            calibration_batches(d, ctx.cfg.calib_batch),
            "default",
            task=d.task.name,
            device="cpu",
        )
    stats_s = time.perf_counter() - t0
    acc = {}
    for d in ctx.data:
        with apply_corrections(body, corrections[d.task.name]):
            acc[d.task.name] = accuracy(body, ctx.trained.expert_heads[d.task.name], d.x_test, d.y_test)
    label = f"TACT on {best['label']}"
    return {
        "label": label,
        "kind": "data-based",
        "method": "tact",
        "on": best["label"],
        "params": {"points": "default (attention output, MLP pre-activation, block output)"},
        "calibration_examples_per_task": ctx.cfg.calib_examples,
        "note": "per-task activation correction (needs the task id at inference)",
        "stats_seconds": round(stats_s, 2),
        **summarize(acc, ctx.expert_acc),
    }


DATA_ROWS: dict[str, Callable[[Context, list[dict[str, Any]]], dict[str, Any]]] = {
    "RegMean": regmean_row,
    "TACT": tact_row,
}
SMOKE_DATA_ROWS = ("RegMean",)


# ------------------------------------------------------------------------------------------ run


def run(
    cfg: SuiteConfig,
    rows: Sequence[MethodRow],
    data_rows: Sequence[str],
    cache: Path,
    rebuild: bool,
    threads: int,
    sensitivity: Sequence[MethodRow] = (),
) -> dict[str, Any]:
    """Train (or load) base and experts, then evaluate the probe, the experts and every row."""
    t0 = time.perf_counter()
    if VOCAB in (cfg.size.hidden, cfg.size.intermediate):
        raise SystemExit(
            f"layer width {VOCAB} equals the vocabulary size: raymerge would merge those layers as embeddings"
        )
    torch.set_num_threads(threads)
    _quiet_transformers()
    torch.manual_seed(cfg.seed)
    data = make_data(cfg)
    trained = train_all(cfg, data, cache, rebuild)
    t_train = time.perf_counter() - t0
    base = load_body(trained.base)
    experts = {n: load_body(p) for n, p in trained.experts.items()}
    expert_acc = evaluate(lambda t: experts[t], trained.expert_heads, data)
    probe_acc = evaluate(lambda _t: base, trained.probe_heads, data)
    out_rows: list[dict[str, Any]] = [
        {
            "label": "Base (linear probe)",
            "kind": "reference",
            "note": "head trained on the frozen base",
            **summarize(probe_acc, expert_acc),
        },
        {
            "label": "Experts (individual)",
            "kind": "reference",
            "note": "each task on its own fine-tuned expert",
            **summarize(expert_acc, expert_acc),
        },
    ]
    log.info("probe %s | experts %s", _fmt(probe_acc), _fmt(expert_acc))
    with tempfile.TemporaryDirectory(prefix="raymerge-quality-") as tmp:
        ctx = Context(cfg, data, trained, Path(tmp), expert_acc)
        for row in rows:
            r = data_free_row(ctx, row)
            log.info("%-18s mean normalized %.3f  %s", row.label, r["mean_normalized"], _fmt(r["accuracy"]))
            out_rows.append(r)
        for name in data_rows:
            r = DATA_ROWS[name](ctx, out_rows)
            log.info("%-18s %s", r["label"], r.get("reason") or f"mean normalized {r['mean_normalized']:.3f}")
            out_rows.append(r)
        extra = []
        for row in sensitivity:
            r = data_free_row(ctx, row)
            log.info("%-18s mean normalized %.3f (sensitivity)", row.label, r["mean_normalized"])
            extra.append(r)
    import transformers

    from raymerge.engine import __version__

    return {
        "benchmark": "quality",
        "tasks": {
            d.task.name: {"classes": d.task.classes, "doc": (SAMPLERS[d.task.name][0].__doc__ or "").strip()}
            for d in data
        },
        "config": {
            **dataclasses.asdict(cfg),
            "base_key": cfg.base_key(),
            "experts_key": cfg.experts_key(),
            "training_version": TRAINING_VERSION,
        },
        "rows": out_rows,
        "sensitivity": extra,
        "training": trained.info,
        "wall_seconds": {"total": round(time.perf_counter() - t0, 2), "training_or_cache": round(t_train, 2)},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "raymerge": __version__,
        },
    }


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())


# ------------------------------------------------------------------------------------------ reporting


def markdown_table(result: dict[str, Any]) -> str:
    """The README block: the main table, then the sensitivity rows (when the run has them).

    Cells are normalized accuracy (% of the task's expert) per task and their mean, plus the mean
    raw accuracy; the main table ends with the experts' own accuracy.
    """
    text = rows_table(result, "rows")
    if result.get("sensitivity"):
        text += (
            "\n\nSensitivity (same experts; not in the chart): the settings behind the rows that differ most "
            "from their papers' ranking.\n\n" + rows_table(result, "sensitivity")
        )
    return text


def rows_table(result: dict[str, Any], section: str) -> str:
    """One markdown table of ``result[section]`` (``rows`` or ``sensitivity``)."""
    tasks = list(result["tasks"])
    head = "| method | " + " | ".join(t.replace("_", " ") for t in tasks) + " | **mean norm.** | mean acc. |"
    lines = [head, "|---" * (len(tasks) + 3) + "|"]
    for r in result[section]:
        if r.get("status") == "pending":
            lines.append(f"| {r['label']} | " + " | ".join("–" for _ in tasks) + f" | pending | {r['reason']} |")
            continue
        cells = [f"{100 * r['normalized'][t]:.1f}" for t in tasks]
        lines.append(
            f"| {r['label']} | "
            + " | ".join(cells)
            + f" | **{100 * r['mean_normalized']:.1f}** | {100 * r['mean_accuracy']:.1f} |"
        )
    if section == "rows":
        expert = next(r for r in result["rows"] if r["label"].startswith("Experts"))
        lines.append(
            "| *expert accuracy* | "
            + " | ".join(f"*{100 * expert['accuracy'][t]:.1f}*" for t in tasks)
            + f" | | *{100 * expert['mean_accuracy']:.1f}* |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Grouped bars: normalized accuracy per task (groups) and the mean, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    rows = [r for r in result["rows"] if r.get("status") != "pending" and not r["label"].startswith("Experts")]
    groups = [*tasks, "mean"]
    width = 0.85 / len(rows)
    fig, ax = plt.subplots(figsize=(max(10, 1.6 * len(groups)), 4.8))
    # One colour family per kind of method, shades within it; data-based rows hatched.
    family = {
        "mean": "Blues",
        "task_arithmetic": "Blues",
        "ties": "Blues",
        "dare_ties": "Blues",
        "consensus": "Blues",
        "tsv_m": "Greens",
        "iso_c": "Greens",
        "iso_cts": "Greens",
        "actmat": "Oranges",
        "wudi": "Oranges",
        "regmean": "Purples",
        "tact": "Purples",
    }
    members: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        members.setdefault(family.get(r.get("method", ""), "Greys"), []).append(i)
    for i, r in enumerate(rows):
        vals = [r["normalized"][t] for t in tasks] + [r["mean_normalized"]]
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        fam = family.get(r.get("method", ""), "Greys")
        idx, n = members[fam].index(i), len(members[fam])
        color = "#9a9a9a" if r["kind"] == "reference" else plt.get_cmap(fam)(0.4 + 0.5 * idx / max(1, n - 1))
        ax.bar(
            xs,
            [100 * v for v in vals],
            width,
            label=r["label"],
            color=color,
            edgecolor="white",
            linewidth=0.3,
            hatch="//" if r["kind"] == "data-based" else None,
        )
    ax.axvline(len(tasks) - 0.5, color="#bbbbbb", lw=0.8)
    ax.axhline(100, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), [g.replace("_", "\n") for g in groups], fontsize=8)
    ax.set_ylabel("normalized accuracy (% of expert)")
    ax.set_ylim(0, 115)
    cfg = result["config"]
    ax.set_title(
        f"Merging {len(tasks)} fully fine-tuned experts of a {cfg['size']['layers']}-block, "
        f"hidden-{cfg['size']['hidden']} BERT (raymerge merge())",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 tasks, 3 data-free methods + RegMean (< 60 s)")
    p.add_argument(
        "--methods",
        nargs="*",
        default=None,
        metavar="LABEL",
        help="table rows to run, by label (default: all; see METHOD_ROWS and DATA_ROWS)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data, pretraining and fine-tuning (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine two threads can run 10x slower; results depend on it)",
    )
    p.add_argument("--cache-dir", type=Path, default=CACHE, help=f"trained base/experts cache (default {CACHE})")
    p.add_argument("--rebuild", action="store_true", help="retrain even when the cache holds this configuration")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where quality.json and quality.png go")
    p.add_argument("--stem", default=None, help="results file stem (default quality, quality_smoke with --smoke)")
    p.add_argument(
        "--table",
        type=Path,
        default=None,
        metavar="JSON",
        help="only print the markdown table of an existing results JSON (what the README shows)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log training progress")
    return p.parse_args(argv)


def write_results(
    result: dict[str, Any],
    results_dir: Path,
    stem: str,
    plot: Callable[[dict[str, Any], Path], None],
    table: Callable[[dict[str, Any]], str],
) -> Path:
    """Write a quality run's ``result`` to ``results_dir/<stem>.json`` and its plot beside it
    (``.png``); print its README table and what was written. Returns the JSON path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"{stem}.json"
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.png').name} in {result['wall_seconds']['total']:.0f} s")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s", stream=sys.stderr
    )
    log.setLevel(logging.INFO)
    cfg = SMOKE if args.smoke else FULL
    cfg = dataclasses.replace(cfg, seed=args.seed, threads=args.threads)
    labels = args.methods
    if labels is None:
        labels = [*SMOKE_ROWS, *SMOKE_DATA_ROWS] if args.smoke else [r.label for r in METHOD_ROWS] + list(DATA_ROWS)
    known = {r.label for r in METHOD_ROWS} | set(DATA_ROWS)
    unknown = [x for x in labels if x not in known]
    if unknown:
        print(f"unknown method label(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
        return 2
    rows = [r for r in METHOD_ROWS if r.label in labels]
    data_rows = [n for n in DATA_ROWS if n in labels]
    sensitivity = () if args.smoke or args.methods is not None else SENSITIVITY_ROWS
    result = run(cfg, rows, data_rows, args.cache_dir, args.rebuild, args.threads, sensitivity)
    result["config"]["smoke"] = args.smoke
    result["command"] = "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    stem = args.stem or ("quality_smoke" if args.smoke else "quality")
    write_results(result, args.results_dir, stem, plot, markdown_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
