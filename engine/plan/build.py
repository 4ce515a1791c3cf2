"""``build_plan``: from a recipe and checkpoint headers to tasks and an output layout.

Reads headers only (never tensor data) and fails early on any disagreement between models.
"""

from __future__ import annotations

from typing import Any

import torch

from raymerge.engine import chat_template
from raymerge.engine.arch import fused_groups, is_embedding_name, stack_depths
from raymerge.engine.errors import CheckpointError
from raymerge.engine.lora import open_model
from raymerge.engine.plan.estimates import Placement
from raymerge.engine.plan.layout import lay_out, tensor_order
from raymerge.engine.plan.slices import slice_sources, stacked_config, whole_model_sources
from raymerge.engine.plan.tasks import PlanContext, tensor_tasks
from raymerge.engine.plan.types import DEFAULT_SHARD_BYTES, MergePlan, TensorTask
from raymerge.engine.plan.vocab import is_vocab_tensor, out_entry, plan_vocab
from raymerge.engine.recipe import Recipe
from raymerge.engine.storage import DTYPES, TAG_OF_DTYPE, Checkpoint, dtype_from_name


def check_agreement(ckpts: list[Checkpoint], ref: Checkpoint, vocab: bool = False) -> None:
    """Every model has the reference's tensors with the same shapes and dtypes, or one clear error;
    with ``vocab`` (a re-indexed vocabulary) token tables may differ in their number of rows."""
    names = set(ref.entries)
    for ck in ckpts:
        if ck is ref:
            continue
        missing = sorted(names - set(ck.entries))
        if missing:
            raise CheckpointError(
                f"tensor is missing from model {ck.url} (present in {ref.url})", file=ck.url, tensor=missing[0]
            )
        extra = sorted(set(ck.entries) - names)
        if extra:
            raise CheckpointError(f"model {ck.url} has a tensor that {ref.url} lacks", file=ck.url, tensor=extra[0])
        for name, e in ref.entries.items():
            o = ck.entries[name]
            rows_may_differ = vocab and is_vocab_tensor(name, e.shape) and len(o.shape) == 2
            if o.shape != e.shape and not (rows_may_differ and o.shape[1:] == e.shape[1:]):
                vocab = len(e.shape) == 2 and is_embedding_name(name)
                raise CheckpointError(
                    f"shape {list(o.shape)} in model {ck.url} differs from {list(e.shape)} in {ref.url}",
                    file=ck.shard_of[name],
                    tensor=name,
                    hint=(
                        "vocabulary sizes differ; set `tokenizer_source: union` (or base, or a model) to re-index them"
                        if vocab
                        else "models must share one architecture"
                    ),
                )
            if o.dtype != e.dtype:
                raise CheckpointError(
                    f"dtype {o.dtype} in model {ck.url} differs from {e.dtype} in {ref.url}",
                    file=ck.shard_of[name],
                    tensor=name,
                    hint="convert the checkpoints to one dtype",
                )


def compute_dtype(recipe: Recipe) -> torch.dtype | None:
    """The recipe's compute dtype: ``raymerge.compute_dtype``, where ``mergekit`` means the
    recipe's ``dtype`` (as mergekit computes); None for the default (fp32, fp64 for fp64 inputs)."""
    name = recipe.raymerge.compute_dtype
    if name == "mergekit":
        name = recipe.dtype
    return dtype_from_name(name) if name else None


def build_plan(
    recipe: Recipe, *, out_shard_bytes: int = DEFAULT_SHARD_BYTES, placement: Placement | None = None
) -> MergePlan:
    """Open every checkpoint's headers, validate them and lay out tasks and output shards.

    A sliced recipe stacks blocks of its inputs (``slices.slice_sources``); the output's config
    then records the new block count.

    ``placement`` (default: CPU) says where accelerator-friendly tasks will compute; it sets
    their declared host and device memory, nothing they write (except that ``precision: auto``
    statistics that would not fit ``placement.device_memory`` in fp64 are planned in fp32).
    """
    where = placement or Placement()
    method = recipe.method
    urls = recipe.model_urls()
    ckpts = {u: open_model(u, allow_pickle=recipe.raymerge.allow_pickle_bin) for u in urls}
    experts = recipe.expert_urls()
    if recipe.slices:
        base_url = recipe.base_model or recipe.slices[0].sources[0].model
        ref = ckpts[base_url]
        sources, stacked = slice_sources(recipe, ckpts)
        config = stacked_config(dict(ref.config), stacked, ckpts)
        n_layers: int | dict[str, int] = len(stacked)
    else:
        base_url = recipe.base_model if recipe.base_model else experts[0]
        ref = ckpts[base_url]
        check_agreement(list(ckpts.values()), ref, vocab=recipe.vocab_source is not None)
        has_base = method.needs_base or (recipe.base_model is not None and not method.includes_base_in_inputs)
        inputs = ([recipe.base_model] if has_base and recipe.base_model else []) + experts
        sources = whole_model_sources(list(ref.entries), base_url, inputs, experts, has_base)
        config = dict(ref.config)
        n_layers = stack_depths(config, ref.entries)
    tokens = plan_vocab(recipe, ckpts, base_url)
    if tokens is not None:
        config = with_vocab_size(config, tokens.vocab.padded)
    out_tag: str | None = None
    if recipe.out_dtype or recipe.dtype:
        out_tag = TAG_OF_DTYPE[dtype_from_name(recipe.out_dtype or recipe.dtype or "")]
    ctx = PlanContext(
        recipe=recipe,
        ckpts=ckpts,
        base_url=base_url,
        config=config,
        vocab=config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None,
        n_layers=n_layers,
        compute_dtype=compute_dtype(recipe),
        mergekit_order=recipe.raymerge.compute_dtype == "mergekit",
        aux_cache={},
        placement=where,
        groups=fused_groups(config.get("model_type"), ref.entries) if not recipe.slices else {},
        tokens=tokens,
    )
    sources.sort(key=lambda src: tensor_order(src.name))
    entries = {src.name: ckpts[src.ref[0]].entries[src.ref[1]] for src in sources}
    if tokens is not None:
        entries = {
            n: out_entry(e, tokens) if e.is_float and is_vocab_tensor(n, e.shape) else e for n, e in entries.items()
        }
    layout = lay_out([src.name for src in sources], entries, out_tag, out_shard_bytes)
    tasks: list[TensorTask] = []
    for src in sources:
        tasks += tensor_tasks(ctx, src, layout.offset_of[src.name], layout.dtype_of[src.name])
    tokenizer_from = base_url if tokens is None else None
    out_dtype_name = str(DTYPES[out_tag][0]).replace("torch.", "") if out_tag else None
    return MergePlan(
        recipe,
        tuple(urls),
        tuple(tasks),
        layout.shards,
        config,
        out_dtype_name,
        tokenizer_from,
        device=where.device,
        device_memory=where.device_memory,
        chat_template=chat_template.resolve(recipe.chat_template, urls) if recipe.chat_template else None,
        tokenizer_files=dict(tokens.vocab.files) if tokens is not None else {},
    )


def with_vocab_size(config: dict[str, Any], rows: int) -> dict[str, Any]:
    """``config`` with its vocabulary size (top level, else ``text_config``'s) set to ``rows``."""
    out = dict(config)
    if isinstance(out.get("text_config"), dict) and "vocab_size" not in out:
        out["text_config"] = {**out["text_config"], "vocab_size": rows}
    else:
        out["vocab_size"] = rows
    return out


__all__ = ["build_plan", "check_agreement"]
