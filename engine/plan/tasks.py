"""Tasks of one tensor: the method that applies to it, its resolved parameters, its row spans.

Row-separable methods become one task per row chunk; chunked methods iterate over the chunks
inside one task (their statistics span the tensor); the rest take the whole tensor. With
``split_fused``, a packed projection is merged block by block (q, k, v / gate, up) as if the
blocks were separate tensors, so per-tensor statistics are per block.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from raymerge.engine.arch import classify, fused_blocks, linear_layout
from raymerge.engine.errors import CheckpointError, PlanError, RecipeError
from raymerge.engine.methods import METHODS, MethodSpec, WorkShape
from raymerge.engine.methods.gram_lora import factored_rank
from raymerge.engine.methods.mergekit_order import mergekit_order
from raymerge.engine.plan.estimates import Placement, stats_item, task_flops, task_footprint
from raymerge.engine.plan.slices import TensorSource
from raymerge.engine.plan.types import OutputRef, TensorRef, TensorTask
from raymerge.engine.plan.vocab import VocabPlan, is_vocab_tensor, out_entry, split_spans, task_fields
from raymerge.engine.recipe import Recipe
from raymerge.engine.storage import DTYPES, TAG_OF_DTYPE, Checkpoint, TensorEntry, open_checkpoint, open_shard


@dataclass
class PlanContext:
    """What every tensor's tasks share: the recipe, the opened checkpoints and where inputs come from.

    ``base_url`` is the reference model (the base, or the first expert without one) whose config
    the output takes; which tensors each task reads is the ``TensorSource`` it is planned from;
    ``aux_cache`` keeps auxiliary statistics (RegMean's Grams) open across tensors; ``placement``
    says where accelerator-friendly work computes, for the memory figures.
    """

    recipe: Recipe
    ckpts: dict[str, Checkpoint]
    base_url: str
    config: dict[str, Any]
    vocab: int | None
    n_layers: int | dict[str, int]  # blocks per stack (``arch.stack_depths``), or one count
    compute_dtype: torch.dtype | None
    aux_cache: dict[str, Checkpoint]
    placement: Placement
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # ``arch.fused_groups`` of the inputs
    mergekit_order: bool = False  # ``compute_dtype: mergekit``: mergekit's arithmetic where it has one
    tokens: VocabPlan | None = None  # the re-indexed output vocabulary, when the recipe builds a tokenizer


def copy_task(ctx: PlanContext, name: str, ref: tuple[str, str], cls: str, out: tuple[str, int]) -> TensorTask:
    """A non-float buffer: the bytes of tensor ``ref`` (the base model's, by model and name), copied as stored."""
    src = ctx.ckpts[ref[0]]
    e = src.entries[ref[1]]
    return TensorTask(
        id=name,
        tensor=name,
        tensor_class=cls,
        action="copy",
        method="copy",
        row_start=0,
        row_end=e.shape[0] if e.shape else 0,
        inputs=(TensorRef.of(src.shard_of[ref[1]], e),),
        has_base=True,
        shared={},
        per_model=(),
        seed=0,
        compute_dtype=e.dtype,
        output=OutputRef(out[0], out[1], e.nbytes, e.dtype, e.shape),
        chunk_rows=0,
        est_host_bytes=2 * e.nbytes,
        read_bytes=e.nbytes,
        write_bytes=e.nbytes,
        flops=0,
    )


def method_for(ctx: PlanContext, name: str, cls: str) -> MethodSpec:
    """The recipe's method, or its fallback for tensor classes it does not handle and excluded names."""
    method = ctx.recipe.method
    if cls not in method.applies_to or any(re.search(p, name) for p in ctx.recipe.raymerge.exclude):
        return METHODS[method.fallback or "mean"]
    return method


def tensor_tasks(ctx: PlanContext, src: TensorSource, out: tuple[str, int], out_tag: str) -> list[TensorTask]:
    """Every task of output tensor ``src.name``, written at shard/offset ``out`` in dtype ``out_tag``."""
    recipe, name = ctx.recipe, src.name
    e = ctx.ckpts[src.ref[0]].entries[src.ref[1]]
    tokens = ctx.tokens if ctx.tokens is not None and e.is_float and is_vocab_tensor(name, e.shape) else None
    if tokens is not None:
        e = out_entry(e, tokens)
    cls = classify(name, e, ctx.vocab)
    if cls == "buffer":
        return [copy_task(ctx, name, src.ref, cls, out)]
    spec = method_for(ctx, name, cls)
    params = src.params(recipe, spec, ctx.n_layers, ctx.config.get("model_type"))
    problem = spec.check(params.shared, params.per_model) if spec.check else None
    if problem:
        raise RecipeError(f"method {spec.name!r}: {problem}", tensor=name)
    layout = linear_layout(cls, ctx.config)
    # mergekit's arithmetic (``methods.mergekit_order``) takes the whole tensor as stored.
    order = "mergekit" if ctx.mergekit_order and mergekit_order(spec.name, params.shared, params.per_model) else ""
    turned = layout == "in_out" and spec.oriented  # the method sees the weight transposed
    aux, aux_names = aux_refs(spec, params.per_model, src, e, ctx.aux_cache, turned)
    refs = tuple(TensorRef.of(ctx.ckpts[u].shard_of[n], ctx.ckpts[u].entries[n]) for u, n in src.reads)
    group = group_refs(ctx, spec, src, bool(order))
    group_at = next((i for i, n in enumerate(ctx.groups.get(name, ())) if n == name), 0) if group else 0
    lora = tuple(getattr(ctx.ckpts[u], "deltas", {}).get(n) for u, n in src.reads)
    lora_bytes = sum(x.a_end - x.a_start + x.b_end - x.b_start for x in lora if x is not None)
    if tokens is not None and any(lora):
        raise PlanError("a LoRA update of a re-indexed vocabulary is not supported", tensor=name)
    compute = ctx.compute_dtype or (torch.float64 if e.dtype == "F64" else torch.float32)
    c_item = torch.empty((), dtype=compute).element_size()
    out_item = DTYPES[out_tag][1]
    rows_total = e.shape[0] if e.shape else 1
    row_numel = e.numel // rows_total if rows_total else 0
    chunk_rows = max(1, recipe.raymerge.chunk_bytes // max(1, row_numel * c_item)) if row_numel else 1
    spans: list[tuple[int, int]]
    if order:
        spans = [(0, rows_total if e.shape else 0)]
    elif spec.row_separable and len(e.shape) >= 1 and row_numel:
        spans = [(r, min(rows_total, r + chunk_rows)) for r in range(0, rows_total, chunk_rows)] or [(0, 0)]
    elif recipe.raymerge.split_fused and (blocks := fused_blocks(name, e, ctx.config)):
        spans = list(itertools.pairwise([0, *itertools.accumulate(blocks)]))
    else:
        spans = [(0, rows_total if e.shape else 0)]
    if tokens is not None and spec.row_separable:
        spans = split_spans(spans, tokens.vocab.size)
    seed = tensor_seed(recipe.raymerge.seed, name) if spec.random else 0
    tasks = []
    for r0, r1 in spans:
        numel = (r1 - r0) * row_numel if e.shape else e.numel
        chunk_shape = (r1 - r0, *e.shape[1:]) if e.shape else ()
        shared = dict(params.shared)
        shape = WorkShape(
            numel=numel,
            work_numel=min(numel, chunk_rows * row_numel)
            if spec.chunked and e.shape and not (turned or order)
            else numel,
            chunk_shape=chunk_shape[::-1] if turned else chunk_shape,
            chunk_rows=chunk_rows,
            inputs=len(refs),
            experts=len(src.experts),
            in_item=e.itemsize,
            compute_item=c_item,
            out_item=out_item,
            stats_item=stats_item(shared),
            params=shared,
            lora_rank=factored_rank(spec.name, shared, refs, lora, src.has_base) if any(lora) else 0,
        )
        fp = task_footprint(spec, shape, shared, ctx.placement)
        out_bytes = numel * out_item
        tasks.append(
            TensorTask(
                id=name if len(spans) == 1 else f"{name}@{r0}:{r1}",
                tensor=name,
                tensor_class=cls,
                action="merge",
                method=spec.name,
                row_start=r0,
                row_end=r1,
                inputs=refs,
                has_base=src.has_base,
                shared=shared,
                per_model=params.per_model,
                seed=seed,
                compute_dtype=TAG_OF_DTYPE[compute],
                output=OutputRef(out[0], out[1] + r0 * row_numel * out_item, out_bytes, out_tag, e.shape),
                chunk_rows=chunk_rows,
                aux=aux,
                aux_names=aux_names,
                group=group,
                group_at=group_at,
                order=order,
                layout=layout,
                # a LoRA input adds its factors and one product of the task's rows while it is formed
                # (in factored form, ``shape.lora_rank``, no product: the method's model counts the factors)
                est_host_bytes=fp.host
                + ((lora_bytes + (0 if shape.lora_rank else numel * c_item)) if any(lora) else 0),
                est_device_bytes=fp.device,
                read_bytes=numel * e.itemsize * len(refs)
                + sum(a.end - a.start for a in aux)
                + sum(r.end - r.start for _, rs in group for r in rs)
                + lora_bytes,
                write_bytes=out_bytes,
                flops=task_flops(spec, shape),
                lora=lora if any(lora) else (),
                **(task_fields(tokens, recipe, ctx.ckpts, src, r0, r1) if tokens is not None else {}),
            )
        )
    return tasks


def group_refs(
    ctx: PlanContext, spec: MethodSpec, src: TensorSource, whole: bool = False
) -> tuple[tuple[str, tuple[TensorRef, ...]], ...]:
    """The other stored tensors of the tensor mergekit fuses ``src.name`` into, with their inputs,
    for a method whose statistics span it (``group_stats``), or for any method computed on the
    whole fused tensor (``whole``: mergekit's arithmetic); () otherwise and in sliced recipes."""
    members = ctx.groups.get(src.name, ())
    if not (spec.group_stats or whole) or src.part is not None or len(members) < 2:
        return ()
    out = []
    for other in members:
        if other == src.name:
            continue
        refs = []
        for u, _ in src.reads:
            ck = ctx.ckpts[u]
            if other not in ck.entries:
                raise CheckpointError(
                    f"model {u} has no tensor {other!r} of this tensor's expert group", file=u, tensor=other
                )
            refs.append(TensorRef.of(ck.shard_of[other], ck.entries[other]))
        out.append((other, tuple(refs)))
    return tuple(out)


def aux_refs(
    spec: Any,
    per_model: tuple[dict[str, Any], ...],
    src: TensorSource,
    e: TensorEntry,
    cache: dict[str, Checkpoint],
    turned: bool = False,
) -> tuple[tuple[TensorRef, ...], tuple[str, ...]]:
    """Locate each expert's auxiliary matrix for one tensor (headers only) and check its shape.

    A method with ``aux_param`` (RegMean: ``grams``) names, per expert, a directory or safetensors
    file holding one in×in matrix per linear layer, keyed by module name (``…mlp.up_proj``) or by
    the weight's own name (the expert's own name of it: ``src`` says which tensor each expert
    reads). ``turned``: the weight is stored in × out (Conv1D), so its input width
    is its first dimension.
    """
    if not spec.aux_param:
        return (), ()
    refs, names = [], []
    for url, name, p in zip(src.experts, src.expert_names(), per_model, strict=True):
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        where = str(p[spec.aux_param])
        if where not in cache:
            cache[where] = open_aux(where)
        ck = cache[where]
        key = module if module in ck.entries else name
        if key not in ck.entries:
            raise CheckpointError(
                f"no {spec.aux_param} matrix for this layer of model {url}",
                file=where,
                tensor=module,
                hint="collect statistics for every linear layer, or exclude it with raymerge.exclude",
            )
        ae = ck.entries[key]
        cols = e.shape[1 - int(turned)] if len(e.shape) == 2 else -1
        if ae.shape != (cols, cols) or not ae.is_float:
            raise CheckpointError(
                f"{spec.aux_param} matrix has shape {list(ae.shape)} ({ae.dtype}), expected [{cols}, {cols}] float",
                file=ck.shard_of[key],
                tensor=key,
            )
        refs.append(TensorRef.of(ck.shard_of[key], ae))
        names.append(key)
    return tuple(refs), tuple(names)


def open_aux(src: str) -> Checkpoint:
    """Open a directory of statistics (HF layout) or a single ``.safetensors`` file, headers only."""
    if src.endswith(".safetensors"):
        reader = open_shard(src)
        return Checkpoint(src, {}, {k: src for k in reader.entries}, dict(reader.entries))
    return open_checkpoint(src)


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


__all__ = ["PlanContext", "aux_refs", "open_aux", "tensor_seed", "tensor_tasks"]
