"""raymerge run and mergekit-yaml (mergekit 0.1.5 from PyPI) on the same fp32 Llama checkpoints.

Every tensor must agree to max |difference| ≤ 1e-6, including layer gradients and filters.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raymerge.cli import main as raymerge_main

from conftest import load_dir, recipe_text

MERGEKIT = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))

CASES = {
    "linear": ("linear", False, None, [{"weight": 0.5}, {"weight": 0.3}, {"weight": "[0.2, 1.0]"}]),
    "task_arithmetic": (
        "task_arithmetic",
        True,
        {"lambda": 0.8},
        [{"weight": 1.0}, {"weight": 0.5}, {"weight": "[0.1, 0.9]"}],
    ),
    "ties": (
        "ties",
        True,
        {"normalize": "true"},
        [{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": "[0.2, 0.8]"}],
    ),
    "ties_filtered": (
        "ties",
        True,
        {"density": "[{filter: mlp, value: 0.2}, {value: 0.6}]"},
        [{"weight": 1.0}, {"weight": 1.0}, {"weight": 1.0}],
    ),
    "breadcrumbs": (
        "breadcrumbs",
        True,
        None,
        [
            {"weight": 1.0, "density": 0.8, "gamma": 0.02},
            {"weight": 0.6, "density": 0.7, "gamma": 0.01},
            {"weight": 0.4, "density": 0.9, "gamma": 0.05},
        ],
    ),
    # DELLA's drop is random (checked against mergekit's probabilities in test_della.py); at density
    # 1 nothing is dropped and the rest of the method (sign election, disjoint mean, λ) must match.
    "della_undropped": (
        "della",
        True,
        {"lambda": 0.9},
        [{"weight": 1.0, "density": 1.0}, {"weight": 0.7, "density": 1.0}, {"weight": "[0.3, 0.9]", "density": 1.0}],
    ),
    "della_linear_undropped": ("della_linear", True, None, [{"weight": 0.6, "density": 1.0}] * 3),
    "sce": ("sce", True, {"select_topk": 0.3}, None),
    "sce_all": ("sce", True, None, None),
    "multislerp": ("multislerp", False, None, [{"weight": 1.0}, {"weight": 0.5}, {"weight": "[0.2, 1.0]"}]),
    "multislerp_base": ("multislerp", True, {"normalize_weights": "false"}, [{"weight": 0.4}, {"weight": 0.3}, {"weight": 0.3}]),
    "nuslerp": ("nuslerp", False, None, [{"weight": 0.3}, {"weight": 0.7}]),
    "nuslerp_base_rows": ("nuslerp", True, {"nuslerp_flatten": "false"}, [{"weight": 1.0}, {"weight": "[0.2, 2.0]"}]),
    "nuslerp_base_columns": ("nuslerp", True, {"nuslerp_flatten": "false", "nuslerp_row_wise": "true"},
                             [{"weight": 0.5}, {"weight": 0.5}]),
    "karcher": ("karcher", False, None, None),
    "karcher_tight": ("karcher", False, {"max_iter": 50, "tol": 1e-7}, None),
    "nearswap": ("nearswap", True, {"t": "[0.001, 0.01]"}, None),
    "ram": ("ram", True, {"epsilon": 0.004}, None),
    "ramplus_tl": ("ramplus_tl", True, {"epsilon": 0.004, "r": 0.5, "alpha": 0.8}, None),
    "passthrough": ("passthrough", False, None, [{"scale": 0.5}]),
    "arcee_fusion": ("arcee_fusion", True, None, None),
    "model_stock": ("model_stock", True, None, None),
    "model_stock_filter_wise": ("model_stock", True, {"filter_wise": "true"}, None),
    "slerp": ("slerp", True, {"t": "[0.1, 0.9]"}, None),
}


_MK_CACHE: dict[str, Path] = {}


def _mergekit_output(text: str, tmp_path: Path) -> Path:
    """Run mergekit-yaml once per distinct recipe (it does not know raymerge's keys)."""
    if text not in _MK_CACHE:
        recipe = tmp_path / "mergekit.yaml"
        recipe.write_text(text)
        out = tmp_path / "mergekit"
        proc = subprocess.run([MERGEKIT, str(recipe), str(out), "--no-copy-tokenizer"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        _MK_CACHE[text] = out
    return _MK_CACHE[text]


@pytest.mark.parametrize("chunk_bytes", [None, 2048], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_mergekit(case, chunk_bytes, family, tmp_path):
    method, use_base, params, per_model = CASES[case]
    base, experts = family
    models = experts[:1] if method in ("slerp", "nearswap", "arcee_fusion") else experts
    if method == "linear":
        models = [base, *experts[:2]]
    if method == "nuslerp":
        models = experts[:2]
    if method == "passthrough":
        models = experts[:1]
    pairwise = method in ("slerp", "nearswap", "arcee_fusion")  # mergekit lists the base among the models
    text = recipe_text(method, base if use_base else None, [base, *models] if pairwise else models,
                       params, ([{}] + per_model) if (pairwise and per_model) else per_model,
                       extra="dtype: float32" + (f"\nraymerge: {{chunk_bytes: {chunk_bytes}}}" if chunk_bytes else ""))  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    mk_out, rm_out = _mergekit_output(text.split("raymerge:")[0], tmp_path), tmp_path / "raymerge"
    assert raymerge_main(["run", str(recipe), str(rm_out), "-q"]) == 0
    ref, got = load_dir(mk_out), load_dir(rm_out)
    assert set(ref) == set(got)
    worst = max(((ref[k].double() - got[k].double()).abs().max().item(), k) for k in ref)
    assert worst[0] <= 1e-6, f"{case}: max |diff| {worst[0]:.3g} at {worst[1]}"
    # and the merge actually moved away from the base (the comparison is not vacuous)
    base_t = load_dir(base)
    assert any(not (got[k] == base_t[k]).all() for k in got)
