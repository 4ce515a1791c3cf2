"""Every example recipe under configs/ parses, and the local ones merge a real (tiny) family."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
EXPERT = re.compile(r"\./models/expert-(\w+)")


def test_there_are_examples():
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_recipe(path, family, tmp_path):
    text = path.read_text()
    recipe = parse_recipe(text)  # schema, method and parameter names are all valid
    if "s3://" in text:
        assert all(m.model.startswith("s3://") for m in recipe.models)
        return
    base, experts = family
    names = list(dict.fromkeys(EXPERT.findall(text)))
    assert 2 <= len(names) <= len(experts)
    text = text.replace("./models/base", str(base))
    for name, expert in zip(names, experts):
        text = text.replace(f"./models/expert-{name}", str(expert))
    for name, expert in zip(names, experts):  # RegMean: Grams for every linear layer of this expert
        gram = f"./stats/{name}/grams.safetensors"
        if gram in text:
            g = torch.Generator().manual_seed(len(name))
            mats = {}
            for key, w in load_dir(expert).items():
                if w.dim() == 2 and "embed" not in key and "lm_head" not in key:
                    x = torch.randn(4 * w.shape[1], w.shape[1], generator=g)
                    mats[key.removesuffix(".weight")] = x.T @ x / x.shape[0]
            save_file(mats, str(tmp_path / f"{name}.safetensors"))
            text = text.replace(gram, str(tmp_path / f"{name}.safetensors"))
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # comments may show commands
    assert "./models" not in body and "./stats" not in body
    merge(parse_recipe(text), tmp_path / "out", progress=False)
    out, ref = load_dir(tmp_path / "out"), load_dir(base)
    assert out.keys() == ref.keys()
    assert all(torch.isfinite(t.float()).all() for t in out.values())
    moved = sum(float((out[k].float() - ref[k].float()).abs().max()) > 0 for k in ref)
    assert moved > len(ref) // 2  # the merge changed the weights, not a copy of the base
