"""Spectral merges: the exact-SVD path against the eigh-of-Gram path (``svd: exact`` / ``auto``).

For each linear shape of one model block and each of TSV-M, Iso-C and Iso-CTS, the same T task
vectors (``synth.task_vector``: rank 4 plus 1 % sparse spikes, the throughput benchmark's inputs)
are merged twice on one device in the method's ``precision: auto`` dtype, and the script records
both times, how many exact SVDs the Gram path still ran (its fallbacks on ill-conditioned steps)
and the relative difference of the two merged task vectors. JSON (+ PNG) in the results folder.

    python -m benchmarks.svd_paths --block llama7b --device cuda     # one Llama-2-7B layer
    python -m benchmarks.svd_paths --block quick                     # small shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.methods.precision import stats_dtype
from raymerge.engine.synth import task_vector

RESULTS = Path(__file__).parent / "results"
BLOCKS = {  # label: (shape, how many such matrices one block has)
    "quick": {"attn_256x256": ((256, 256), 4), "mlp_in_688x256": ((688, 256), 2), "mlp_out_256x688": ((256, 688), 1)},
    "bert": {
        "attn_768x768": ((768, 768), 4),
        "ffn_in_3072x768": ((3072, 768), 1),
        "ffn_out_768x3072": ((768, 3072), 1),
    },
    "llama7b": {
        "attn_4096x4096": ((4096, 4096), 4),
        "mlp_in_11008x4096": ((11008, 4096), 2),
        "mlp_out_4096x11008": ((4096, 11008), 1),
    },
}
METHOD_NAMES = ("tsv_m", "iso_c", "iso_cts")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(method: str, deltas: list[torch.Tensor], svd: str) -> tuple[torch.Tensor, float, int]:
    """(merged task vector, seconds, exact SVD calls) for base = 0."""
    shared = {p.name: p.default for p in METHODS[method].params}
    shared["svd"] = svd
    zero = torch.zeros_like(deltas[0])
    calls = 0
    real = torch.linalg.svd

    def counting(*a: Any, **k: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*a, **k)

    torch.linalg.svd = counting  # type: ignore[assignment]
    try:
        _sync(zero.device)
        t0 = time.perf_counter()
        out = METHODS[method].fn(zero, deltas, MergeArgs(shared, [{}] * len(deltas)))
        _sync(zero.device)
        return out, time.perf_counter() - t0, calls
    finally:
        torch.linalg.svd = real  # type: ignore[assignment]


def run(block: str, device: torch.device, experts: int, methods: tuple[str, ...]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    warm = [torch.randn(64, 32, device=device, dtype=torch.float64)]
    for m in methods:  # load the solver libraries before anything is timed
        _run(m, warm * 2, "auto")
        _run(m, warm * 2, "exact")
    for label, (shape, _count) in BLOCKS[block].items():
        deltas = [task_vector(label, shape, t, seed=0, device=device.type).to(device) for t in range(experts)]
        for m in methods:
            exact, t_exact, n_exact = _run(m, deltas, "exact")
            fast, t_fast, n_fast = _run(m, deltas, "auto")
            diff = float((fast.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-300))
            rows.append(
                {
                    "shape": label,
                    "method": m,
                    "exact_s": round(t_exact, 4),
                    "auto_s": round(t_fast, 4),
                    "speedup": round(t_exact / t_fast, 2),
                    "exact_svds": n_exact,
                    "auto_exact_svds": n_fast,
                    "rel_diff": diff,
                }
            )
            print(
                f"{label:22s} {m:8s} exact {t_exact:8.3f} s  auto {t_fast:8.3f} s  ×{t_exact / t_fast:5.2f}  "
                f"SVDs under auto {n_fast}/{n_exact}  rel diff {diff:.1e}",
                flush=True,
            )
            del exact, fast
        del deltas
    per_block = {}
    for m in methods:  # one whole block: each shape as often as the block has it
        ex = sum(r["exact_s"] * BLOCKS[block][r["shape"]][1] for r in rows if r["method"] == m)
        au = sum(r["auto_s"] * BLOCKS[block][r["shape"]][1] for r in rows if r["method"] == m)
        per_block[m] = {"exact_s": round(ex, 3), "auto_s": round(au, 3), "speedup": round(ex / au, 2)}
        print(f"one {block} block, {m}: exact {ex:.2f} s, auto {au:.2f} s (×{ex / au:.2f})")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "benchmark": "svd_paths",
        "block": block,
        "experts": experts,
        "device": name,
        "dtype": str(stats_dtype("auto", device)).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "inputs": "synth.task_vector: rank 4 + 1 % sparse spikes, fp32, base = 0",
        "rows": rows,
        "per_block": per_block,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['method']}\n{r['shape']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.8), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["exact_s"] for r in rows], 0.4, label="svd: exact")
    ax.bar([x + 0.2 for x in xs], [r["auto_s"] for r in rows], 0.4, label="svd: auto (Gram path)")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("seconds per tensor")
    ax.set_title(f"{result['device']}, {result['experts']} experts, {result['dtype']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", choices=list(BLOCKS), default="quick")
    p.add_argument("--device", default="cpu")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHOD_NAMES))
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/svd_paths_<block>.json)")
    a = p.parse_args(argv)
    result = run(a.block, torch.device(a.device), a.experts, tuple(a.methods.split(",")))
    out = a.out or RESULTS / f"svd_paths_{a.block}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
