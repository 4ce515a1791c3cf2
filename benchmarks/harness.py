"""Measurement harness shared by the throughput benchmarks: inputs, I/O floor, process-tree RSS.

Everything here is tool-agnostic: build (or reuse) a synthetic checkpoint family, warm the page
cache, time the I/O floor, run a command while sampling the summed RSS of its whole process tree,
and compare two merged outputs tensor by tensor.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
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
    root: Path,
    size: str,
    n_experts: int,
    shard_bytes: int,
    rebuild: bool,
    layers: int | None = None,
    vocab: int | None = None,
) -> tuple[Path, list[Path], bool]:
    """Return (base, experts, reused); rebuild unless a matching marker lists files that all still exist.

    ``layers`` keeps the named shape's widths but only that many decoder layers: the 70b and 405b
    shapes are benchmarked as layer subsets (per-layer work is identical, the total only scales).
    ``vocab`` shrinks the embedding and LM head (a 70B family's 128256-row tables would fill the
    disk of a one-layer benchmark; Gram and spectral methods merge them by their fallback anyway).
    """
    import dataclasses

    import torch

    from raymerge.engine.synth import SHAPES, make_family

    want = {"size": size, "experts": n_experts, "dtype": "bfloat16", "shard_bytes": shard_bytes, "seed": 0}
    if layers is not None:
        want["layers"] = layers
    if vocab is not None:
        want["vocab"] = vocab
    if torch.cuda.is_available():
        want["generated_on"] = "cuda"
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
    shape = SHAPES[size] if layers is None else dataclasses.replace(SHAPES[size], layers=layers)
    shape = shape if vocab is None else dataclasses.replace(shape, vocab=vocab)
    print(
        f"building base + {n_experts} experts, {size} ({shape.params / 1e6:,.1f}M params each, bf16) in {root}",
        flush=True,
    )
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, experts = make_family(root, shape, n_experts, dtype=torch.bfloat16, shard_bytes=shard_bytes, device=device)
    print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    marker.write_text(json.dumps({"params": want, "files": _family_files(root)}, indent=1))
    return base, experts, False


def shard_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


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


def _timed_write(f: Any, block: bytes, nbytes: int) -> tuple[float, float]:
    """Write ``nbytes`` of ``block`` repeated from the start of ``f``, then fsync; the seconds
    to write and to write + fsync."""
    f.seek(0)
    t0 = time.perf_counter()
    left = nbytes
    while left > 0:
        left -= f.write(memoryview(block)[: min(left, len(block))])
    t_write = time.perf_counter() - t0
    os.fsync(f.fileno())
    return t_write, time.perf_counter() - t0


def io_floor(inputs: Sequence[Path], out_bytes: int, scratch: Path) -> dict[str, Any]:
    """Time a sequential read of every input byte, then a write + fsync of an output-sized file."""
    t0 = time.perf_counter()
    nread = _read_all(inputs)
    t_read = time.perf_counter() - t0
    block = os.urandom(1 << 20) * (READ_CHUNK >> 20)
    with open(scratch, "wb", buffering=0) as f:
        t_write, t_total_write = _timed_write(f, block, out_bytes)
        # The same bytes again into the pages just written (cached, clean): what the write costs
        # when the kernel need not find fresh pages. On a VM whose host backs guest memory lazily,
        # a fresh page can cost more than its copy (1.7 GB of new anonymous memory took 4.5-10.5 s
        # to touch on the 2-core benchmark machine), and that part of the floor varies run to run.
        t_warm_write, t_warm_total = _timed_write(f, block, out_bytes)
    scratch.unlink()
    return {
        "read_bytes": nread,
        "read_s": round(t_read, 3),
        "read_gbps": round(nread / t_read / 1e9, 3) if t_read else None,
        "write_bytes": out_bytes,
        "write_s": round(t_write, 3),
        "fsync_s": round(t_total_write - t_write, 3),
        "floor_s": round(t_read + t_total_write, 3),
        "warm_write_s": round(t_warm_write, 3),
        "warm_fsync_s": round(t_warm_total - t_warm_write, 3),
        "warm_floor_s": round(t_read + t_warm_total, 3),
        "definition": "warm-cache sequential read of all input shards + write and fsync of one output-sized file",
        "warm_definition": "the same read + a rewrite and fsync of that file, its pages already in the page cache",
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


def _gpu_handle() -> Any:
    """An NVML handle of GPU 0 for utilisation samples, or None (no NVML, no NVIDIA GPU)."""
    try:
        import pynvml  # nvidia-ml-py: on GPU machines

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return None


def _gpu_busy(handle: Any) -> int | None:
    """Percent of the last NVML sample period (1/6 s to 1 s) in which a kernel ran on the GPU."""
    try:
        import pynvml

        return int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:
        return None


@dataclass
class TreeSampler:
    """Polls a process and all its descendants; keeps the peak of the summed RSS (and, on an
    NVIDIA machine, the GPU's busy percentage at each sample)."""

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

    gpu_busy: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._gpu = _gpu_handle()
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
        if self._gpu is not None and (busy := _gpu_busy(self._gpu)) is not None:
            self.gpu_busy.append(busy)
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
        # mean over the run of NVML's busy percentage: how much of the wall the GPU computed
        "gpu_busy_fraction": round(sum(sampler.gpu_busy) / len(sampler.gpu_busy) / 100, 3)
        if sampler.gpu_busy
        else None,
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
        c = classes.setdefault(
            tensor_class(name, ta.dim()),
            {
                "tensors": 0,
                "elements": 0,
                "max_abs_diff": 0.0,
                "sum_abs_diff": 0.0,
                "differing": 0,
                "max_abs_merged_task_vector": 0.0,
                "worst_tensor": None,
            },
        )
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


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def console_script(name: str) -> str:
    """The console script next to this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found next to {sys.executable} or on PATH")
    return found
