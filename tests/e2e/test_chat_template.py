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


CONVERSATIONS = [
    [{"role": "user", "content": " hi there "}],
    [
        {"role": "system", "content": "be nice "},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo\n"},
    ],
    [
        {"role": "system", "content": "s1"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ],
    [
        {"role": "user", "content": "q"},
        {"role": "user_context", "content": "ctx"},
        {"role": "assistant", "content": "a"},
    ],
]


def _render(template: str, conversation: list, generation: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    out, _ = render_jinja_template(
        conversations=[conversation],
        chat_template=template,
        add_generation_prompt=generation,
        bos_token="<s>",
        eos_token="</s>",
    )
    return out[0]


@pytest.mark.parametrize("name", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_named_templates_render_as_mergekit_s(name):
    """Each named template renders every conversation as mergekit's template of that name does,
    in transformers' Jinja environment (exaone: up to the whitespace of mergekit's source lines), and
    refuses the same conversations."""
    pytest.importorskip("transformers")
    import importlib.resources
    import re

    from raymerge.engine.chat_template import NAMED, resolve

    theirs = importlib.resources.files("mergekit._data.chat_templates").joinpath(f"{name}.jinja").read_text()
    mine = resolve(name, [])
    assert mine == NAMED[name] and mine != theirs
    for conv in CONVERSATIONS:
        for gen in (False, True):
            try:
                want = _render(theirs, conv, gen)
            except Exception as exc:  # noqa: BLE001 - mistral refuses roles it does not know
                with pytest.raises(type(exc)):
                    _render(mine, conv, gen)
                continue
            got = _render(mine, conv, gen)
            if name == "exaone":  # mergekit's keeps its source's line breaks and indentation
                want, got = re.sub(r"\s+", "", want), re.sub(r"\s+", "", got)
            assert got == want, (name, conv, gen)


def test_exaone_and_llama3_exact_text():
    pytest.importorskip("transformers")
    from raymerge.engine.chat_template import EXAONE, LLAMA3

    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert (
        _render(EXAONE, conv, True)
        == "[|system|][|endofturn|]\n[|user|]hi\n[|assistant|]yo[|endofturn|]\n[|assistant|]"
    )
    assert _render(LLAMA3, conv[:1], False) == "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n"
