"""Permutation alignment of one model's hidden units to another's (Git Re-Basin weight matching).

Two networks trained from different initialisations compute similar functions with their hidden
units in different orders. Averaging them unit by unit mixes unrelated features, and the merged
activations shrink ("variance collapse", Sharma, Roy & Dziugaite, arXiv 2410.12766). Permuting the
MLP hidden units of a block — rows of its input projections, columns of its output projection —
leaves the network's function unchanged, and so does permuting whole attention heads. Weight
matching (Ainsworth, Hayase & Srinivasa 2022, arXiv 2209.04836) picks, for each such permutation,
the one that brings model B's weights closest to model A's: coordinate descent over permutations,
each step a linear assignment (``scipy.optimize.linear_sum_assignment``) on the summed inner
products of every weight the permutation touches, with the other permutations held fixed.

Residual-stream permutations are not used, so in transformers every permutation is local to one
block and a checkpoint is aligned one block at a time (``PermutationSpec.components``); a plain
MLP couples consecutive hidden layers through the weight between them, and there the coordinate
descent matters. An expert fine-tuned from B is permuted with B's permutations, which puts it into
A's basis: the non-local merge of "expert of A" with "expert of B" becomes a local one.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from raymerge.engine.arch import BERT_LIKE, LLAMA_LIKE
from raymerge.engine.errors import AlignmentError
from raymerge.engine.publish import INDEX, META, SIDE_FILES, ModelPublication, copy_side_files
from raymerge.engine.storage import Checkpoint, open_checkpoint, open_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PermutedAxis:
    """One axis of one tensor that a permutation reorders, in blocks of ``block`` consecutive entries.

    ``block`` is 1 for hidden units and the head width for attention heads (``rep × head_dim`` for
    grouped-query q/o projections, whose query heads move with their key/value head).
    """

    tensor: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Permutation:
    """A permutation of ``size`` units and every tensor axis it must be applied to."""

    name: str
    size: int
    axes: tuple[PermutedAxis, ...]


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation symmetries used for alignment: which axes of which tensors move together.

    A tensor may carry several permutations on different axes (the middle layer of an MLP) but
    never the same one twice (linear assignment could not optimise it exactly).
    """

    perms: tuple[Permutation, ...]
    _axes_of: dict[str, tuple[tuple[str, PermutedAxis], ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [p.name for p in self.perms]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise AlignmentError(f"permutation names repeat: {dup}")
        axes_of: dict[str, list[tuple[str, PermutedAxis]]] = {}
        for p in self.perms:
            if p.size < 1:
                raise AlignmentError(f"permutation {p.name} has size {p.size}")
            for ax in p.axes:
                if ax.axis < 0 or ax.block < 1:
                    raise AlignmentError(f"axis {ax.axis} / block {ax.block} of permutation {p.name}", tensor=ax.tensor,
                                         hint="axes count from 0 and blocks hold at least one entry")  # fmt: skip
                for q, other in axes_of.get(ax.tensor, []):
                    if q == p.name or other.axis == ax.axis:
                        raise AlignmentError(
                            f"permutations {q} and {p.name} both reorder axis {ax.axis}" if q != p.name
                            else f"permutation {p.name} reorders two axes of one tensor",
                            tensor=ax.tensor, hint="a tensor may carry one permutation per axis, each once",
                        )  # fmt: skip
                axes_of.setdefault(ax.tensor, []).append((p.name, ax))
        object.__setattr__(self, "_axes_of", {t: tuple(v) for t, v in axes_of.items()})

    @property
    def tensors(self) -> tuple[str, ...]:
        """Names of every tensor some permutation touches, in spec order."""
        return tuple(self._axes_of)

    def axes_of(self, tensor: str) -> tuple[tuple[str, PermutedAxis], ...]:
        """(permutation name, axis) pairs applied to ``tensor``; empty for untouched tensors."""
        return self._axes_of.get(tensor, ())

    def components(self) -> list[PermutationSpec]:
        """Split into independent groups: permutations that share no tensor never interact.

        In a transformer without residual permutations each block is one group, so alignment can
        read, match and release one block at a time.
        """
        parent = list(range(len(self.perms)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        index = {p.name: i for i, p in enumerate(self.perms)}
        for pairs in self._axes_of.values():
            first = index[pairs[0][0]]
            for q, _ in pairs[1:]:
                parent[root(index[q])] = root(first)
        groups: dict[int, list[Permutation]] = {}
        for i, p in enumerate(self.perms):
            groups.setdefault(root(i), []).append(p)
        return [PermutationSpec(tuple(g)) for g in groups.values()]

    def check(self, shapes: Mapping[str, Sequence[int]], *, label: str) -> None:
        """Raise ``AlignmentError`` unless every permuted axis exists in ``shapes`` with size × block entries."""
        for p in self.perms:
            for ax in p.axes:
                if ax.tensor not in shapes:
                    raise AlignmentError(
                        f"model {label} has no tensor that permutation {p.name} needs", file=label, tensor=ax.tensor,
                        hint="the weights do not match the architecture in config.json",
                    )  # fmt: skip
                shape = tuple(shapes[ax.tensor])
                if ax.axis >= len(shape) or shape[ax.axis] != p.size * ax.block:
                    raise AlignmentError(
                        f"shape {list(shape)} in model {label} has no axis {ax.axis} of {p.size} × {ax.block} "
                        f"entries for permutation {p.name}", file=label, tensor=ax.tensor,
                        hint="check intermediate_size, num_attention_heads and num_key_value_heads in config.json",
                    )  # fmt: skip


@dataclass(frozen=True)
class Matching:
    """Result of weight matching.

    ``perms[name][i] = j`` puts unit ``j`` of the aligned model at position ``i`` (``P(B) = B[perm]``
    along each permuted axis). ``objective`` is Σ ⟨A_w, P(B)_w⟩ over the spec's tensors (fp64, in
    squared weight units): first at the identity, then after every coordinate step.
    """

    perms: dict[str, torch.Tensor]
    objective: tuple[float, ...]
    passes: int
    converged: bool


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, the form ``permutation_spec_for`` and ``PermutationSpec.check`` take."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return default if value is None else value


def _blocks(names: Iterable[str], pattern: str) -> list[str]:
    """Block prefixes (``model.layers.3``) of tensors matching ``pattern``, in layer order."""
    found = []
    for name in names:
        m = re.fullmatch(pattern, name)
        if m:
            prefix = m.group(1)
            found.append((prefix.rsplit(".", 1)[0], int(prefix.rsplit(".", 1)[1]), prefix))
    return [prefix for _, _, prefix in sorted(found)]


def _with_biases(
    axes: list[PermutedAxis], biases: list[tuple[str, int]], names: Collection[str]
) -> tuple[PermutedAxis, ...]:
    """``axes`` plus the bias axes (name, block) that exist in ``names``."""
    return tuple(axes + [PermutedAxis(t, 0, block) for t, block in biases if t in names])


def _llama_spec(config: Any, names: Collection[str], heads: bool) -> list[Permutation]:
    hidden = int(_get(config, "hidden_size"))
    n_heads = int(_get(config, "num_attention_heads"))
    n_kv = int(_get(config, "num_key_value_heads", n_heads))
    head_dim = int(_get(config, "head_dim", hidden // n_heads))
    inter = int(_get(config, "intermediate_size"))
    if n_heads % n_kv:
        raise AlignmentError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    q_block = (n_heads // n_kv) * head_dim  # query heads that share one key/value head move together
    perms = []
    for block in _blocks(names, r"(.*layers\.\d+)\.mlp\.gate_proj\.weight"):
        mlp = f"{block}.mlp"
        axes = [PermutedAxis(f"{mlp}.{p}.weight", 0) for p in ("gate_proj", "up_proj")]
        axes.append(PermutedAxis(f"{mlp}.down_proj.weight", 1))
        biases = [(f"{mlp}.{p}.bias", 1) for p in ("gate_proj", "up_proj")]
        perms.append(Permutation(f"{mlp}.hidden", inter, _with_biases(axes, biases, names)))
        if heads:
            att = f"{block}.self_attn"
            width = {"q_proj": q_block, "k_proj": head_dim, "v_proj": head_dim}
            axes = [PermutedAxis(f"{att}.{p}.weight", 0, w) for p, w in width.items()]
            axes.append(PermutedAxis(f"{att}.o_proj.weight", 1, q_block))
            biases = [(f"{att}.{p}.bias", w) for p, w in width.items()]
            perms.append(Permutation(f"{att}.kv_heads", n_kv, _with_biases(axes, biases, names)))
    return perms


def _bert_spec(config: Any, names: Collection[str], heads: bool) -> list[Permutation]:
    hidden = int(_get(config, "hidden_size"))
    n_heads = int(_get(config, "num_attention_heads"))
    head_dim = hidden // n_heads
    inter = int(_get(config, "intermediate_size"))
    perms = []
    for block in _blocks(names, r"(.*encoder\.layer\.\d+)\.intermediate\.dense\.weight"):
        axes = [PermutedAxis(f"{block}.intermediate.dense.weight", 0), PermutedAxis(f"{block}.output.dense.weight", 1)]
        biases = [(f"{block}.intermediate.dense.bias", 1)]
        perms.append(Permutation(f"{block}.intermediate", inter, _with_biases(axes, biases, names)))
        if heads:
            att = f"{block}.attention"
            axes = [PermutedAxis(f"{att}.self.{p}.weight", 0, head_dim) for p in ("query", "key", "value")]
            axes.append(PermutedAxis(f"{att}.output.dense.weight", 1, head_dim))
            biases = [(f"{att}.self.{p}.bias", head_dim) for p in ("query", "key", "value")]
            perms.append(Permutation(f"{att}.heads", n_heads, _with_biases(axes, biases, names)))
    return perms


def mlp_permutation_spec(layers: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> PermutationSpec:
    """Spec for a plain MLP of linear layers ``layers`` (module names, input to output).

    The hidden units between ``layers[k]`` and ``layers[k+1]`` are one permutation: rows (and bias)
    of the first, columns of the second. Exact for elementwise activations between the layers; a
    norm with per-unit parameters in between would have to be permuted too and is not handled.
    """
    perms = []
    for first, second in zip(layers[:-1], layers[1:]):
        if f"{first}.weight" not in shapes:
            raise AlignmentError(f"no weight for linear layer {first!r}", tensor=f"{first}.weight")
        axes = [PermutedAxis(f"{first}.weight", 0), PermutedAxis(f"{second}.weight", 1)]
        size = int(shapes[f"{first}.weight"][0])
        perms.append(Permutation(f"{first}.out", size, _with_biases(axes, [(f"{first}.bias", 1)], shapes)))
    return PermutationSpec(tuple(perms))


def permutation_spec_for(
    config: Mapping[str, Any] | Any, shapes: Mapping[str, Sequence[int]], *, heads: bool = True
) -> PermutationSpec:
    """Derive the permutation spec of a model from its config (dict or transformers config) and tensor shapes.

    Llama-style (``llama``, ``mistral``, ``qwen2``): per block the MLP hidden units (gate/up rows,
    down columns) and, with ``heads``, whole key/value heads with their query groups (q/k/v rows,
    o columns). BERT-style (``bert``, ``roberta``): intermediate units (rows + bias, output.dense
    columns) and whole heads. ``model_type: mlp`` with ``layers: [names]``: a plain MLP
    (``mlp_permutation_spec``). Tensor names may carry any prefix (``model.``, ``bert.``).
    """
    model_type = _get(config, "model_type")
    if model_type in LLAMA_LIKE:
        perms = _llama_spec(config, shapes, heads)
    elif model_type in BERT_LIKE:
        perms = _bert_spec(config, shapes, heads)
    elif model_type == "mlp":
        layers = _get(config, "layers")
        if not isinstance(layers, Sequence) or len(layers) < 2:
            raise AlignmentError("an mlp config needs 'layers': the names of two or more linear layers")
        return mlp_permutation_spec(list(layers), shapes)
    else:
        raise AlignmentError(
            f"no permutation spec for model_type {model_type!r}",
            hint=f"supported: {', '.join(LLAMA_LIKE + BERT_LIKE)}, mlp; or build a PermutationSpec by hand",
        )  # fmt: skip
    if not perms:
        raise AlignmentError(f"found no {model_type} blocks among the tensor names", hint="is this the right config?")
    spec = PermutationSpec(tuple(perms))
    return spec


def _index(perm: torch.Tensor, block: int) -> torch.Tensor:
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block, device=perm.device)).reshape(-1)


def permute_tensor(
    name: str, tensor: torch.Tensor, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Apply to one tensor every permutation the spec puts on it (returned unchanged if none)."""
    for pname, ax in spec.axes_of(name):
        tensor = tensor.index_select(ax.axis, _index(perms[pname].to(tensor.device), ax.block))
    return tensor


def _check_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    for p in spec.perms:
        if p.name not in perms:
            raise AlignmentError(f"no permutation given for {p.name}")
        got = perms[p.name]
        if got.shape != (p.size,) or not torch.equal(torch.sort(got.cpu()).values, torch.arange(p.size)):
            raise AlignmentError(f"{p.name} is not a permutation of {p.size} units", hint="pass Matching.perms")


def apply_permutation(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every permuted axis reordered (P(B)); other tensors are shared, not copied.

    For a spec from ``permutation_spec_for`` the permuted model computes exactly the same function.
    """
    _check_perms(spec, perms)
    spec.check(shapes_of({t: state_dict[t] for t in spec.tensors if t in state_dict}), label="state dict")
    return {name: permute_tensor(name, t, spec, perms) for name, t in state_dict.items()}


def _check_pair(spec: PermutationSpec, ref: Mapping[str, Sequence[int]], other: Mapping[str, Sequence[int]],
                ref_label: str, other_label: str) -> None:  # fmt: skip
    spec.check(ref, label=ref_label)
    spec.check(other, label=other_label)
    for t in spec.tensors:
        if tuple(ref[t]) != tuple(other[t]):
            raise AlignmentError(
                f"shape {list(other[t])} in model {other_label} differs from {list(ref[t])} in reference {ref_label}",
                file=other_label, tensor=t, hint="models must share one architecture",
            )  # fmt: skip


def _flat(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    return t.movedim(axis, 0).reshape(size, -1)


def _similarity(
    ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor], p: Permutation,
) -> torch.Tensor:  # fmt: skip
    """C[i, j] = Σ_w ⟨unit i of A_w, unit j of B_w⟩ along p's axis, B's other axes permuted as now."""
    sim = torch.zeros(p.size, p.size, dtype=torch.float64, device=next(iter(ref.values())).device)
    for ax in p.axes:
        b = other[ax.tensor]
        for q, other_ax in spec.axes_of(ax.tensor):
            if q != p.name:
                b = b.index_select(other_ax.axis, _index(perms[q], other_ax.block))
        sim += _flat(ref[ax.tensor], ax.axis, p.size) @ _flat(b, ax.axis, p.size).T
    return sim


def match_weights(
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    max_iter: int = 100,
    seed: int = 0,
    tol: float = 1e-12,
) -> Matching:
    """Weight matching: permutations of ``other``'s units that maximise Σ_w ⟨A_w, P(B)_w⟩.

    Starts at the identity; each pass visits the permutations in a seeded random order and replaces
    each by the linear assignment that is optimal with the others fixed, so the objective never
    decreases. A permutation is solved again only after one it shares a tensor with has changed, so
    uncoupled permutations (every one in a transformer spec) cost one assignment each. Stops when
    no step gains more than ``tol`` (relative) or after ``max_iter`` passes. Similarities are fp64
    on the tensors' device, assignments on the CPU; only the spec's tensors are read. Minimising
    ‖A − P(B)‖² over the spec's tensors is the same problem, since ‖P(B)‖ = ‖B‖.
    """
    _check_pair(spec, shapes_of({t: ref[t] for t in spec.tensors if t in ref}),
                shapes_of({t: other[t] for t in spec.tensors if t in other}), "reference", "model")  # fmt: skip
    a = {t: ref[t].detach().to(torch.float64) for t in spec.tensors}
    b = {t: other[t].detach().to(device=a[t].device, dtype=torch.float64) for t in spec.tensors}
    for label, tensors in (("reference", a), ("model", b)):
        for t, x in tensors.items():
            if not torch.isfinite(x).all():
                raise AlignmentError(f"non-finite values in the {label}", tensor=t, hint="cannot match NaN/Inf weights")
    device = a[spec.tensors[0]].device if spec.tensors else torch.device("cpu")
    coupled: dict[str, set[str]] = {p.name: set() for p in spec.perms}
    for t in spec.tensors:
        names = {q for q, _ in spec.axes_of(t)}
        for q in names:
            coupled[q] |= names - {q}
    perms = {p.name: torch.arange(p.size, device=device) for p in spec.perms}
    stale = set(perms)  # permutations whose assignment may no longer be optimal
    objective = sum(float((a[t] * b[t]).sum()) for t in spec.tensors)
    trace = [objective]
    order_gen = torch.Generator().manual_seed(seed)
    passes = 0
    while stale and passes < max_iter:
        passes += 1
        for k in torch.randperm(len(spec.perms), generator=order_gen).tolist():
            p = spec.perms[k]
            if p.name not in stale:
                continue
            stale.discard(p.name)
            sim = _similarity(a, b, spec, perms, p).cpu().numpy()
            old = float(sim[np.arange(p.size), perms[p.name].cpu().numpy()].sum())
            rows, cols = linear_sum_assignment(sim, maximize=True)
            new = float(sim[rows, cols].sum())
            if new - old > tol * max(1.0, abs(objective)):
                perms[p.name] = torch.as_tensor(np.asarray(cols), dtype=torch.int64, device=device)
                objective += new - old
                stale |= coupled[p.name]
            trace.append(objective)
    converged = not stale
    log.debug("weight matching: %d permutations, %d passes, objective %.6g -> %.6g", len(spec.perms), passes,
              trace[0], trace[-1])  # fmt: skip
    return Matching(perms={k: v.cpu() for k, v in perms.items()}, objective=tuple(trace), passes=passes,
                    converged=converged)  # fmt: skip


def weight_distance(
    ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor] | None = None,
) -> float:  # fmt: skip
    """‖A − P(B)‖ (Frobenius, fp64) over the spec's tensors; ``perms=None`` means the identity."""
    total = 0.0
    for t in spec.tensors:
        b = other[t] if perms is None else permute_tensor(t, other[t], spec, perms)
        total += float((ref[t].to(torch.float64) - b.to(torch.float64)).pow(2).sum())
    return total**0.5


# ---------------------------------------------------------------------------------------------
# Checkpoint directories: match block by block, write permuted HF-layout copies.


@dataclass(frozen=True)
class AlignReport:
    """What ``align_checkpoints`` did. Distances are Frobenius norms over the permuted tensors (weight units)."""

    permutations: int
    units: int
    moved_units: int
    distance_before: float
    distance_after: float
    max_passes: int
    outputs: tuple[str, ...]
    seconds: float


def _read(ckpt: Checkpoint, name: str) -> torch.Tensor:
    return open_shard(ckpt.shard_of[name]).read_rows(ckpt.entries[name])


def _write_permuted(
    ckpt: Checkpoint, spec: PermutationSpec, perms: Mapping[str, torch.Tensor], staging: Path, *,
    extra: Mapping[str, bytes], label: str, progress: bool,
) -> None:  # fmt: skip
    """Write a permuted copy of ``ckpt`` into the empty directory ``staging``: the input's shard
    layout, index, config and tokenizer files, and ``extra`` (name → bytes) under ``.raymerge/``.

    Works one input shard at a time, so host memory is about one shard.
    """
    from safetensors.torch import save_file

    shards = sorted(set(ckpt.shard_of.values()))
    total = sum(e.nbytes for e in ckpt.entries.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"write {label}", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:  # fmt: skip
        for url in shards:
            reader = open_shard(url)
            tensors = {}
            for name, entry in sorted(reader.entries.items(), key=lambda kv: kv[1].start):
                tensors[name] = permute_tensor(name, reader.read_rows(entry), spec, perms).contiguous()
                bar.update(entry.nbytes)
            save_file(tensors, str(staging / posixpath.basename(url.replace(os.sep, "/"))),
                      metadata={"format": "pt", **reader.metadata})  # fmt: skip
            del tensors
    copy_side_files(ckpt.url, staging, (INDEX, *SIDE_FILES))
    (staging / META).mkdir()
    for fname, data in extra.items():
        (staging / META / fname).write_bytes(data)


def align_checkpoints(
    reference: str,
    model: str,
    out: str | Path,
    *,
    also: Sequence[tuple[str, str | Path]] = (),
    heads: bool = True,
    max_iter: int = 100,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> AlignReport:
    """Align checkpoint ``model`` (B) to ``reference`` (A) and write P(B) to ``out``; each
    ``(expert, expert_out)`` in ``also`` (experts fine-tuned from B) is written permuted the same way.

    Headers are checked first (names, shapes, architecture) for every input, before any tensor is
    read. Matching runs one independent group of permutations (a transformer block) at a time, so
    host memory is about four fp64 copies of one block's MLP and attention weights plus one shard
    while writing. Outputs are Hugging Face directories with the inputs' shard layout, config and
    tokenizer files, plus ``.raymerge/permutations.safetensors`` and ``.raymerge/alignment.json``;
    each is a local path or a URL and appears whole or not at all (``publish.ModelPublication``).
    """
    from safetensors.torch import save

    start = time.perf_counter()
    ref_ckpt, model_ckpt = open_checkpoint(reference), open_checkpoint(model)
    jobs = [(model_ckpt, out)] + [(open_checkpoint(src), dst) for src, dst in also]
    pubs = [ModelPublication(dst, overwrite=overwrite, progress=progress, error=AlignmentError) for _, dst in jobs]
    outs = [pub.target for pub in pubs]
    if len(set(outs)) != len(outs):
        raise AlignmentError("two outputs share one directory", hint="give every --also its own OUT_DIR")
    inputs = sorted({c.url for c, _ in jobs} | {ref_ckpt.url})
    for pub in pubs:
        pub.check(inputs)
    shapes = {k: e.shape for k, e in model_ckpt.entries.items()}
    spec = permutation_spec_for(model_ckpt.config, shapes, heads=heads)
    _check_pair(spec, {k: e.shape for k, e in ref_ckpt.entries.items()}, shapes, ref_ckpt.url, model_ckpt.url)
    for ckpt, _ in jobs[1:]:
        _check_pair(spec, shapes, {k: e.shape for k, e in ckpt.entries.items()}, model_ckpt.url, ckpt.url)
    for t in spec.tensors:
        if not model_ckpt.entries[t].is_float:
            raise AlignmentError("permuted tensors must be floating point", file=model_ckpt.url, tensor=t)
    perms: dict[str, torch.Tensor] = {}
    sq_before = sq_after = 0.0
    max_passes = 0
    groups = spec.components()
    for group in tqdm(groups, desc="match", unit="block", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        a = {t: _read(ref_ckpt, t) for t in group.tensors}
        b = {t: _read(model_ckpt, t) for t in group.tensors}
        result = match_weights(a, b, group, max_iter=max_iter, seed=seed)
        perms.update(result.perms)
        sq_before += weight_distance(a, b, group) ** 2
        sq_after += weight_distance(a, b, group, result.perms) ** 2
        max_passes = max(max_passes, result.passes)
        if not result.converged:
            log.warning("weight matching for %s stopped after %d passes without converging",
                        ", ".join(p.name for p in group.perms), result.passes)  # fmt: skip
    units = sum(p.size for p in spec.perms)
    moved = sum(int((perms[p.name] != torch.arange(p.size)).sum()) for p in spec.perms)
    report = AlignReport(
        permutations=len(spec.perms), units=units, moved_units=moved, distance_before=sq_before**0.5,
        distance_after=sq_after**0.5, max_passes=max_passes, outputs=tuple(outs), seconds=0.0,
    )  # fmt: skip
    summary = {
        "reference": ref_ckpt.url, "model": model_ckpt.url, "method": "weight_matching", "heads": heads,
        "seed": seed, "max_iter": max_iter, "permutations": report.permutations, "units": units,
        "moved_units": moved, "distance_before": report.distance_before, "distance_after": report.distance_after,
    }  # fmt: skip
    extra = {
        "permutations.safetensors": save({k: v.contiguous() for k, v in perms.items()}),
        "alignment.json": json.dumps(summary, indent=1).encode(),
    }
    for (ckpt, _), pub in zip(jobs, pubs):
        with pub:
            label = pub.target.rstrip("/").rsplit("/", 1)[-1]
            _write_permuted(ckpt, spec, perms, pub.start(), extra=extra, label=label, progress=progress)
            pub.publish()
    report = replace(report, seconds=time.perf_counter() - start)
    log.info("aligned %s to %s: %d of %d units moved, distance %.6g -> %.6g", model_ckpt.url, ref_ckpt.url, moved,
             units, report.distance_before, report.distance_after)  # fmt: skip
    return report
