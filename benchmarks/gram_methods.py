"""WUDI (Adam / spectral) and ACTMat in raymerge versus FusionBench's ``wudi_merging``.

Same 8 task vectors per layer, for the linear-layer shapes of a BERT-base-sized model (12 blocks
of Q/K/V/O 768×768, FFN-in 3072×768, FFN-out 768×3072). FusionBench's per-step cost is constant
(it back-propagates through T products of shape out×out every step), so on a CPU the script
times ``--fb-steps`` and twice as many steps of it, fits fixed + per-step cost, extrapolates
to 300, and runs FusionBench for all 300 steps on
the 768×768 shape to check that both give the same output. Results go to
``benchmarks/results/gram_methods.json`` and ``.png``.

    python -m benchmarks.gram_methods            # full run (about 10–20 minutes on 2 cores)
    python -m benchmarks.gram_methods --quick    # smoke run: small shapes, few steps
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.synth import task_vector

RESULTS = Path(__file__).parent / "results"
BERT_BLOCK = {
    "attn_768x768": ((768, 768), 4),
    "ffn_in_3072x768": ((3072, 768), 1),
    "ffn_out_768x3072": ((768, 3072), 1),
}
QUICK_BLOCK = {"attn_128x128": ((128, 128), 4), "ffn_in_512x128": ((512, 128), 1), "ffn_out_128x512": ((128, 512), 1)}
# One Llama-2-7B decoder layer: q/k/v/o 4096×4096 (32 KV heads), gate/up 11008×4096, down 4096×11008.
LLAMA7B_BLOCK = {
    "attn_4096x4096": ((4096, 4096), 4),
    "mlp_in_11008x4096": ((11008, 4096), 2),
    "mlp_out_4096x11008": ((4096, 11008), 1),
}
BLOCKS = {"bert": (BERT_BLOCK, 12, "12 BERT-base blocks"), "llama7b": (LLAMA7B_BLOCK, 32, "32 Llama-2-7B layers")}


def _defaults(name: str, **over: object) -> dict[str, object]:
    shared: dict[str, object] = {p.name: p.default for p in METHODS[name].params}
    shared.update(over)
    return shared


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(method: str, deltas: list[torch.Tensor], **params: object) -> tuple[torch.Tensor, float]:
    """Run a raymerge method on task vectors (base = 0) where they live; return (merged task vector, seconds)."""
    zero = torch.zeros_like(deltas[0])
    _sync(zero.device)
    t0 = time.perf_counter()
    out = METHODS[method].fn(zero, deltas, MergeArgs(_defaults(method, **params), [{}] * len(deltas)))
    _sync(zero.device)
    return out, time.perf_counter() - t0


def fusion_bench(deltas: list[torch.Tensor], steps: int) -> tuple[torch.Tensor, float]:
    """FusionBench's own ``wudi_merging`` on one key, on the deltas' device; returns (merged task vector, seconds)."""
    from fusion_bench.method.wudi.wudi import wudi_merging

    device = deltas[0].device
    tvs = [{"w": d.clone()} for d in deltas]
    _sync(device)
    t0 = time.perf_counter()
    out = wudi_merging(tvs, accelerator=str(device), iter_num=steps)["w"].detach()
    _sync(device)
    return out, time.perf_counter() - t0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(
    quick: bool, experts: int, fb_steps: int, precision: str, block_name: str = "bert", device: str = "cpu"
) -> dict[str, object]:
    block, n_blocks, model_name = BLOCKS[block_name]
    if quick:
        block, n_blocks = QUICK_BLOCK, 12
    dev = torch.device(device)
    steps = 30 if quick else 300
    rows: dict[str, dict[str, float]] = {}
    check: dict[str, float] = {}
    for label, (shape, _count) in block.items():
        deltas = [task_vector(label, shape, e, seed=0, scale=0.01).to(dev) for e in range(experts)]
        # warm-up of both code paths (fp64 eigh, fp32 Adam): CUDA context, cuBLAS/cuSOLVER handles
        ours("actmat", deltas, precision=precision)
        ours("wudi", deltas, steps=2, precision=precision)
        r: dict[str, float] = {}
        adam, r["wudi_adam_s"] = ours("wudi", deltas, steps=steps, precision=precision)
        if dev.type == "cuda":  # TF32 only inside the Adam loop (statistics stay full precision)
            adam_tf32, r["wudi_adam_tf32_s"] = ours("wudi", deltas, steps=steps, precision=precision, tf32=True)
            r["wudi_adam_tf32_rel_err_vs_fp32"] = rel(adam_tf32.cpu(), adam.cpu())
        _, r["wudi_spectral_s"] = ours("wudi", deltas, solver="spectral", precision=precision)
        _, r["wudi_adaptive_s"] = ours("wudi", deltas, solver="adaptive", precision=precision)
        _, r["actmat_s"] = ours("actmat", deltas, precision=precision)
        # T(n) = fixed + n·per_step: two short runs give both, then extrapolate to ``steps``.
        _, t1 = fusion_bench(deltas, fb_steps)
        _, t2 = fusion_bench(deltas, 2 * fb_steps)
        per_step = max(t2 - t1, 0.0) / fb_steps
        r["fusion_bench_s"] = max(t1 - per_step * fb_steps, 0.0) + per_step * steps
        r["fusion_bench_measured_steps"] = 3 * fb_steps
        rows[label] = r
        if label == next(iter(block)):
            fb_full, t_full = fusion_bench(deltas, steps)
            check = {
                "shape": list(shape),
                "steps": steps,
                "rel_err_wudi_adam_vs_fb": rel(adam.cpu(), fb_full.cpu()),
                "fusion_bench_full_s": t_full,
                "fusion_bench_extrapolated_s": r["fusion_bench_s"],
            }
        print(label, {k: round(v, 3) for k, v in r.items()}, flush=True)
    per_block = {k: sum(rows[lbl][k] * cnt for lbl, (_, cnt) in block.items()) for k in next(iter(rows.values()))}
    model = {k: v * n_blocks for k, v in per_block.items() if k.endswith("_s")}
    speedup = {k.removesuffix("_s"): model["fusion_bench_s"] / v for k, v in model.items() if k != "fusion_bench_s"}
    return {
        "benchmark": "gram_methods",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        },
        "config": {
            "experts": experts,
            "adam_steps": steps,
            "precision": precision,
            "quick": quick,
            "model": f"{model_name} (embeddings excluded: both fall back to the mean there)",
            "block": block_name,
        },
        "per_shape": rows,
        "whole_model_s": model,
        "speedup_vs_fusion_bench": speedup,
        "equal_output_check": check,
        "targets": {"wudi_adam": 10, "wudi_spectral": 100, "actmat": 100},
    }


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = result["whole_model_s"]
    assert isinstance(model, dict)
    names = list(model)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names, [model[n] for n in names], color=["#4c72b0" if "fusion" not in n else "#c44e52" for n in names])
    ax.set_xscale("log")
    cfg = result["config"]
    machine = result["machine"]
    assert isinstance(cfg, dict) and isinstance(machine, dict)
    ax.set_xlabel(f"seconds for {cfg['model'].split(' (')[0]}, {cfg['experts']} experts (log)")
    for i, n in enumerate(names):
        ax.text(model[n], i, f" {model[n]:.1f}s", va="center")
    ax.set_title(f"WUDI / ACTMat: raymerge vs FusionBench ({machine['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and few steps (smoke run)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--fb-steps", type=int, default=10, help="FusionBench steps actually timed per shape")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp64"], help="raymerge statistics dtype")
    ap.add_argument("--block", default="bert", choices=sorted(BLOCKS), help="layer shapes (default bert)")
    ap.add_argument("--device", default="cpu", help="torch device for both tools, e.g. cuda (default cpu)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default results/gram_methods[_<block>_<device>].json)"
    )
    args = ap.parse_args()
    if args.out is None:
        stem = (
            "gram_methods"
            if (args.block, args.device) == ("bert", "cpu")
            else f"gram_methods_{args.block}_{args.device}"
        )
        args.out = RESULTS / f"{stem}.json"
    result = run(args.quick, args.experts, args.fb_steps, args.precision, args.block, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(
        json.dumps(
            {
                "speedup_vs_fusion_bench": result["speedup_vs_fusion_bench"],
                "equal_output_check": result["equal_output_check"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
