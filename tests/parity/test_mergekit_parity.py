"""raymerge run and mergekit-yaml (mergekit 0.1.5 from PyPI) on the same fp32 Llama checkpoints.

Every tensor must agree to max |difference| ≤ 1e-6, including layer gradients and filters. The
cases are the rows of tests/method_examples.py that name a mergekit method.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raymerge.cli import main as raymerge_main

from conftest import load_dir, mergekit_yaml
from method_examples import EXAMPLES

# Every example of tests/method_examples.py that mergekit 0.1.5 can reproduce, by example name.
CASES = {e.name: e for e in EXAMPLES if e.mergekit}


_MK_CACHE: dict[str, Path] = {}


def _mergekit_output(text: str, tmp_path: Path) -> Path:
    """Run mergekit-yaml once per distinct recipe (it does not know raymerge's keys)."""
    if text not in _MK_CACHE:
        _MK_CACHE[text] = mergekit_yaml(text, tmp_path / "mergekit")
    return _MK_CACHE[text]


@pytest.mark.parametrize("chunk_bytes", [None, 2048], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_mergekit(case, chunk_bytes, family, tmp_path):
    example = CASES[case]
    base, experts = family
    chunking = f"\nraymerge: {{chunk_bytes: {chunk_bytes}}}" if chunk_bytes else ""
    text = example.recipe(base, experts, extra="dtype: float32" + chunking)
    mk_text = example.recipe(base, experts, extra="dtype: float32", method=example.mergekit)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    mk_out, rm_out = _mergekit_output(mk_text, tmp_path), tmp_path / "raymerge"
    assert raymerge_main(["run", str(recipe), str(rm_out), "-q"]) == 0
    ref, got = load_dir(mk_out), load_dir(rm_out)
    assert set(ref) == set(got)
    worst = max(((ref[k].double() - got[k].double()).abs().max().item(), k) for k in ref)
    assert worst[0] <= 1e-6, f"{case}: max |diff| {worst[0]:.3g} at {worst[1]}"
    # and the merge actually moved away from the base (the comparison is not vacuous)
    base_t = load_dir(base)
    assert any(not (got[k] == base_t[k]).all() for k in got)
