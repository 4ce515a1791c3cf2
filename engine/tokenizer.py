"""The output tokenizer of a merge and, per input model, where each output token's row comes from.

mergekit's semantics (``tokenizer_source`` or the ``tokenizer:`` section): the output tokenizer is
built first — the base model's (``base``, with tokens past its ``vocab_size`` dropped), one
model's as it ships (a model reference), or the union of all of them (``union``: the base's
tokenizer plus every other model's tokens it lacks, in model order, then their added tokens) —
plus any tokens the ``tokens`` section names. Every embedding / LM-head row is then re-indexed
for each model: a token the model has takes its own row; one it lacks (or one ``force``-d) takes a
default row, made by mergekit's rules:

- a token in the ``tokens`` section takes its ``source``: a model's own row of that token, a
  given token (``kind: model_token`` with ``token`` or ``token_id``) of a model, or zeros;
- otherwise a token only one model has takes that model's row, a token no model has is zeros, a
  token the base has takes the base's row, and the rest the mean of the rows of the models having it.

With ``pad_to_multiple_of`` the output has more rows than tokens; each model's extra rows are the
mean of its re-indexed token rows. This module only builds the tokenizer (with ``transformers``,
on the planning host) and the row maps: the rows themselves are gathered per task by byte range.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raymerge.engine.arch import layer_index
from raymerge.engine.errors import CheckpointError, RecipeError
from raymerge.engine.storage import is_local, local_path

log = logging.getLogger(__name__)

# Names of tables indexed by token id (not positions or token types): embeddings and LM heads.
TOKEN_HINTS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "tok_embeddings", "output.weight")


def is_vocab_tensor(name: str, shape: Sequence[int]) -> bool:
    """Whether tensor ``name`` has one row per token (a 2-D token embedding or LM head)."""
    return len(shape) == 2 and layer_index(name) is None and any(h in name for h in TOKEN_HINTS)


# A default row: the rows (model index, row) it averages; () is a row of zeros.
Default = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TokenSource:
    """Where a ``tokens`` entry's row comes from: ``kind`` is ``model`` (that model's own row of the
    token), ``model_token`` (``model``'s row of ``token`` or ``token_id``) or ``zero``."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSetting:
    source: TokenSource | None
    force: bool = False


class TokenRowSource(BaseModel):
    """A ``tokens`` entry's ``source`` given as a mapping: ``{kind: zero}``, or ``{kind:
    model_token, model: M, token: T}`` / ``token_id: N`` (model M's row of another token)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["model_token", "zero"]
    model: str | None = None
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_token(self) -> TokenRowSource:
        if self.kind == "model_token" and (self.model is None or (self.token is None) == (self.token_id is None)):
            raise ValueError("kind model_token needs `model` and exactly one of `token` and `token_id`")
        return self


class TokenEntry(BaseModel):
    """One entry of ``tokenizer.tokens``: where the token's row comes from (a model, whose own row
    of it is taken, or a ``TokenRowSource``), and whether models that have it take that row too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | TokenRowSource | None = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: Any) -> Any:
        if isinstance(v, dict):  # one clear message, not one per member of the union
            try:
                return TokenRowSource(**v)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"{where + ': ' if where else ''}{first['msg']}") from None
        return v

    def setting(self) -> TokenSetting:
        s = self.source
        if s is None or isinstance(s, str):
            return TokenSetting(None if s is None else TokenSource("model", s), self.force)
        return TokenSetting(TokenSource(s.kind, s.model, s.token, s.token_id), self.force)


class TokenizerSection(BaseModel):
    """mergekit's ``tokenizer:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "union"
    tokens: dict[str, TokenEntry] | None = None
    pad_to_multiple_of: int | None = Field(None, gt=0)

    def settings(self) -> dict[str, TokenSetting]:
        return {k: v.setting() for k, v in (self.tokens or {}).items()}


def check_tokenizer(source: str | None, section: TokenizerSection | None, urls: Sequence[str], origin: str) -> None:
    """A recipe's ``tokenizer_source`` / ``tokenizer``: at most one, naming `base`, `union` or a
    merged model, with every token source a merged model."""
    if source and section:
        raise RecipeError("give either `tokenizer_source` or a `tokenizer` section, not both", file=origin)
    key = "tokenizer.source" if section else "tokenizer_source"
    ts = section.source if section else source
    if ts not in (None, "base", "union") and ts not in urls:
        raise RecipeError(f"{key} {ts!r} is neither `base`, `union` nor one of the models", file=origin)
    for token, entry in ((section.tokens if section else None) or {}).items():
        model = entry.source.model if isinstance(entry.source, TokenRowSource) else entry.source
        if model is not None and model not in urls:
            raise RecipeError(f"tokenizer.tokens[{token!r}].source: {model!r} is not one of the models", file=origin)


@dataclass(frozen=True)
class OutputVocab:
    """The output tokenizer (its files, ready to write) and each model's row of every output token.

    ``rows[model][t]`` is the row of output token ``t`` in that model's embedding, -1 where it has
    none; ``original[model]`` is the model's own vocabulary (token → row), for ``model_token`` sources.
    """

    tokens: tuple[str, ...]  # by output id
    rows: Mapping[str, tuple[int, ...]]
    original: Mapping[str, Mapping[str, int]]
    files: Mapping[str, bytes]
    pad_to_multiple_of: int | None = None

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def padded(self) -> int:
        """Rows of the output embedding: the token count rounded up to ``pad_to_multiple_of``."""
        m = self.pad_to_multiple_of
        return -(-self.size // m) * m if m else self.size


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise RecipeError(
            "building the output tokenizer needs the transformers package, which is not installed",
            hint="pip install transformers, or drop tokenizer_source / tokenizer from the recipe",
        ) from None
    return transformers


def _load(url: str) -> Any:
    if not is_local(url):
        raise RecipeError(
            "tokenizer surgery reads tokenizers from local directories only",
            file=url,
            hint="download the model, or drop tokenizer_source",
        )
    try:
        return _transformers().AutoTokenizer.from_pretrained(local_path(url), use_fast=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a missing or bad tokenizer
        raise CheckpointError(f"cannot load the tokenizer: {' '.join(str(exc).split())[:300]}", file=url) from None


def config_vocab_size(config: Mapping[str, Any]) -> int | None:
    """The ``vocab_size`` of a config.json (top level, else ``text_config``'s)."""
    for c in (config, config.get("text_config")):
        if isinstance(c, Mapping) and isinstance(c.get("vocab_size"), int):
            return int(c["vocab_size"])
    return None


def _stripped(tok: Any, vocab_size: int | None, url: str) -> Any:
    """``tok`` without the tokens whose ids are past the model's embedding rows (BPE only)."""
    if vocab_size is None:
        return tok
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    spec = json.loads(tok._tokenizer.to_str())
    if not tok.is_fast or spec["model"]["type"] != "BPE":
        raise CheckpointError(
            f"the tokenizer has {len(unused)} token(s) past the model's {vocab_size} rows and is not a BPE "
            "tokenizer, so they cannot be dropped",
            file=url,
        )
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < vocab_size]
    for t in unused:
        spec["model"]["vocab"].pop(t, None)

    def keep(m: Any) -> bool:  # a merge of, or making, a dropped token goes too (mergekit keeps the latter)
        pair = m.split(" ") if isinstance(m, str) else list(m)
        return not any(p in unused for p in pair) and "".join(pair) not in unused

    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if keep(m)]
    import tokenizers

    try:
        tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise CheckpointError(f"cannot drop the tokens past row {vocab_size}: {exc}", file=url) from None
    return tok


def _union(base_tok: Any, toks: dict[str, Any], sizes: dict[str, int | None]) -> Any:
    """The base tokenizer plus every other model's tokens it lacks, then all models' added tokens."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for url, tok in toks.items():
        size = sizes[url] or tok.vocab_size
        decoder = tok.added_tokens_decoder
        specials = {info.content for info in decoder.values()}
        # in id order: mergekit takes the order of a hash map, which varies from run to run
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and t not in specials:
                plain.setdefault(t)
        for i, info in decoder.items():
            if i < size and info.content not in added:
                added[info.content] = info
            elif i < size and added[info.content] != info:
                log.warning(
                    "token %r is added with different settings by several models; the first is kept", info.content
                )
    with tempfile.TemporaryDirectory() as tmp:  # a copy, so the base tokenizer is left as loaded
        base_tok.save_pretrained(tmp, legacy_format=False)
        out = _transformers().AutoTokenizer.from_pretrained(tmp, use_fast=True)
    have = base_tok.get_vocab()
    for t in plain:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_vocab(
    source: str,
    models: Sequence[str],
    base: str | None,
    configs: Mapping[str, Mapping[str, Any]],
    extra_tokens: Sequence[str] = (),
    pad_to_multiple_of: int | None = None,
    tokenizer_dirs: Mapping[str, str] | None = None,
) -> OutputVocab:
    """Build the output tokenizer (``source``: ``base``, ``union`` or a model of ``models``) and
    every model's row of each output token. ``tokenizer_dirs`` maps a model to the directory its
    tokenizer is read from, where that is not the model itself (a LoRA adapter's base)."""
    dirs = dict(tokenizer_dirs or {})
    first = base or models[0]
    sizes = {u: config_vocab_size(configs[u]) for u in models}
    toks: dict[str, Any] = {first: _stripped(_load(dirs.get(first, first)), sizes[first], first)}
    for u in models:
        if u not in toks:
            toks[u] = _load(dirs.get(u, u))
    if source == "base":
        out = toks[first]
    elif source == "union":
        out = _union(toks[first], toks, sizes)
    else:
        out = _load(dirs.get(source, source))
    have = set(out.get_vocab())
    for t in extra_tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise CheckpointError(
            "the output tokenizer's token ids are not 0, 1, 2, …; its embedding rows cannot be laid out",
            file=source if source not in ("base", "union") else first,
        )
    rows: dict[str, tuple[int, ...]] = {}
    original: dict[str, dict[str, int]] = {}
    for u in models:
        own = toks[u].get_vocab()
        size = sizes[u] if sizes[u] is not None else len(own)
        original[u] = own
        rows[u] = tuple(own[t] if t in own and own[t] < size else -1 for t in tokens)
    with tempfile.TemporaryDirectory() as tmp:
        out.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return OutputVocab(tuple(tokens), rows, original, files, pad_to_multiple_of)


def row_maps(
    vocab: OutputVocab, models: Sequence[str], base: str | None, settings: Mapping[str, TokenSetting]
) -> tuple[dict[str, tuple[int, ...]], tuple[Default, ...]]:
    """For one vocabulary tensor gathered from ``models`` (in mergekit's order): per model, the
    input row of each output token (``-k-1``: default row ``k``), and the default rows."""
    perms = [vocab.rows[u] for u in models]
    index = {u: i for i, u in enumerate(models)}
    defaults: list[Default] = []
    default_of: dict[str, int] = {}

    def add(token: str, d: Default) -> None:
        default_of[token] = len(defaults)
        defaults.append(d)

    for t, token in enumerate(vocab.tokens):
        present = [i for i, p in enumerate(perms) if p[t] >= 0]
        setting = settings.get(token)
        if len(present) == len(models) and not (setting and setting.force):
            continue
        if setting is not None:
            add(token, _setting_row(setting, token, t, vocab, models, index))
        elif len(present) == 1:
            add(token, ((present[0], perms[present[0]][t]),))
        elif not present:
            log.warning("token %r is in none of the models; its row is zeros", token)
            add(token, ())
        elif base in index and perms[index[base]][t] >= 0:
            add(token, ((index[base], perms[index[base]][t]),))
        else:
            add(token, tuple((i, perms[i][t]) for i in present))
    maps: dict[str, tuple[int, ...]] = {}
    for u, p in zip(models, perms, strict=True):
        out = []
        for t, token in enumerate(vocab.tokens):
            setting = settings.get(token)
            if p[t] >= 0 and not (setting and setting.force):
                out.append(p[t])
            elif token in default_of:
                out.append(-default_of[token] - 1)
            else:  # unreachable by the rules above; mergekit leaves such a row at zero
                add(token, ())
                out.append(-default_of[token] - 1)
        maps[u] = tuple(out)
    return maps, tuple(defaults)


def _setting_row(
    s: TokenSetting, token: str, t: int, vocab: OutputVocab, models: Sequence[str], index: Mapping[str, int]
) -> Default:
    """The default row a ``tokens`` entry asks for."""
    src = s.source
    if src is None:
        raise RecipeError(f"tokenizer.tokens[{token!r}]: a token some model lacks (or forced) needs a `source`")
    if src.kind == "zero":
        return ()
    assert src.model is not None
    if src.model not in index:
        raise RecipeError(
            f"tokenizer.tokens[{token!r}] takes its row from model {src.model!r}, which this tensor is not merged from",
            hint="name one of the merged models",
        )
    i = index[src.model]
    if src.kind == "model":
        row = vocab.rows[src.model][t]
        if row < 0:
            raise RecipeError(f"tokenizer.tokens[{token!r}]: model {src.model!r} has no token {token!r}")
        return ((i, row),)
    if src.token_id is not None:
        return ((i, src.token_id),)
    own = vocab.original[src.model]
    if src.token not in own:
        raise RecipeError(f"tokenizer.tokens[{token!r}]: model {src.model!r} has no token {src.token!r}")
    return ((i, own[str(src.token)]),)


__all__ = [
    "TOKEN_HINTS",
    "Default",
    "TokenEntry",
    "TokenRowSource",
    "TokenizerSection",
    "check_tokenizer",
    "OutputVocab",
    "TokenSetting",
    "TokenSource",
    "build_vocab",
    "config_vocab_size",
    "is_vocab_tensor",
    "row_maps",
]
