"""TIES on a ~1B-parameter Llama shape: raymerge vs mergekit 0.1.5, wall time and peak RSS.

What it does, in one invocation:

1. Builds (or reuses, when a completion marker matches) synthetic bf16 checkpoints with
   ``raymerge.engine.synth.make_family``: a base plus ``--experts`` experts, sharded at
   ``--shard-bytes`` like real Hugging Face checkpoints.
2. Writes one TIES recipe in mergekit's YAML schema (weight 1.0, density 0.2 per expert,
   ``normalize: true``, ``dtype: bfloat16``).
3. Measures an I/O floor (sequential read of every input byte + write and fsync of one
   output-sized file), then runs ``raymerge run`` and ``mergekit-yaml`` as subprocesses on the
   same inputs. Before each tool (and the floor) every input shard is read once to /dev/null, so
   all three start with the inputs in the page cache; dirty pages are flushed (``sync``) first.
   Peak RSS is the maximum over time of the summed RSS of the whole process tree, sampled every
   ``--sample-interval`` seconds with psutil (anonymous vs file-backed split from /proc).
4. Compares the two outputs tensor by tensor (``safetensors.safe_open``) and records the max
   absolute difference per tensor class. mergekit computes TIES in bf16 when ``dtype`` is
   bfloat16 while raymerge computes in fp32 and rounds once, so small differences are expected;
   they are recorded, never treated as failures.
5. Writes ``<results-dir>/<stem>.json`` and ``<results-dir>/<stem>.png``.

Example::

    python -m benchmarks.core_ties_1b --size tiny          # smoke run, seconds
    python -m benchmarks.core_ties_1b                      # full 1b run (~9 GB inputs)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
# mergekit 0.1.5 on this shape, 2-core / 24 GB machine (context only; never used as a result).
REFERENCE = {"mergekit_0.1.5_wall_s": 326.0, "mergekit_0.1.5_peak_rss_bytes": 10.4e9, "target_ratio": 0.2}
MARKER = "family.json"
READ_CHUNK = 16 << 20
GIB = 2**30


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _family_files(root: Path) -> dict[str, int]:
    """Relative path → size of every file of the family under ``root`` (marker excluded)."""
    out: dict[str, int] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MARKER and p.parent != root:
            out[str(p.relative_to(root))] = p.stat().st_size
    return out


def build_family(
    root: Path, size: str, n_experts: int, shard_bytes: int, rebuild: bool
) -> tuple[Path, list[Path], bool]:
    """Return (base, experts, reused); rebuild unless a matching marker lists files that all still exist."""
    import torch

    from raymerge.engine.synth import SHAPES, make_family

    want = {"size": size, "experts": n_experts, "dtype": "bfloat16", "shard_bytes": shard_bytes, "seed": 0}
    marker = root / MARKER
    base, experts = root / "base", [root / f"expert{e}" for e in range(n_experts)]
    if not rebuild and marker.exists():
        try:
            saved = json.loads(marker.read_text())
            files = saved["files"]
            complete = saved["params"] == want and all(
                (root / rel).is_file() and (root / rel).stat().st_size == nb for rel, nb in files.items()
            )
        except (ValueError, KeyError, OSError):
            complete = False
        if complete:
            return base, experts, True
    if marker.exists():
        marker.unlink()
    for d in [base, *experts]:
        if d.exists():
            shutil.rmtree(d)
    root.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[size]
    print(
        f"building base + {n_experts} experts, {size} ({shape.params / 1e6:,.1f}M params each, bf16) in {root}",
        flush=True,
    )
    t0 = time.perf_counter()
    base, experts = make_family(root, size, n_experts, dtype=torch.bfloat16, shard_bytes=shard_bytes)
    print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    marker.write_text(json.dumps({"params": want, "files": _family_files(root)}, indent=1))
    return base, experts, False


def shard_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def write_recipe(path: Path, base: Path, experts: Sequence[Path], density: float) -> str:
    """One TIES recipe that both tools accept (mergekit's schema)."""
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    for e in experts:
        lines += [f"  - model: {e}", "    parameters:", "      weight: 1.0", f"      density: {density}"]
    lines += ["parameters:", "  normalize: true", "dtype: bfloat16", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def warm_inputs(files: Sequence[Path]) -> float:
    """``sync``, then read every input byte once so each run starts with the inputs cached."""
    os.sync()
    t0 = time.perf_counter()
    _read_all(files)
    return time.perf_counter() - t0


def _read_all(files: Sequence[Path]) -> int:
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def io_floor(inputs: Sequence[Path], out_bytes: int, scratch: Path) -> dict[str, Any]:
    """Time a sequential read of every input byte, then a write + fsync of an output-sized file."""
    t0 = time.perf_counter()
    nread = _read_all(inputs)
    t_read = time.perf_counter() - t0
    block = os.urandom(1 << 20) * (READ_CHUNK >> 20)
    t0 = time.perf_counter()
    with open(scratch, "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            left -= f.write(memoryview(block)[: min(left, len(block))])
        t_write = time.perf_counter() - t0
        os.fsync(f.fileno())
    t_total_write = time.perf_counter() - t0
    scratch.unlink()
    return {
        "read_bytes": nread,
        "read_s": round(t_read, 3),
        "read_gbps": round(nread / t_read / 1e9, 3) if t_read else None,
        "write_bytes": out_bytes,
        "write_s": round(t_write, 3),
        "fsync_s": round(t_total_write - t_write, 3),
        "floor_s": round(t_read + t_total_write, 3),
        "definition": "warm-cache sequential read of all input shards + write and fsync of one output-sized file",
    }


# --------------------------------------------------------------------------------------------
# measured subprocess
# --------------------------------------------------------------------------------------------


def _proc_status_kib(pid: int) -> dict[str, int] | None:
    """RssAnon / RssFile / RssShmem / VmRSS / Threads of one process from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[str, int] = {}
    for key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
        m = re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE)
        if m:
            out[key] = int(m.group(1))
    return out


@dataclass
class TreeSampler:
    """Polls a process and all its descendants; keeps the peak of the summed RSS."""

    pid: int
    interval: float
    peak_rss: int = 0
    peak_anon: int = 0
    peak_file: int = 0
    anon_at_peak: int = 0
    file_at_peak: int = 0
    peak_threads: int = 0
    peak_processes: int = 0
    samples: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)
    # Last CPU time seen per descendant: processes the child never reaps (Ray's raylet, GCS and
    # workers) are missing from wait4's rusage, so their CPU is added from here.
    cpu_by_pid: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    root_cpu: float = 0.0

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            with contextlib.suppress(psutil.Error):
                t = root.cpu_times()
                self.root_cpu = t.user + t.system
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = anon = filed = threads = 0
        alive = 0
        for p in procs:
            if p.pid != self.pid:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    self.cpu_by_pid[p.pid] = t.user + t.system
            st = _proc_status_kib(p.pid)
            if st is not None and "VmRSS" in st:
                rss += st["VmRSS"] << 10
                anon += st.get("RssAnon", 0) << 10
                filed += (st.get("RssFile", 0) + st.get("RssShmem", 0)) << 10
                threads += st.get("Threads", 0)
                alive += 1
            elif st is None:  # no /proc (not Linux): psutil's RSS only
                try:
                    rss += p.memory_info().rss
                    alive += 1
                except psutil.Error:
                    continue
        if not alive or not rss:  # exited (zombies have no VmRSS)
            return
        self.samples += 1
        if rss > self.peak_rss:
            self.peak_rss, self.anon_at_peak, self.file_at_peak = rss, anon, filed
        self.peak_anon = max(self.peak_anon, anon)
        self.peak_file = max(self.peak_file, filed)
        self.peak_threads = max(self.peak_threads, threads)
        self.peak_processes = max(self.peak_processes, alive)
        self.timeline.append((round(time.perf_counter() - self._t0, 3), rss))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)


def _busy_cpu_s() -> tuple[float, float]:
    """System-wide CPU seconds spent busy (all cores, idle and iowait excluded) and stolen so far."""
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    return busy, getattr(t, "steal", 0.0)


def wait_quiet(max_wait: float, threshold: float = 0.25, window: float = 5.0) -> dict[str, Any]:
    """Wait (at most ``max_wait`` s) until the machine's busy CPU over ``window`` is below ``threshold`` cores.

    Other people's processes on a small machine distort wall times; this records how long we waited
    and the load we finally started under, so a contended run is visible in the results.
    """
    t0 = time.perf_counter()
    while True:
        b0, _ = _busy_cpu_s()
        time.sleep(window)
        load = (_busy_cpu_s()[0] - b0) / window
        waited = time.perf_counter() - t0
        if load < threshold or waited >= max_wait:
            quiet = load < threshold
            if not quiet:
                print(f"  machine still busy ({load:.2f} cores) after {waited:.0f} s; measuring anyway", flush=True)
            return {"waited_s": round(waited, 1), "busy_cores_at_start": round(load, 3), "quiet": quiet}


def run_measured(cmd: list[str], log: Path, interval: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` with stdout+stderr to ``log``; wall time, tree peak RSS, CPU time, exit code."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "wb") as logf:
        busy0, steal0 = _busy_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
        busy1, steal1 = _busy_cpu_s()
    cpu = max(usage.ru_utime + usage.ru_stime, sampler.root_cpu + sum(sampler.cpu_by_pid.values()))
    other_cpu = max(0.0, busy1 - busy0 - cpu)
    timeline = sampler.timeline
    step = max(1, len(timeline) // 400)
    result = {
        "cmd": cmd,
        "returncode": proc.returncode,
        "wall_s": round(wall, 3),
        "peak_rss_bytes": sampler.peak_rss,
        "peak_rss_anon_bytes": sampler.peak_anon,
        "peak_rss_file_bytes": sampler.peak_file,
        "rss_anon_at_peak_bytes": sampler.anon_at_peak,
        "rss_file_at_peak_bytes": sampler.file_at_peak,
        "maxrss_largest_process_bytes": usage.ru_maxrss * 1024,
        "cpu_user_s": round(usage.ru_utime, 3),
        "cpu_sys_s": round(usage.ru_stime, 3),
        "cpu_utilisation": round(cpu / wall, 3) if wall else None,
        "major_faults": usage.ru_majflt,
        "minor_faults": usage.ru_minflt,
        "other_processes_cpu_s": round(other_cpu, 3),
        "other_processes_mean_cores": round(other_cpu / wall, 3) if wall else None,
        "steal_cpu_s": round(steal1 - steal0, 3),
        "peak_threads": sampler.peak_threads,
        "peak_processes": sampler.peak_processes,
        "rss_samples": sampler.samples,
        "rss_timeline_s_bytes": timeline[::step],
        "log": str(log),
    }
    tail = log.read_text(errors="replace").splitlines()[-15:]
    result["log_tail"] = tail
    status_word = "ok" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
    print(f"  {status_word}: {wall:.1f} s, peak tree RSS {sampler.peak_rss / GIB:.2f} GiB, CPU {cpu:.1f} s", flush=True)
    if proc.returncode != 0:
        print("  " + "\n  ".join(tail), flush=True)
    return result


# --------------------------------------------------------------------------------------------
# output comparison
# --------------------------------------------------------------------------------------------


def tensor_class(name: str, ndim: int) -> str:
    """raymerge's classes: embedding (token embeddings / LM head), linear (2-D), vector (≤1-D)."""
    if ndim == 2 and any(h in name for h in ("embed_tokens", "lm_head")):
        return "embedding"
    if ndim == 2:
        return "linear"
    return "vector" if ndim <= 1 else "other"


def _tensor_locations(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in wm.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for shard in shard_files(model_dir):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = shard
    return out


def compare_outputs(a_dir: Path, b_dir: Path, base_dir: Path) -> dict[str, Any]:
    """Max |a − b| per tensor class, plus context: differing fraction and the task-vector scale."""
    import torch
    from safetensors import safe_open

    a_loc, b_loc, base_loc = _tensor_locations(a_dir), _tensor_locations(b_dir), _tensor_locations(base_dir)
    only_a, only_b = sorted(set(a_loc) - set(b_loc)), sorted(set(b_loc) - set(a_loc))
    classes: dict[str, dict[str, Any]] = {}
    worst: dict[str, Any] = {"tensor": None, "max_abs_diff": -1.0}
    mismatched: list[str] = []
    handles: dict[Path, Any] = {}

    def get(path: Path, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    for name in sorted(set(a_loc) & set(b_loc)):
        ta, tb = get(a_loc[name], name), get(b_loc[name], name)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            mismatched.append(f"{name}: {ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)}")
            continue
        fa, fb = ta.float(), tb.float()
        diff = (fa - fb).abs()
        mx = float(diff.max()) if diff.numel() else 0.0
        base = get(base_loc[name], name).float() if name in base_loc else None
        tv = float((fa - base).abs().max()) if base is not None and base.shape == fa.shape else float("nan")
        c = classes.setdefault(tensor_class(name, ta.dim()), {
            "tensors": 0, "elements": 0, "max_abs_diff": 0.0, "sum_abs_diff": 0.0, "differing": 0,
            "max_abs_merged_task_vector": 0.0, "worst_tensor": None,
        })  # fmt: skip
        c["tensors"] += 1
        c["elements"] += diff.numel()
        c["sum_abs_diff"] += float(diff.sum(dtype=torch.float64))
        c["differing"] += int((diff > 0).sum())
        c["max_abs_merged_task_vector"] = max(c["max_abs_merged_task_vector"], tv)
        if c["worst_tensor"] is None or mx > c["max_abs_diff"]:
            c["max_abs_diff"], c["worst_tensor"] = mx, name
        if mx > worst["max_abs_diff"]:
            worst = {"tensor": name, "max_abs_diff": mx}
        del ta, tb, fa, fb, diff, base
    for c in classes.values():
        n = max(1, c.pop("elements"))
        c["mean_abs_diff"] = c.pop("sum_abs_diff") / n
        c["fraction_differing"] = round(c.pop("differing") / n, 6)
    return {
        "tensors_compared": sum(c["tensors"] for c in classes.values()),
        "only_in_raymerge": only_a,
        "only_in_mergekit": only_b,
        "shape_or_dtype_mismatch": mismatched,
        "by_class": classes,
        "worst": worst,
        "note": "mergekit computes TIES in bf16 (dtype: bfloat16); raymerge in fp32 with one final rounding",
    }


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    vm = psutil.virtual_memory()

    def ver(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    import torch

    return {
        "cpu": cpu,
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_total_bytes": vm.total,
        "ram_available_bytes_at_start": vm.available,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "raymerge": ver("raymerge"),
        "mergekit": ver("mergekit"),
        "safetensors": ver("safetensors"),
    }


def engine_state() -> dict[str, Any]:
    """Which raymerge code a run used: git HEAD, uncommitted engine/cluster files, a hash of their sources."""
    import hashlib

    def git(*a: str) -> str | None:
        try:
            return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    h = hashlib.sha256()
    for d in ("engine", "cluster"):
        for f in sorted((REPO_ROOT / d).rglob("*.py")):
            h.update(str(f.relative_to(REPO_ROOT)).encode())
            h.update(f.read_bytes())
    head = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "engine", "cluster")
    return {
        "git_head": head.strip() if head else None,
        "uncommitted": [line[3:] for line in dirty.splitlines()] if dirty else [],
        "sources_sha256": h.hexdigest()[:16],
    }


def figures_line(log: Path) -> str | None:
    """raymerge's own ``format_figures`` line from its output, if the run got that far."""
    for line in log.read_text(errors="replace").splitlines():
        if re.match(r"^\w+: \d+ tensors / \d+ tasks", line):
            return line.strip()
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _color(name: str) -> str:
    if name == "mergekit":
        return "#d95f02"
    return "#2b7bba" if name == "raymerge" else "#7fb2dc"


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar charts of wall time and peak RSS (plus the RSS timelines) with the 0.2× targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    names = list(runs)
    target = REFERENCE["target_ratio"]
    mk = runs.get("mergekit") if runs.get("mergekit", {}).get("returncode") == 0 else None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.5]})

    def bars(ax: Any, values: list[float], fmt: str) -> None:
        drawn = ax.bar(names, values, color=[_color(n) for n in names])
        for b, v, n in zip(drawn, values, names, strict=True):
            label = fmt.format(v) if runs[n]["returncode"] == 0 else f"failed (exit {runs[n]['returncode']})"
            ax.annotate(label, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)

    ax = axes[0]
    bars(ax, [runs[n]["wall_s"] for n in names], "{:.1f} s")
    floor = results["io_floor"]["floor_s"]
    ax.axhline(floor, color="gray", ls=":", lw=1.2, label=f"I/O floor {floor:.1f} s")
    if mk is not None:
        ax.axhline(target * mk["wall_s"], color="green", ls="--", lw=1.2, label=f"target {target}× mergekit")
    ax.set_ylabel("wall time (s)")
    ax.set_title("wall time")
    ax.legend(fontsize=8)

    ax = axes[1]
    bars(ax, [runs[n]["peak_rss_bytes"] / GIB for n in names], "{:.2f} GiB")
    if mk is not None:
        ax.axhline(
            target * mk["peak_rss_bytes"] / GIB, color="green", ls="--", lw=1.2, label=f"target {target}× mergekit"
        )
    budget = results["config"].get("memory_budget_bytes")
    if budget:
        ax.axhline(budget / GIB, color="purple", ls=":", lw=1.2, label=f"--memory-budget {budget / GIB:.2f} GiB")
    ax.set_ylabel("peak RSS of process tree (GiB)")
    ax.set_title("peak RSS")
    ax.legend(fontsize=8)

    ax = axes[2]
    for n in names:
        tl = runs[n]["rss_timeline_s_bytes"]
        if tl:
            ax.plot([t for t, _ in tl], [r / GIB for _, r in tl], color=_color(n), label=n)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("RSS (GiB)")
    ax.set_title("process-tree RSS over time")
    ax.legend(fontsize=8)

    cfg = results["config"]
    fig.suptitle(
        f"TIES, base + {cfg['experts']} experts, {cfg['size']} Llama ({cfg['params_per_model'] / 1e6:,.1f}M params, "
        f"bf16) — {results['machine']['logical_cores']} cores, {results['machine']['ram_total_bytes'] / GIB:.0f} GiB "
        f"RAM, warm page cache",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.core_ties_1b",
        description="Benchmark raymerge vs mergekit-yaml on a TIES merge of synthetic Llama checkpoints.",
    )
    p.add_argument("--size", default="1b", choices=["tiny", "small", "1b"], help="synthetic Llama shape (default 1b)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/raymerge-bench"),
        help="checkpoints, recipe and outputs (default /tmp/raymerge-bench)",
    )
    p.add_argument("--experts", type=int, default=3, help="number of experts (default 3)")
    p.add_argument("--density", type=float, default=0.2, help="TIES density per expert (default 0.2)")
    p.add_argument("--shard-bytes", type=int, default=1 << 30, help="input shard size in bytes (default 1 GiB)")
    p.add_argument("--memory-budget", default="1.5GiB", help="raymerge --memory-budget (default 1.5GiB)")
    p.add_argument(
        "--extra-budget",
        action="append",
        default=[],
        metavar="SIZE",
        help="also run raymerge with this --memory-budget (repeatable); reported as raymerge@SIZE",
    )
    p.add_argument("--workers", type=int, default=None, help="raymerge --workers (default: raymerge's own)")
    p.add_argument("--sample-interval", type=float, default=0.05, help="RSS sampling period in seconds (default 0.05)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="before each measurement wait up to this long for other processes to go idle (default 300; 0: never)",
    )
    p.add_argument(
        "--max-contention",
        type=float,
        default=0.25,
        metavar="CORES",
        help="repeat a measurement during which other processes used more than this many cores on average (default 0.25)",
    )
    p.add_argument(
        "--attempts", type=int, default=3, help="most measurements per tool; the least contended is kept (default 3)"
    )
    p.add_argument(
        "--ray-budget",
        action="append",
        default=[],
        metavar="SIZE",
        help="also run raymerge with --executor ray (embedded Ray) at this --memory-budget (repeatable);"
        " reported as raymerge-ray@SIZE, its RSS including every Ray process it starts",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the checkpoints even if complete ones exist")
    p.add_argument("--skip-mergekit", action="store_true", help="run raymerge only (no ratios)")
    p.add_argument("--keep-outputs", action="store_true", help="keep the merged models after comparing them")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="where the JSON and PNG go")
    p.add_argument("--stem", default=None, help="results file name stem (default core_ties_<size>)")
    args = p.parse_args(argv)
    from raymerge.engine.cli import parse_size

    try:
        args.memory_budget_bytes = parse_size(args.memory_budget)
        for b in [*args.extra_budget, *args.ray_budget]:
            parse_size(b)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if not 0.0 < args.sample_interval <= 1.0:
        p.error("--sample-interval must be in (0, 1] seconds")
    if args.experts < 1:
        p.error("--experts must be at least 1")
    return args


def _tool(name: str) -> str:
    """The console script next to this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found next to {sys.executable} or on PATH")
    return found


def ratios_for(run: dict[str, Any], mk: dict[str, Any] | None, floor_s: float) -> dict[str, Any]:
    """Ratios of one raymerge run to mergekit and to the I/O floor (``None`` where a run failed)."""
    ok = run["returncode"] == 0
    out: dict[str, Any] = {"wall_over_io_floor": _ratio(run["wall_s"], floor_s) if ok else None}
    if mk is None:
        return out
    both = ok and mk["returncode"] == 0
    t = REFERENCE["target_ratio"]
    out["wall_over_mergekit"] = _ratio(run["wall_s"], mk["wall_s"]) if both else None
    out["peak_rss_over_mergekit"] = _ratio(run["peak_rss_bytes"], mk["peak_rss_bytes"]) if both else None
    out["meets_wall_target"] = both and out["wall_over_mergekit"] <= t
    out["meets_rss_target"] = both and out["peak_rss_over_mergekit"] <= t
    if not both:
        out["note"] = "no ratio: " + ("raymerge" if not ok else "mergekit") + " failed"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from raymerge.engine.synth import SHAPES

    stem = args.stem or f"core_ties_{args.size}"
    root = args.workdir / args.size
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    machine = machine_info()

    base, experts, reused = build_family(root, args.size, args.experts, args.shard_bytes, args.rebuild)
    inputs = [f for d in [base, *experts] for f in shard_files(d)]
    input_bytes = sum(f.stat().st_size for f in inputs)
    base_bytes = sum(f.stat().st_size for f in shard_files(base))
    recipe = root / "ties.yaml"
    recipe_text = write_recipe(recipe, base, experts, args.density)
    state = "reused" if reused else "built"
    print(f"inputs: {len(inputs)} shards, {input_bytes / GIB:.2f} GiB ({state}); recipe {recipe}", flush=True)

    quiet: dict[str, Any] = {}
    warm_s: dict[str, float] = {}

    def prepare(label: str) -> None:
        """Same starting state for every measurement: idle machine (if we can get it), warm inputs."""
        if args.wait_quiet > 0:
            quiet[label] = wait_quiet(args.wait_quiet)
        warm_s[label] = round(warm_inputs(inputs), 3)

    prepare("io_floor")
    floor = io_floor(inputs, base_bytes, root / "io-floor.scratch")
    print(
        f"I/O floor: read {floor['read_s']:.1f} s + write {floor['write_s']:.1f} s + fsync {floor['fsync_s']:.1f} s"
        f" = {floor['floor_s']:.1f} s",
        flush=True,
    )

    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    budgets = (
        [("raymerge", args.memory_budget)]
        + [(f"raymerge@{b}", b) for b in args.extra_budget]
        + [(f"raymerge-ray@{b}", b) for b in args.ray_budget]
    )
    outs = {name: root / ("out-" + re.sub(r"[^A-Za-z0-9.]+", "-", name)) for name, _ in budgets}
    if not args.skip_mergekit:
        outs["mergekit"] = root / "out-mergekit"
    for d in outs.values():
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(d.with_name(d.name + ".raymerge-staging"), ignore_errors=True)

    def measure(name: str, cmd: list[str]) -> dict[str, Any]:
        """Run ``cmd`` until one measurement is uncontended (at most ``--attempts``); keep the least contended."""
        log = root / (outs[name].name.replace("out-", "") + ".log")
        tried: list[dict[str, Any]] = []
        for attempt in range(max(1, args.attempts)):
            shutil.rmtree(outs[name], ignore_errors=True)
            prepare(f"{name}#{attempt + 1}")
            state = engine_state()
            r = run_measured(cmd, log, args.sample_interval, env)
            r["engine"] = state
            r["figures_line"] = figures_line(log) if name != "mergekit" else None
            tried.append(r)
            other = r["other_processes_mean_cores"] or 0.0
            if r["returncode"] != 0 or other <= args.max_contention:
                break
            print(f"  other processes used {other:.2f} cores during the run; measuring again", flush=True)
        best = min(tried, key=lambda t: (t["returncode"] != 0, t["other_processes_mean_cores"] or 0.0))
        best["attempts"] = [
            {k: t[k] for k in ("wall_s", "peak_rss_bytes", "other_processes_mean_cores", "returncode")} for t in tried
        ]
        best["contended"] = (best["other_processes_mean_cores"] or 0.0) > args.max_contention
        if best is not tried[-1] and best["returncode"] == 0:
            # the kept attempt's output was replaced by a later attempt; the bytes are identical run to run
            best["note"] = "output compared is from the last attempt"
        return best

    runs: dict[str, dict[str, Any]] = {}
    for name, budget in budgets:
        cmd = [_tool("raymerge"), "run", str(recipe), str(outs[name]), "--overwrite", "-q", "--memory-budget", budget]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        if name.startswith("raymerge-ray@"):
            cmd += ["--executor", "ray"]
        runs[name] = measure(name, cmd)
        runs[name]["memory_budget"] = budget
    if not args.skip_mergekit:
        cmd = [_tool("mergekit-yaml"), str(recipe), str(outs["mergekit"]), "--no-copy-tokenizer"]
        runs["mergekit"] = measure("mergekit", cmd)

    mk = runs.get("mergekit")
    comparison: dict[str, Any] | None = None
    ok_rm = [name for name, _ in budgets if runs[name]["returncode"] == 0]
    if mk is not None and mk["returncode"] == 0 and ok_rm:
        print(f"comparing outputs of {ok_rm[0]} and mergekit ...", flush=True)
        comparison = {"raymerge_run": ok_rm[0], **compare_outputs(outs[ok_rm[0]], outs["mergekit"], base)}
        for cls, c in comparison["by_class"].items():
            print(
                f"  {cls:<10} max|Δ| {c['max_abs_diff']:.3g}  mean|Δ| {c['mean_abs_diff']:.3g}  "
                f"differing {c['fraction_differing']:.2%}  ({c['tensors']} tensors)",
                flush=True,
            )
    out_sizes = {n: sum(f.stat().st_size for f in shard_files(d)) for n, d in outs.items() if d.exists()}
    if not args.keep_outputs:
        for d in outs.values():
            shutil.rmtree(d, ignore_errors=True)

    ratios = {name: ratios_for(runs[name], mk, floor["floor_s"]) for name, _ in budgets}
    if mk is not None and mk["returncode"] == 0:
        ratios["mergekit"] = {"wall_over_io_floor": _ratio(mk["wall_s"], floor["floor_s"])}
    local = runs["raymerge"]
    for name, budget in budgets:
        if name.startswith("raymerge-ray@") and runs[name]["returncode"] == 0 and local["returncode"] == 0:
            # Ray's fixed overhead is what the tree holds beyond the budget: raylet, GCS, workers.
            ratios[name]["wall_over_local_executor"] = _ratio(runs[name]["wall_s"], local["wall_s"])
            from raymerge.engine.cli import parse_size

            ratios[name]["peak_rss_minus_budget_bytes"] = runs[name]["peak_rss_bytes"] - parse_size(budget)

    states = {json.dumps(r["engine"], sort_keys=True) for n, r in runs.items() if n != "mergekit"}
    if len(states) > 1:
        print("warning: the raymerge sources changed between runs (see runs.*.engine)", flush=True)
    results: dict[str, Any] = {
        "benchmark": "core_ties_1b",
        "engine": engine_state(),
        "engine_changed_during_benchmark": len(states) > 1,
        "started_utc": started,
        "machine": machine,
        "config": {
            "size": args.size,
            "shape": asdict(SHAPES[args.size]),
            "params_per_model": SHAPES[args.size].params,
            "experts": args.experts,
            "density": args.density,
            "dtype": "bfloat16",
            "input_shard_bytes": args.shard_bytes,
            "input_shards": len(inputs),
            "input_bytes": input_bytes,
            "output_bytes_expected": base_bytes,
            "output_bytes": out_sizes,
            "memory_budget": args.memory_budget,
            "memory_budget_bytes": args.memory_budget_bytes,
            "extra_budgets": args.extra_budget,
            "workers": args.workers,
            "workdir": str(root),
            "checkpoints_reused": reused,
            "recipe": recipe_text,
        },
        "method": {
            "page_cache": "warm: before the I/O floor and before each tool run, sync then read every input shard "
            "sequentially to /dev/null, so every run starts with all inputs in the page cache",
            "rss": f"max over time of summed VmRSS of the child and all descendants, sampled every "
            f"{args.sample_interval} s (psutil + /proc/<pid>/status); anon/file split from RssAnon and RssFile+RssShmem",
            "wall": "wall clock from spawn to exit of the tool's process (includes interpreter start-up and imports)",
            "contention": "other_processes_cpu_s = machine-wide busy CPU during the run minus the tool's own CPU "
            "(includes this harness's sampler); quiet_wait = idle check before each measurement; a measurement "
            f"during which others used > {args.max_contention} cores is repeated (at most {args.attempts} times) "
            "and the least contended attempt kept ('contended' says whether even that one was)",
            "order": "io_floor, " + ", ".join(runs),
        },
        "quiet_wait": quiet,
        "warmup_read_s": warm_s,
        "io_floor": floor,
        "runs": runs,
        "ratios": ratios,
        "comparison": comparison,
        "reference": REFERENCE,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.results_dir / f"{stem}.json", args.results_dir / f"{stem}.png"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, png_path)
    for name, _ in budgets:
        r = ratios[name]
        print(f"{name}: {runs[name]['figures_line'] or 'no figures (failed)'}")
        if r.get("wall_over_mergekit") is not None:
            print(
                f"  /mergekit: wall {r['wall_over_mergekit']}, peak RSS {r['peak_rss_over_mergekit']} "
                f"(target ≤ {REFERENCE['target_ratio']}); wall / I/O floor {r['wall_over_io_floor']}"
            )
    print(f"wrote {json_path} and {png_path}")
    return 0 if all(r["returncode"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
