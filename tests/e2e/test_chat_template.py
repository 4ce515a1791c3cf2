"""The recipe's chat_template (auto, a name, literal Jinja) lands where transformers reads it."""

from __future__ import annotations

import json
import shutil

import pytest

from raymerge.engine.chat_template import CHATML
from raymerge.engine.errors import RecipeError
from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe

from conftest import recipe_text


def _with_template(src, dst, template):
    shutil.copytree(src, dst)
    (dst / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "chat_template": template}))
    return dst


def test_chat_template_auto_named_and_literal(family, tmp_path):
    base, experts = family
    a, b = "{{ 'A' }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "{{ 'B' }}"
    mine = [_with_template(e, tmp_path / f"e{i}", t) for i, (e, t) in enumerate(zip(experts, (b, a, a), strict=True))]
    for spec, want in (("auto", a), ("chatml", CHATML), ("'{{ messages[0].content }}'", "{{ messages[0].content }}")):
        text = recipe_text(
            "task_arithmetic", base, mine, per_model=[{"weight": 0.5}] * 3, extra=f"chat_template: {spec}"
        )
        out = tmp_path / f"out-{spec[:6].strip(chr(39))}"
        merge(parse_recipe(text), out, progress=False, workers=1)
        config = json.loads((out / "tokenizer_config.json").read_text())
        assert config["chat_template"] == want and (out / "chat_template.jinja").read_text() == want, spec
    # a template that renders: transformers' own Jinja environment accepts what was written
    jinja2 = pytest.importorskip("jinja2")
    rendered = jinja2.Template(CHATML).render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_chat_template_name_is_one_clear_error(family, tmp_path):
    base, experts = family
    text = recipe_text(
        "task_arithmetic", base, experts, per_model=[{"weight": 0.5}] * 3, extra="chat_template: vicunaa"
    )
    with pytest.raises(RecipeError, match="unknown chat_template 'vicunaa'.*chatml"):
        merge(parse_recipe(text), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
