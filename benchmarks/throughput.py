"""Throughput and memory matrix: every method × executor, with the peers side by side, in one run.

For one synthetic Llama-shaped family (``--size``, optionally a ``--layers`` subset of a big
shape) it measures, in the same run and with the page cache warm before every measurement:

* the **I/O floor**: a sequential read of every input byte plus the write and fsync of one
  output-sized file;
* every ``--methods`` entry through ``raymerge run`` for each ``--executors`` entry, and the peer
  that has the method: ``mergekit-yaml`` (same recipe file) for the task-vector family,
  FusionBench's own functions (``benchmarks.fusionbench_runner``) for WUDI / TSV-M / Iso;
  wall time, GB/s of input read, wall / I/O floor, and the peak RSS of the whole process tree
  (children and Ray's raylet, GCS and workers included, sampled with psutil);
* **scaling**: TIES throughput versus ``--workers`` for each executor;
* **growth**: TIES peak RSS versus model size over ``--growth`` sizes (must stay flat).

Results: ``<results-dir>/<stem>.json`` and ``.png``.

    python -m benchmarks.throughput --size tiny --growth tiny        # smoke run, under a minute
    python -m benchmarks.throughput --size 1b --growth tiny,small,1b # this machine, ~40 min
    bash benchmarks/gpu.sh                                           # the 7B-shaped GPU matrix
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    DEFAULT_RESULTS,
    GIB,
    build_family,
    compare_outputs,
    console_script,
    engine_state,
    figures_line,
    io_floor,
    machine_info,
    ratio,
    run_measured,
    shard_files,
    warm_inputs,
)

MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "model_stock"}
FUSIONBENCH_METHODS = {"wudi", "tsv_m", "iso_c", "iso_cts"}
# Per-model and global parameters: reference defaults from the method notes.
PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({"weight": 1.0}, {"normalize": True}),
    "task_arithmetic": ({"weight": 0.3}, {}),
    "ties": ({"weight": 1.0, "density": 0.2}, {"normalize": True}),
    "dare_ties": ({"weight": 1.0, "density": 0.2}, {"normalize": True}),
    "breadcrumbs": ({"weight": 1.0, "density": 0.9, "gamma": 0.01}, {}),
    "model_stock": ({}, {}),
    "actmat": ({}, {}),
    "wudi": ({}, {}),
    "wudi_spectral": ({}, {"solver": "spectral"}),
    "tsv_m": ({}, {}),
    "iso_c": ({}, {}),
}


ALIASES = {"wudi_spectral": "wudi"}


def write_recipe(path: Path, method: str, base: Path, experts: Sequence[Path]) -> str:
    """A recipe in mergekit's schema (so ``mergekit-yaml`` reads the same file where it has the method)."""
    per_model, global_params = PARAMS.get(method, ({}, {}))
    # A label such as wudi_spectral names a method with its parameters (PARAMS).
    lines = [f"merge_method: {ALIASES.get(method, method)}", f"base_model: {base}", "models:"]
    for e in experts:
        lines.append(f"  - model: {e}")
        if per_model:
            lines.append("    parameters:")
            lines += [f"      {k}: {json.dumps(v)}" for k, v in per_model.items()]
    if global_params:
        lines.append("parameters:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in global_params.items()]
    lines += ["dtype: bfloat16", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def peak_device(figures: str | None) -> int | None:
    """The ``peak device X GiB`` of raymerge's figures line, in bytes."""
    m = re.search(r"peak device ([0-9.]+) GiB", figures or "")
    return int(float(m.group(1)) * GIB) if m else None


def ray_split(log: Path) -> dict[str, Any]:
    """From a Ray run's summary table: the tasks and GB read in the driver and on the cluster, and
    when the embedded cluster took drivers and had warm workers (seconds after the executor was
    created; None when it was not before the driver had run every task)."""
    text = log.read_text(errors="replace")
    out: dict[str, Any] = {"driver_tasks": 0, "driver_read_gb": 0.0, "ray_tasks": 0, "ray_read_gb": 0.0}
    head = re.search(r"Ray run finished in .*", text)
    m = re.search(r"embedded Ray ready after ([0-9.]+) s", head.group(0)) if head else None
    out["head_ready_s"] = float(m.group(1)) if m else None
    m = re.search(r"workers warm after ([0-9.]+) s", head.group(0)) if head else None
    out["workers_warm_s"] = float(m.group(1)) if m else None
    table = text.split("Ray run finished", 1)[1].splitlines()[2:] if head else []
    for row in table:
        cols = row.split()
        if len(cols) != 9 or cols[0] == "total":  # node label (2 words) + 7 figures
            continue
        side = "driver" if cols[:2] == ["driver", "in-proc"] else "ray"
        out[f"{side}_tasks"] += int(cols[4])
        out[f"{side}_read_gb"] = round(out[f"{side}_read_gb"] + float(cols[5]), 3)
    return out


def parse_size(spec: str) -> tuple[str, int | None]:
    """``7b`` → ("7b", None); ``70b:2`` → ("70b", 2) (a two-layer subset of the 70b shape)."""
    name, _, layers = spec.partition(":")
    return name, int(layers) if layers else None


def size_label(name: str, layers: int | None) -> str:
    return name if layers is None else f"{name}-{layers}L"


class Matrix:
    """Runs and records measurements for one family; every run starts from a warm page cache."""

    def __init__(self, args: argparse.Namespace, root: Path, base: Path, experts: list[Path]) -> None:
        self.args, self.root, self.base, self.experts = args, root, base, experts
        self.inputs = [f for d in [base, *experts] for f in shard_files(d)]
        self.input_bytes = sum(f.stat().st_size for f in self.inputs)
        self.output_bytes = sum(f.stat().st_size for f in shard_files(base))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")

    def floor(self) -> dict[str, Any]:
        warm_inputs(self.inputs)
        return io_floor(self.inputs, self.output_bytes, self.root / "io-floor.scratch")

    def _measure(self, label: str, cmd: list[str], out: Path) -> dict[str, Any]:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".raymerge-staging"), ignore_errors=True)
        warm_inputs(self.inputs)
        r = run_measured(cmd, self.root / f"{label}.log", self.args.sample_interval, self.env)
        r.pop("rss_timeline_s_bytes", None)
        r["read_gbps"] = round(self.input_bytes / r["wall_s"] / 1e9, 4) if r["returncode"] == 0 else None
        return r

    def raymerge(self, method: str, executor: str, workers: int | None, device: str) -> dict[str, Any]:
        recipe = self.root / f"{method}.yaml"
        write_recipe(recipe, method, self.base, self.experts)
        label = f"raymerge-{executor}-{method}-w{workers or 'default'}-{device}"
        out = self.root / f"out-{label}"
        cmd = [console_script("raymerge"), "run", str(recipe), str(out), "--overwrite", "-q"]
        cmd += ["--memory-budget", self.args.memory_budget, "--executor", executor, "--device", device]
        if workers:
            cmd += ["--workers", str(workers)]
        r = self._measure(label, cmd, out)
        r["figures_line"] = figures_line(self.root / f"{label}.log")
        if executor == "ray":
            r["ray_split"] = ray_split(self.root / f"{label}.log")
        r["peak_device_bytes"] = peak_device(r["figures_line"])
        r.update(self.declared(recipe, device))
        r.update(tool="raymerge", method=method, executor=executor, workers=workers, device=device, out=str(out))
        return r

    def declared(self, recipe: Path, device: str) -> dict[str, Any]:
        """The plan's declared peaks per task (``raymerge plan --json``) for this recipe and device."""
        cmd = [console_script("raymerge"), "plan", str(recipe), "--json", "--memory-budget", self.args.memory_budget]
        cmd += ["--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, check=False)
        try:
            plan = json.loads(proc.stdout)
        except ValueError:
            return {"declared": None}
        keys = ("peak_task_host_bytes", "peak_task_device_bytes")
        return {"declared": {k: plan.get(k) for k in keys}}

    def peer(self, method: str, device: str) -> dict[str, Any] | None:
        recipe = self.root / f"{method}.yaml"
        write_recipe(recipe, method, self.base, self.experts)
        if method in MERGEKIT_METHODS and "mergekit" in self.args.peers:
            out = self.root / f"out-mergekit-{method}"
            cmd = [console_script("mergekit-yaml"), str(recipe), str(out), "--no-copy-tokenizer"]
            cmd += ["--cuda"] if device == "cuda" else []
            r = self._measure(f"mergekit-{method}", cmd, out)
            r.update(tool="mergekit", method=method, executor="mergekit", device=device, out=str(out))
            return r
        if method in FUSIONBENCH_METHODS and "fusionbench" in self.args.peers:
            out = self.root / f"out-fusionbench-{method}"
            cmd = [sys.executable, "-m", "benchmarks.fusionbench_runner", "--method", method, "--base", str(self.base)]
            cmd += ["--out", str(out), "--device", device, *map(str, self.experts)]
            r = self._measure(f"fusionbench-{method}", cmd, out)
            r.update(tool="fusionbench", method=method, executor="fusionbench", device=device, out=str(out))
            return r
        return None

    def compare(self, ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any] | None:
        if ours["returncode"] != 0 or peer["returncode"] != 0:
            return None
        c = compare_outputs(Path(ours["out"]), Path(peer["out"]), self.base)
        return {"by_class": c["by_class"], "worst": c["worst"], "tensors_compared": c["tensors_compared"]}


def device_for(method: str, device: str) -> str:
    """``auto`` → the method's preferred device when CUDA is present (Gram/spectral on GPU)."""
    if device != "auto":
        return device
    import torch

    from raymerge.engine.methods import get_method

    return (
        "cuda" if torch.cuda.is_available() and get_method(ALIASES.get(method, method)).prefers_accelerator else "cpu"
    )


def run_matrix(args: argparse.Namespace, checkpoint: Path | None = None) -> dict[str, Any]:
    """The method × executor matrix and the scaling sweep; ``checkpoint`` gets the runs so far after each one."""
    name, layers = parse_size(args.size)
    root = args.workdir / size_label(name, layers)
    base, experts, reused = build_family(root, name, args.experts, args.shard_bytes, args.rebuild, layers, args.vocab)
    m = Matrix(args, root, base, experts)
    print(f"inputs: {len(m.inputs)} shards, {m.input_bytes / GIB:.2f} GiB ({'reused' if reused else 'built'})")
    floor = m.floor()
    print(f"I/O floor: {floor['floor_s']:.2f} s ({floor['read_gbps']} GB/s read)", flush=True)
    floors: list[float] = [floor["floor_s"]]  # every floor measured in this run, the first included
    warm_floors: list[float] = [floor["warm_floor_s"]]
    unused = [floor]

    def new_floor() -> dict[str, Any]:
        f = m.floor()
        floors.append(f["floor_s"])
        warm_floors.append(f["warm_floor_s"])
        return f

    runs: list[dict[str, Any]] = []
    comparisons: dict[str, Any] = {}
    scaling: list[dict[str, Any]] = []

    def save() -> None:
        if checkpoint is not None:
            checkpoint.write_text(
                json.dumps({"partial": True, "io_floors_s": floors, "runs": runs, "scaling": scaling})
            )

    startup = measure_startup(args) if args.startup_size else {}
    for method in args.methods:
        device = device_for(method, args.device)
        ours: dict[str, Any] | None = None
        rounds: dict[str, list[dict[str, Any]]] = {e: [] for e in args.executors}
        for _ in range(max(1, args.repeats)):  # executors interleaved, each run after its own floor
            for executor in args.executors:
                f = unused.pop() if unused else new_floor()  # the first run takes the floor of the start
                r = m.raymerge(method, executor, None, device)
                against(r, f)
                rounds[executor].append(r)  # each round rewrites the same output directory
        for executor in args.executors:
            r = typical(rounds[executor])
            split_wall(r, startup.get(executor), m.input_bytes)
            local = rounds.get("local")
            if executor != "local" and local and r["returncode"] == 0:
                r["wall_over_local"] = median_ratio(rounds[executor], local)
            runs.append(r)
            save()
            ours = ours or (r if r["returncode"] == 0 else None)
        peer = m.peer(method, device) if method in args.peer_methods or not args.peer_methods else None
        if peer is not None:
            against(peer, new_floor())
            runs.append(peer)
            save()
            if ours is not None:
                comparisons[method] = {"peer": peer["tool"], **(m.compare(ours, peer) or {})}
                ours["wall_over_peer"] = ratio(ours["wall_s"], peer["wall_s"]) if peer["returncode"] == 0 else None
                ours["peak_rss_over_peer"] = (
                    ratio(ours["peak_rss_bytes"], peer["peak_rss_bytes"]) if peer["returncode"] == 0 else None
                )
        if not args.keep_outputs:
            for r in runs:
                if r["method"] == method:
                    shutil.rmtree(r["out"], ignore_errors=True)
    for executor in args.executors:
        for w in args.workers:
            r = m.raymerge(args.scaling_method, executor, w, device_for(args.scaling_method, args.device))
            shutil.rmtree(r["out"], ignore_errors=True)
            scaling.append(
                {
                    k: r.get(k)
                    for k in (
                        "executor",
                        "workers",
                        "wall_s",
                        "read_gbps",
                        "peak_rss_bytes",
                        "returncode",
                        "device",
                        "other_processes_mean_cores",
                    )
                }
            )
            save()
    return {
        "size": size_label(name, layers),
        "params_per_model": _params(name, layers),
        "input_bytes": m.input_bytes,
        "output_bytes": m.output_bytes,
        "checkpoints_reused": reused,
        "io_floor": floor
        | {
            "floor_s": median(floors),
            "floors_s": floors,
            "first_floor_s": floor["floor_s"],
            "warm_floor_s": median(warm_floors),
            "warm_floors_s": warm_floors,
        },
        "startup": startup,
        "runs": runs,
        "comparisons": comparisons,
        "scaling": scaling,
    }


def against(run: dict[str, Any], floor: dict[str, Any]) -> None:
    """Record on ``run`` the floors measured just before it and its wall over each."""
    ok = run["returncode"] == 0
    run["io_floor_s"], run["io_warm_floor_s"] = floor["floor_s"], floor["warm_floor_s"]
    run["wall_over_io_floor"] = ratio(run["wall_s"], floor["floor_s"]) if ok else None
    run["wall_over_warm_floor"] = ratio(run["wall_s"], floor["warm_floor_s"]) if ok else None


def median(xs: Sequence[float]) -> float:
    """The middle value (the lower of the two middle ones for an even count: an observed value)."""
    return sorted(xs)[(len(xs) - 1) // 2]


def typical(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median wall over its own floor, with every repeat's wall, floor and
    ratio alongside (a failed repeat makes the whole entry failed)."""
    failed = [r for r in repeats if r["returncode"] != 0]
    if failed:
        return failed[0]
    ranked = sorted(repeats, key=lambda r: r["wall_over_io_floor"])
    r = dict(ranked[(len(ranked) - 1) // 2])
    r["repeats"] = len(repeats)
    r["walls_s"] = [x["wall_s"] for x in repeats]
    r["io_floors_s"] = [x["io_floor_s"] for x in repeats]
    r["walls_over_io_floor"] = [x["wall_over_io_floor"] for x in repeats]
    r["walls_over_warm_floor"] = [x.get("wall_over_warm_floor") for x in repeats]
    return r


def median_ratio(runs: list[dict[str, Any]], local: list[dict[str, Any]]) -> float | None:
    """Median over rounds of a run's wall over the local executor's wall in the same round."""
    pairs = [ratio(a["wall_s"], b["wall_s"]) for a, b in zip(runs, local, strict=True)]
    ok = [x for x in pairs if x is not None]
    return median(ok) if ok else None


def measure_startup(args: argparse.Namespace) -> dict[str, Any]:
    """Each executor's fixed cost: the wall of task arithmetic on the ``--startup-size`` family
    (a few MB: interpreter, imports, planning, publishing, and for Ray starting and stopping the
    embedded cluster and warming its workers), best of ``--startup-repeats`` runs."""
    name, layers = parse_size(args.startup_size)
    root = args.workdir / size_label(name, layers)
    base, experts, _ = build_family(root, name, args.experts, args.shard_bytes, args.rebuild, layers)
    m = Matrix(args, root, base, experts)
    out: dict[str, Any] = {}
    for executor in args.executors:
        walls, cpus = [], []
        for _ in range(max(1, args.startup_repeats)):
            r = m.raymerge("task_arithmetic", executor, None, "cpu")
            shutil.rmtree(r["out"], ignore_errors=True)
            if r["returncode"] == 0:
                walls.append(r["wall_s"])
                cpus.append(round((r["cpu_utilisation"] or 0) * r["wall_s"], 3))  # whole tree
        out[executor] = {
            "size": size_label(name, layers),
            "input_bytes": m.input_bytes,
            "wall_s": min(walls) if walls else None,
            "walls_s": walls,
            "cpu_s": min(cpus) if cpus else None,
            "peak_rss_bytes": r.get("peak_rss_bytes"),
        }
    return out


def split_wall(run: dict[str, Any], start: dict[str, Any] | None, input_bytes: int) -> None:
    """A run's wall as its executor's fixed start-up plus seconds per GB of input beyond it."""
    if run["returncode"] != 0 or not start or start.get("wall_s") is None:
        return
    run["fixed_startup_s"] = start["wall_s"]
    run["per_gb_s"] = round(
        (run["wall_s"] - start["wall_s"]) / max(1e-9, (input_bytes - start["input_bytes"]) / 1e9), 3
    )


def _params(name: str, layers: int | None) -> int:
    from raymerge.engine.synth import SHAPES

    shape = SHAPES[name] if layers is None else dataclasses.replace(SHAPES[name], layers=layers)
    return shape.params


def run_growth(args: argparse.Namespace) -> list[dict[str, Any]]:
    """TIES peak RSS and wall time at each ``--growth`` size, same budget, same executor (local)."""
    out: list[dict[str, Any]] = []
    for spec in args.growth:
        name, layers = parse_size(spec)
        root = args.workdir / size_label(name, layers)
        base, experts, _ = build_family(root, name, args.experts, args.shard_bytes, args.rebuild, layers)
        m = Matrix(args, root, base, experts)
        r = m.raymerge("ties", "local", None, "cpu")
        shutil.rmtree(r["out"], ignore_errors=True)
        out.append(
            {
                "size": size_label(name, layers),
                "params_per_model": _params(name, layers),
                "input_bytes": m.input_bytes,
                **{k: r.get(k) for k in ("wall_s", "read_gbps", "peak_rss_bytes", "returncode")},
            }
        )
        if args.clean_growth and spec != args.size:
            shutil.rmtree(root, ignore_errors=True)
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Four panels: wall time per method (with peers and the I/O floor), peak RSS per method, scaling, growth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mx = results["matrix"]
    runs = [r for r in mx["runs"] if r["returncode"] == 0]
    # Without a method matrix (a scaling/growth-only run) only the last two panels are drawn, and
    # without a scaling or growth sweep only the first two.
    sweeps = bool(mx["scaling"] or results["growth"])
    n_panels = (2 if runs else 0) + (2 if sweeps or not runs else 0)
    fig, drawn = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 5))
    drawn = list(drawn)
    axes = (drawn[:2] if runs else [None, None]) + (drawn[-2:] if sweeps or not runs else [None, None])
    columns = sorted({(r["tool"], r["executor"]) for r in runs}, key=lambda c: (c[0] != "raymerge", c))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    colors = {"raymerge": ["#2b7bba", "#7fb2dc", "#b3d3ee"], "mergekit": ["#d95f02"], "fusionbench": ["#c44e52"]}
    width = 0.8 / max(1, len(columns))
    for panel, key, scale, unit in ((0, "wall_s", 1.0, "s"), (1, "peak_rss_bytes", GIB, "GiB")) if runs else ():
        ax = axes[panel]
        for i, (tool, executor) in enumerate(columns):
            xs, ys = [], []
            for j, meth in enumerate(methods):
                hit = [r for r in runs if (r["tool"], r["executor"], r["method"]) == (tool, executor, meth)]
                if hit:
                    xs.append(j + (i - (len(columns) - 1) / 2) * width)
                    ys.append(hit[0][key] / scale)
            shade = colors[tool][min(i, len(colors[tool]) - 1)] if tool == "raymerge" else colors[tool][0]
            label = f"raymerge ({executor})" if tool == "raymerge" else tool
            ax.bar(xs, ys, width, label=label, color=shade)
        ax.set_xticks(range(len(methods)), methods, rotation=30, fontsize=8)
        ax.set_ylabel(f"{'wall time' if panel == 0 else 'peak RSS, process tree'} ({unit})")
        if panel == 0:
            ax.axhline(mx["io_floor"]["floor_s"], color="gray", ls=":", label="I/O floor")
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("wall time per method" if panel == 0 else "peak memory per method")
    ax = axes[2]
    if ax is None:
        _finish(fig, results, path)
        return
    for executor in sorted({s["executor"] for s in mx["scaling"]}):
        pts = [s for s in mx["scaling"] if s["executor"] == executor and s["returncode"] == 0]
        ax.plot([s["workers"] for s in pts], [s["read_gbps"] for s in pts], "o-", label=f"raymerge ({executor})")
    ax.set_xlabel("workers")
    ax.set_ylabel("input GB/s")
    ax.set_title(f"scaling ({results['config']['scaling_method']})")
    ax.legend(fontsize=7)
    ax = axes[3]
    g = [r for r in results["growth"] if r["returncode"] == 0]
    if g:
        ax.plot([r["input_bytes"] / GIB for r in g], [r["peak_rss_bytes"] / GIB for r in g], "o-", color="#2b7bba")
        for r in g:
            ax.annotate(r["size"], (r["input_bytes"] / GIB, r["peak_rss_bytes"] / GIB), fontsize=7)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
    ax.set_xlabel("input bytes (GiB, log)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("growth: TIES peak memory vs model size")
    _finish(fig, results, path)


def _finish(fig: Any, results: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    mx = results["matrix"]
    m = results["machine"]
    fig.suptitle(
        f"{mx['size']} Llama shape, base + {results['config']['experts']} experts, bf16 — {m.get('gpu') or 'no GPU'},"
        f" {m['logical_cores']} cores, {m['ram_total_bytes'] / GIB:.0f} GiB RAM, warm page cache",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gib(n: int | None) -> str:
    return f"{n / GIB:.2f}" if n is not None else ""


def declared(run: dict[str, Any]) -> str:
    d = run.get("declared") or {}
    return f"{gib(d.get('peak_task_host_bytes'))} / {gib(d.get('peak_task_device_bytes'))}" if d else ""


def spread(run: dict[str, Any], key: str, value: float) -> str:
    """``value`` (the median repeat's), with the range over the repeats when there were several."""
    xs = run.get(key) or []
    return f"{value:.1f} ({min(xs):.1f}–{max(xs):.1f})" if len(xs) > 1 else f"{value:.1f}"


def summary_table(results: dict[str, Any]) -> str:
    """Markdown table of the matrix (what the README's Figures section shows)."""
    mx = results["matrix"]
    rows = [
        "| method | tool | executor | device | wall s | GB/s | × I/O floor | × warm-page floor | peak RSS GiB "
        "| peak device GiB | declared task host / device GiB | × peer wall | × peer RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in mx["runs"]:
        if r["returncode"] != 0:
            rows.append(f"| {r['method']} | {r['tool']} | {r['executor']} | {r['device']} | failed | | | | | | | | |")
            continue
        vs_wall, vs_rss = r.get("wall_over_peer"), r.get("peak_rss_over_peer")
        rows.append(
            f"| {r['method']} | {r['tool']} | {r['executor']} | {r['device']} | {spread(r, 'walls_s', r['wall_s'])}"
            f" | {r['read_gbps']:.2f} | {spread(r, 'walls_over_io_floor', r['wall_over_io_floor'])}"
            f" | {spread(r, 'walls_over_warm_floor', r['wall_over_warm_floor']) if r.get('wall_over_warm_floor') else ''} | {r['peak_rss_bytes'] / GIB:.2f} | {gib(r.get('peak_device_bytes'))}"
            f" | {declared(r)} | {f'**{vs_wall:.2f}**' if vs_wall else ''} | {f'**{vs_rss:.2f}**' if vs_rss else ''} |"
        )
    return "\n".join(rows)


def startup_table(results: dict[str, Any]) -> str:
    """Fixed start-up per executor and each run's seconds per GB beyond it (empty without a
    start-up measurement, as in runs that predate it)."""
    mx = results["matrix"]
    start = mx.get("startup") or {}
    if not start:
        return ""
    rows = [
        "| method | executor | wall s | fixed start-up s | s per GB of input beyond it | × local wall "
        "| input GB read in the driver / on Ray | Ray ready / workers warm after s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in mx["runs"]:
        if r["tool"] != "raymerge" or r["returncode"] != 0 or "per_gb_s" not in r:
            continue
        vs = r.get("wall_over_local")
        split, where, when = r.get("ray_split"), "", ""
        if split:
            where = f"{split['driver_read_gb']:.2f} / {split['ray_read_gb']:.2f}"
            ready, warm = split.get("head_ready_s"), split.get("workers_warm_s")
            when = f"{'–' if ready is None else f'{ready:.1f}'} / {'–' if warm is None else f'{warm:.1f}'}"
        rows.append(
            f"| {r['method']} | {r['executor']} | {r['wall_s']:.1f} | {r['fixed_startup_s']:.1f} | {r['per_gb_s']:.2f} "
            f"| {f'{vs:.2f}' if vs else ''} | {where} | {when} |"
        )
    size = next(iter(start.values()))["size"]
    return "\n".join(rows) + f"\n\nFixed start-up: best wall of task arithmetic on the {size} family per executor."


def scaling_growth_table(results: dict[str, Any]) -> str:
    """Markdown tables of the scaling sweep (GB/s vs workers) and the growth sweep (peak RSS vs size)."""
    mx = results["matrix"]
    rows = ["| executor | workers | wall s | input GB/s | peak RSS GiB |", "|---|---|---|---|---|"]
    for s in mx["scaling"]:
        if s["returncode"] != 0:
            continue
        rows.append(
            f"| {s['executor']} | {s['workers']} | {s['wall_s']:.1f} | {s['read_gbps']:.3f} | "
            f"{s['peak_rss_bytes'] / GIB:.2f} |"
        )
    rows += ["", "| size | params per model | input GiB | TIES wall s | peak RSS GiB |", "|---|---|---|---|---|"]
    for g in results["growth"]:
        if g["returncode"] == 0:
            rows.append(
                f"| {g['size']} | {g['params_per_model'] / 1e6:,.0f}M | {g['input_bytes'] / GIB:.2f} | "
                f"{g['wall_s']:.1f} | {g['peak_rss_bytes'] / GIB:.2f} |"
            )
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description="Throughput/memory matrix of raymerge methods and executors, mergekit and FusionBench alongside.",
    )
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--size", default="tiny", help="shape, or SHAPE:LAYERS for a layer subset (e.g. 70b:2)")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--methods", type=csv, default=["task_arithmetic", "ties", "dare_ties", "actmat", "wudi", "tsv_m"])
    p.add_argument("--executors", type=csv, default=["local", "ray"], help="raymerge executors to run each method on")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: Gram/spectral on CUDA")
    p.add_argument("--peers", type=csv, default=["mergekit", "fusionbench"], help="peers to run alongside (or none)")
    p.add_argument("--peer-methods", type=csv, default=[], help="only these methods get a peer run (default: all)")
    p.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1, 2],
        help="worker counts for the scaling sweep",
    )
    p.add_argument("--scaling-method", default="ties")
    p.add_argument("--growth", type=csv, default=["tiny"], help="sizes for the growth sweep (SHAPE or SHAPE:LAYERS)")
    p.add_argument("--clean-growth", action="store_true", help="delete each growth family after measuring it")
    p.add_argument("--memory-budget", default="2GiB")
    p.add_argument("--startup-size", default="tiny", help="family whose runs measure fixed start-up ('' to skip)")
    p.add_argument("--startup-repeats", type=int, default=2)
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per method and executor, executors interleaved, each right after its own I/O floor "
        "(the figures are the run with the median wall over its floor)",
    )
    p.add_argument("--shard-bytes", type=int, default=1 << 30)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("RAYMERGE_BENCH_DIR", "/tmp/raymerge-bench")))
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--stem", default=None, help="results file stem (default throughput_<size>[_<gpu>])")
    p.add_argument("--sample-interval", type=float, default=0.05)
    p.add_argument("--vocab", type=int, default=None, help="embedding rows (default: the shape's own)")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--keep-outputs", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.peers = [] if args.peers == ["none"] else args.peers
    machine = machine_info()
    import torch

    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    gpu_tag = re.sub(r"[^a-z0-9]+", "-", machine.get("gpu", "").lower()).strip("-")
    stem = args.stem or f"throughput_{size_label(*parse_size(args.size))}" + (f"_{gpu_tag}" if gpu_tag else "")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    partial = args.results_dir / f"{stem}.partial.json"
    matrix = run_matrix(args, partial)
    growth = run_growth(args)
    results = {
        "benchmark": "throughput",
        "started_utc": started,
        "machine": machine,
        "engine": engine_state(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": {
            "page_cache": "warm: every input shard is read once before the I/O floor and before each run",
            "rss": f"max over time of the summed VmRSS of the tool's process tree, sampled every {args.sample_interval} s",
            "wall": "spawn to exit of the tool's process, interpreter start-up and imports included",
            "io_floor": "sequential read of every input byte + write and fsync of one output-sized file",
            "peers": "mergekit-yaml reads the same recipe file; FusionBench runs its own merge functions on "
            "whole in-memory state dicts (benchmarks.fusionbench_runner)",
        },
        "matrix": matrix,
        "growth": growth,
    }
    json_path = args.results_dir / f"{stem}.json"
    partial.unlink(missing_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, json_path.with_suffix(".png"))
    print(summary_table(results))
    print(startup_table(results))
    print("growth:", [(g["size"], round((g["peak_rss_bytes"] or 0) / GIB, 2)) for g in growth])
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    failed = [r for r in matrix["runs"] if r["returncode"] != 0 and r["tool"] == "raymerge"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
