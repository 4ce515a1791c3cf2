"""Merge a checkpoint family the way FusionBench does it, as a measurable subprocess.

FusionBench's merge functions take whole state dicts in memory, so this loads the base and every
expert completely (that is the peer's memory behaviour, and what the throughput benchmark
measures), forms task vectors for the 2-D linear weights, calls FusionBench's own function for the
method (``wudi_merging``, ``compute_and_sum_svd_mem_reduction``, ``iso_c``, ``iso_cts``), and
averages every other tensor (norms, embeddings, LM head), as raymerge's Gram/spectral methods do.
The result is written as one safetensors file in the base's dtype.

    python -m benchmarks.fusionbench_runner --method wudi --base B --out O E1 E2 E3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

METHODS = ("wudi", "tsv_m", "iso_c", "iso_cts")


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF-layout safetensors checkpoint, fully in memory."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def is_linear(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and "embed" not in name and "lm_head" not in name


def merge_task_vectors(method: str, tvs: list[dict[str, torch.Tensor]], device: str) -> dict[str, torch.Tensor]:
    """FusionBench's merged task vector for each key of ``tvs`` (fp32 on ``device``)."""
    with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints a line per key
        if method == "wudi":
            from fusion_bench.method.wudi.wudi import wudi_merging

            return wudi_merging(tvs, accelerator=device, iter_num=300)
        if method == "tsv_m":
            from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

            return compute_and_sum_svd_mem_reduction(tvs, accelerator=device)
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts

        if method == "iso_c":
            return iso_c(tvs, accelerator=device)
        return iso_cts(tvs, common_space_fraction=0.8, accelerator=device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fusionbench_runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("experts", type=Path, nargs="+")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    base = load_dir(args.base)
    experts = [load_dir(e) for e in args.experts]
    keys = [k for k, t in base.items() if is_linear(k, t)]
    tvs = [{k: (e[k].float() - base[k].float()).to(args.device) for k in keys} for e in experts]
    t_load = time.perf_counter() - t0
    merged_tv = merge_task_vectors(args.method, tvs, args.device)
    del tvs
    out: dict[str, torch.Tensor] = {}
    for k, t in base.items():
        if k in merged_tv:
            out[k] = (t.float() + merged_tv[k].detach().float().cpu()).to(t.dtype)
        else:
            out[k] = (sum(e[k].float() for e in experts) / len(experts)).to(t.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(out, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(args.base / "config.json", args.out / "config.json")
    print(json.dumps({"load_s": round(t_load, 3), "total_s": round(time.perf_counter() - t0, 3), "keys": len(keys)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
