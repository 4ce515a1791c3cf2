"""Pickle (``pytorch_model*.bin``) checkpoints: refused by default, read through weights_only
unpickling with the opt-in (same bytes out as the safetensors twin), and a hostile pickle is
refused even then, with nothing executed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from raymerge.engine.errors import CheckpointError
from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.storage import open_checkpoint

from conftest import recipe_text

RAYMERGE = str(Path(sys.executable).parent / "raymerge")


def bin_twin(src: Path, dst: Path, *, sharded: bool) -> Path:
    """Re-save a safetensors checkpoint as torch pickles, in the Hugging Face .bin layout."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    shards = sorted(src.glob("*.safetensors"))
    weight_map = {}
    if not sharded:
        state = {}
        for f in shards:
            with safe_open(str(f), "pt") as sf:
                state.update({k: sf.get_tensor(k) for k in sf.keys()})
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    for i, f in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        with safe_open(str(f), "pt") as sf:
            state = {k: sf.get_tensor(k) for k in sf.keys()}
        torch.save(state, dst / name)
        weight_map.update(dict.fromkeys(state, name))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


def test_bin_checkpoint_is_refused_by_default_naming_file_and_opt_in(family, tmp_path):
    base, _ = family
    twin = bin_twin(base, tmp_path / "binbase", sharded=True)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(str(twin))
    msg = str(exc.value)
    assert str(twin / "pytorch_model.bin.index.json") in msg
    assert "allow_pickle_bin: true" in msg and "--allow-pickle" in msg and "\n" not in msg
    single = bin_twin(base, tmp_path / "binsingle", sharded=False)
    with pytest.raises(CheckpointError, match="allow_pickle_bin") as exc:
        open_checkpoint(str(single))
    assert str(single / "pytorch_model.bin") in str(exc.value)


def test_safetensors_index_pointing_at_a_bin_shard_needs_the_opt_in(family, tmp_path):
    base, _ = family
    twin = bin_twin(base, tmp_path / "twin", sharded=True)
    # An index named like safetensors' cannot smuggle a pickle past the default refusal.
    shutil.move(twin / "pytorch_model.bin.index.json", twin / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="allow_pickle_bin"):
        open_checkpoint(str(twin))
    assert open_checkpoint(str(twin), allow_pickle=True).entries


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_bin_merge_equals_safetensors_twin(family, tmp_path, sharded):
    base, experts = family
    bins = [bin_twin(m, tmp_path / f"bin-{m.name}", sharded=sharded) for m in (base, *experts)]
    ref = recipe_text("ties", base, experts, {"density": 0.4}, [{"weight": 1.0}] * 3)
    st = merge(parse_recipe(ref), tmp_path / "st", progress=False, out_shard_bytes=150_000)
    text = recipe_text(
        "ties", bins[0], bins[1:], {"density": 0.4}, [{"weight": 1.0}] * 3, extra="raymerge:\n  allow_pickle_bin: true"
    )
    figures = merge(parse_recipe(text), tmp_path / "bin", progress=False, out_shard_bytes=150_000)
    assert digests(tmp_path / "bin") == digests(tmp_path / "st")
    # Tensor bytes are read in place from the zip records, exactly the spans the safetensors run reads.
    assert figures.bytes_read == st.bytes_read > 0


def test_cli_allow_pickle_flag(family, tmp_path):
    base, experts = family
    bins = [bin_twin(m, tmp_path / f"bin-{m.name}", sharded=True) for m in (base, experts[0])]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text("task_arithmetic", bins[0], bins[1:], None, [{"weight": 0.5}]))
    out = tmp_path / "out"
    refused = subprocess.run([RAYMERGE, "run", str(recipe), str(out), "-q"], capture_output=True, text=True)
    assert refused.returncode == 2 and not out.exists()
    line = refused.stderr.strip()
    assert line.startswith("raymerge: error: checkpoint has only pickle weights") and "\n" not in line
    assert str(bins[0] / "pytorch_model.bin.index.json") in line and "--allow-pickle" in line
    ok = subprocess.run(
        [RAYMERGE, "run", str(recipe), str(out), "-q", "--allow-pickle"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    st = tmp_path / "st.yaml"
    st.write_text(recipe_text("task_arithmetic", base, [experts[0]], None, [{"weight": 0.5}]))
    merge(parse_recipe(st.read_text()), tmp_path / "st", progress=False)
    assert digests(out) == digests(tmp_path / "st")


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_even_with_opt_in(family, tmp_path):
    base, experts = family
    evil = bin_twin(experts[0], tmp_path / "evil", sharded=False)
    marker = tmp_path / "pwned"
    state = torch.load(evil / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = _Payload(marker)
    torch.save(state, evil / "pytorch_model.bin")
    text = recipe_text(
        "task_arithmetic",
        base,
        [evil, experts[1]],
        None,
        [{"weight": 1.0}] * 2,
        extra="raymerge:\n  allow_pickle_bin: true",
    )
    with pytest.raises(CheckpointError) as exc:
        merge(parse_recipe(text), tmp_path / "out", progress=False)
    msg = str(exc.value)
    assert f"file {evil / 'pytorch_model.bin'}" in msg
    assert "system" in msg and "nothing was executed" in msg and "\n" not in msg
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.raymerge-staging").exists()


def test_strided_or_corrupt_bin_is_refused(family, tmp_path):
    base, _ = family
    twin = bin_twin(base, tmp_path / "strided", sharded=False)
    state = torch.load(twin / "pytorch_model.bin", weights_only=True)
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = state[name].t()  # a transposed view: its bytes are not in row-major order
    torch.save(state, twin / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="strided view") as exc:
        open_checkpoint(str(twin), allow_pickle=True)
    assert exc.value.tensor == name
    (twin / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a torch archive")
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        open_checkpoint(str(twin), allow_pickle=True)
