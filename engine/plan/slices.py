"""Where each output tensor's inputs come from: whole models, or mergekit's ``slices``.

A ``models`` recipe reads tensor ``name`` of every input model for output tensor ``name``. A
sliced recipe stacks blocks: output block i is the i-th block of the concatenated slices, and the
block at offset k of a slice reads block ``layer_range[0] + k`` of each of the slice's sources,
renamed to the output index (depth up-scaling lists one model in overlapping ranges). Tensors
outside blocks follow mergekit: those before the blocks (token and position embeddings) are merged
over the first slice's sources, the rest (final norm, LM head) over the last slice's, both at
depth 0 with that slice's parameters. Headers only: no tensor data is read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raymerge.engine.arch import LAYER_RE, is_embedding_name, layer_index, mergekit_name, num_layers
from raymerge.engine.errors import CheckpointError, PlanError
from raymerge.engine.methods import MethodSpec, Scope
from raymerge.engine.recipe import Recipe, ResolvedParams, SliceEntry, resolve_for_tensor, resolve_param
from raymerge.engine.storage import Checkpoint
from raymerge.engine.tokenizer import is_vocab_tensor

# Names outside blocks that come after them (LM heads), although they look like embeddings.
HEAD_HINTS = ("lm_head", "embed_out", "output.weight")

# config.json keys that hold the number of blocks, in the order they are looked for.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class TensorSource:
    """The inputs of one output tensor ``name``.

    ``reads``: (model URL, tensor name in that model) per task input, base first when
    ``has_base``, then ``experts`` in order; ``ref``: the (model, tensor) whose shape and dtype the
    output takes and whose bytes a non-float buffer copies; ``part``: the output slice the tensor
    belongs to (None for a ``models`` recipe) and ``t`` its depth there, for parameter gradients.
    """

    name: str
    reads: tuple[tuple[str, str], ...]
    experts: tuple[str, ...]
    has_base: bool
    ref: tuple[str, str]
    part: SliceEntry | None = None
    t: float = 0.0

    def expert_names(self) -> list[str]:
        """Each expert's own name of this tensor (its block index differs in a sliced recipe)."""
        names = dict(self.reads)
        return [names[u] for u in self.experts]

    def params(
        self, recipe: Recipe, method: MethodSpec, n_layers: int | dict[str, int], model_type: Any = None
    ) -> ResolvedParams:
        """The method's parameters for this tensor, by mergekit's precedence and depth rules
        (filters match mergekit's names of the tensor: ``arch.mergekit_name``)."""
        if self.part is None:
            return resolve_for_tensor(recipe, self.name, n_layers, method, model_type)
        names = {u: mergekit_name(n, model_type) for u, n in self.reads}
        return resolve_for_slice(recipe, self.part, mergekit_name(self.name, model_type), names, self.t, method)


def resolve_for_slice(
    recipe: Recipe, s: SliceEntry, out_name: str, in_names: dict[str, str], t: float, method: MethodSpec
) -> ResolvedParams:
    """All parameters of ``method`` for one output tensor of slice ``s`` at depth ``t`` ∈ [0, 1].

    mergekit's rules: ``t`` is the block's position inside its slice (``k / (length − 1)``, 1 for a
    one-block slice, 0 outside blocks); per-model settings come from the source, then the slice,
    then the top level, and filters match the source's own tensor name (``in_names``, by model);
    shared settings come from the slice, then the top level, matched against the output name.
    """
    top = recipe.parameters
    shared = {
        p.name: resolve_param(p, [s.parameters, top], out_name, t, "parameters")
        for p in method.params
        if p.scope == Scope.SHARED
    }
    per_model = []
    for url in recipe.slice_experts(s):
        scopes = [s.source(url).parameters, s.parameters, top]
        per_model.append(
            {
                p.name: resolve_param(p, scopes, in_names[url], t, f"model {url}")
                for p in method.params
                if p.scope == Scope.MODEL
            }
        )
    return ResolvedParams(shared, tuple(per_model))


def whole_model_sources(
    names: list[str], base_url: str, inputs: list[str], experts: list[str], has_base: bool
) -> list[TensorSource]:
    """A ``models`` recipe: output tensor ``name`` reads ``name`` of every input."""
    return [TensorSource(n, tuple((u, n) for u in inputs), tuple(experts), has_base, (base_url, n)) for n in names]


def renumber(name: str, index: int) -> str:
    """``name`` with its block index replaced (``model.layers.7.mlp…``, 2 → ``model.layers.2.mlp…``)."""
    m = LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"{name!r} is not inside a numbered block")
    return f"{name[: m.start(1)]}{index}{name[m.end(1) :]}"


def _before_blocks(name: str) -> bool:
    return is_embedding_name(name) and not any(h in name for h in HEAD_HINTS)


def _tensor(
    recipe: Recipe, ckpts: dict[str, Checkpoint], part: SliceEntry, out: str, names: dict[str, str], t: float
) -> TensorSource:
    """Output tensor ``out`` of slice ``part``, reading ``names[model]`` of each source model."""
    base = recipe.slice_base(part)
    has_base = recipe.slice_has_base(part)
    experts = recipe.slice_experts(part)
    order = ([base] if has_base and base else []) + experts
    ref_url = base if base in names else part.sources[0].model
    ref_name = names[ref_url]
    e = ckpts[ref_url].entries.get(ref_name)
    for u in order:
        o = ckpts[u].entries.get(names[u])
        if o is None:
            raise CheckpointError(
                f"model {u} has no tensor {names[u]!r}, which output tensor {out!r} reads",
                file=u,
                tensor=names[u],
                hint="check the slice's layer_range against the model's blocks",
            )
        # a re-indexed vocabulary (tokenizer_source) lets token tables differ in their row count
        vocab = e is not None and recipe.vocab_source is not None and is_vocab_tensor(out, e.shape)
        same = e is None or o.shape == e.shape or (vocab and o.shape[1:] == e.shape[1:])
        if e is not None and (not same or o.dtype != e.dtype):
            raise CheckpointError(
                f"{o.dtype} {list(o.shape)} in model {u} differs from {e.dtype} {list(e.shape)} "
                f"({ref_name} in {ref_url}), both read for {out!r}",
                file=ckpts[u].shard_of[names[u]],
                tensor=names[u],
                hint="the models of one slice must share one architecture",
            )
    reads = tuple((u, names[u]) for u in order)
    return TensorSource(out, reads, tuple(experts), has_base, (ref_url, ref_name), part, t)


def slice_sources(recipe: Recipe, ckpts: dict[str, Checkpoint]) -> tuple[list[TensorSource], list[tuple[str, int]]]:
    """Every output tensor of a sliced recipe, and per output block the (model, block) it stacks
    (the first source's), from headers only; a layer range past a model's blocks is a PlanError."""
    first = recipe.slices[0]
    # mergekit pairs the last slice's models with as many inputs as the first slice has.
    last = recipe.slices[-1].model_copy(update={"sources": recipe.slices[-1].sources[: len(first.sources)]})
    blocks: dict[str, dict[int, list[str]]] = {}
    for s in recipe.slices:
        for x in s.sources:
            ck = ckpts[x.model]
            n = num_layers(ck.config, ck.entries)
            if x.layer_range[1] > n:
                raise PlanError(
                    f"layer_range {list(x.layer_range)} goes past the {n} blocks of model {x.model}",
                    file=x.model,
                    hint=f"the end of a layer_range is at most {n}",
                )
            if x.model not in blocks:
                by_index: dict[int, list[str]] = {}
                for name in ck.entries:
                    i = layer_index(name)
                    if i is not None:
                        by_index.setdefault(i, []).append(name)
                blocks[x.model] = by_index
    out: list[TensorSource] = []
    for name in ckpts[first.sources[0].model].entries:
        if layer_index(name) is None:
            part = first if _before_blocks(name) else last
            out.append(_tensor(recipe, ckpts, part, name, {x.model: name for x in part.sources}, 0.0))
    stacked: list[tuple[str, int]] = []
    for s in recipe.slices:
        head = s.sources[0]
        for k in range(s.length):
            t = k / (s.length - 1) if s.length > 1 else 1.0
            at = len(stacked)
            for name in blocks[head.model].get(head.layer_range[0] + k, []):
                names = {x.model: renumber(name, x.layer_range[0] + k) for x in s.sources}
                out.append(_tensor(recipe, ckpts, s, renumber(name, at), names, t))
            stacked.append((head.model, head.layer_range[0] + k))
    return out, stacked


def stacked_config(
    config: dict[str, Any], stacked: list[tuple[str, int]], ckpts: dict[str, Checkpoint]
) -> dict[str, Any]:
    """The output's config.json: ``config`` with the new block count (and per-block
    ``layer_types``, where the models list them, taken from each stacked block's model)."""
    if not config:
        return config
    out = dict(config)
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(out.get(k), int)), LAYER_COUNT_KEYS[0])
    out[key] = len(stacked)
    if isinstance(out.get("layer_types"), list):
        types = []
        for url, i in stacked:
            theirs = ckpts[url].config.get("layer_types")
            types.append(theirs[i] if isinstance(theirs, list) and i < len(theirs) else out["layer_types"][-1])
        out["layer_types"] = types
    return out


__all__ = [
    "TensorSource",
    "renumber",
    "resolve_for_slice",
    "slice_sources",
    "stacked_config",
    "whole_model_sources",
]
