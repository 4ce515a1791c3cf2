"""Smoke run of the non-local MLP benchmark: two differently seeded ReLU MLPs, 4 + 4 experts,
merges through ``merge()``, TACT from ``engine.tact``; asserts the variance collapse and its repair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quality_nonlocal_mlp_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.quality_nonlocal_mlp", "--smoke", "--results-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "quality_nonlocal_mlp_smoke.json").read_text())
    assert (tmp_path / "quality_nonlocal_mlp_smoke.png").stat().st_size > 1000
    assert [t["side"] for t in res["tasks"]] == ["A"] * 4 + ["B"] * 4
    assert all(a > 0.7 for a in res["expert_accuracy"].values()), res["expert_accuracy"]
    # Weight matching is a symmetry of each B expert (its head included) and brings the bases closer.
    wm = res["alignments"]["wm"]
    assert wm["max_logit_gap"] <= 1e-4
    assert wm["objective_after"] > wm["objective_before"]
    assert wm["base_distance"] < res["alignments"]["none"]["base_distance"]
    rows = {(r["alignment"], r["method"]): r for r in res["rows"]}
    assert len(rows) == 6
    # Averaging unaligned units collapses the hidden activations; alignment reduces the collapse.
    collapse = min(rows["none", "Average"]["sigma_ratio"])
    assert collapse < 0.8, rows["none", "Average"]["sigma_ratio"]
    assert min(rows["wm", "Average"]["sigma_ratio"]) > collapse
    for key, r in rows.items():
        # TACT puts every layer back at the expert's scale on held-out inputs, not only on its
        # calibration batches, and recovers accuracy lost by the merge.
        assert all(abs(x - 1) < 0.1 for x in r["sigma_ratio_after_tact_heldout"]), (key, r)
        assert r["mean_normalized_tact"] > r["mean_normalized"] + 3, (key, r)
        assert set(r["accuracy"]) == set(res["expert_accuracy"])
