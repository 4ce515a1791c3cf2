"""Planning re-indexed vocabularies: which tensors have a token axis, and each task's row maps.

With ``tokenizer_source`` or a ``tokenizer:`` section, the output tokenizer is built before any
task (``engine.tokenizer.build_vocab``); every token embedding and LM head then gets the output's
row count, and each of its tasks carries, per input, the input row of each of its output rows
(``engine.gather`` reads them by byte range).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raymerge.engine.errors import CheckpointError
from raymerge.engine.lora import split_lora
from raymerge.engine.plan.slices import TensorSource
from raymerge.engine.plan.types import TensorRef
from raymerge.engine.recipe import Recipe
from raymerge.engine.storage import Checkpoint, TensorEntry
from raymerge.engine.tokenizer import (
    TOKEN_HINTS,
    Default,
    OutputVocab,
    TokenSetting,
    build_vocab,
    is_vocab_tensor,
    row_maps,
)


@dataclass
class VocabPlan:
    """The output vocabulary and the recipe's per-token settings; row maps cached per model set."""

    vocab: OutputVocab
    settings: dict[str, TokenSetting]
    cache: dict[tuple[tuple[str, ...], str | None], Any] = field(default_factory=dict)

    def maps(self, models: tuple[str, ...], base: str | None) -> tuple[dict[str, tuple[int, ...]], tuple[Default, ...]]:
        key = (models, base)
        if key not in self.cache:
            self.cache[key] = row_maps(self.vocab, models, base, self.settings)
        return self.cache[key]  # type: ignore[no-any-return]


def plan_vocab(recipe: Recipe, ckpts: dict[str, Checkpoint], base_url: str) -> VocabPlan | None:
    """The output vocabulary when the recipe builds a tokenizer, else None."""
    source = recipe.vocab_source
    if source is None:
        return None
    section = recipe.tokenizer
    settings = section.settings() if section else {}
    urls = gather_order(recipe)
    vocab = build_vocab(
        source,
        urls,
        recipe.base_model,
        {u: ckpts[u].config for u in urls},
        extra_tokens=list(settings),
        pad_to_multiple_of=section.pad_to_multiple_of if section else None,
        tokenizer_dirs={u: pair[0] for u in urls if (pair := split_lora(u))},
    )
    return VocabPlan(vocab, settings)


def gather_order(recipe: Recipe, src: TensorSource | None = None) -> tuple[str, ...]:
    """The models a vocabulary tensor is gathered from, in mergekit's order: a slice's sources, or
    the recipe's models with the base last when it is not among them."""
    if src is not None and src.part is not None:
        return tuple(x.model for x in src.part.sources)
    if recipe.slices:
        return tuple(dict.fromkeys(x.model for s in recipe.slices for x in s.sources))
    urls = [m.model for m in recipe.models]
    if recipe.base_model and recipe.base_model not in urls:
        urls.append(recipe.base_model)
    return tuple(urls)


def out_entry(e: TensorEntry, vp: VocabPlan) -> TensorEntry:
    """The output's entry of a vocabulary tensor: ``vp``'s row count, the input's width and dtype."""
    rows = vp.vocab.padded
    return TensorEntry(e.name, e.dtype, (rows, *e.shape[1:]), e.start, e.start + rows * e.row_bytes())


def split_spans(spans: list[tuple[int, int]], v: int) -> list[tuple[int, int]]:
    """Row spans cut at the first padding row ``v``, so only the padding task maps every token row."""
    out = []
    for a, b in spans:
        out += [(a, v), (v, b)] if a < v < b else [(a, b)]
    return out


def task_fields(
    vp: VocabPlan, recipe: Recipe, ckpts: dict[str, Checkpoint], src: TensorSource, r0: int, r1: int
) -> dict[str, Any]:
    """The ``vocab_*`` fields of the task over output rows [r0, r1) of vocabulary tensor ``src``."""
    models = gather_order(recipe, src)
    base = recipe.slice_base(src.part) if src.part is not None else recipe.base_model
    maps, defaults = vp.maps(models, base)
    v = vp.vocab.size
    lo, hi = (0, v) if r1 > v else (r0, r1)
    rows = [maps[u][lo:hi] for u, _ in src.reads]
    used = sorted({-r - 1 for rs in rows for r in rs if r < 0})
    local = {k: j for j, k in enumerate(used)}
    refs = []
    for u in models:
        name = dict(src.reads).get(u, src.name)
        ck = ckpts[u]
        if name not in ck.entries:
            raise CheckpointError(f"model {u} has no tensor {name!r} to take token rows from", file=u, tensor=name)
        refs.append(TensorRef.of(ck.shard_of[name], ck.entries[name]))
    for k in used:
        for m, r in defaults[k]:
            if not 0 <= r < refs[m].shape[0]:
                raise CheckpointError(
                    f"token row {r} is past the {refs[m].shape[0]} rows of model {models[m]}",
                    file=models[m],
                    tensor=src.name,
                    hint="check tokenizer.tokens token_id",
                )
    return {
        "vocab_size": v,
        "vocab_rows": tuple(tuple(r if r >= 0 else -local[-r - 1] - 1 for r in rs) for rs in rows),
        "vocab_defaults": tuple(defaults[k] for k in used),
        "vocab_refs": tuple(refs),
    }


__all__ = [
    "TOKEN_HINTS",
    "VocabPlan",
    "gather_order",
    "is_vocab_tensor",
    "out_entry",
    "plan_vocab",
    "split_spans",
    "task_fields",
]
