"""Acceptance for frontier sizes (issue 12): ``raymerge plan`` of 8-expert Llama-3 70B and 405B
merges, on header-only checkpoints (real safetensors headers over sparse files: no tensor data).

On an accelerator every Gram and spectral method must plan with a small host peak (the host holds
row-chunks in flight, not statistics) and fit one H200 (141 GiB) at both sizes and one 80 GiB
card at 70B; on a CPU, 70B ACTMat must fit a 24 GiB budget and 405B ACTMat must be refused in
one readable line that names the tensor and both sizes. The CLI runs in-process.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from raymerge.cli import main
from raymerge.engine.storage import open_checkpoint
from raymerge.engine.synth import SHAPES, gram_specs, make_header_only_family, make_header_only_grams

from conftest import recipe_text

GiB = 2**30
N_EXPERTS = 8
SIZES = {"70b": "llama3-70b", "405b": "llama3-405b"}
# Hugging Face's own shard counts for Meta-Llama-3.1-70B / -405B at max_shard_size 5GB.
HF_SHARDS = {"70b": 30, "405b": 191}
HOST_PEAK_ON_ACCELERATOR = 2 * GiB
ACCELERATOR = ["--device", "cuda", "--memory-budget", "16GiB"]
CPU = ["--device", "cpu", "--memory-budget", "24GiB"]

# (case id, merge method, shared parameters)
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("actmat", "actmat", {}),
    *[(f"wudi-{s}", "wudi", {"solver": s}) for s in ("adam", "spectral", "adaptive", "closed_form")],
    ("tsv_m", "tsv_m", {}),
    ("iso_c", "iso_c", {}),
    ("iso_cts", "iso_cts", {}),
    ("regmean", "regmean", {}),
]


@dataclass(frozen=True)
class Family:
    base: Path
    experts: list[Path]
    grams: list[Path]  # each expert's input Grams (RegMean), HF-layout directories


@pytest.fixture(scope="session")
def frontier(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    """70B and 405B: base + 8 experts + 8 Gram sets each, all header-only (a few MiB of disk)."""
    root = tmp_path_factory.mktemp("frontier")
    out = {}
    for size, shape in SIZES.items():
        base, experts = make_header_only_family(root / size, shape, N_EXPERTS, dtype=torch.bfloat16)
        grams = [make_header_only_grams(root / size / f"grams{e}", shape) for e in range(N_EXPERTS)]
        out[size] = Family(base, experts, grams)
    return out


def _recipe(tmp_path: Path, fam: Family, method: str, params: dict[str, Any], grams: list[Path] | None = None) -> Path:
    per_model = [{"grams": g} for g in (grams or fam.grams)] if method == "regmean" else None
    r = tmp_path / f"{method}.yaml"
    r.write_text(recipe_text(method, fam.base, fam.experts, params or None, per_model, extra="dtype: bfloat16"))
    return r


def _plan(capsys: pytest.CaptureFixture[str], recipe: Path, *flags: str) -> tuple[int, dict[str, Any], str]:
    """Exit code, the JSON summary (empty if none was printed) and stderr of ``raymerge plan``."""
    rc = main(["plan", str(recipe), "--json", *flags])
    cap = capsys.readouterr()
    return rc, json.loads(cap.out) if cap.out.strip() else {}, cap.err


def _figures(summary: dict[str, Any]) -> str:
    tasks = summary.get("task_list") or [{"id": "?", "est_host_bytes": 0, "est_device_bytes": 0}]
    host = max(tasks, key=lambda t: t["est_host_bytes"])
    dev = max(tasks, key=lambda t: t["est_device_bytes"])
    return (
        f"peak host {summary.get('peak_task_host_bytes', 0) / GiB:.3f} GiB ({host['id']}), "
        f"peak device {summary.get('peak_task_device_bytes', 0) / GiB:.2f} GiB ({dev['id']})"
    )


def test_header_only_checkpoints(frontier: dict[str, Family]) -> None:
    """Real headers (our strict parser and the safetensors library agree), HF sharding, holes."""
    for size, shape in SIZES.items():
        fam = frontier[size]
        specs = dict(SHAPES[shape].tensors())
        for path in (fam.base, fam.experts[-1]):
            ck = open_checkpoint(str(path))
            assert {k: e.shape for k, e in ck.entries.items()} == specs
            assert {e.dtype for e in ck.entries.values()} == {"BF16"}
            assert len(set(ck.shard_of.values())) == HF_SHARDS[size]
        index = json.loads((fam.base / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == 2 * SHAPES[shape].params
        first = sorted(fam.base.glob("model-*.safetensors"))[0]
        with safe_open(str(first), "pt") as sf:
            for k in sf.keys():
                assert tuple(sf.get_slice(k).get_shape()) == specs[k]
        grams = open_checkpoint(str(fam.grams[0]))
        assert {k: e.shape for k, e in grams.entries.items()} == dict(gram_specs(shape))
        assert "model.layers.0.mlp.down_proj" in grams.entries
        on_disk = sum(os.stat(f).st_blocks * 512 for f in fam.base.iterdir())
        assert on_disk < 16 * 2**20, f"{size} base takes {on_disk} bytes of disk"


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize(("case", "method", "params"), METHODS, ids=[m[0] for m in METHODS])
def test_plan_on_h200(
    frontier: dict[str, Family],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    size: str,
    case: str,
    method: str,
    params: dict[str, Any],
) -> None:
    """One 141 GiB accelerator, 16 GiB of host: accepted, host peak ≤ 2 GiB at 70B and 405B."""
    rc, s, err = _plan(
        capsys, _recipe(tmp_path, frontier[size], method, params), *ACCELERATOR, "--device-memory", "141GiB"
    )
    figures = _figures(s)
    assert rc == 0, f"{case} {size}: {err.strip()}; {figures}"
    assert s["peak_task_host_bytes"] <= HOST_PEAK_ON_ACCELERATOR, f"{case} {size}: {figures}"
    assert s["peak_task_device_bytes"] <= 141 * GiB, f"{case} {size}: {figures}"
    assert s["peak_task_host_bytes"] == max(t["est_host_bytes"] for t in s["task_list"])
    assert s["peak_task_device_bytes"] == max(t["est_device_bytes"] for t in s["task_list"])


@pytest.mark.parametrize(("case", "method", "params"), METHODS, ids=[m[0] for m in METHODS])
def test_plan_70b_on_80gib(
    frontier: dict[str, Family],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    method: str,
    params: dict[str, Any],
) -> None:
    """70B fits one 80 GiB accelerator (A100/H100) with every method."""
    _plan_on_80gib(capsys, tmp_path, frontier, "70b", method, params)


def _plan_on_80gib(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    frontier: dict[str, Family],
    size: str,
    method: str,
    params: dict[str, Any],
) -> dict[str, Any]:
    """``raymerge plan`` for one 80 GiB card: accepted, both peaks within it and the host's 2 GiB."""
    rc, s, err = _plan(
        capsys, _recipe(tmp_path, frontier[size], method, params), *ACCELERATOR, "--device-memory", "80GiB"
    )
    case = f"{method} {params} {size}"
    assert rc == 0, f"{case}: {err.strip()}; {_figures(s)}"
    assert s["peak_task_device_bytes"] <= 80 * GiB, f"{case}: {_figures(s)}"
    assert s["peak_task_host_bytes"] <= HOST_PEAK_ON_ACCELERATOR, f"{case}: {_figures(s)}"
    return s


@pytest.mark.parametrize(
    ("case", "method", "params"), [m for m in METHODS if m[0] in ("actmat", "wudi-closed_form", "regmean")]
)
def test_plan_405b_solves_in_fp64_on_80gib(
    frontier: dict[str, Family],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    method: str,
    params: dict[str, Any],
) -> None:
    """405B R S⁺ on one 80 GiB card: fp64 statistics and Cholesky, only the eigh fallback planned in
    fp32 (fp64 eigh of the 53248-wide down_proj S needs 6n² = 127 GiB); WUDI's spectral filter,
    which always decomposes S, is planned in fp32 there."""
    s = _plan_on_80gib(capsys, tmp_path, frontier, "405b", method, params)
    linear = [t for t in s["task_list"] if t["class"] == "linear"]
    down = [t for t in linear if ".mlp.down_proj." in t["id"]]
    assert down and all(t["precision"] == "auto" and t["eigh_precision"] == "fp32" for t in down), down[0]
    assert all(t.get("precision") != "fp32" for t in linear)
    spectral = _plan_on_80gib(capsys, tmp_path, frontier, "405b", "wudi", {"solver": "spectral"})
    assert any(t.get("precision") == "fp32" for t in spectral["task_list"])


def test_plan_70b_actmat_on_cpu(
    frontier: dict[str, Family], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without an accelerator, 70B ACTMat still fits a 24 GiB host budget."""
    rc, s, err = _plan(capsys, _recipe(tmp_path, frontier["70b"], "actmat", {}), *CPU)
    assert rc == 0, f"actmat 70b cpu: {err.strip()}; {_figures(s)}"
    assert s["device"] == "cpu"
    assert s["peak_task_host_bytes"] <= 24 * GiB


def test_plan_405b_actmat_on_cpu_is_refused(
    frontier: dict[str, Family], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """405B ACTMat on a 24 GiB CPU host: refused in one line naming the tensor and both sizes."""
    rc, _, err = _plan(capsys, _recipe(tmp_path, frontier["405b"], "actmat", {}), *CPU)
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("raymerge: error:"), err
    assert "Traceback" not in err
    line = lines[0]
    assert re.search(r"model\.layers\.\d+\.\S+\.weight", line), line
    sizes = re.findall(r"(\d+(?:\.\d+)?) GiB", line)
    assert len(sizes) >= 2 and "24.0" in sizes and max(map(float, sizes)) > 24, line


def test_regmean_grams_in_one_file(
    frontier: dict[str, Family], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Grams as ``raymerge stats`` writes them (one ``grams.safetensors``, ~370 GiB at 70B, larger
    than this host's memory) plan like sharded ones: headers only, whatever the file's size."""
    single = make_header_only_grams(tmp_path / "grams", SIZES["70b"], shard_bytes=None)
    assert single.name == "grams.safetensors" and single.stat().st_size > 300 * GiB
    recipe = _recipe(tmp_path, frontier["70b"], "regmean", {}, grams=[single] * N_EXPERTS)
    rc, s, err = _plan(capsys, recipe, *ACCELERATOR, "--device-memory", "141GiB")
    assert rc == 0, err.strip()
    assert s["peak_task_host_bytes"] <= HOST_PEAK_ON_ACCELERATOR, _figures(s)
