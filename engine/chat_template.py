"""The recipe's ``chat_template``: ``auto``, a template name, or a literal Jinja template.

``auto`` takes the template most of the input models ship (in ``tokenizer_config.json`` or
``chat_template.jinja``; the first in recipe order among equals), as mergekit does; a name picks
one of the templates below; anything with Jinja markup is used as written. The merged model gets
it where transformers reads it: ``tokenizer_config.json``'s ``chat_template`` and
``chat_template.jinja``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from raymerge.engine.errors import CheckpointError, RecipeError
from raymerge.engine.safeio import parse_json, read_json
from raymerge.engine.storage import join_url, read_blob, read_text

log = logging.getLogger(__name__)
TEMPLATE_BYTES = 1 << 20  # a chat template is a few kB

# ChatML: each message as <|im_start|>ROLE, newline, content, <|im_end|>.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Alpaca: the last system message, a blank line, then "### Instruction:" / "### Input:" /
# "### Response:" sections (contents trimmed) separated by blank lines.
ALPACA = (
    "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{{- (system | last)['content'] | trim if system else '' }}{{ '\n\n' }}"
    "{%- for message in messages -%}"
    "{%- set head = {'user': 'Instruction', 'user_context': 'Input', 'assistant': 'Response'}.get(message['role']) -%}"
    "{%- if head -%}{{ '### ' + head + ':\n' + message['content'] | trim }}{{ '' if loop.last else '\n\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{ '### Response:\n' }}{%- endif -%}"
)
# Llama 3: BOS, then per message a role header, the trimmed content and <|eot_id|> (mergekit adds a newline).
LLAMA3 = (
    "{%- for message in messages -%}"
    "{{ (bos_token if loop.first else '') + '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)
# Mistral: BOS, then alternating " [INST] user [/INST]" and " assistant</s>"; a leading system
# message is put in front of the first user turn.
MISTRAL = (
    "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
    "{%- set turns = messages[1:] if has_system else messages -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('mistral template: after an optional system message, roles must alternate user, assistant, user, ...') -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- ' [INST] ' + ((messages[0]['content'] + '\n\n') if has_system and loop.first else '') + message['content'] + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' + message['content'] + eos_token -}}"
    "{%- else -%}{{- raise_exception('mistral template: only user and assistant turns after one optional system message') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# EXAONE: [|role|]content, user turns ending in a newline and the others in [|endofturn|] and a
# newline; an empty system turn first when the conversation has none.
EXAONE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}{{ '[|system|][|endofturn|]\n' }}{%- endif -%}"
    "{{ '[|' + message['role'] + '|]' + message['content'] + ('\n' if message['role'] == 'user' else '[|endofturn|]\n') }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}"
)
# The templates mergekit knows by name.
NAMED = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}


def model_template(url: str) -> str | None:
    """The chat template a model directory ships, if any."""
    text = read_text(join_url(url, "chat_template.jinja"), limit=TEMPLATE_BYTES, what="chat_template.jinja")
    if text:
        return text
    config_url = join_url(url, "tokenizer_config.json")
    raw = read_blob(config_url, what="tokenizer_config.json")
    if not raw:
        return None
    try:
        config = parse_json(raw, file=config_url, error=CheckpointError, what="tokenizer_config.json")
    except CheckpointError as exc:  # a model's broken tokenizer file does not stop the merge
        log.warning("ignoring its chat template: %s", exc)
        return None
    value = config.get("chat_template")
    if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) and value else None


def resolve(spec: str, models: Sequence[str]) -> str | None:
    """The template ``spec`` names for a merge of ``models`` (None: ``auto`` and no model has one)."""
    if spec == "auto":
        found = [t for t in (model_template(m) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if spec in NAMED:
        return NAMED[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    raise RecipeError(
        f"unknown chat_template {spec!r}",
        hint=f"use auto, one of {', '.join(sorted(NAMED))}, or a literal Jinja template",
    )


def write(directory: Path, template: str) -> None:
    """Put ``template`` where transformers reads it in a model ``directory``."""
    config_path = directory / "tokenizer_config.json"
    config = {}
    if config_path.exists():
        config = read_json(config_path, error=CheckpointError, what="tokenizer_config.json")
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")


__all__ = ["ALPACA", "CHATML", "EXAONE", "LLAMA3", "MISTRAL", "NAMED", "model_template", "resolve", "write"]
