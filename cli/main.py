"""The ``raymerge`` command line: plan, run, demo.

Every ``RaymergeError`` becomes one readable line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymerge.engine import __version__
from raymerge.engine.errors import RaymergeError
from raymerge.engine.plan import DEFAULT_SHARD_BYTES, build_plan, check_budget, fmt_bytes
from raymerge.engine.recipe import Recipe
from raymerge.engine.storage import is_local

if TYPE_CHECKING:
    from raymerge.engine.stats import DataSpec, StatsBackend

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """``"2GiB"`` → 2147483648; plain integers are bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500MB, 2GiB, 1073741824)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _load(args: argparse.Namespace) -> Recipe:
    """The recipe file with command-line opt-ins applied (``--allow-pickle``)."""
    from raymerge.engine.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.allow_pickle and not recipe.raymerge.allow_pickle_bin:
        options = recipe.raymerge.model_copy(update={"allow_pickle_bin": True})
        recipe = recipe.model_copy(update={"raymerge": options})
    return recipe


def cmd_plan(args: argparse.Namespace) -> int:
    from raymerge.engine.executor import default_memory_budget

    recipe = _load(args)
    plan = build_plan(recipe, out_shard_bytes=args.out_shard_size)
    budget = args.memory_budget or default_memory_budget()
    summary = plan.summary()
    summary["memory_budget"] = budget
    if args.json:
        summary["task_list"] = [
            {"id": t.id, "class": t.tensor_class, "read_bytes": t.read_bytes, "write_bytes": t.write_bytes,
             "est_host_bytes": t.est_host_bytes, "flops": t.flops}
            for t in plan.tasks
        ]  # fmt: skip
        print(json.dumps(summary, indent=1))
    else:
        print(f"method      {summary['method']}  ({len(plan.models)} models)")
        print(f"tensors     {summary['tensors']}  in {summary['tasks']} tasks  {summary['tasks_by_class']}")
        print(f"read        {fmt_bytes(summary['read_bytes'])}")
        print(f"write       {fmt_bytes(summary['write_bytes'])}  in {len(plan.shards)} shard(s)")
        print(f"peak task   {fmt_bytes(summary['peak_task_host_bytes'])} host  (budget {fmt_bytes(budget)})")
        print(f"flops       {summary['flops']:.3g}")
        biggest = sorted(plan.tasks, key=lambda t: -t.est_host_bytes)[:5]
        print("largest tasks:")
        for t in biggest:
            print(f"  {t.id:<60} {fmt_bytes(t.est_host_bytes):>12}")
    check_budget(plan, budget)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from raymerge.engine.merge import format_figures, merge

    recipe = _load(args)
    figures = merge(
        recipe, args.out, memory_budget=args.memory_budget, workers=args.workers,
        out_shard_bytes=args.out_shard_size, overwrite=args.overwrite, progress=not args.quiet, device=args.device,
        executor=args.executor, address=args.address,
    )  # fmt: skip
    print(format_figures(figures))
    print(f"wrote {Path(args.out).absolute() if is_local(args.out) else args.out}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    import os

    from raymerge.cluster.submit import DEFAULT_DASHBOARD, submit_merge

    run_args = [] if args.out_shard_size == DEFAULT_SHARD_BYTES else ["--out-shard-size", str(args.out_shard_size)]
    if args.memory_budget:
        run_args += ["--memory-budget", str(args.memory_budget)]
    if args.workers:
        run_args += ["--workers", str(args.workers)]
    if args.device:
        run_args += ["--device", args.device]
    if args.overwrite:
        run_args.append("--overwrite")
    if args.allow_pickle:
        run_args.append("--allow-pickle")
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_DASHBOARD
    return submit_merge(args.recipe, args.out, address=address, run_args=run_args, wait=not args.no_wait,
                        job_id=args.job_id)  # fmt: skip


def cmd_verify(args: argparse.Namespace) -> int:
    from raymerge.engine.verify import verify_model

    rep = verify_model(args.model)
    print(
        f"ok: {rep.tensors} tensors in {rep.shards} shard(s); {rep.tasks_checked} task checksums "
        f"over {fmt_bytes(rep.bytes_checked)} match; all floating-point values finite"
    )
    return 0


def describe_methods(name: str | None = None) -> str:
    """``raymerge methods``: every method with its reference, or one method's parameters."""
    from raymerge.engine.methods import METHODS
    from raymerge.engine.recipe import suggest

    if name is None:
        shown = {n: (", ".join(p.name for p in spec.params) or "-", spec.reference)
                 for n, spec in sorted(METHODS.items()) if n != "mean_task_vector"}  # fmt: skip
        w1, w2 = max(map(len, shown)), max(len(v[0]) for v in shown.values())
        rows = [f"{n:<{w1}}  {ps:<{w2}}  {ref}" for n, (ps, ref) in shown.items()]
        return "\n".join([f"{'method':<{w1}}  {'parameters':<{w2}}  reference", *rows])
    if name not in METHODS:
        raise RaymergeError(f"unknown method {name!r}", hint=suggest(name, METHODS))
    spec = METHODS[name]
    lines = [f"{name}: {spec.reference}"]
    applies = "all tensors" if len(spec.applies_to) == 4 else ", ".join(sorted(spec.applies_to)) + " tensors"
    lines.append(f"  applies to {applies}" + (f"; others get {spec.fallback!r}" if spec.fallback else ""))
    lines.append("  needs a base model" if spec.needs_base else "  no base model needed")
    for p in spec.params:
        default = "required" if p.required else f"default {p.default!r}"
        where = "per model" if p.scope.value == "model" else "top-level"
        allowed = f"one of {', '.join(p.choices)}" if p.choices else p.allowed() if p.kind in (int, float) else p.kind.__name__
        lines.append(f"  {p.name:<22} {where:<9} {default:<16} {allowed}" + (f" — {p.help}" if p.help else ""))
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    print(describe_methods(args.name))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from raymerge.engine.demo import run_demo

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="raymerge-demo-"))
    return run_demo(workdir, size=args.size)


def _also_pair(text: str) -> tuple[str, str]:
    """``EXPERT_DIR:OUT_DIR`` → the pair; split at the last colon so URLs (``s3://…``) work as EXPERT_DIR."""
    src, sep, dst = text.rpartition(":")
    if not sep or not src or not dst:
        raise argparse.ArgumentTypeError(f"expected EXPERT_DIR:OUT_DIR, got {text!r}")
    return src, dst


def cmd_align(args: argparse.Namespace) -> int:
    from raymerge.engine.align import align_checkpoints

    rep = align_checkpoints(
        args.reference, args.model, args.out, also=args.also, heads=not args.no_heads, max_iter=args.max_iter,
        seed=args.seed, overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip
    drop = 100 * (1 - rep.distance_after / rep.distance_before) if rep.distance_before else 0.0
    print(
        f"aligned {args.model} to {args.reference}: {rep.permutations} permutations, {rep.moved_units} of "
        f"{rep.units} units moved; weight distance {rep.distance_before:.6g} -> {rep.distance_after:.6g} "
        f"({drop:.1f}% lower) in {rep.seconds:.1f} s"
    )
    for out in rep.outputs:
        print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------------
# Data-based merging: `raymerge stats` (engine/stats.py) and `raymerge tact` (engine/tact.py).


def _data_spec(args: argparse.Namespace) -> DataSpec:
    from raymerge.engine.stats import DataSpec

    return DataSpec(
        files=tuple(args.data), tokenizer=args.tokenizer, text_field=args.text_field, batch_size=args.batch_size,
        max_length=args.max_length, max_examples=args.max_examples,
    )  # fmt: skip


def _stats_backend(args: argparse.Namespace, model_dir: str, work_dir: str) -> StatsBackend:
    """The local backend, or Ray actors for ``--executor ray`` (raymerge.cluster)."""
    from raymerge.engine.stats import LocalStatsBackend

    if args.executor == "ray":
        from raymerge.cluster.stats import RayStatsBackend

        return RayStatsBackend(
            model_dir, _data_spec(args), work_dir=work_dir, actors=args.actors, device=args.device,
            memory_budget=args.memory_budget, offload=args.offload or None, address=args.address,
        )  # fmt: skip
    return LocalStatsBackend(
        model_dir, _data_spec(args), device=args.device, memory_budget=args.memory_budget,
        offload=args.offload or None, progress=not args.quiet,
    )  # fmt: skip


def cmd_stats(args: argparse.Namespace) -> int:
    import torch

    from raymerge.engine.stats import collect_stats

    backend = _stats_backend(args, args.model, args.out)
    try:
        res = collect_stats(
            args.model, _data_spec(args), args.out, points=args.points, grams=not args.no_grams,
            gram_layers=args.gram_layers, gram_dtype=getattr(torch, args.gram_dtype), backend=backend,
        )  # fmt: skip
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
            args.expert, args.merged, _data_spec(args), args.points, task=task, eps=args.eps, backend=backend,
            require_foldable=args.fold,
        )  # fmt: skip
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
    sp.add_argument("--data", action="append", required=True, metavar="FILE",
                    help="unlabelled data: .jsonl/.json/.txt text, or .pt/.safetensors tensors (repeatable)")  # fmt: skip
    sp.add_argument("--tokenizer", default=None, help="tokenizer directory for text data (default: the model's)")
    sp.add_argument("--text-field", default="text", help="JSON key holding the text (default: text)")
    sp.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    sp.add_argument("--max-length", type=int, default=512, help="truncate text to this many tokens (default 512)")
    sp.add_argument("--max-examples", type=int, default=None, help="use at most this many examples")
    sp.add_argument("--points", nargs="+", default=["default"], metavar="MODULE",
                    help="module names or glob patterns for per-channel statistics; 'default' = attention "
                         "output, MLP pre-activation and output of every block; 'none'")  # fmt: skip
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where forward passes run")
    sp.add_argument("--memory-budget", type=parse_size, default=None,
                    help="host memory for weights and statistics; larger models are offloaded to disk")  # fmt: skip
    sp.add_argument("--offload", action="store_true", help="always load through accelerate with disk offload")
    sp.add_argument("--executor", choices=["local", "ray"], default="local", help="where forward passes run")
    sp.add_argument("--actors", type=int, default=2, help="Ray actors, each with a shard of the data (default 2)")
    sp.add_argument("--address", default=None, help="Ray cluster to join (auto | HOST:PORT); default: embedded")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_data_commands(sub: Any) -> None:
    """``stats`` and ``tact compute|fold|show``."""
    sp = sub.add_parser("stats", help="collect input Grams (for regmean) and activation moments from data")
    sp.add_argument("model", help="Hugging Face model directory")
    sp.add_argument("--out", required=True, help="output directory: grams.safetensors, moments.safetensors, stats.json")
    _add_data_options(sp)
    sp.add_argument("--no-grams", action="store_true", help="moments only")
    sp.add_argument("--gram-layers", nargs="+", default=None, metavar="PATTERN",
                    help="glob patterns of nn.Linear modules to collect Grams for (default: all)")  # fmt: skip
    sp.add_argument("--gram-dtype", choices=["float32", "float64"], default="float32",
                    help="dtype of the stored Grams (accumulation is fp64 on CPU)")  # fmt: skip
    sp.set_defaults(fn=cmd_stats)

    tact = sub.add_parser("tact", help="TACT: per-task activation corrections of a merged model")
    tsub = tact.add_subparsers(dest="tact_cmd", required=True)
    sp = tsub.add_parser("compute", help="corrections of MERGED towards EXPERT on the task's data")
    sp.add_argument("--expert", required=True, help="the task's expert (model directory)")
    sp.add_argument("--merged", required=True, help="the merged model directory")
    sp.add_argument("--task", default=None, help="task name (default: the expert directory's name)")
    sp.add_argument("--out", required=True, help="writes OUT/corrections/TASK.safetensors (and OUT/TASK/ with --fold)")
    sp.add_argument("--eps", type=float, default=1e-6, help="added to the merged variance (default 1e-6)")
    sp.add_argument("--fold", action="store_true",
                    help="also write OUT/TASK/, the merged model with the corrections folded into its weights")  # fmt: skip
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


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raymerge", description="Out-of-core merging of fine-tuned models.")
    p.add_argument("--version", action="version", version=f"raymerge {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="recipe YAML (mergekit schema + raymerge keys)")
        sp.add_argument(
            "--out-shard-size",
            type=parse_size,
            default=DEFAULT_SHARD_BYTES,
            help="bytes per output shard (default 5GiB)",
        )
        sp.add_argument(
            "--memory-budget",
            type=parse_size,
            default=None,
            help="host memory for running tasks (default: half the available RAM)",
        )
        sp.add_argument(
            "--allow-pickle",
            action="store_true",
            help="read pytorch_model*.bin checkpoints with torch.load(weights_only=True) "
            "(same as `allow_pickle_bin: true` under `raymerge:`)",
        )

    sp = sub.add_parser("plan", help="validate a recipe against checkpoint headers and print the plan")
    common(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output, with every task")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("run", help="run a merge into OUT (resumes an interrupted run of the same plan)")
    common(sp)
    sp.add_argument("out", help="output model directory (published atomically)")
    sp.add_argument("--executor", choices=["local", "ray"], default="local", help="where tasks run")
    sp.add_argument(
        "--address", default=None, help="Ray cluster to join (auto | HOST:PORT); default: embedded local Ray"
    )
    sp.add_argument("--workers", type=int, default=None, help="concurrent tasks (default: min(4, cores))")
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="compute device")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("submit", help="run a merge on a Ray cluster as a job (Ray Jobs API); streams its logs")
    common(sp)
    sp.add_argument("--out", required=True, help="output model directory, on storage every node mounts")
    sp.add_argument(
        "--address", default=None, help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)"
    )
    sp.add_argument("--workers", type=int, default=None, help="concurrent tasks per node (default: min(4, cores))")
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="compute device")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    sp.add_argument("--job-id", default=None, help="submission id for the job (default: chosen by Ray)")
    sp.add_argument("--no-wait", action="store_true", help="print the job id and return without streaming logs")
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("methods", help="list the merge methods, or one method's parameters, defaults and ranges")
    sp.add_argument("name", nargs="?", default=None, help="a method name (e.g. ties)")
    sp.set_defaults(fn=cmd_methods)

    sp = sub.add_parser("verify", help="recheck a merged model: index, headers, receipts' checksums, finiteness")
    sp.add_argument("model", help="model directory or URL (s3://, gs://, https://, …) written by raymerge run")
    sp.set_defaults(fn=cmd_verify)

    sp = sub.add_parser("demo", help="build small checkpoints, merge them, print the figures")
    sp.add_argument("--workdir", default=None, help="where to build (default: a temp dir)")
    sp.add_argument("--size", default="small", choices=["tiny", "small", "1b"], help="synthetic model size")
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("align", help="permute MODEL's hidden units into REFERENCE's basis (weight matching)")
    sp.add_argument("--reference", required=True, help="model A, whose unit order is kept")
    sp.add_argument("--model", required=True, help="model B, permuted to match A (its function is unchanged)")
    sp.add_argument("--out", required=True, help="output directory for the permuted model B")
    sp.add_argument(
        "--also", action="append", type=_also_pair, default=[], metavar="EXPERT_DIR:OUT_DIR",
        help="an expert fine-tuned from MODEL, written with the same permutation (repeatable)",
    )  # fmt: skip
    sp.add_argument("--no-heads", action="store_true", help="permute MLP hidden units only, not attention heads")
    sp.add_argument("--max-iter", type=int, default=100, help="coordinate-descent passes at most (default 100)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the order permutations are visited in")
    sp.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=cmd_align)
    add_data_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.fn(args))
    except RaymergeError as exc:
        print(f"raymerge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("raymerge: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
