"""Where the Gram and spectral methods spend their time on a GPU: the dense solves, timed alone.

fp64 ``eigh`` at the input widths of the 7B, 70B and 405B ``down_proj`` (ACTMat / WUDI's one
solve per tensor), the thin SVD by each cuSOLVER driver at a 7B shape, and TSV-M on one 7B
``down_proj`` with 8 synthetic experts, with how often its Gram path handed over to the exact SVD.

    python -m benchmarks.cuda_solvers --out results.json [--eigh 4096,11008,28672]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return round(time.perf_counter() - t0, 4)


def tsv_layer(n_experts: int, dev: torch.device, div: int = 1) -> list[dict[str, Any]]:
    """TSV-M on each weight of one Llama-2-7B layer, with every top-k / polar step timed."""
    from raymerge.engine.methods import METHODS, MergeArgs
    from raymerge.engine.methods import spectral as sp
    from raymerge.engine.synth import base_tensor, task_vector

    steps: list[dict[str, Any]] = []
    orig_top, orig_polar = sp.Solver.top, sp.Solver.polar

    def top2(self: Any, a: torch.Tensor, k: int) -> Any:
        f = self.fallbacks
        sync(dev)
        t0 = time.perf_counter()
        out = orig_top(self, a, k)
        sync(dev)
        steps.append(
            {
                "step": "top",
                "shape": list(a.shape),
                "k": k,
                "fallback": self.fallbacks - f,
                "s": round(time.perf_counter() - t0, 4),
            }
        )
        return out

    def polar2(self: Any, a: torch.Tensor, try_gram: bool = True, values: bool = True) -> Any:
        f = self.fallbacks
        sync(dev)
        t0 = time.perf_counter()
        out = orig_polar(self, a, try_gram, values)
        sync(dev)
        steps.append(
            {
                "step": "polar",
                "shape": list(a.shape),
                "fallback": self.fallbacks - f,
                "s": round(time.perf_counter() - t0, 4),
            }
        )
        return out

    sp.Solver.top, sp.Solver.polar = top2, polar2  # type: ignore[method-assign]
    rows: list[dict[str, Any]] = []
    try:
        spec = METHODS["tsv_m"]
        margs = MergeArgs({q.name: q.default for q in spec.params}, [{}] * n_experts)
        for short, full in (("q_proj", (4096, 4096)), ("gate_proj", (11008, 4096)), ("down_proj", (4096, 11008))):
            shape = (full[0] // div, full[1] // div)
            name = f"model.layers.0.x.{short}.weight"
            base = base_tensor(name, shape, 0, dev.type)
            experts = [base + task_vector(name, shape, e, 0, device=dev.type) for e in range(n_experts)]
            steps.clear()
            total = timed(lambda b=base, x=experts: spec.fn(b, x, margs), dev)
            rows.append({"tensor": short, "shape": list(shape), "s": total, "steps": list(steps)})
            print("tsv_m", short, total, [(s["step"], s["fallback"], s["s"]) for s in steps], flush=True)
            del base, experts
    finally:
        sp.Solver.top, sp.Solver.polar = orig_top, orig_polar  # type: ignore[method-assign]
    return rows


def timed_value(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    return round(time.perf_counter() - t0, 4), value


def inverse_time(n: int, dev: torch.device, rows: int = 4096) -> dict[str, Any]:
    """ACTMat's solve as ``eigh.gram_inverse`` does it on a nonsingular n × n S: Cholesky, the
    certifying inverse iteration, and R S⁻¹ for ``rows`` rows, against fp64 ``eigh`` and its
    pseudo-inverse."""
    from raymerge.engine.methods.eigh import Pseudoinverse, certified_cholesky, cholesky_apply

    g = torch.Generator(dev.type).manual_seed(1)
    x = torch.randn(n, 256, dtype=torch.float64, device=dev, generator=g)
    S = x @ x.T + torch.eye(n, dtype=torch.float64, device=dev)
    R = torch.randn(rows, n, dtype=torch.float64, device=dev, generator=g)
    del x
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    chol, L = timed_value(lambda: certified_cholesky(S), dev)
    peak = (torch.cuda.max_memory_allocated(dev) - before) / (8 * n * n)
    assert L is not None, "S was not certified"
    factor = [L]  # dropped before eigh runs, so its memory is free for it
    apply, y = timed_value(lambda: cholesky_apply(factor[0], R), dev)
    factor.clear()
    del L
    eig, pinv = timed_value(lambda: Pseudoinverse(*torch.linalg.eigh(S)), dev)
    eig_apply, z = timed_value(lambda: pinv.apply(R), dev)
    return {
        "cholesky_and_certify_s": chol,
        "apply_s": apply,
        "peak_over_n2": round(peak, 2),
        "eigh_s": eig,
        "eigh_apply_s": eig_apply,
        "rel_diff_vs_eigh": float((y - z).norm() / z.norm()),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--eigh", default="4096,11008,28672")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--svd", action=argparse.BooleanOptionalAction, default=True, help="time the SVD drivers")
    p.add_argument("--layer", action="store_true", help="TSV-M per tensor of one 7B layer, each SVD step timed")
    p.add_argument("--only-layer", action="store_true", help="just that (on --device, shapes divided by --div)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--div", type=int, default=1)
    p.add_argument("--only-inverse", action="store_true", help="just ACTMat's Cholesky solve against eigh")
    args = p.parse_args()
    if args.only_inverse:
        inv: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "inverse_fp64": {}}
        for n in (int(x) for x in args.eigh.split(",") if x):
            inv["inverse_fp64"][n] = inverse_time(n, torch.device(args.device))
            print("inverse", n, inv["inverse_fp64"][n], flush=True)
            args.out.write_text(json.dumps(inv, indent=1))
            torch.cuda.empty_cache()
        return 0
    if args.only_layer:
        rows = tsv_layer(args.experts, torch.device(args.device), args.div)
        args.out.write_text(json.dumps({"tsv_m_layer": rows}, indent=1))
        return 0
    dev = torch.device("cuda")
    g = torch.Generator(dev.type).manual_seed(0)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    def save() -> None:
        args.out.write_text(json.dumps(res, indent=1))

    # warm-up: cuSOLVER handles and kernels
    a = torch.randn(256, 256, dtype=torch.float64, device=dev, generator=g)
    torch.linalg.eigh(a @ a.T)
    torch.linalg.svd(a)
    res["eigh_fp64_s"] = {}
    for n in (int(x) for x in args.eigh.split(",") if x):
        x = torch.randn(n, 64, dtype=torch.float64, device=dev, generator=g)
        s = x @ x.T + torch.eye(n, dtype=torch.float64, device=dev)
        del x
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        res["eigh_fp64_s"][n] = {
            "seconds": timed(lambda s=s: torch.linalg.eigh(s), dev),
            "peak_over_n2": round((torch.cuda.max_memory_allocated(dev) - before) / (8 * n * n), 2),
        }
        del s
        torch.cuda.empty_cache()
        print("eigh", n, res["eigh_fp64_s"][n], flush=True)
        save()
    res["svd_fp64_s"] = {}
    for shape in ((4096, 11008), (4096, 4096)) if args.svd else ():
        m = torch.randn(*shape, dtype=torch.float64, device=dev, generator=g)
        for driver in ("gesvd", "gesvdj", "gesvda"):
            try:
                t = timed(lambda m=m, d=driver: torch.linalg.svd(m, full_matrices=False, driver=d), dev)
            except RuntimeError as exc:
                t = f"failed: {str(exc)[:80]}"
            res["svd_fp64_s"][f"{shape[0]}x{shape[1]}:{driver}"] = t
            print("svd", shape, driver, t, flush=True)
            save()
        gram = timed(lambda m=m: torch.linalg.eigh(m @ m.T), dev)
        res["svd_fp64_s"][f"{shape[0]}x{shape[1]}:gram_eigh"] = gram
        del m
    from raymerge.engine.methods import METHODS, MergeArgs
    from raymerge.engine.methods import spectral as sp
    from raymerge.engine.synth import base_tensor, task_vector

    name, shape = "model.layers.0.mlp.down_proj.weight", (4096, 11008)
    base = base_tensor(name, shape, 0, "cuda")
    experts = [base + task_vector(name, shape, e, 0, device="cuda") for e in range(args.experts)]
    fallbacks: list[int] = []
    real_solver = sp.Solver

    class Counting(real_solver):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            fallbacks.append(0)
            self._slot = len(fallbacks) - 1

        def top(self, *a: Any, **k: Any) -> Any:
            out = super().top(*a, **k)
            fallbacks[self._slot] = self.fallbacks
            return out

        def polar(self, *a: Any, **k: Any) -> Any:
            out = super().polar(*a, **k)
            fallbacks[self._slot] = self.fallbacks
            return out

    if args.layer:
        res["tsv_m_layer"] = tsv_layer(args.experts, dev, args.div)
        save()
    sp.Solver = Counting
    try:
        for method, over in (("tsv_m", {}), ("tsv_m", {"svd": "exact"}), ("iso_c", {}), ("actmat", {})):
            spec = METHODS[method]
            shared = {q.name: q.default for q in spec.params} | over
            margs = MergeArgs(shared, [{}] * len(experts))
            key = method + ("" if not over else ":" + ",".join(f"{k}={v}" for k, v in over.items()))
            res.setdefault("method_s", {})[key] = timed(lambda s=spec, m=margs: s.fn(base, experts, m), dev)
            res.setdefault("gram_fallbacks", {})[key] = fallbacks[-1] if fallbacks and method != "actmat" else None
            print(key, res["method_s"][key], "fallbacks", res["gram_fallbacks"][key], flush=True)
            save()
    finally:
        sp.Solver = real_solver
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
