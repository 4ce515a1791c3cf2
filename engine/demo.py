"""``raymerge demo``: build small synthetic checkpoints, merge them with TIES, print the figures."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from raymerge.engine.merge import format_figures, merge
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.synth import SHAPES, make_family

DEMO_RECIPE = """\
merge_method: ties
base_model: {base}
models:
{models}
parameters:
  density: 0.2
  normalize: true
dtype: float32
out_dtype: bfloat16
"""


def run_demo(workdir: Path, size: str = "small", n_experts: int = 3) -> int:
    """Build a base plus ``n_experts`` experts of the named Llama shape and merge them."""
    workdir.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[size]
    print(f"building {n_experts + 1} synthetic Llama checkpoints ({shape.params / 1e6:.1f}M params each) in {workdir}")
    t0 = time.perf_counter()
    base, experts = make_family(workdir / "models", shape, n_experts, dtype=torch.bfloat16, shard_bytes=64 << 20)
    print(f"  built in {time.perf_counter() - t0:.1f} s")
    models = "\n".join(f"  - model: {e}\n    parameters:\n      weight: 1.0" for e in experts)
    text = DEMO_RECIPE.format(base=base, models=models)
    (workdir / "recipe.yaml").write_text(text)
    print(f"recipe: {workdir / 'recipe.yaml'}")
    out = workdir / "merged"
    figures = merge(parse_recipe(text, str(workdir / "recipe.yaml")), out, overwrite=True, out_shard_bytes=32 << 20)
    print(format_figures(figures))
    files = sorted(p.name for p in out.iterdir())
    print(f"merged model: {out}  ({', '.join(files)})")
    # The same experts through the data-free interference-minimising methods.
    for method, extra in (("actmat", ""), ("wudi", "parameters:\n  solver: spectral\n")):
        other = (
            f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            + "".join(f"  - model: {e}\n" for e in experts)
            + extra
            + "out_dtype: bfloat16\n"
        )
        f = merge(parse_recipe(other, method), workdir / f"merged-{method}", overwrite=True, progress=False)
        print(format_figures(f))
    return 0
