"""Merge quality, non-local, on deep ReLU MLPs: the setting where permutation alignment and TACT
are known to matter (REPAIR's and the TACT paper's VGG experiments), at a size a CPU trains in a
minute.

The BERT suite (``benchmarks.quality_nonlocal``) cannot show this well: a transformer's residual
stream has an (almost) continuous rotation symmetry that a permutation cannot undo, so its two
bases barely align, and LayerNorm keeps activation variance from collapsing. A plain ReLU MLP has
exactly the permutation symmetry and no normalisation. One run (deterministic, one torch thread):

1. **Bases.** Two MLPs (``--width`` units × ``--depth`` hidden ReLU layers) trained from seeds A
   and B on one pretraining task (16 classes of a random nonlinear teacher on N(0, I) inputs).
2. **Experts.** 8 tasks, each a different 4-class random teacher on a shifted input distribution;
   tasks 1–4 are fine-tuned from base A, 5–8 from base B (LP-FT: probe, then the whole network),
   every expert keeps its head. The probe on the frozen base is the "no fine-tuning" row.
3. **Alignment** of B's side to A: *none*, or weight matching between the two bases with the
   engine's ``match_weights`` on its ``mlp`` permutation spec, applied to every B expert and its
   head (each checked to compute the same function, ≤ 1e-4).
4. **Merges** through ``merge()`` from mergekit-schema recipes on saved checkpoints: Average, TA
   (λ = 0.3) and TIES (top 20 %, λ = 1) with task vectors relative to the midpoint of the two
   (aligned) bases, itself merged by raymerge (``linear``), as in the TACT paper's notebook.
5. **TACT** per task on every merge: ``engine.tact.compute_corrections`` with the task's expert as
   target on 512 calibration inputs, at every hidden layer's pre-activation (the Linear outputs),
   applied with ``apply_corrections`` hooks for evaluation on 2048 held-out inputs.
6. **Variance collapse**: σ_merged/σ_expert per layer (mean over channels, then tasks), from the
   merged model's statistics that TACT computes, and after TACT on the held-out inputs.

    python -m benchmarks.quality_nonlocal_mlp            # full: about 2 minutes on one core
    python -m benchmarks.quality_nonlocal_mlp --smoke --results-dir /tmp/q
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.quality import RESULTS, recipe_yaml, run_merge
from raymerge.engine.align import apply_permutation, match_weights, permutation_spec_for, shapes_of
from raymerge.engine.tact import apply_corrections, compute_corrections

PRETRAIN_CLASSES = 16
TASK_CLASSES = 4
N_TASKS = 8
FUNCTION_TOL = 1e-4
MERGES = {  # label: (method, shared parameters, per-expert parameters); base = midpoint of the bases
    "Average": ("mean", {}, {}),
    "TA": ("task_arithmetic", {"lambda": 0.3}, {"weight": 1.0}),
    "TIES": ("ties", {"lambda": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.2}),
}
ALIGNMENTS = {"none": "no alignment", "wm": "weight matching (bases)"}


@dataclass(frozen=True)
class Config:
    inputs: int = 32
    width: int = 256
    depth: int = 4
    pretrain_examples: int = 32768
    pretrain_steps: int = 2000
    train_examples: int = 8192
    probe_steps: int = 300
    finetune_steps: int = 800
    test_examples: int = 2048
    calib_examples: int = 512
    batch: int = 256
    seed_a: int = 0
    seed_b: int = 1


SMOKE = Config(
    width=48,
    depth=3,
    pretrain_examples=4096,
    pretrain_steps=300,
    train_examples=2048,
    probe_steps=80,
    finetune_steps=150,
    test_examples=512,
    calib_examples=128,
)


# ------------------------------------------------------------------------------------------ models


class Net(nn.Module):
    """``body`` (Linear/ReLU stack; points ``body.0``, ``body.2``, … are pre-activations) + ``head``."""

    def __init__(self, cfg: Config, classes: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        n = cfg.inputs
        for _ in range(cfg.depth):
            layers += [nn.Linear(n, cfg.width), nn.ReLU()]
            n = cfg.width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cfg.width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def layer_names(cfg: Config) -> list[str]:
    return [f"body.{2 * i}" for i in range(cfg.depth)]


def state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def with_state(cfg: Config, sd: dict[str, torch.Tensor]) -> Net:
    net = Net(cfg, sd["head.weight"].shape[0], seed=0)
    net.load_state_dict(sd)
    return net


def teacher(cfg: Config, seed: int, classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A random one-hidden-layer tanh network's argmax: the labels of a task."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(cfg.inputs, 64, generator=g) / cfg.inputs**0.5
    w2 = torch.randn(64, classes, generator=g) / 8
    return lambda x: (torch.tanh(x @ w1) @ w2).argmax(1)


def inputs(cfg: Config, seed: int, n: int, shift: torch.Tensor | None = None) -> torch.Tensor:
    x = torch.randn(n, cfg.inputs, generator=torch.Generator().manual_seed(seed))
    return x if shift is None else x + shift


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int, seed: int) -> None:
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[i]), y[i]).backward()
        opt.step()


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).double().mean())


@dataclass
class Task:
    name: str
    side: str  # "A" or "B": the base it is fine-tuned from
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_calib: torch.Tensor


def make_tasks(cfg: Config) -> list[Task]:
    tasks = []
    for t in range(N_TASKS):
        shift = 0.5 * torch.randn(cfg.inputs, generator=torch.Generator().manual_seed(50 + t))
        label = teacher(cfg, 100 + t, TASK_CLASSES)
        x_tr, x_te = inputs(cfg, 200 + t, cfg.train_examples, shift), inputs(cfg, 300 + t, cfg.test_examples, shift)
        tasks.append(
            Task(
                f"task{t + 1}",
                "A" if t < N_TASKS // 2 else "B",
                x_tr,
                label(x_tr),
                x_te,
                label(x_te),
                inputs(cfg, 400 + t, cfg.calib_examples, shift),
            )
        )
    return tasks


def train(cfg: Config, tasks: list[Task]) -> tuple[dict[str, Net], dict[str, Net], dict[str, float], dict[str, float]]:
    """(bases by side, experts by task, probe accuracy, expert accuracy)."""
    label = teacher(cfg, 999, PRETRAIN_CLASSES)
    x = inputs(cfg, 1, cfg.pretrain_examples)
    y = label(x)
    bases = {}
    for side, seed in (("A", cfg.seed_a), ("B", cfg.seed_b)):
        net = Net(cfg, PRETRAIN_CLASSES, seed)
        fit(net, x, y, cfg.pretrain_steps, 1e-3, cfg.batch, seed)
        bases[side] = net
    experts, probe, expert_acc = {}, {}, {}
    for i, t in enumerate(tasks):
        net = Net(cfg, TASK_CLASSES, seed=10 + i)
        net.body = copy.deepcopy(bases[t.side].body)
        net.body.requires_grad_(False)
        fit(net, t.x_train, t.y_train, cfg.probe_steps, 1e-2, cfg.batch, seed=10 + i)
        probe[t.name] = accuracy(net, t.x_test, t.y_test)
        net.body.requires_grad_(True)
        fit(net, t.x_train, t.y_train, cfg.finetune_steps, 1e-3, cfg.batch, seed=20 + i)
        experts[t.name] = net
        expert_acc[t.name] = accuracy(net, t.x_test, t.y_test)
    return bases, experts, probe, expert_acc


# ------------------------------------------------------------------------------------------ merging


def save_body(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """A merge input: the body's tensors (``body.*``) and a config naming the architecture."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items() if k.startswith("body.")}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "mlp", "architectures": ["ReluMLP"]}))
    return path


def load_body(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def merge_dir(
    method: str,
    base: Path | None,
    experts: Sequence[Path],
    shared: dict[str, Any],
    per_model: dict[str, Any],
    out: Path,
) -> tuple[dict[str, torch.Tensor], float]:
    t0 = time.perf_counter()
    run_merge(recipe_yaml(method, base, experts, shared, [per_model] * len(experts), [], 0), out)
    return load_body(out), time.perf_counter() - t0


def align(
    cfg: Config, bases: dict[str, Net], experts: dict[str, Net], tasks: list[Task], how: str
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, Any]]:
    """(expert state dicts, B's base state dict, report), B's side permuted onto A's if ``how``."""
    sds = {t.name: state(experts[t.name]) for t in tasks}
    base_b = state(bases["B"])
    if how == "none":
        return sds, base_b, {}
    layers = [*layer_names(cfg), "head"]
    spec_pre = permutation_spec_for({"model_type": "mlp", "layers": layers}, shapes_of(base_b))
    res = match_weights(state(bases["A"]), base_b, spec_pre, seed=0)
    spec_task = permutation_spec_for({"model_type": "mlp", "layers": layers}, shapes_of(next(iter(sds.values()))))
    gaps = {}
    for t in tasks:
        if t.side != "B":
            continue
        permuted = apply_permutation(sds[t.name], spec_task, res.perms)
        with torch.no_grad():
            gaps[t.name] = float((with_state(cfg, permuted)(t.x_test) - experts[t.name](t.x_test)).abs().max())
        if gaps[t.name] > FUNCTION_TOL:
            raise RuntimeError(f"permuted expert {t.name} computes another function (max |Δlogit| {gaps[t.name]:.2e})")
        sds[t.name] = permuted
    report = {
        "objective_before": res.objective[0],
        "objective_after": res.objective[-1],
        "passes": res.passes,
        "max_logit_gap": max(gaps.values()),
    }
    return sds, apply_permutation(base_b, spec_pre, res.perms), report


def layer_ratios(points: Sequence[Any]) -> list[float]:
    return [float((p.merged_std / p.expert_std.clamp_min(1e-12)).mean()) for p in points]


def heldout_ratio(cfg: Config, merged: nn.Module, expert: nn.Module, x: torch.Tensor) -> list[float]:
    """σ_merged/σ_expert per hidden pre-activation on ``x`` (mean over channels)."""
    out: list[float] = []

    def stds(net: nn.Module) -> list[torch.Tensor]:
        found: list[torch.Tensor] = []
        hooks = [
            dict(net.named_modules())[n].register_forward_hook(lambda m, a, o: found.append(o.std(0)))
            for n in layer_names(cfg)
        ]
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()
        return found

    for m, e in zip(stds(merged), stds(expert), strict=True):
        out.append(float((m / e.clamp_min(1e-12)).mean()))
    return out


def evaluate(
    cfg: Config,
    merged_sd: dict[str, torch.Tensor],
    sds: dict[str, dict[str, torch.Tensor]],
    tasks: list[Task],
    expert_acc: dict[str, float],
) -> dict[str, Any]:
    """Accuracy per task before and after TACT, and the σ ratios, for one merged body."""
    acc, acc_tact, ratio, after = {}, {}, [], []
    for t in tasks:
        expert = with_state(cfg, sds[t.name])
        merged = with_state(
            cfg, {**merged_sd, "head.weight": sds[t.name]["head.weight"], "head.bias": sds[t.name]["head.bias"]}
        )
        acc[t.name] = accuracy(merged, t.x_test, t.y_test)
        batches = [{"x": t.x_calib[i : i + 128]} for i in range(0, len(t.x_calib), 128)]
        corr = compute_corrections(expert, merged, batches, points=layer_names(cfg), task=t.name, device="cpu")
        ratio.append(layer_ratios(corr.points))
        hooks = apply_corrections(merged, corr)
        acc_tact[t.name] = accuracy(merged, t.x_test, t.y_test)
        after.append(heldout_ratio(cfg, merged, expert, t.x_test))
        hooks.remove()
    n = len(tasks)

    def mean_norm(a: dict[str, float]) -> float:
        return 100 * sum(a[k] / expert_acc[k] for k in a) / n

    def per_layer(rows: list[list[float]]) -> list[float]:
        return [round(sum(r[i] for r in rows) / n, 4) for i in range(len(rows[0]))]

    return {
        "accuracy": acc,
        "accuracy_tact": acc_tact,
        "mean_normalized": round(mean_norm(acc), 2),
        "mean_normalized_tact": round(mean_norm(acc_tact), 2),
        "sigma_ratio": per_layer(ratio),
        "sigma_ratio_after_tact_heldout": per_layer(after),
    }


def run(cfg: Config, work: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    tasks = make_tasks(cfg)
    bases, experts, probe, expert_acc = train(cfg, tasks)
    log(f"trained bases and {len(experts)} experts in {time.perf_counter() - t0:.0f} s")
    rows: list[dict[str, Any]] = []
    alignments: dict[str, Any] = {}
    for how in ALIGNMENTS:
        sds, base_b, report = align(cfg, bases, experts, tasks, how)
        root = work / how
        base_dirs = [save_body(state(bases["A"]), root / "base_A"), save_body(base_b, root / "base_B")]
        anchor_sd, _ = merge_dir("linear", None, base_dirs, {}, {"weight": 0.5}, root / "midpoint")
        expert_dirs = [save_body(sds[t.name], root / "experts" / t.name) for t in tasks]
        dist = sum(float((state(bases["A"])[k] - base_b[k]).norm() ** 2) for k in anchor_sd) ** 0.5
        alignments[how] = {"label": ALIGNMENTS[how], "base_distance": round(dist, 3), **report}
        for label, (method, shared, per_model) in MERGES.items():
            merged_sd, seconds = merge_dir(method, root / "midpoint", expert_dirs, shared, per_model, root / label)
            res = evaluate(cfg, merged_sd, sds, tasks, expert_acc)
            rows.append(
                {
                    "alignment": how,
                    "method": label,
                    "raymerge_method": method,
                    "merge_seconds": round(seconds, 2),
                    **res,
                }
            )
            log(
                f"{how:5s} {label:8s} mean normalized {res['mean_normalized']:5.1f} → TACT "
                f"{res['mean_normalized_tact']:5.1f}   σ ratio per layer {res['sigma_ratio']}"
            )
    return {
        "benchmark": "quality_nonlocal_mlp",
        "config": asdict(cfg),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "tasks": [{"name": t.name, "side": t.side} for t in tasks],
        "probe_accuracy": probe,
        "expert_accuracy": expert_acc,
        "probe_mean_normalized": round(100 * sum(probe[k] / expert_acc[k] for k in probe) / len(probe), 2),
        "alignments": alignments,
        "merges": {k: {"method": m, "shared": s, "per_model": p} for k, (m, s, p) in MERGES.items()},
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ------------------------------------------------------------------------------------------ reporting


def markdown_table(result: dict[str, Any]) -> str:
    """The README table: mean normalized accuracy before → after TACT and σ ratios per layer."""
    depth = result["config"]["depth"]
    lines = [
        f"| alignment | merge | mean norm. acc. | + TACT | σ_merged/σ_expert, layers 1–{depth} | after TACT (held-out) |",
        "|---|---|---|---|---|---|",
        f"| – | Bases (linear probe) | {result['probe_mean_normalized']:.1f} | | | |",
        "| – | Experts (individual) | 100.0 | | | |",
    ]
    for r in result["rows"]:
        before = " / ".join(f"{x:.2f}" for x in r["sigma_ratio"])
        after = " / ".join(f"{x:.2f}" for x in r["sigma_ratio_after_tact_heldout"])
        lines.append(
            f"| {ALIGNMENTS[r['alignment']]} | {r['method']} | {r['mean_normalized']:.1f} | "
            f"**{r['mean_normalized_tact']:.1f}** | {before} | {after} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['method']}\n{r['alignment']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["mean_normalized"] for r in rows], 0.4, label="merged")
    ax.bar([x + 0.2 for x in xs], [r["mean_normalized_tact"] for r in rows], 0.4, label="merged + TACT")
    ax.axhline(result["probe_mean_normalized"], color="grey", ls="--", label="linear probe")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("mean normalized accuracy (%)")
    ax.legend(fontsize=8)
    for r in rows:
        bx.plot(
            range(1, len(r["sigma_ratio"]) + 1), r["sigma_ratio"], marker="o", label=f"{r['method']} ({r['alignment']})"
        )
    bx.axhline(1.0, color="grey", ls="--")
    bx.set_xlabel("hidden layer")
    bx.set_ylabel("σ_merged / σ_expert (before TACT)")
    bx.legend(fontsize=7)
    fig.suptitle("Non-local merges of ReLU MLPs: 4 + 4 experts from two differently seeded bases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="small widths and few steps (seconds)")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--stem", default=None, help="results file stem (default quality_nonlocal_mlp[_smoke])")
    a = p.parse_args(argv)
    cfg = SMOKE if a.smoke else Config()
    with tempfile.TemporaryDirectory(prefix="raymerge-nonlocal-mlp-") as work:
        result = run(cfg, Path(work))
    stem = a.stem or ("quality_nonlocal_mlp_smoke" if a.smoke else "quality_nonlocal_mlp")
    a.results_dir.mkdir(parents=True, exist_ok=True)
    out = a.results_dir / f"{stem}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(markdown_table(result))
    print(f"wrote {out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
