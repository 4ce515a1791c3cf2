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
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from raymerge.engine.errors import AlignmentError
from raymerge.engine.outpath import check_output_path
from raymerge.engine.permutation import (
    Permutation,
    PermutationSpec,
    PermutedAxis,
    apply_permutation,
    mlp_permutation_spec,
    permutation_spec_for,
    permute_tensor,
    shapes_of,
    unit_index,
)
from raymerge.engine.publish import INDEX, META, SIDE_FILES, ModelPublication, copy_side_files
from raymerge.engine.sidefiles import check_side_files
from raymerge.engine.storage import Checkpoint, open_checkpoint, open_shard
from raymerge.engine.urls import redact

log = logging.getLogger(__name__)


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


def _check_pair(
    spec: PermutationSpec,
    ref: Mapping[str, Sequence[int]],
    other: Mapping[str, Sequence[int]],
    ref_label: str,
    other_label: str,
) -> None:
    spec.check(ref, label=ref_label)
    spec.check(other, label=other_label)
    for t in spec.tensors:
        if tuple(ref[t]) != tuple(other[t]):
            raise AlignmentError(
                f"shape {list(other[t])} in model {other_label} differs from {list(ref[t])} in reference {ref_label}",
                file=other_label,
                tensor=t,
                hint="models must share one architecture",
            )


def _flat(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    return t.movedim(axis, 0).reshape(size, -1)


def _similarity(
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    p: Permutation,
) -> torch.Tensor:
    """C[i, j] = Σ_w ⟨unit i of A_w, unit j of B_w⟩ along p's axis, B's other axes permuted as now."""
    sim = torch.zeros(p.size, p.size, dtype=torch.float64, device=next(iter(ref.values())).device)
    for ax in p.axes:
        b = other[ax.tensor]
        for q, other_ax in spec.axes_of(ax.tensor):
            if q != p.name:
                b = b.index_select(other_ax.axis, unit_index(perms[q], other_ax.block))
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
    _check_pair(
        spec,
        shapes_of({t: ref[t] for t in spec.tensors if t in ref}),
        shapes_of({t: other[t] for t in spec.tensors if t in other}),
        "reference",
        "model",
    )
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
    log.debug(
        "weight matching: %d permutations, %d passes, objective %.6g -> %.6g",
        len(spec.perms),
        passes,
        trace[0],
        trace[-1],
    )
    return Matching(
        perms={k: v.cpu() for k, v in perms.items()}, objective=tuple(trace), passes=passes, converged=converged
    )


def weight_distance(
    ref: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor] | None = None,
) -> float:
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
    ckpt: Checkpoint,
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    staging: Path,
    *,
    extra: Mapping[str, bytes],
    label: str,
    progress: bool,
) -> None:
    """Write a permuted copy of ``ckpt`` into the empty directory ``staging``: the input's shard
    layout, index, config and tokenizer files, and ``extra`` (name → bytes) under ``.raymerge/``.

    Works one input shard at a time, so host memory is about one shard.
    """
    from safetensors.torch import save_file

    shards = sorted(set(ckpt.shard_of.values()))
    total = sum(e.nbytes for e in ckpt.entries.values())
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"write {label}",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        for url in shards:
            reader = open_shard(url)
            tensors = {}
            for name, entry in sorted(reader.entries.items(), key=lambda kv: kv[1].start):
                tensors[name] = permute_tensor(name, reader.read_rows(entry), spec, perms).contiguous()
                bar.update(entry.nbytes)
            save_file(
                tensors,
                str(staging / posixpath.basename(url.replace(os.sep, "/"))),
                metadata={"format": "pt", **reader.metadata},
            )
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
    for dst in [out, *(d for _, d in also)]:
        check_output_path(str(dst))
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
    for ckpt, _ in jobs:  # copied into the outputs: refuse an unsafe side file before any work
        check_side_files(ckpt.url, SIDE_FILES)
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
            log.warning(
                "weight matching for %s stopped after %d passes without converging",
                ", ".join(p.name for p in group.perms),
                result.passes,
            )
    units = sum(p.size for p in spec.perms)
    moved = sum(int((perms[p.name] != torch.arange(p.size)).sum()) for p in spec.perms)
    report = AlignReport(
        permutations=len(spec.perms),
        units=units,
        moved_units=moved,
        distance_before=sq_before**0.5,
        distance_after=sq_after**0.5,
        max_passes=max_passes,
        outputs=tuple(outs),
        seconds=0.0,
    )
    summary = {
        "reference": redact(ref_ckpt.url),  # written into the outputs: no credentials
        "model": redact(model_ckpt.url),
        "method": "weight_matching",
        "heads": heads,
        "seed": seed,
        "max_iter": max_iter,
        "permutations": report.permutations,
        "units": units,
        "moved_units": moved,
        "distance_before": report.distance_before,
        "distance_after": report.distance_after,
    }
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
    log.info(
        "aligned %s to %s: %d of %d units moved, distance %.6g -> %.6g",
        model_ckpt.url,
        ref_ckpt.url,
        moved,
        units,
        report.distance_before,
        report.distance_after,
    )
    return report


__all__ = [
    "AlignReport",
    "Matching",
    "Permutation",
    "PermutationSpec",
    "PermutedAxis",
    "align_checkpoints",
    "apply_permutation",
    "match_weights",
    "mlp_permutation_spec",
    "permutation_spec_for",
    "permute_tensor",
    "shapes_of",
    "weight_distance",
]
