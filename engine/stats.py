"""Activation statistics from forward passes: RegMean's input Grams and per-channel moments.

Given a model (a Hugging Face directory or a loaded ``nn.Module``) and a little unlabelled data,
forward hooks collect

* **input Grams** of every ``nn.Linear``: G = XᵀX / N over the layer's input rows, where a row is
  one non-padding token (the batch's ``attention_mask`` drops padding wherever the input has the
  mask's [batch, seq] leading shape) or one sample for inputs without a sequence axis. Sums are
  accumulated on the device the layer's input arrives on, in fp64 on CPU and on GPUs with full-
  rate FP64, fp32 on other GPUs (``methods.precision.stats_dtype``); the file stores G in fp32 by
  default. The output ``grams.safetensors`` holds one ``[in, in]`` matrix per layer keyed by module
  name: exactly what the ``regmean`` method's ``grams`` parameter reads.
* **per-channel moments** (count, mean, M2 = Σ(x − mean)²) of named modules' outputs over the
  last axis, combined across batches and workers with Chan et al.'s exact pairwise update.

Memory: the Gram file's header is planned before any forward pass; when the accumulators of all
layers would not fit ``memory_budget`` the layers are split into groups, one pass over the data
per group, and each group's Grams are written at their planned offsets as soon as its pass ends,
so at most one group is ever resident. Models larger than the budget load through accelerate
(``init_empty_weights`` + ``load_checkpoint_and_dispatch``, the rest offloaded to disk).

The same pass function runs in this process (``LocalStatsBackend``) or data-parallel on Ray
actors (``raymerge.cluster.stats``); a backend returns partial moments and Gram sums that the
driver combines exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from raymerge.engine.errors import RaymergeError
from raymerge.engine.methods.precision import stats_dtype, tf32
from raymerge.engine.storage import DTYPES, TAG_OF_DTYPE

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
GRAMS_FILE = "grams.safetensors"
MOMENTS_FILE = "moments.safetensors"
SUMMARY_FILE = "stats.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")
# Modules whose (eval-mode) output is their input object: never the producer of a value.
_PASS_THROUGH = (nn.Dropout, nn.Identity)


class StatsError(RaymergeError):
    """Statistics cannot be collected: bad data file, unknown module name, model that does not fit."""


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataSpec:
    """Where a task's unlabelled data is and how to batch it.

    ``files``: ``.jsonl`` (one object per line, text under ``text_field``, or one JSON string per
    line), ``.json`` (a list of such), ``.txt`` (one example per non-empty line), or tensor files
    ``.pt`` / ``.safetensors`` holding one tensor ``[examples, ...]`` (fed as the model's main
    input: ``input_ids``, ``pixel_values``, …) or several named ones (``input_ids`` and
    ``attention_mask``, …). Text is tokenized with the tokenizer in ``tokenizer`` (default: the
    model directory), truncated to ``max_length`` tokens and right-padded per batch.
    """

    files: tuple[str, ...]
    tokenizer: str | None = None
    text_field: str = "text"
    batch_size: int = 8
    max_length: int = 512
    max_examples: int | None = None

    def with_tokenizer(self, default: str | None) -> DataSpec:
        """This spec with ``tokenizer`` defaulted to ``default`` (a model directory)."""
        return self if self.tokenizer or not default else dataclasses.replace(self, tokenizer=str(default))


def _read_texts(path: str, field_name: str) -> list[str]:
    suffix = Path(path).suffix.lower()
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StatsError(f"cannot read data file: {exc.strerror}", file=path) from None
    if suffix == ".txt":
        return [ln for ln in raw.splitlines() if ln.strip()]
    try:
        items = json.loads(raw) if suffix == ".json" else [json.loads(ln) for ln in raw.splitlines() if ln.strip()]
    except json.JSONDecodeError as exc:
        raise StatsError(f"data file is not valid JSON: {exc}", file=path) from None
    if not isinstance(items, list):
        raise StatsError("a .json data file must hold a list of examples", file=path)
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and isinstance(item.get(field_name), str):
            texts.append(item[field_name])
        else:
            raise StatsError(
                f"example {i} has no string field {field_name!r}", file=path,
                hint="set --text-field to the key holding the text",
            )  # fmt: skip
    return texts


def _read_tensors(path: str, main_input: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad data file
        raise StatsError(f"cannot read tensor data file: {exc}", file=path) from None
    if isinstance(obj, torch.Tensor):
        obj = {main_input: obj}
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StatsError("a tensor data file must hold a tensor or a dict of tensors", file=path)
    if len(obj) == 1 and main_input not in obj:
        obj = {main_input: next(iter(obj.values()))}
    n = {int(v.shape[0]) if v.dim() else -1 for v in obj.values()}
    if len(n) != 1 or -1 in n:
        raise StatsError(f"tensors disagree on the number of examples (dim 0): {sorted(n)}", file=path)
    return dict(obj)


def _tokenizer(directory: str | None, file: str) -> Any:
    if not directory or not any((Path(directory) / f).exists() for f in _TOKENIZER_FILES):
        raise StatsError(
            f"text data needs a tokenizer, and {directory or 'no directory'} has none", file=file,
            hint="put tokenizer files in the model directory, pass --tokenizer DIR, or give tensor files (.pt/.safetensors) of input ids",
        )  # fmt: skip
    _require_transformers()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise StatsError("the tokenizer has neither a pad nor an eos token to pad batches with", file=directory)
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_batches(spec: DataSpec, *, main_input: str = "input_ids") -> list[Batch]:
    """Read ``spec``'s files into CPU batches of at most ``spec.batch_size`` examples, in file order.

    Batches never span two files; ``max_examples`` caps the total. Text batches carry an
    ``attention_mask`` (1 = token, 0 = padding), which the hooks use to leave padding out.
    """
    if spec.batch_size < 1:
        raise StatsError(f"batch size must be ≥ 1, got {spec.batch_size}")
    batches: list[Batch] = []
    left = spec.max_examples if spec.max_examples is not None else -1
    for path in spec.files:
        if left == 0:
            break
        if not Path(path).is_file():
            raise StatsError("data file not found", file=path)
        if path.endswith((".pt", ".safetensors")):
            tensors = _read_tensors(path, main_input)
            n = int(next(iter(tensors.values())).shape[0])
            n = n if left < 0 else min(n, left)
            for lo in range(0, n, spec.batch_size):
                hi = min(n, lo + spec.batch_size)
                batches.append({k: v[lo:hi] for k, v in tensors.items()})
        else:
            texts = _read_texts(path, spec.text_field)
            texts = texts if left < 0 else texts[:left]
            n = len(texts)
            if not texts:
                continue
            tok = _tokenizer(spec.tokenizer, path)
            for lo in range(0, n, spec.batch_size):
                enc = tok(texts[lo : lo + spec.batch_size], padding=True, truncation=True,
                          max_length=spec.max_length, return_tensors="pt")  # fmt: skip
                batches.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
        left = left - n if left > 0 else left
    if not batches:
        raise StatsError("no examples in the data files", file=", ".join(spec.files))
    return batches


def shard_batches(batches: Sequence[Batch], rank: int, world: int) -> list[Batch]:
    """Batches ``rank, rank + world, …``: one worker's share for data-parallel collection."""
    return list(batches[rank::world])


# ------------------------------------------------------------------------------------------------ moments


@dataclass(frozen=True)
class Moments:
    """Per-channel count, mean and M2 = Σ (x − mean)² of some rows (fp64, CPU).

    ``merge`` is Chan, Golub & LeVeque's pairwise update, exact for any split of the rows:
    δ = μ_b − μ_a, μ = μ_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def of_rows(rows: torch.Tensor, dtype: torch.dtype = torch.float64) -> Moments:
        """Moments of ``rows`` [n, channels], computed in ``dtype`` on the rows' device."""
        x = rows.to(dtype)
        mean = x.mean(0)
        return Moments(int(x.shape[0]), mean, ((x - mean) ** 2).sum(0))

    def merge(self, other: Moments) -> Moments:
        """The moments of both row sets together."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        b = other.mean.to(self.mean.device, self.mean.dtype)
        delta = b - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2.to(self.m2.device, self.m2.dtype) + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def var(self) -> torch.Tensor:
        """Population variance M2 / n (what BatchNorm/REPAIR normalise with)."""
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def cpu(self) -> Moments:
        return Moments(
            self.count, self.mean.detach().to("cpu", torch.float64), self.m2.detach().to("cpu", torch.float64)
        )


def merge_moments(parts: Sequence[Mapping[str, Moments]]) -> dict[str, Moments]:
    """Combine per-worker moments point by point (in the given order, so the result is deterministic)."""
    out: dict[str, Moments] = {}
    for part in parts:
        for name, m in part.items():
            out[name] = out[name].merge(m) if name in out else m
    return out


# ------------------------------------------------------------------------------------------------ gram files


@dataclass(frozen=True)
class GramLayout:
    """A pre-planned safetensors file of ``[in, in]`` matrices: header written first, data by offset."""

    path: str
    dtype: torch.dtype
    offsets: dict[str, tuple[int, int]]  # name → absolute [start, end) in the file
    dims: dict[str, int]
    size: int

    @staticmethod
    def plan(path: str | Path, dims: Mapping[str, int], dtype: torch.dtype, metadata: Mapping[str, str]) -> GramLayout:
        """Lay out one matrix per name (sorted), write the header and size the file; no data yet."""
        item = DTYPES[TAG_OF_DTYPE[dtype]][1]
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
        rel: dict[str, tuple[int, int]] = {}
        pos = 0
        for name in sorted(dims):
            nb = dims[name] * dims[name] * item
            header[name] = {
                "dtype": TAG_OF_DTYPE[dtype],
                "shape": [dims[name], dims[name]],
                "data_offsets": [pos, pos + nb],
            }
            rel[name] = (pos, pos + nb)
            pos += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        path = str(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "wb") as f:
                f.write(len(raw).to_bytes(8, "little") + raw)
                f.truncate(start + pos)
        except OSError as exc:
            raise StatsError(f"cannot create statistics file: {exc.strerror}", file=path) from None
        offsets = {k: (start + lo, start + hi) for k, (lo, hi) in rel.items()}
        return GramLayout(path, dtype, offsets, dict(dims), start + pos)

    def write(self, name: str, matrix: torch.Tensor) -> None:
        """Write ``matrix`` (any device/dtype; cast to the file's dtype) at ``name``'s offset."""
        lo, hi = self.offsets[name]
        data = matrix.detach().to("cpu", self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data
        if data.nbytes != hi - lo:
            raise StatsError(
                f"matrix of shape {list(matrix.shape)} does not fit its planned slot", file=self.path, tensor=name
            )
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view = data.cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], lo + done)
        finally:
            os.close(fd)


def read_matrix(path: str, name: str) -> torch.Tensor:
    """One tensor of a local safetensors file (whole tensor, CPU)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


# ------------------------------------------------------------------------------------------------ passes


@dataclass(frozen=True)
class PointAffine:
    """A per-channel affine y = scale·x + shift applied to a module's output (last axis)."""

    point: str
    scale: torch.Tensor
    shift: torch.Tensor


@dataclass(frozen=True)
class PassSpec:
    """What one pass over the data collects: Grams of ``gram_layers``, moments at ``points``.

    ``corrections`` are applied to the named modules' outputs during the pass (TACT); with
    ``stop_after`` each forward stops once that point's statistics are taken (later layers are
    not needed, so they are not run).
    """

    gram_layers: tuple[str, ...] = ()
    points: tuple[str, ...] = ()
    corrections: tuple[PointAffine, ...] = ()
    stop_after: str | None = None


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: moments per point, rows per Gram layer, and how much data it saw."""

    moments: dict[str, Moments]
    gram_rows: dict[str, int]
    batches: int
    tokens: int


GramSink = Callable[[str, torch.Tensor, int], None]
"""Receives (layer, Σ xxᵀ on its accumulation device, rows) once per Gram layer at a pass's end."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (the rest of the network is not needed)."""


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    return [new, *out[1:]]


class _TokenMask:
    """The current batch's padding mask, as boolean [batch, seq] on whichever device asks."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask.bool() if mask is not None else None
        self._by_device = {}

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., C] as rows [n, C], without padding positions when the mask's shape applies."""
        m = self.mask
        if m is not None and x.dim() == m.dim() + 1 and tuple(x.shape[:-1]) == tuple(m.shape):
            dm = self._by_device.get(x.device)
            if dm is None:
                dm = self._by_device[x.device] = m.to(x.device)
            return x[dm]
        return x.reshape(-1, x.shape[-1])


@dataclass
class _GramAcc:
    total: torch.Tensor | None = None
    rows: int = 0


@dataclass
class _Hooks:
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def module_map(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → module (``named_modules``)."""
    return dict(model.named_modules())


def _need(modules: Mapping[str, nn.Module], name: str, what: str) -> nn.Module:
    if name not in modules:
        raise StatsError(f"no module named {name!r} in the model ({what})", tensor=name)
    return modules[name]


def affine_hook(scale: torch.Tensor, shift: torch.Tensor) -> Callable[..., Any]:
    """A forward hook replacing the output x by scale·x + shift (per channel, last axis)."""
    cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        x = _first_tensor(out)
        if x is None:
            return None
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (scale.to(x.device, x.dtype), shift.to(x.device, x.dtype))
        a, b = cache[key]
        return _replace_first(out, torch.addcmul(b, x, a))

    return hook


def run_pass(
    model: nn.Module,
    batches: Sequence[Batch],
    spec: PassSpec,
    *,
    on_gram: GramSink | None = None,
    progress: bool = False,
    desc: str = "statistics",
) -> PassResult:
    """Run ``batches`` through ``model`` once with hooks for ``spec``; return moments and Gram rows.

    Gram sums Σ xxᵀ (fp64 on CPU and full-FP64 GPUs, else fp32) stay on the device where each
    layer's input arrives until the pass ends, then go to ``on_gram`` one layer at a time and are
    freed. Moments are reduced per batch on the device and merged with Chan's update.
    """
    modules = module_map(model)
    mask = _TokenMask()
    hooks = _Hooks()
    grams: dict[str, _GramAcc] = {n: _GramAcc() for n in spec.gram_layers}
    moments: dict[str, Moments] = {}
    last: dict[str, Any] = {"x": None, "prod": None}  # q/k/v (gate/up) share one input: one product

    def gram_hook(name: str) -> Callable[..., None]:
        acc = grams[name]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            if x is last["x"]:
                prod, n = last["prod"]
            else:
                rows = mask.rows(x.detach())
                dt = stats_dtype("auto", rows.device)
                r = rows.to(dt)
                with tf32(False):  # fp32 Grams on consumer GPUs: full fp32 products, never TF32
                    prod, n = r.T @ r, int(r.shape[0])
                last["x"], last["prod"] = x, (prod, n)
            if acc.total is None:
                acc.total = torch.zeros_like(prod)
            acc.total.add_(prod.to(acc.total.device))
            acc.rows += n

        return hook

    def moment_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            x = _first_tensor(out)
            if x is None:
                raise StatsError(f"module output is {type(out).__name__}, not a tensor", tensor=name)
            rows = mask.rows(x.detach())
            m = Moments.of_rows(rows, stats_dtype("auto", rows.device))
            moments[name] = moments[name].merge(m) if name in moments else m
            if spec.stop_after == name:
                raise _StopForward

        return hook

    if spec.stop_after is not None and spec.stop_after not in spec.points:
        raise StatsError("stop_after must be one of the pass's points", tensor=spec.stop_after)
    # Corrections first: hooks run in registration order, so a point that is both corrected and
    # measured in one pass is measured after its correction (what the corrected model computes).
    for c in spec.corrections:
        hooks.handles.append(_need(modules, c.point, "correction").register_forward_hook(affine_hook(c.scale, c.shift)))
    for name in spec.gram_layers:
        hooks.handles.append(_need(modules, name, "Gram layer").register_forward_pre_hook(gram_hook(name)))
    for name in spec.points:
        hooks.handles.append(_need(modules, name, "statistics point").register_forward_hook(moment_hook(name)))

    device = _input_device(model)
    accepted = _accepted_inputs(model)
    tokens = 0
    it: Any = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch", leave=False)
    try:
        with torch.no_grad():
            for batch in it:
                feed = {k: v.to(device) for k, v in batch.items() if accepted is None or k in accepted}
                m = batch.get("attention_mask")
                mask.set(m)
                tokens += batch_tokens(batch)
                with contextlib.suppress(_StopForward):
                    model(**feed)
                last["x"] = last["prod"] = None
    finally:
        hooks.remove()
    rows = {}
    for name, acc in grams.items():
        if acc.total is None:
            raise StatsError("this linear layer was never called in the forward pass; no Gram for it", tensor=name)
        rows[name] = acc.rows
        if on_gram is not None:
            on_gram(name, acc.total, acc.rows)
        acc.total = None
    missing = [p for p in spec.points if p not in moments]
    if missing:
        raise StatsError("statistics point was never reached in the forward pass", tensor=missing[0])
    return PassResult({k: v.cpu() for k, v in moments.items()}, rows, len(batches), tokens)


def batch_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Rows a batch contributes: non-padding tokens, else batch × sequence for token ids, else samples."""
    m = batch.get("attention_mask")
    if m is not None:
        return int(m.sum())
    first = next(iter(batch.values()))
    is_ids = first.dim() >= 2 and not first.is_floating_point()
    return int(first.shape[0]) * (int(first.shape[1]) if is_ids else 1)


def _input_device(model: nn.Module) -> torch.device:
    """Where to put the inputs: accelerate's execution device of the first module, else the first parameter's."""
    for mod in model.modules():
        hook = getattr(mod, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _accepted_inputs(model: nn.Module) -> set[str] | None:
    """Keyword arguments the model's forward names explicitly (None: accept every key)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


# ------------------------------------------------------------------------------------------------ points


@dataclass(frozen=True)
class PointInfo:
    """A statistics/correction point: module name, channels, and the module that produced its value.

    ``producer`` is the innermost ``nn.Linear`` or ``nn.LayerNorm`` whose output tensor *is* the
    point's output (dropout/identity in between), or None (e.g. a residual add): only points with a
    producer can be folded into weights.
    """

    name: str
    channels: int
    producer: str | None
    producer_kind: str | None  # "linear" | "norm"


_ATTN_OUT = ("self_attn.o_proj", "attention.output", "attn.c_proj", "self_attn.out_proj", "attn.out_proj",
             "self_attention.dense", "attn.o_proj")  # fmt: skip
_MLP_PRE = ("mlp.gate_proj", "intermediate.dense", "mlp.c_fc", "mlp.fc1", "mlp.dense_h_to_4h", "mlp.up_proj")


def block_names(model: nn.Module) -> list[str]:
    """The transformer blocks: children of the largest ``ModuleList`` of same-class modules."""
    best: tuple[int, str, list[str]] = (0, "", [])
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best[0]:
                best = (size, name, [f"{name}.{i}" if name else str(i) for i in range(len(mod))])
    return best[2]


def default_points(model: nn.Module) -> list[str]:
    """Per block: attention output, MLP hidden pre-activation, block output (Llama/BERT/ViT/GPT-2 names)."""
    modules = module_map(model)
    out: list[str] = []
    blocks = block_names(model)
    if not blocks:
        raise StatsError("cannot find the transformer blocks of this model", hint="name the points with --points")
    for b in blocks:
        for group in (_ATTN_OUT, _MLP_PRE):
            found = next((f"{b}.{s}" for s in group if f"{b}.{s}" in modules), None)
            if found is None:
                raise StatsError(
                    f"no known attention-output / MLP module in block {b}", tensor=b,
                    hint="name the points with --points (module names or glob patterns)",
                )  # fmt: skip
            out.append(found)
        out.append(b)
    return out


def expand_points(model: nn.Module, patterns: Sequence[str] | str) -> list[str]:
    """Module names for ``patterns``: ``default``, exact names or glob patterns (``*.mlp.gate_proj``)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    names = list(module_map(model))
    out: list[str] = []
    for pat in patterns:
        if pat == "default":
            hits = default_points(model)
        elif pat in ("none", ""):
            hits = []
        else:
            hits = [n for n in names if n and (n == pat or fnmatch.fnmatchcase(n, pat))]
            if not hits:
                near = [n for n in names if n and pat.split(".")[-1] in n][:3]
                raise StatsError(
                    f"no module matches point {pat!r}", tensor=pat,
                    hint=f"use module names such as {', '.join(near or names[1:4])}",
                )  # fmt: skip
        out.extend(h for h in hits if h not in out)
    return out


def probe_points(model: nn.Module, batch: Batch, points: Sequence[str]) -> list[PointInfo]:
    """Run one batch to put ``points`` in network order (the order their outputs are produced)
    and find each point's producer module (for folding)."""
    modules = module_map(model)
    fired: list[tuple[str, torch.Tensor | None]] = []
    hooks = _Hooks()

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            fired.append((name, _first_tensor(out)))

        return hook

    for name, mod in modules.items():
        if name and not isinstance(mod, _PASS_THROUGH):
            hooks.handles.append(mod.register_forward_hook(record(name)))
    device = _input_device(model)
    accepted = _accepted_inputs(model)
    try:
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in batch.items() if accepted is None or k in accepted})
    finally:
        hooks.remove()
    first_fire: dict[str, int] = {}
    for i, (n, _) in enumerate(fired):
        first_fire.setdefault(n, i)
    missing = [p for p in points if p not in first_fire]
    if missing:
        raise StatsError("point was never called in a forward pass", tensor=missing[0])
    infos = []
    for p in sorted(points, key=lambda n: first_fire[n]):
        i = first_fire[p]
        out = fired[i][1]
        if out is None:
            raise StatsError("point's output is not a tensor", tensor=p)
        producer = None
        # The earliest call inside p's subtree that returned this very tensor made it.
        for n, o in fired[: i + 1]:
            if o is out and (n == p or n.startswith(p + ".")):
                producer = n
                break
        kind = None
        if producer is not None:
            mod = modules[producer]
            if isinstance(mod, nn.Linear):
                kind = "linear"
            elif isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
                kind = "norm"
        infos.append(PointInfo(p, int(out.shape[-1]), producer if kind else None, kind))
    return infos


# ------------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for forward passes, and how it was placed."""

    model: nn.Module
    source: str | None
    dispatched: bool  # True: accelerate hooks move weights from CPU/disk on the fly
    host_weight_bytes: int  # weights resident in host memory
    device: torch.device
    offload_dir: str | None = None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise StatsError(
            "data-based merging loads models and tokenizers with the transformers package, which is not installed",
            hint="pip install 'transformers>=4.45'",
        ) from None


def model_class(model_dir: str) -> tuple[Any, Any]:
    """The transformers class named by ``config.json``'s ``architectures`` (else ``AutoModel``) and the config."""
    _require_transformers()
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad config
        raise StatsError(f"cannot read the model's config.json: {exc}", file=model_dir) from None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls, config
    from transformers import AutoModel

    return AutoModel, config


def checkpoint_bytes(model_dir: str) -> tuple[int, dict[str, tuple[int, ...]], torch.dtype]:
    """Bytes, tensor shapes and the dominant float dtype of a checkpoint, from headers only."""
    from raymerge.engine.storage import open_checkpoint

    ck = open_checkpoint(model_dir)
    total = 0
    by_dtype: dict[torch.dtype, int] = {}
    for e in ck.entries.values():
        nb = e.end - e.start
        total += nb
        if e.is_float:
            by_dtype[e.torch_dtype] = by_dtype.get(e.torch_dtype, 0) + nb
    dtype = max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else torch.float32
    return total, {k: tuple(e.shape) for k, e in ck.entries.items()}, dtype


def load_model(
    model_dir: str | Path,
    *,
    device: str | None = "auto",
    memory_budget: int | None = None,
    offload: bool | None = None,
    offload_dir: str | None = None,
) -> LoadedModel:
    """Load an HF model directory for inference, within ``memory_budget`` bytes of host memory.

    Weights up to half the budget (or all, without a budget) load normally onto ``device``.
    Larger models — or any with ``offload=True`` — are built on the meta device
    (``init_empty_weights``) and placed by ``load_checkpoint_and_dispatch``: the GPU (when used)
    takes what fits, host memory at most half the budget, the rest goes to ``offload_dir`` (a temp
    dir by default) and is streamed in layer by layer during the forward pass.
    """
    model_dir = str(model_dir)
    dev = resolve_device(device)
    cls, config = model_class(model_dir)
    weight_bytes, _, dtype = checkpoint_bytes(model_dir)
    host_share = None if memory_budget is None else max(1, memory_budget // 2)
    gpu_free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 0
    fits = weight_bytes <= (int(gpu_free * 0.8) if dev.type == "cuda" else (host_share or weight_bytes))
    if offload is None:
        offload = not fits
    if not offload:
        kw: dict[str, Any] = {"dtype": dtype} if _transformers_major() >= 5 else {"torch_dtype": dtype}
        if dev.type != "cpu":
            kw["device_map"] = {"": str(dev)}
        with _quiet_transformers():
            model = cls.from_pretrained(model_dir, **kw).eval()
        if dev.type == "cpu":
            model.to(dev)
        return LoadedModel(model, model_dir, False, weight_bytes if dev.type == "cpu" else 0, dev)

    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    max_memory: dict[Any, Any] = {"cpu": host_share if host_share is not None else weight_bytes // 2}
    if dev.type == "cuda":
        max_memory[dev.index or 0] = int(gpu_free * 0.8)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if set(device_map.values()) == {"disk"}:
        # accelerate keeps room in memory for the largest block it streams in; below that nothing
        # can run (and accelerate 1.x fails on an all-disk map anyway).
        raise StatsError(
            f"a memory budget of {(memory_budget or 0) / 2**20:.1f} MiB leaves too little host memory to "
            "stream the model's largest block from disk", file=model_dir, hint="raise --memory-budget",
        )  # fmt: skip
    own_dir = offload_dir is None
    off = offload_dir or tempfile.mkdtemp(prefix="raymerge-offload-")
    model = load_checkpoint_and_dispatch(
        model, model_dir, device_map=device_map, offload_folder=off, no_split_module_classes=no_split, dtype=dtype,
    ).eval()  # fmt: skip
    resident = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if p.device.type == "cpu"
    )  # fmt: skip
    log.info("model %s dispatched: %s (offload %s)", model_dir, sorted(set(map(str, device_map.values()))), off)
    return LoadedModel(model, model_dir, True, resident, dev, off if own_dir else None)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers (raymerge reports progress itself)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def release_model(loaded: LoadedModel) -> None:
    """Drop a model and remove the temporary offload folder it created."""
    if loaded.offload_dir:
        shutil.rmtree(loaded.offload_dir, ignore_errors=True)


def input_features(mod: nn.Module) -> int | None:
    """Input width of a linear layer: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2 family,
    weight stored in × out); None for anything else."""
    if isinstance(mod, nn.Linear):
        return int(mod.in_features)
    weight = getattr(mod, "weight", None)
    if type(mod).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return None


def linear_layers(model: nn.Module, patterns: Sequence[str] | None = None) -> dict[str, int]:
    """Linear layers (``nn.Linear`` and GPT-2's ``Conv1D``), optionally filtered by glob patterns
    → input features."""
    out = {}
    for name, mod in model.named_modules():
        width = input_features(mod)
        if width is not None and (not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)):
            out[name] = width
    return out


def plan_gram_groups(dims: Mapping[str, int], budget: int | None, itemsize: int) -> list[tuple[str, ...]]:
    """Split layers (in order) into groups whose accumulators fit ``budget`` bytes, one pass each.

    A group needs Σ in² accumulators plus two in×in temporaries (the batch product and the shared
    q/k/v product) of its widest layer.
    """
    names = list(dims)
    if budget is None:
        return [tuple(names)] if names else []
    groups: list[tuple[str, ...]] = []
    cur: list[str] = []
    used = 0
    for n in names:
        nb = dims[n] ** 2 * itemsize
        if 3 * nb > budget:
            raise StatsError(
                f"the Gram of this layer needs {3 * nb / 2**30:.2f} GiB (with temporaries) but only "
                f"{budget / 2**30:.2f} GiB of the memory budget is left for statistics", tensor=n,
                hint="raise --memory-budget or leave the layer out with --gram-layers",
            )  # fmt: skip
        widest = max([dims[c] for c in cur] + [dims[n]]) ** 2 * itemsize
        if cur and used + nb + 2 * widest > budget:
            groups.append(tuple(cur))
            cur, used = [], 0
        cur.append(n)
        used += nb
    if cur:
        groups.append(tuple(cur))
    return groups


# ------------------------------------------------------------------------------------------------ backends


class StatsBackend(Protocol):
    """Runs passes over one model and one task's data: in this process, or on Ray actors."""

    def probe(self, patterns: Sequence[str] | str) -> list[PointInfo]: ...

    def linear_dims(self, patterns: Sequence[str] | None) -> dict[str, int]: ...

    def gram_budget(self) -> int | None: ...

    def run_pass(self, spec: PassSpec, grams: GramLayout | None) -> PassResult:
        """Run ``spec`` over all the data; when ``grams`` is given, write XᵀX/N of
        ``spec.gram_layers`` into it (combined over workers)."""
        ...

    def close(self) -> None: ...


class LocalStatsBackend:
    """All data through one model in this process."""

    def __init__(
        self,
        model: nn.Module | str | Path,
        data: DataSpec | Sequence[Batch],
        *,
        device: str | None = "auto",
        memory_budget: int | None = None,
        offload: bool | None = None,
        offload_dir: str | None = None,
        progress: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        # Data first: a bad data file fails before a large model is loaded.
        if isinstance(data, DataSpec):
            if isinstance(model, nn.Module):
                main = str(getattr(model, "main_input_name", "input_ids"))
            else:
                main = str(getattr(model_class(str(model))[0], "main_input_name", "input_ids"))
            batches = load_batches(data.with_tokenizer(None if isinstance(model, nn.Module) else str(model)),
                                   main_input=main)  # fmt: skip
        else:
            batches = list(data)
        if isinstance(model, nn.Module):
            self.loaded = LoadedModel(model.eval(), None, False, 0, _input_device(model))
        else:
            self.loaded = load_model(model, device=device, memory_budget=memory_budget, offload=offload,
                                     offload_dir=offload_dir)  # fmt: skip
        self.batches = shard_batches(batches, rank, world)
        if not self.batches:
            raise StatsError(f"worker {rank} of {world} has no data: {len(batches)} batch(es) in all",
                             hint="use fewer workers or a smaller batch size")  # fmt: skip
        self.dims = linear_layers(self.loaded.model)
        self.memory_budget = memory_budget
        self.progress = progress

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def probe(self, patterns: Sequence[str] | str) -> list[PointInfo]:
        names = expand_points(self.model, patterns)
        return probe_points(self.model, self.batches[0], names) if names else []

    def linear_dims(self, patterns: Sequence[str] | None) -> dict[str, int]:
        return linear_layers(self.model, patterns)

    def gram_budget(self) -> int | None:
        if self.loaded.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.loaded.device)[0]
            return int(free * 0.5)
        if self.memory_budget is None:
            return None
        left = self.memory_budget - self.loaded.host_weight_bytes
        if left <= 0:
            raise StatsError(
                f"the model's weights take {self.loaded.host_weight_bytes / 2**30:.2f} GiB of host memory, "
                f"the whole budget of {self.memory_budget / 2**30:.2f} GiB", file=self.loaded.source,
                hint="raise --memory-budget (weights beyond half of it are offloaded to disk)",
            )  # fmt: skip
        return left

    def run_pass(self, spec: PassSpec, grams: GramLayout | None) -> PassResult:
        def sink(name: str, total: torch.Tensor, rows: int) -> None:
            if grams is not None:
                grams.write(name, total / max(rows, 1))

        return run_pass(self.model, self.batches, spec, on_gram=sink if grams else None, progress=self.progress)

    def partial_pass(self, spec: PassSpec, partial_path: str | None) -> PassResult:
        """A worker's pass: Gram *sums* (fp64, unnormalised) into ``partial_path`` for the driver to combine."""
        layout: GramLayout | None = None
        if partial_path is not None and spec.gram_layers:
            layout = GramLayout.plan(partial_path, {n: self.dims[n] for n in spec.gram_layers}, torch.float64, {})

        def sink(name: str, total: torch.Tensor, rows: int) -> None:
            assert layout is not None
            layout.write(name, total)

        return run_pass(self.model, self.batches, spec, on_gram=sink if layout else None, progress=self.progress)

    def close(self) -> None:
        release_model(self.loaded)


# ------------------------------------------------------------------------------------------------ collect


@dataclass(frozen=True)
class StatsResult:
    """What ``collect_stats`` produced.

    ``grams_path`` is the file to give the ``regmean`` method as ``grams`` (None without Grams);
    ``moments`` holds per-channel statistics at ``points`` (in network order); ``tokens`` counts
    non-padding tokens (or samples), ``passes`` the passes over the data the Gram budget needed.
    """

    out_dir: Path | None
    grams_path: Path | None
    gram_rows: dict[str, int]
    points: tuple[str, ...]
    moments: dict[str, Moments]
    batches: int
    tokens: int
    passes: int
    seconds: float


def collect_stats(
    model: nn.Module | str | Path,
    data: DataSpec | Sequence[Batch],
    out_dir: str | Path | None,
    *,
    points: Sequence[str] | str = (),
    grams: bool = True,
    gram_layers: Sequence[str] | None = None,
    gram_dtype: torch.dtype = torch.float32,
    device: str | None = "auto",
    memory_budget: int | None = None,
    offload: bool | None = None,
    backend: StatsBackend | None = None,
    progress: bool = False,
) -> StatsResult:
    """Collect input Grams of every linear layer and moments at ``points``; write them to ``out_dir``.

    ``model`` is an HF directory (loaded within ``memory_budget`` bytes, see ``load_model``) or a
    loaded module; ``data`` a ``DataSpec`` or ready batches (dicts of model inputs). ``points`` are
    module names, glob patterns or ``"default"``; ``gram_layers`` glob patterns (default: every
    ``nn.Linear``). Writes ``out_dir/grams.safetensors`` (XᵀX/N per layer in ``gram_dtype``, keyed by
    module name: RegMean's ``grams`` input), ``moments.safetensors`` (``<point>.mean``, ``.var``,
    ``.count``; fp64) and ``stats.json``. ``backend`` runs the passes elsewhere (Ray actors); by
    default they run in this process.
    """
    t0 = time.perf_counter()
    if grams and out_dir is None:
        raise StatsError("Grams are written to disk: give an output directory")
    own = backend is None
    be: StatsBackend = backend or LocalStatsBackend(
        model, data, device=device, memory_budget=memory_budget, offload=offload, progress=progress
    )
    try:
        infos = be.probe(points)
        names = tuple(i.name for i in infos)
        dims = be.linear_dims(gram_layers) if grams else {}
        if grams and not dims:
            raise StatsError("no nn.Linear layers to collect Grams for", hint="check --gram-layers")
        out = Path(out_dir) if out_dir is not None else None
        layout = None
        if out is not None and dims:
            layout = GramLayout.plan(out / GRAMS_FILE, dims, gram_dtype, {"raymerge": "grams/1"})
        groups = plan_gram_groups(dims, be.gram_budget(), 8) or [()]
        log.info("statistics: %d Gram layers in %d pass(es), %d points", len(dims), len(groups), len(names))
        gram_rows: dict[str, int] = {}
        moments: dict[str, Moments] = {}
        res: PassResult | None = None
        for i, group in enumerate(groups):
            spec = PassSpec(gram_layers=group, points=names if i == 0 else ())
            res = be.run_pass(spec, layout)
            gram_rows.update(res.gram_rows)
            if i == 0:
                moments = res.moments
        assert res is not None
        result = StatsResult(out, Path(layout.path) if layout else None, gram_rows, names, moments, res.batches,
                             res.tokens, len(groups), time.perf_counter() - t0)  # fmt: skip
        if out is not None:
            write_moments(out / MOMENTS_FILE, names, moments)
            summary = {
                "model": str(model) if not isinstance(model, nn.Module) else type(model).__name__,
                "data": list(data.files) if isinstance(data, DataSpec) else None,
                "grams": GRAMS_FILE if layout else None, "gram_dtype": str(gram_dtype).replace("torch.", ""),
                "accumulation": "float64 on CPU and full-FP64 GPUs, else float32",
                "gram_rows": gram_rows, "points": list(names), "batches": res.batches, "tokens": res.tokens,
                "passes": len(groups), "seconds": round(result.seconds, 3),
            }  # fmt: skip
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        if isinstance(model, (str, Path)) and gram_rows:
            _warn_unmatched(str(model), gram_rows)
        return result
    finally:
        if own:
            be.close()


def write_moments(path: Path, points: Sequence[str], moments: Mapping[str, Moments]) -> None:
    """``<point>.mean`` / ``.var`` (fp64, population) / ``.count`` for each point, in a safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for p in points:
        m = moments[p]
        tensors[f"{p}.mean"] = m.mean.contiguous()
        tensors[f"{p}.var"] = m.var.contiguous()
        tensors[f"{p}.count"] = torch.tensor(m.count, dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "points": json.dumps(list(points))})


def read_moments(path: str | Path) -> dict[str, Moments]:
    """The moments ``write_moments`` wrote, by point."""
    from safetensors import safe_open

    out: dict[str, Moments] = {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        for p in json.loads(meta.get("points", "[]")):
            n = int(f.get_tensor(f"{p}.count"))
            mean = f.get_tensor(f"{p}.mean")
            out[p] = Moments(n, mean, f.get_tensor(f"{p}.var") * n)
    return out


def _warn_unmatched(model_dir: str, rows: Mapping[str, int]) -> None:
    with contextlib.suppress(RaymergeError):
        _, shapes, _ = checkpoint_bytes(model_dir)
        missing = [n for n in rows if f"{n}.weight" not in shapes]
        if missing:
            log.warning(
                "%d Gram layer(s) have no '<name>.weight' tensor in %s (e.g. %s); RegMean looks Grams up by "
                "the checkpoint's tensor names", len(missing), model_dir, missing[0],
            )  # fmt: skip


__all__ = [
    "Batch", "DataSpec", "GramLayout", "LoadedModel", "LocalStatsBackend", "Moments", "PassResult", "PassSpec",
    "PointAffine", "PointInfo", "StatsBackend", "StatsError", "StatsResult", "collect_stats", "default_points",
    "expand_points", "load_batches", "load_model", "merge_moments", "probe_points", "read_moments", "run_pass",
]  # fmt: skip
