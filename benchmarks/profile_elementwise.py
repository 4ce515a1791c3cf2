"""Where the wall time of an elementwise merge goes: a sampled profile of ``raymerge run``.

For one synthetic Llama-shaped family (``--size``, e.g. ``1b:4`` for four layers of the 1B shape)
and each ``--methods`` entry it runs ``raymerge run --executor local`` under py-spy (every
thread, idle samples included, line numbers on), then files every sample of every thread under
one phase by the innermost raymerge frame that explains it:

* **read** (``read_ahead``/``read_rows``: mapping views, read-ahead, explicit page population),
* **input convert + check** (stored dtype → compute dtype; page faults of a mapping land here;
  the NaN/Inf check of each input chunk),
* **method passes** (the method's statistics passes — rank cuts, L1 rescale probes — and its
  apply pass: masks, sign election, sums),
* **output convert + CRC** (compute dtype → output dtype, CRC32 of the bytes),
* **write** (``pwrite`` into the staging shard),
* **task overhead** (the rest of ``run_task``: opening readers, Python between the passes),
* **start-up + plan + publish** (the main thread outside the executor: imports, planning,
  verification, publishing), **scheduling** (the main thread inside the executor: admission,
  receipts, the journal), and **idle** (pool threads with no task).

The figures are seconds of samples per phase summed over threads (core-seconds), and the share
of the busy samples; the wall and CPU time of the same run are recorded alongside, with the
machine's load average (on a shared machine, compare CPU seconds rather than walls).

    python -m benchmarks.profile_elementwise --size 1b:4 --stem profile_elementwise_1b-4L_before
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import DEFAULT_RESULTS, build_family, console_script, machine_info, run_measured, shard_files
from benchmarks.harness import warm_inputs as _warm
from benchmarks.throughput import parse_size, size_label, write_recipe

PHASES = (
    "read",
    "input convert",
    "input NaN/Inf check",
    "method: statistics passes",
    "method: apply pass",
    "output convert + CRC",
    "write",
    "task overhead",
    "start-up + plan + publish",
    "scheduling",
    "idle",
)
# Not busy: pool threads without a task, the main thread blocked on the pool, sleeping helpers.
NOT_BUSY = ("idle", "main thread waiting", "helper threads")

PACKAGE = Path(__file__).resolve().parent.parent


def _frame(frame: str) -> tuple[str, str, int]:
    """``Class.func (path:line)`` → (func, path, line)."""
    m = re.match(r"(.*) \((.*):(\d+)\)$", frame)
    if not m:
        return frame, "", 0
    return m.group(1).rsplit(".", 1)[-1], m.group(2), int(m.group(3))


_SOURCE: dict[str, list[str]] = {}


def source_line(path: str, line: int) -> str:
    """The text of ``path:line`` of this checkout (py-spy names files relative to the package root)."""
    if path not in _SOURCE:
        f = PACKAGE / path
        _SOURCE[path] = f.read_text(errors="replace").splitlines() if f.is_file() else []
    lines = _SOURCE[path]
    return lines[line - 1] if 0 < line <= len(lines) else ""


def _leaf_phase(func: str, path: str, line: int) -> str | None:
    if func == "pwrite_all":
        return "write"
    if path.endswith("engine/storage.py") or func in ("read_ahead", "populate"):
        return "read"
    if func in ("check_finite", "all_finite"):
        return "input NaN/Inf check"
    if path.endswith("engine/task.py") and func == "load":
        text = source_line(path, line)
        if "isfinite" in text or "_finite(" in text:
            return "input NaN/Inf check"
        if ".to(" in text or "convert" in text:
            return "input convert"
        return None
    if path.endswith("engine/task.py") and func in ("_write_pieces", "write_chunk"):
        return "output convert + CRC"
    return None


def classify(stack: Sequence[str]) -> str:
    """The phase of one sampled stack (frames outermost first, ``Class.func (file:line)``)."""
    frames = [_frame(f) for f in stack]
    funcs = [f for f, _, _ in frames]
    if "run_task" in funcs:
        stats = any(f in ("__init__", "rank_cut", "_delta_chunks") and "methods/masks.py" in p for f, p, _ in frames)
        for func, path, line in reversed(frames):
            phase = _leaf_phase(func, path, line)
            if phase is not None:
                return phase
            if "engine/methods/" in path:
                return "method: statistics passes" if stats else "method: apply pass"
        return "task overhead"
    if "_worker" in funcs:
        return "idle"
    if not funcs or funcs[0] != "<module>":
        return "helper threads"
    if any(f == "run" and p.endswith(("engine/local.py", "cluster/executor.py")) for f, p, _ in frames):
        return "main thread waiting" if funcs[-1] == "wait" else "scheduling"
    return "start-up + plan + publish"


def parse_raw(path: Path) -> Counter[str]:
    """Samples per phase from py-spy's raw (collapsed) output: ``thread;frame;… count`` per line."""
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")[1:]  # the first is the thread
        counts[classify(frames)] += int(n)
    return counts


def summarise(counts: Counter[str], rate: int) -> dict[str, Any]:
    busy = sum(v for k, v in counts.items() if k not in NOT_BUSY)
    return {
        "samples": sum(counts.values()),
        "rate_hz": rate,
        "phase_s": {p: round(counts.get(p, 0) / rate, 3) for p in PHASES},
        "phase_share_of_busy": {p: round(counts.get(p, 0) / busy, 4) if busy else None for p in PHASES if p != "idle"},
        "main_thread_waiting_s": round(counts.get("main thread waiting", 0) / rate, 3),
    }


def profile_one(args: argparse.Namespace, root: Path, method: str, base: Path, experts: list[Path]) -> dict[str, Any]:
    recipe = root / f"{method}.yaml"
    write_recipe(recipe, method, base, experts)
    out = root / f"out-profile-{method}"
    shutil.rmtree(out, ignore_errors=True)
    raw = root / f"profile-{method}.raw.txt"
    cmd = [console_script("py-spy"), "record", "--format", "raw", "--idle", "--threads", "-r", str(args.rate)]
    cmd += ["-o", str(raw), "--", console_script("raymerge"), "run", str(recipe), str(out), "--overwrite", "-q"]
    cmd += ["--memory-budget", args.memory_budget, "--executor", "local", "--device", "cpu"]
    inputs = [f for d in [base, *experts] for f in shard_files(d)]
    _warm(inputs)
    load0 = os.getloadavg()[0]
    r = run_measured(cmd, root / f"profile-{method}.log", 0.1, dict(os.environ, TQDM_DISABLE="1"))
    counts = parse_raw(raw)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "method": method,
        "returncode": r["returncode"],
        "wall_s": r["wall_s"],
        "cpu_s": round(r["cpu_user_s"] + r["cpu_sys_s"], 3),
        "other_processes_mean_cores": r["other_processes_mean_cores"],
        "load_average_1min_before": round(load0, 2),
        "raw": str(raw),
        **summarise(counts, args.rate),
    }


def markdown_table(res: dict[str, Any]) -> str:
    """Core-seconds per phase (share of busy samples) for each profiled method."""
    runs = [r for r in res["runs"] if r["returncode"] == 0]
    head = "| phase | " + " | ".join(r["method"] for r in runs) + " |"
    rows = [head, "|---|" + "---|" * len(runs)]
    for p in PHASES:
        cells = []
        for r in runs:
            share = r["phase_share_of_busy"].get(p)
            cells.append(f"{r['phase_s'][p]:.1f} s" + (f" ({100 * share:.0f} %)" if share is not None else ""))
        rows.append(f"| {p} | " + " | ".join(cells) + " |")
    rows.append(
        "| **wall** (CPU) | " + " | ".join(f"**{r['wall_s']:.1f} s** ({r['cpu_s']:.1f} s)" for r in runs) + " |"
    )
    loads = ", ".join(f"{r['load_average_1min_before']:.1f}" for r in runs)
    rows.append("")
    rows.append(
        f"{res['size']} shape, base + {res['experts']} experts, bf16, `--executor local`, "
        f"{res['machine']['logical_cores']} cores; sampled by py-spy at {runs[0]['rate_hz'] if runs else 0} Hz, "
        f"seconds summed over threads; 1-minute load average before each run: {loads}."
    )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_elementwise", description=__doc__.split("\n\n")[0])
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--size", default="1b:4", help="shape, or SHAPE:LAYERS for a layer subset")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--methods", type=csv, default=["task_arithmetic", "ties", "dare_ties"])
    p.add_argument("--memory-budget", default="2GiB")
    p.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--shard-bytes", type=int, default=1 << 30)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("RAYMERGE_BENCH_DIR", "/tmp/raymerge-bench")))
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--stem", default=None)
    p.add_argument("--reparse", type=Path, default=None, help="re-classify the raw samples a results JSON names")
    args = p.parse_args(argv)
    if args.reparse is not None:
        res = json.loads(args.reparse.read_text())
        for r in res["runs"]:
            r.update(summarise(parse_raw(Path(r["raw"])), r["rate_hz"]))
        args.reparse.write_text(json.dumps(res, indent=1) + "\n")
        print(markdown_table(res))
        return 0
    name, layers = parse_size(args.size)
    root = args.workdir / size_label(name, layers)
    base, experts, _ = build_family(root, name, args.experts, args.shard_bytes, False, layers)
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    runs = []
    for method in args.methods:
        runs.append(profile_one(args, root, method, base, experts))
        print(json.dumps({k: runs[-1][k] for k in ("method", "wall_s", "cpu_s", "phase_s")}), flush=True)
        time.sleep(1)
    res = {
        "benchmark": "profile_elementwise",
        "started_utc": started,
        "machine": machine_info(),
        "size": size_label(name, layers),
        "experts": args.experts,
        "runs": runs,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"profile_elementwise_{size_label(name, layers)}"
    path = args.results_dir / f"{stem}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown_table(res))
    print(f"wrote {path}")
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
