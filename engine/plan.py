"""Planning: from a recipe and checkpoint headers to a list of tensor tasks and an output layout.

Reads headers only (never tensor data) and fails early on any disagreement between models. Every
output tensor gets a fixed shard and byte offset before any compute, so tasks can write their
bytes in place from any process or node, in any order, any number of times.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from raymerge.engine.errors import CheckpointError, PlanError, RecipeError
from raymerge.engine.methods import METHODS
from raymerge.engine.methods import RESIDENT_SELECT_ELEMENTS
from raymerge.engine.recipe import Recipe, layer_index, resolve_for_tensor
from raymerge.engine.storage import (
    DTYPES,
    TAG_OF_DTYPE,
    Checkpoint,
    TensorEntry,
    dtype_from_name,
    open_checkpoint,
    open_shard,
)

DEFAULT_SHARD_BYTES = 5 * 1024**3
# Names of 2-D tables that are looked up, not multiplied (token, position and type embeddings,
# T5's relative-position buckets) and of LM heads: Gram and spectral methods give them their fallback.
_EMBED_HINTS = (
    "embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "tok_embeddings", "output.weight",
    "wpe", "position_embedding", "token_type_embeddings", "embed_positions", "relative_attention_bias",
)  # fmt: skip


@dataclass(frozen=True)
class TensorRef:
    """Where one input tensor's bytes live: shard URL, absolute byte range, dtype tag, shape."""

    url: str
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, url: str, e: TensorEntry) -> TensorRef:
        return cls(url, e.start, e.end, e.dtype, e.shape)

    def entry(self, name: str) -> TensorEntry:
        return TensorEntry(name, self.dtype, self.shape, self.start, self.end)


@dataclass(frozen=True)
class OutputRef:
    """Where a task writes: output shard file name, absolute offset of its first byte, dtype, shape."""

    shard: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorTask:
    """One self-contained unit of work: merge rows [row_start, row_end) of one tensor.

    ``action`` is ``merge`` (run ``method``) or ``copy`` (take the base model's bytes, for
    non-float buffers). ``est_host_bytes`` is the declared peak host memory, which executors use
    for admission; ``read_bytes``/``write_bytes`` are exact I/O volumes.
    """

    id: str
    tensor: str
    tensor_class: str
    action: str
    method: str
    row_start: int
    row_end: int
    inputs: tuple[TensorRef, ...]  # base first when the method has one, then experts
    has_base: bool
    shared: dict[str, Any] = field(hash=False)
    per_model: tuple[dict[str, Any], ...] = field(hash=False)
    seed: int
    compute_dtype: str
    output: OutputRef
    chunk_rows: int
    est_host_bytes: int
    read_bytes: int
    write_bytes: int
    flops: int
    # Per-expert auxiliary matrices (e.g. RegMean's input Grams): where they are and their names.
    aux: tuple[TensorRef, ...] = ()
    aux_names: tuple[str, ...] = ()
    # How a linear weight is stored: "out_in" (nn.Linear) or "in_out" (GPT-2's Conv1D).
    layout: str = "out_in"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorTask:
        d = dict(d)
        d["inputs"] = tuple(TensorRef(**{**r, "shape": tuple(r["shape"])}) for r in d["inputs"])
        d["per_model"] = tuple(d["per_model"])
        d["aux"] = tuple(TensorRef(**{**r, "shape": tuple(r["shape"])}) for r in d.get("aux", ()))
        d["aux_names"] = tuple(d.get("aux_names", ()))
        o = d["output"]
        d["output"] = OutputRef(**{**o, "shape": tuple(o["shape"])})
        return cls(**d)


@dataclass(frozen=True)
class OutputShard:
    """A pre-sized output file: its name, full size, the header bytes, and the tensors in it."""

    name: str
    size: int
    header: bytes
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class MergePlan:
    recipe: Recipe
    models: tuple[str, ...]
    tasks: tuple[TensorTask, ...]
    shards: tuple[OutputShard, ...]
    config: dict[str, Any]
    out_dtype: str | None
    tokenizer_from: str | None

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)

    @property
    def write_bytes(self) -> int:
        return sum(t.write_bytes for t in self.tasks)

    @property
    def peak_task_bytes(self) -> int:
        return max((t.est_host_bytes for t in self.tasks), default=0)

    def fingerprint(self) -> str:
        """A hash of everything that determines the output bytes (for safe resume)."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.name.encode())
            h.update(s.header)
        for t in self.tasks:
            h.update(json.dumps(t.to_json(), sort_keys=True, default=str).encode())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Machine-readable summary printed by ``raymerge plan --json``."""
        by_class: dict[str, int] = {}
        for t in self.tasks:
            by_class[t.tensor_class] = by_class.get(t.tensor_class, 0) + 1
        return {
            "method": self.recipe.merge_method,
            "models": list(self.models),
            "tensors": len({t.tensor for t in self.tasks}),
            "tasks": len(self.tasks),
            "tasks_by_class": by_class,
            "shards": [{"name": s.name, "bytes": s.size, "tensors": len(s.tensors)} for s in self.shards],
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "peak_task_host_bytes": self.peak_task_bytes,
            "flops": sum(t.flops for t in self.tasks),
            "fingerprint": self.fingerprint(),
        }


# Model types whose linear layers are transformers' Conv1D (weight stored in × out, y = x W + b).
INPUT_MAJOR_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def linear_layout(tensor_class: str, config: dict[str, Any]) -> str:
    """``in_out`` for the 2-D weights of Conv1D models, else ``out_in`` (``nn.Linear``)."""
    return "in_out" if tensor_class == "linear" and config.get("model_type") in INPUT_MAJOR_MODEL_TYPES else "out_in"


def classify(name: str, entry: TensorEntry, vocab_size: int | None) -> str:
    """Tensor class: ``buffer`` (non-float), ``embedding`` (token embeddings / LM head),
    ``linear`` (other 2-D weights), ``vector`` (≤1-D) or ``other`` (≥3-D, e.g. convolutions).

    A 2-D tensor is an embedding by name, or by a first dimension equal to the vocabulary size —
    but only outside numbered blocks: inside a block that shape is a projection whose width
    happens to equal the vocabulary (small models), and treating it as an embedding would give it
    the fallback merge instead of the method's."""
    if not entry.is_float:
        return "buffer"
    vocab_shaped = vocab_size is not None and entry.shape[0] == vocab_size and layer_index(name) is None
    if len(entry.shape) == 2 and (any(h in name for h in _EMBED_HINTS) or vocab_shaped):
        return "embedding"
    if len(entry.shape) == 2:
        return "linear"
    if len(entry.shape) <= 1:
        return "vector"
    return "other"


def _order_key(name: str) -> tuple[int, int, str]:
    idx = layer_index(name)
    if idx is not None:
        return (1, idx, name)
    return (0 if "embed" in name else 2, 0, name)


def _check_agreement(ckpts: list[Checkpoint], ref: Checkpoint) -> None:
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
            if o.shape != e.shape:
                vocab = len(e.shape) == 2 and any(h in name for h in _EMBED_HINTS)
                raise CheckpointError(
                    f"shape {list(o.shape)} in model {ck.url} differs from {list(e.shape)} in {ref.url}",
                    file=ck.shard_of[name], tensor=name,
                    hint=(
                        "vocabulary sizes differ; resize the embeddings to a common vocabulary before merging"
                        if vocab else "models must share one architecture"
                    ),
                )  # fmt: skip
            if o.dtype != e.dtype:
                raise CheckpointError(
                    f"dtype {o.dtype} in model {ck.url} differs from {e.dtype} in {ref.url}",
                    file=ck.shard_of[name], tensor=name, hint="convert the checkpoints to one dtype",
                )  # fmt: skip


def shard_header(entries: list[tuple[str, str, tuple[int, ...], int, int]]) -> bytes:
    obj: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, tag, shape, lo, hi in entries:
        obj[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [lo, hi]}
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    return raw


def build_plan(recipe: Recipe, *, out_shard_bytes: int = DEFAULT_SHARD_BYTES) -> MergePlan:
    """Open every checkpoint's headers, validate them and lay out tasks and output shards."""
    method = recipe.method
    urls = recipe.model_urls()
    ckpts = {u: open_checkpoint(u, allow_pickle=recipe.raymerge.allow_pickle_bin) for u in urls}
    expert_urls = recipe.expert_urls()
    base_url = recipe.base_model if recipe.base_model else expert_urls[0]
    ref = ckpts[base_url]
    _check_agreement(list(ckpts.values()), ref)
    has_base = method.needs_base or (recipe.base_model is not None and not method.includes_base_in_inputs)
    input_urls = ([recipe.base_model] if has_base and recipe.base_model else []) + expert_urls
    config = dict(ref.config)
    vocab = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None
    num_layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")
    if not isinstance(num_layers, int):
        idxs = [i for i in (layer_index(n) for n in ref.entries) if i is not None]
        num_layers = max(idxs) + 1 if idxs else 1
    out_tag: str | None = None
    if recipe.out_dtype or recipe.dtype:
        out_tag = TAG_OF_DTYPE[dtype_from_name(recipe.out_dtype or recipe.dtype or "")]
    cdt = dtype_from_name(recipe.raymerge.compute_dtype) if recipe.raymerge.compute_dtype else None

    names = sorted(ref.entries, key=_order_key)
    # 1) output layout: shard membership and offsets
    shard_members: list[list[str]] = [[]]
    shard_fill = 0
    out_dtype_of: dict[str, str] = {}
    for name in names:
        e = ref.entries[name]
        tag = out_tag if (out_tag and e.is_float) else e.dtype
        out_dtype_of[name] = tag
        nbytes = e.numel * DTYPES[tag][1]
        if shard_members[-1] and shard_fill + nbytes > out_shard_bytes:
            shard_members.append([])
            shard_fill = 0
        shard_members[-1].append(name)
        shard_fill += nbytes
    n_shards = len(shard_members)
    shards: list[OutputShard] = []
    offset_of: dict[str, tuple[str, int]] = {}
    for i, members in enumerate(shard_members):
        fname = "model.safetensors" if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        rows: list[tuple[str, str, tuple[int, ...], int, int]] = []
        pos = 0
        for name in members:
            e = ref.entries[name]
            nb = e.numel * DTYPES[out_dtype_of[name]][1]
            rows.append((name, out_dtype_of[name], e.shape, pos, pos + nb))
            pos += nb
        header = shard_header(rows)
        data_start = 8 + len(header)
        for name, _, _, lo, _ in rows:
            offset_of[name] = (fname, data_start + lo)
        shards.append(OutputShard(fname, data_start + pos, header, tuple(members)))

    # 2) tasks
    tasks: list[TensorTask] = []
    aux_cache: dict[str, Checkpoint] = {}
    n_exp = len(expert_urls)
    for name in names:
        e = ref.entries[name]
        cls = classify(name, e, vocab)
        shard_name, out_off = offset_of[name]
        out_tag_t = out_dtype_of[name]
        out_item = DTYPES[out_tag_t][1]
        if cls == "buffer":
            src = ckpts[base_url]
            refs: tuple[TensorRef, ...] = (TensorRef.of(src.shard_of[name], src.entries[name]),)
            tasks.append(TensorTask(
                id=name, tensor=name, tensor_class=cls, action="copy", method="copy", row_start=0,
                row_end=e.shape[0] if e.shape else 0, inputs=refs, has_base=True, shared={}, per_model=(),
                seed=0, compute_dtype=e.dtype, output=OutputRef(shard_name, out_off, e.nbytes, e.dtype, e.shape), chunk_rows=0,
                est_host_bytes=2 * e.nbytes, read_bytes=e.nbytes, write_bytes=e.nbytes, flops=0,
            ))  # fmt: skip
            continue
        spec = method
        if cls not in method.applies_to or any(re.search(p, name) for p in recipe.raymerge.exclude):
            spec = METHODS[method.fallback or "mean"]
        params = resolve_for_tensor(recipe, name, num_layers, spec)
        problem = spec.check(params.shared, params.per_model) if spec.check else None
        if problem:
            raise RecipeError(f"method {spec.name!r}: {problem}", tensor=name)
        layout = linear_layout(cls, config)
        turned = layout == "in_out" and spec.oriented  # the method sees the weight transposed
        aux, aux_names = _aux_refs(spec, params.per_model, expert_urls, name, e, aux_cache, turned)
        refs = tuple(TensorRef.of(ckpts[u].shard_of[name], ckpts[u].entries[name]) for u in input_urls)
        compute = cdt or (torch.float64 if e.dtype == "F64" else torch.float32)
        c_item = torch.empty((), dtype=compute).element_size()
        rows_total = e.shape[0] if e.shape else 1
        row_numel = e.numel // rows_total if rows_total else 0
        chunk_rows = max(1, recipe.raymerge.chunk_bytes // max(1, row_numel * c_item)) if row_numel else 1
        # Row-separable methods become one task per chunk; chunked methods iterate over the chunks
        # inside one task (their statistics span the tensor); the rest take the whole tensor.
        # With ``split_fused``, a packed projection is merged block by block (q, k, v / gate, up) as
        # if the blocks were separate tensors, so per-tensor statistics are per block.
        spans: list[tuple[int, int]]
        if spec.row_separable and len(e.shape) >= 1 and row_numel:
            spans = [(r, min(rows_total, r + chunk_rows)) for r in range(0, rows_total, chunk_rows)] or [(0, 0)]
        elif recipe.raymerge.split_fused and (blocks := fused_blocks(name, e, config)):
            edges = [0, *itertools.accumulate(blocks)]
            spans = list(itertools.pairwise(edges))
        else:
            spans = [(0, rows_total if e.shape else 0)]
        n_chunks = len(spans)
        seed = _tensor_seed(recipe.raymerge.seed, name) if spec.random else 0
        for r0, r1 in spans:
            numel = (r1 - r0) * row_numel if e.shape else e.numel
            work_numel = min(numel, chunk_rows * row_numel) if spec.chunked and e.shape else numel
            in_bytes = numel * e.itemsize * len(refs) + sum(a.end - a.start for a in aux)
            out_bytes = numel * out_item
            resident_in = work_numel * e.itemsize * (2 if spec.streams_experts else len(refs))
            chunk_shape = (r1 - r0, *e.shape[1:]) if e.shape else ()
            if turned:
                chunk_shape = chunk_shape[::-1]
            est = (
                spec.work_buffers(n_exp) * work_numel * c_item
                + spec.extra_bytes(chunk_shape, c_item)
                + resident_in
                + (work_numel * out_item if spec.chunked else out_bytes)
                + (4 * numel if spec.chunked and numel <= RESIDENT_SELECT_ELEMENTS else 0)
            )
            tid = name if n_chunks == 1 else f"{name}@{r0}:{r1}"
            tasks.append(TensorTask(
                id=tid, tensor=name, tensor_class=cls, action="merge", method=spec.name, row_start=r0,
                row_end=r1, inputs=refs, has_base=has_base, shared=params.shared, per_model=params.per_model,
                seed=seed, compute_dtype=TAG_OF_DTYPE[compute],
                output=OutputRef(shard_name, out_off + r0 * row_numel * out_item, out_bytes, out_tag_t, e.shape),
                chunk_rows=chunk_rows, aux=aux, aux_names=aux_names, layout=layout,
                est_host_bytes=est, read_bytes=in_bytes, write_bytes=out_bytes,
                flops=spec.flops(chunk_shape, n_exp) if spec.flops else 10 * numel * max(1, n_exp),
            ))  # fmt: skip

    tok = recipe.tokenizer_source
    tokenizer_from = base_url if tok in (None, "base") else tok
    out_dtype_name = None
    if out_tag:
        out_dtype_name = str(DTYPES[out_tag][0]).replace("torch.", "")
    return MergePlan(recipe, tuple(urls), tuple(tasks), tuple(shards), config, out_dtype_name, tokenizer_from)


def fused_blocks(name: str, e: TensorEntry, config: dict[str, Any]) -> list[int] | None:
    """Row sizes of the blocks of a packed projection, from the model config; None if not packed.

    Known layouts: ``qkv_proj`` = [q; k; v] with heads·head_dim and kv_heads·head_dim rows
    (Phi-3 style), ``gate_up_proj`` = [gate; up] with equal halves.
    """
    if len(e.shape) != 2:
        return None
    rows = e.shape[0]
    if name.endswith("qkv_proj.weight"):
        heads = config.get("num_attention_heads")
        kv = config.get("num_key_value_heads") or heads
        hidden = config.get("hidden_size")
        if not (isinstance(heads, int) and isinstance(kv, int) and isinstance(hidden, int)):
            raise PlanError("split_fused needs num_attention_heads and hidden_size in config.json", tensor=name)
        hd = config.get("head_dim") or hidden // heads
        blocks = [heads * hd, kv * hd, kv * hd]
    elif name.endswith("gate_up_proj.weight"):
        blocks = [rows // 2, rows - rows // 2]
    else:
        return None
    if sum(blocks) != rows:
        raise PlanError(
            f"packed projection has {rows} rows but the config implies blocks {blocks}", tensor=name,
            hint="set raymerge.split_fused: false to merge it as stored",
        )  # fmt: skip
    return blocks


def _aux_refs(
    spec: Any,
    per_model: tuple[dict[str, Any], ...],
    experts: list[str],
    name: str,
    e: TensorEntry,
    cache: dict[str, Checkpoint],
    turned: bool = False,
) -> tuple[tuple[TensorRef, ...], tuple[str, ...]]:
    """Locate each expert's auxiliary matrix for tensor ``name`` (headers only) and check its shape.

    A method with ``aux_param`` (RegMean: ``grams``) names, per expert, a directory or safetensors
    file holding one in×in matrix per linear layer, keyed by module name (``…mlp.up_proj``) or by
    the weight's own name. ``turned``: the weight is stored in × out (Conv1D), so its input width
    is its first dimension.
    """
    if not spec.aux_param:
        return (), ()
    refs, names = [], []
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    for url, p in zip(experts, per_model, strict=True):
        src = str(p[spec.aux_param])
        if src not in cache:
            cache[src] = open_aux(src)
        ck = cache[src]
        key = module if module in ck.entries else name
        if key not in ck.entries:
            raise CheckpointError(
                f"no {spec.aux_param} matrix for this layer of model {url}", file=src, tensor=module,
                hint="collect statistics for every linear layer, or exclude it with raymerge.exclude",
            )  # fmt: skip
        ae = ck.entries[key]
        cols = e.shape[1 - int(turned)] if len(e.shape) == 2 else -1
        if ae.shape != (cols, cols) or not ae.is_float:
            raise CheckpointError(
                f"{spec.aux_param} matrix has shape {list(ae.shape)} ({ae.dtype}), expected [{cols}, {cols}] float",
                file=ck.shard_of[key], tensor=key,
            )  # fmt: skip
        refs.append(TensorRef.of(ck.shard_of[key], ae))
        names.append(key)
    return tuple(refs), tuple(names)


def open_aux(src: str) -> Checkpoint:
    """Open a directory of statistics (HF layout) or a single ``.safetensors`` file, headers only."""
    if src.endswith(".safetensors"):
        reader = open_shard(src)
        return Checkpoint(src, {}, {k: src for k in reader.entries}, dict(reader.entries))
    return open_checkpoint(src)


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def fmt_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it at or above 1 (``512.0 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_budget(plan: MergePlan, budget: int) -> None:
    """Refuse a plan whose biggest task cannot fit the memory budget, naming the tensor."""
    for t in plan.tasks:
        if t.est_host_bytes > budget:
            raise PlanError(
                f"task needs about {fmt_bytes(t.est_host_bytes)} but the memory budget is {fmt_bytes(budget)}",
                tensor=t.tensor,
                hint="raise --memory-budget, or choose a method that can be row-chunked",
            )
