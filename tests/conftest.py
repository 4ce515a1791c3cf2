"""Shared fixtures: tiny HF-layout Llama checkpoints built in temp dirs, and recipe helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from raymerge.engine.storage import clear_shard_cache
from raymerge.engine.synth import make_family


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadgroup``), tests that start Ray clusters run one after another
    in one worker, and so do CUDA tests (one device); the rest spread over the other workers."""
    for item in items:
        for marker in ("ray", "gpu"):
            if item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.xdist_group(marker))
                break


@pytest.fixture(autouse=True)
def _fresh_readers():
    # Tests rewrite files in place; never reuse a mapping of an older file.
    clear_shard_cache()
    yield
    clear_shard_cache()


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """fp32 tiny Llama: base + 3 experts, sharded (several shards per model)."""
    root = tmp_path_factory.mktemp("family")
    return make_family(root, "tiny", 3, dtype=torch.float32, shard_bytes=200_000)


@pytest.fixture(scope="session")
def family_single(tmp_path_factory) -> tuple[Path, list[Path]]:
    """fp32 tiny Llama in single-file layout (model.safetensors, no index)."""
    root = tmp_path_factory.mktemp("family1")
    return make_family(root, "tiny", 3, dtype=torch.float32, seed=7)


def recipe_text(
    method: str,
    base: Path | str | None,
    experts: list,
    params: dict | None = None,
    per_model: list[dict] | None = None,
    extra: str = "",
) -> str:
    """A recipe YAML string for ``method`` over ``experts`` (optionally per-model parameters)."""
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for i, e in enumerate(experts):
        lines.append(f"  - model: {e}")
        pm = (per_model or [{}] * len(experts))[i]
        if pm:
            lines.append("    parameters:")
            for k, v in pm.items():
                lines.append(f"      {k}: {v}")
    if params:
        lines.append("parameters:")
        for k, v in params.items():
            lines.append(f"  {k}: {v}")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def presize_shards(staging: Path | str, shards) -> None:
    """Create ``staging`` and each of a plan's ``shards`` in it, sparse and at its final size, as
    the writer does before tasks ``pwrite`` into them (for tests that call ``run_task`` directly)."""
    os.makedirs(staging, exist_ok=True)
    for shard in shards:
        with open(os.path.join(staging, shard.name), "wb") as f:
            f.truncate(shard.size)


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory (any number of shards), via the safetensors library."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


MERGEKIT = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))


def mergekit_yaml(text: str, out: Path, *flags: str, copy_tokenizer: bool = False) -> Path:
    """Run ``mergekit-yaml`` on recipe ``text`` (written beside ``out`` as ``OUT.yaml``) into ``out``,
    with extra ``flags``; fails the test with mergekit's stderr if it does not exit 0."""
    recipe = out.with_suffix(".yaml")
    recipe.write_text(text)
    cmd = [MERGEKIT, str(recipe), str(out), *(() if copy_tokenizer else ("--no-copy-tokenizer",)), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def map_reduce_errors(got_dir: Path, want_dir: Path, base_dir: Path) -> dict[str, float]:
    """Per tensor, how far a map-reduce merge (``got_dir``) is from the single-task one: the sums are
    reassociated, nothing else changes. Gram-merged linear weights are measured relative to their
    merged task vector, the fp32 means (norms, embeddings, LM head) relative to the tensor."""
    got, want, base = load_dir(got_dir), load_dir(want_dir), load_dir(base_dir)
    assert got.keys() == want.keys()
    errors = {}
    for name, w in want.items():
        gram = w.dim() == 2 and "embed" not in name and "lm_head" not in name
        scale = (w - base[name]) if gram else w
        errors[name] = float((got[name] - w).abs().max() / scale.abs().max().clamp(min=1e-30))
    return errors
