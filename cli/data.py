"""``raymerge stats`` and ``raymerge tact compute|fold|show``: data-based statistics and corrections.

The statistics backend is chosen here, the one place that knows both: ``LocalStatsBackend``
(``raymerge.engine.stats``) or Ray actors (``raymerge.cluster.stats``) for ``--executor ray``.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymerge.cli.options import positive_int, positive_size
from raymerge.engine.errors import RaymergeError

if TYPE_CHECKING:
    from raymerge.engine.stats import DataSpec, StatsBackend


def _data_spec(args: argparse.Namespace) -> DataSpec:
    from raymerge.engine.stats import DataSpec

    return DataSpec(
        files=tuple(args.data),
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_examples=args.max_examples,
    )


def _stats_backend(args: argparse.Namespace, model_dir: str, work_dir: str) -> StatsBackend:
    """The local backend, or Ray actors for ``--executor ray`` (raymerge.cluster)."""
    from raymerge.engine.stats import LocalStatsBackend

    if args.executor == "ray":
        from raymerge.cluster.stats import RayStatsBackend

        return RayStatsBackend(
            model_dir,
            _data_spec(args),
            work_dir=work_dir,
            actors=args.actors,
            device=args.device,
            memory_budget=args.memory_budget,
            offload=args.offload or None,
            address=args.address,
        )
    return LocalStatsBackend(
        model_dir,
        _data_spec(args),
        device=args.device,
        memory_budget=args.memory_budget,
        offload=args.offload or None,
        progress=not args.quiet,
    )


def cmd_stats(args: argparse.Namespace) -> int:
    import torch

    from raymerge.engine.stats import collect_stats

    backend = _stats_backend(args, args.model, args.out)
    try:
        res = collect_stats(
            args.model,
            _data_spec(args),
            args.out,
            points=args.points,
            grams=not args.no_grams,
            gram_layers=args.gram_layers,
            gram_dtype=getattr(torch, args.gram_dtype),
            backend=backend,
        )
    finally:
        backend.close()
    print(f"{res.batches} batches, {res.tokens} tokens, {res.passes} pass(es) in {res.seconds:.1f} s")
    if res.grams_path:
        print(f"grams    {res.grams_path}  ({len(res.gram_rows)} linear layers; regmean parameter `grams:`)")
    if res.points:
        print(f"moments  {Path(args.out) / 'moments.safetensors'}  ({len(res.points)} points)")
    return 0


def cmd_tact_compute(args: argparse.Namespace) -> int:
    from raymerge.engine.tact import compute_corrections, fold_corrections

    task = args.task or Path(args.expert).name
    out = Path(args.out)
    if args.fold and (out / task).exists() and not args.overwrite:
        raise RaymergeError("output directory exists", file=str(out / task), hint="pass --overwrite to replace it")
    args.tokenizer = args.tokenizer or args.expert  # both models read the text with the expert's tokenizer

    def backend(model: str, data: Any) -> StatsBackend:
        return _stats_backend(args, model, str(out))

    with contextlib.ExitStack() as stack:
        if args.executor == "ray":
            from raymerge.cluster.connect import RayConnection

            stack.enter_context(RayConnection(args.address))  # one Ray session for both models' actors
        corr = compute_corrections(
            args.expert,
            args.merged,
            _data_spec(args),
            args.points,
            task=task,
            eps=args.eps,
            backend=backend,
            require_foldable=args.fold,
        )
    path = corr.save(out / "corrections" / f"{task}.safetensors")
    _print_collapse(corr)
    print(f"corrections  {path}  ({len(corr.points)} points, {corr.tokens} tokens)")
    if args.fold:
        print(f"folded model {fold_corrections(args.merged, corr, out / task, overwrite=args.overwrite)}")
    return 0


def _print_collapse(corr: Any) -> None:
    print(f"{'point':<56} σ_merged/σ_expert (mean over channels)")
    for point, ratio in corr.collapse().items():
        print(f"{point:<56} {ratio:.3f}")


def cmd_tact_fold(args: argparse.Namespace) -> int:
    from raymerge.engine.tact import fold_corrections

    print(f"folded model {fold_corrections(args.merged, args.corrections, args.out, overwrite=args.overwrite)}")
    return 0


def cmd_tact_show(args: argparse.Namespace) -> int:
    from raymerge.engine.tact import Corrections

    corr = Corrections.load(args.corrections)
    print(f"task {corr.task}: {len(corr.points)} points, eps {corr.eps:g}, {corr.tokens} tokens")
    _print_collapse(corr)
    return 0


def _add_data_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE",
        help="unlabelled data: .jsonl/.json/.txt text, or .pt/.safetensors tensors (repeatable)",
    )
    sp.add_argument("--tokenizer", default=None, help="tokenizer directory for text data (default: the model's)")
    sp.add_argument("--text-field", default="text", help="JSON key holding the text (default: text)")
    sp.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass (default 8)")
    sp.add_argument(
        "--max-length", type=positive_int, default=512, help="truncate text to this many tokens (default 512)"
    )
    sp.add_argument("--max-examples", type=positive_int, default=None, help="use at most this many examples")
    sp.add_argument(
        "--points",
        nargs="+",
        default=["default"],
        metavar="MODULE",
        help="module names or glob patterns for per-channel statistics; 'default' = attention "
        "output, MLP pre-activation and output of every block; 'none'",
    )
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where forward passes run")
    sp.add_argument(
        "--memory-budget",
        type=positive_size,
        default=None,
        help="host memory for weights and statistics; larger models are offloaded to disk",
    )
    sp.add_argument("--offload", action="store_true", help="always load through accelerate with disk offload")
    sp.add_argument("--executor", choices=["local", "ray"], default="local", help="where forward passes run")
    sp.add_argument(
        "--actors", type=positive_int, default=2, help="Ray actors, each with a shard of the data (default 2)"
    )
    sp.add_argument("--address", default=None, help="Ray cluster to join (auto | HOST:PORT); default: embedded")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_data_commands(sub: Any) -> None:
    """``stats`` and ``tact compute|fold|show``."""
    sp = sub.add_parser("stats", help="collect input Grams (for regmean) and activation moments from data")
    sp.add_argument("model", help="Hugging Face model directory")
    sp.add_argument("--out", required=True, help="output directory: grams.safetensors, moments.safetensors, stats.json")
    _add_data_options(sp)
    sp.add_argument("--no-grams", action="store_true", help="moments only")
    sp.add_argument(
        "--gram-layers",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="glob patterns of nn.Linear modules to collect Grams for (default: all)",
    )
    sp.add_argument(
        "--gram-dtype",
        choices=["float32", "float64"],
        default="float32",
        help="dtype of the stored Grams (accumulation is fp64 on CPU)",
    )
    sp.set_defaults(fn=cmd_stats)

    tact = sub.add_parser("tact", help="TACT: per-task activation corrections of a merged model")
    tsub = tact.add_subparsers(dest="tact_cmd", required=True)
    sp = tsub.add_parser("compute", help="corrections of MERGED towards EXPERT on the task's data")
    sp.add_argument("--expert", required=True, help="the task's expert (model directory)")
    sp.add_argument("--merged", required=True, help="the merged model directory")
    sp.add_argument("--task", default=None, help="task name (default: the expert directory's name)")
    sp.add_argument("--out", required=True, help="writes OUT/corrections/TASK.safetensors (and OUT/TASK/ with --fold)")
    sp.add_argument("--eps", type=float, default=1e-6, help="added to the merged variance (default 1e-6)")
    sp.add_argument(
        "--fold",
        action="store_true",
        help="also write OUT/TASK/, the merged model with the corrections folded into its weights",
    )
    sp.add_argument("--overwrite", action="store_true", help="replace an existing OUT/TASK/")
    _add_data_options(sp)
    sp.set_defaults(fn=cmd_tact_compute)
    sp = tsub.add_parser("fold", help="write a per-task model directory with the corrections folded in")
    sp.add_argument("--merged", required=True, help="the merged model directory the corrections were computed for")
    sp.add_argument("--corrections", required=True, help="a corrections/TASK.safetensors file")
    sp.add_argument("--out", required=True, help="output model directory")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    sp.set_defaults(fn=cmd_tact_fold)
    sp = tsub.add_parser("show", help="print a corrections file: points and variance collapse")
    sp.add_argument("corrections", help="a corrections/TASK.safetensors file")
    sp.set_defaults(fn=cmd_tact_show)


__all__ = ["add_data_commands"]
