"""Render the README's figure tables from the committed JSON, so the two never disagree.

The README marks each generated table with ``<!-- figures:NAME -->`` … ``<!-- /figures:NAME -->``;
NAME is a results file stem under ``benchmarks/results``. ``--write`` regenerates every marked
block, ``--check`` (run by the test suite) fails when one differs from its JSON.

    python -m benchmarks.figures --write
    python -m benchmarks.figures --check
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- figures:([\w.-]+) -->\n)(.*?)(<!-- /figures:\2 -->)", re.DOTALL)

GRAM_LABELS = {
    "fusion_bench": "FusionBench `wudi_merging` (300 Adam steps, autograd)",
    "wudi_adam": "raymerge `wudi` (`solver: adam`, 300 steps, fp32)",
    "wudi_adam_tf32": "raymerge `wudi` (`solver: adam`, `tf32: true`)",
    "wudi_spectral": "raymerge `wudi` (`solver: spectral`)",
    "wudi_adaptive": "raymerge `wudi` (`solver: adaptive`)",
    "actmat": "raymerge `actmat`",
}


def gram_table(res: dict[str, Any]) -> str:
    """Whole-model seconds and speed-up over FusionBench for each Gram-method variant."""
    model = res["whole_model_s"]
    what = res["config"]["model"].split(" (")[0]
    rows = [f"| method | {what}, {res['config']['experts']} experts | speed-up vs FusionBench |", "|---|---|---|"]
    for key in ["fusion_bench", *[k for k in GRAM_LABELS if k != "fusion_bench"]]:
        if f"{key}_s" not in model:
            continue
        speed = "1" if key == "fusion_bench" else f"**{res['speedup_vs_fusion_bench'][key]:.1f}×**"
        rows.append(f"| {GRAM_LABELS[key]} | {model[f'{key}_s']:.0f} s | {speed} |")
    check = res["equal_output_check"]
    rows.append("")
    rows.append(
        f"Same output: relative difference {check['rel_err_wudi_adam_vs_fb']:.1e} after {check['steps']} Adam steps "
        f"on {check['shape'][0]}×{check['shape'][1]} ({res['machine']['device']})."
    )
    return "\n".join(rows)


def throughput_table(res: dict[str, Any]) -> str:
    from benchmarks.throughput import startup_table, summary_table

    floor = res["matrix"]["io_floor"]
    start = startup_table(res)
    floors = floor.get("floors_s") or []
    how = (
        f"I/O floor: median {floor['floor_s']:.2f} s of {len(floors)} measurements ({min(floors):.2f}–{max(floors):.2f} s);"
        " each run is divided by the floor measured just before it, and a row is the repeat with the median ratio"
        " (ranges over the repeats in parentheses)."
        + (
            f" Warm-page floor (the same read, then a rewrite and fsync of the file just written, its pages"
            f" already cached): median {floor['warm_floor_s']:.2f} s."
            if floor.get("warm_floor_s")
            else ""
        )
        if len(floors) > 1
        else f"I/O floor: {floor['floor_s']:.2f} s ({floor['read_gbps']} GB/s sequential read, warm cache)."
    )
    return summary_table(res) + f"\n\n{how}" + (f"\n\n{start}" if start else "")


def _renderer(stem: str) -> Callable[[dict[str, Any]], str]:
    if stem.startswith("gram_methods"):
        return gram_table
    if stem.startswith("throughput_scaling"):
        from benchmarks.throughput import scaling_growth_table

        return scaling_growth_table
    if stem.startswith(("throughput", "frontier")):
        return throughput_table
    if stem.startswith("profile_elementwise"):
        from benchmarks.profile_elementwise import markdown_table

        return markdown_table
    if stem.startswith("quality"):
        # the longest module name that prefixes the stem renders it (quality_nonlocal_mlp before quality_nonlocal)
        modules = ("quality_nonlocal_mlp", "quality_nonlocal", "quality_real", "quality")
        module = "benchmarks." + next(m for m in modules if stem.startswith(m))
        quality = importlib.import_module(module)
        render: Callable[[dict[str, Any]], str] = quality.markdown_table
        return render
    raise SystemExit(f"no renderer for figures block {stem!r}")


def render(text: str) -> str:
    """``text`` with every marked block regenerated from ``benchmarks/results/<stem>.json``."""

    def one(m: re.Match[str]) -> str:
        stem = m.group(2)
        res = json.loads((RESULTS / f"{stem}.json").read_text())
        return f"{m.group(1)}{_renderer(stem)(res).rstrip()}\n{m.group(4)}"

    return BLOCK.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.figures", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the marked README blocks in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if a marked block differs from its JSON")
    args = ap.parse_args(argv)
    text = README.read_text()
    new = render(text)
    blocks = [m.group(2) for m in BLOCK.finditer(text)]
    if args.write:
        README.write_text(new)
        print(f"regenerated {len(blocks)} block(s): {', '.join(blocks)}")
        return 0
    if new != text:
        stale = [m.group(2) for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new)) if m.group(0) != n.group(0)]
        print(
            f"README figures out of date with their JSON: {', '.join(stale)}; run python -m benchmarks.figures --write"
        )
        return 1
    print(f"{len(blocks)} README figure block(s) match their JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
